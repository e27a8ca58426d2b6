/* Board siracusa: bare metal on Siracusa's fabric controller (FC) and its 8-core cluster, as GVSoC's `siracusa`
 * target models them (docs/codegen.md, "The siracusa board"). Addresses from GVSoC's pulp/chips/siracusa model
 * (soc.json, cluster.json) and the PULP SDK's archi headers. */
#ifndef EF_BOARD_H
#define EF_BOARD_H

#include <stdint.h>

#define EF_BOARD_NAME "siracusa"
#define EF_SIRACUSA_CORES 8u                       /* cluster cores that run the program (core 8 is not started) */
#define EF_SIRACUSA_FC_CLUSTER 31u                 /* mhartid >> 5 on the FC */
#define EF_SIRACUSA_CLUSTER_CTRL 0x10200000u       /* cluster control unit */
#define EF_SIRACUSA_FETCH_ENABLE 0x08u             /* bit i: core i fetches */
#define EF_SIRACUSA_BOOT_ADDR(i) (0x40u + 4u * (i)) /* core i's boot address */
#define EF_SIRACUSA_STDOUT 0x1A10F000u             /* + (cluster << 7) + (core << 3): one character per write */
#define EF_SIRACUSA_EXIT_REG 0x1A1040A0u           /* apb_soc_ctrl: write 0x80000000 | code to end the simulation */

static inline uint32_t ef_board_hartid(void) {
    uint32_t id;
    __asm__ volatile("csrr %0, mhartid" : "=r"(id));
    return id;
}

/* mcycle counts the clock of the reading core's domain (cluster cores: the cluster clock); 32 bits only
 * (GVSoC does not implement mcycleh), so one step must stay below 2^32 cycles. */
static inline uint32_t ef_board_cycles32(void) {
    uint32_t c;
    __asm__ volatile("csrr %0, mcycle" : "=r"(c));
    return c;
}

/* PULP performance counter 1 (PCCR1, CSR 0x781): instructions retired, once PCER/PCMR enable it. */
static inline uint32_t ef_board_instructions32(void) {
    uint32_t c;
    __asm__ volatile("csrr %0, 0x781" : "=r"(c));
    return c;
}

static inline void ef_board_counters_start(void) {
    __asm__ volatile("csrw 0xCC0, %0" ::"r"(0x3u));   /* PCER: cycles, instructions */
    __asm__ volatile("csrw 0xCC1, %0" ::"r"(0x1u));   /* PCMR: counters on */
}

static inline void ef_board_putc(char c) {
    const uint32_t id = ef_board_hartid();
    const uint32_t addr = EF_SIRACUSA_STDOUT + (((id >> 5) & 0x3fu) << 7) + ((id & 0x1fu) << 3);
    *(volatile uint32_t *)(uintptr_t)addr = (uint32_t)(uint8_t)c;
}

#endif /* EF_BOARD_H */
