/* Board rv32-qemu: QEMU virt, rv32imf, bare metal in M-mode. The counters are the machine-mode CSRs
 * (mcycle/minstret); run QEMU with `-icount shift=0` so that minstret counts retired instructions (without
 * icount both CSRs return host time stamps). QEMU has no timing model: with icount, cycles == instructions. */
#ifndef EF_BOARD_H
#define EF_BOARD_H

#include <stdint.h>

#define EF_BOARD_NAME "rv32-qemu"

#define EF_READ_CSR64(lo_csr, hi_csr)                                          \
    ({                                                                         \
        uint32_t hi_, lo_, hi2_;                                               \
        do {                                                                   \
            __asm__ volatile("csrr %0, " hi_csr : "=r"(hi_));                  \
            __asm__ volatile("csrr %0, " lo_csr : "=r"(lo_));                  \
            __asm__ volatile("csrr %0, " hi_csr : "=r"(hi2_));                 \
        } while (hi_ != hi2_);                                                 \
        ((uint64_t)hi_ << 32) | lo_;                                           \
    })

static inline uint64_t ef_board_cycles(void) { return EF_READ_CSR64("mcycle", "mcycleh"); }
static inline uint64_t ef_board_instructions(void) { return EF_READ_CSR64("minstret", "minstreth"); }

#endif /* EF_BOARD_H */
