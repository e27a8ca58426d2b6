/* Board siracusa, fabric controller side (built for rv32imc: the FC has no FPU): start the 8 cluster cores at
 * the reset entry, wait until cluster core 0 posts the job's exit code, end the simulation with it. */
#include <stdint.h>

#include "ef_board.h"
#include "ef_siracusa.h"

extern void _start(void);

static inline void reg_write(uint32_t addr, uint32_t value) { *(volatile uint32_t *)(uintptr_t)addr = value; }

void ef_fc_main(void) {
    for (uint32_t i = 0; i < EF_SIRACUSA_CORES; i++)
        reg_write(EF_SIRACUSA_CLUSTER_CTRL + EF_SIRACUSA_BOOT_ADDR(i), (uint32_t)(uintptr_t)&_start);
    reg_write(EF_SIRACUSA_CLUSTER_CTRL + EF_SIRACUSA_FETCH_ENABLE, (1u << EF_SIRACUSA_CORES) - 1u);
    while (ef_siracusa_done == 0) {
    }
    reg_write(EF_SIRACUSA_EXIT_REG, 0x80000000u | (ef_siracusa_done & 0xffu));
    for (;;) {
    }
}
