/* Board siracusa: the PULP SDK's Siracusa target (fabric controller + 8-core cluster with RedMulE). The firmware
 * entry is boards/siracusa/main.c; counters come from the cluster's performance counters (pmsis pi_perf_*). */
#ifndef EF_BOARD_H
#define EF_BOARD_H

#define EF_BOARD_NAME "siracusa"
#define EF_SIRACUSA_MASTER_STACK_BYTES 4096   /* cluster core 0: runs the program (kernels keep small stacks) */
#define EF_SIRACUSA_WORKER_STACK_BYTES 1024   /* cores 1-7: transposes and epilogues of ef_hal_gemm */

#endif /* EF_BOARD_H */
