/* Boards built by the PULP SDK for Siracusa (siracusa-serial): the PULP runtime (pmsis) on the fabric controller
 * and the 8-core cluster; counters from the cluster's performance counters (pmsis pi_perf_*). The bare-metal
 * siracusa board for GVSoC has its own folder (boards/siracusa). */
#ifndef EF_BOARD_H
#define EF_BOARD_H

#define EF_BOARD_NAME "siracusa"
#define EF_SIRACUSA_MASTER_STACK_BYTES 4096   /* cluster core 0: runs the program (kernels keep small stacks) */
#define EF_SIRACUSA_WORKER_STACK_BYTES 1024   /* cores 1-7: transposes and epilogues of ef_hal_gemm */

#endif /* EF_BOARD_H */
