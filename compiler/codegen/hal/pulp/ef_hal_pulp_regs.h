/* Register map the pulp HAL programs, for the PULP cluster of Siracusa. Every value names where it was read;
 * the code in ef_hal_pulp.c is this project's own. Addresses are as seen from a cluster core.
 *
 * Sources (public repositories, read for the offsets only):
 *   [SDK-MAP]  pulp-platform/pulp-sdk rtos/pulpos/pulp_archi/include/archi/chips/siracusa/memory_map.h
 *   [SDK-PROP] pulp-platform/pulp-sdk rtos/pulpos/pulp_archi/include/archi/chips/siracusa/properties.h
 *   [EU]       pulp-platform/pulp-runtime include/archi/eu/eu_v3.h (event unit; also in pulp-sdk pulp_archi)
 *   [MCHAN]    pulp-platform/pulp-runtime include/archi/dma/mchan_v7.h, include/hal/dma/mchan_v7.h
 *              (MCHAN_VERSION 7 on Siracusa per [SDK-PROP])
 *   [RM]       pulp-platform/redmule sw/archi_redmule.h and rtl/redmule_tiler.sv (master, commit 51cd064):
 *              the HWPE register file of the hardware-tiler RedMulE
 *   [RM-FP32]  pulp-platform/redmule branch ab/fp32 (fc21ffe, "Make fp32 work"): rtl/redmule_pkg.sv gemm_fmt_e
 *   [RM-SDK]   pulp-platform/pulp-sdk tests/redmule/gemm/archi_redmule.h, redmule_test.c: RedMulE in the PULP
 *              cluster at 0x10201000, completion on cluster event 12
 */
#ifndef EF_HAL_PULP_REGS_H
#define EF_HAL_PULP_REGS_H

/* ---- cluster peripherals [SDK-MAP] -------------------------------------------------------------------- */
#define EF_PULP_CLUSTER_GLOBAL_BASE 0x10000000u    /* ARCHI_CLUSTER_GLOBAL_ADDR(0) */
#define EF_PULP_CLUSTER_PERIPH_OFFSET 0x00200000u  /* ARCHI_CLUSTER_PERIPHERALS_OFFSET */
#define EF_PULP_HWPE_OFFSET 0x00001000u            /* ARCHI_HWCE_OFFSET: the accelerator slot */
#define EF_PULP_MCHAN_OFFSET 0x00001800u           /* ARCHI_MCHAN_EXT_OFFSET */
#define EF_PULP_EU_DEMUX_ADDR 0x00204000u          /* ARCHI_DEMUX_PERIPHERALS_OFFSET + ARCHI_EU_DEMUX_OFFSET (per core) */
#define EF_PULP_MCHAN_ADDR (EF_PULP_CLUSTER_GLOBAL_BASE + EF_PULP_CLUSTER_PERIPH_OFFSET + EF_PULP_MCHAN_OFFSET)
/* 0x10201800, as in GVSoC's pulp/chips/siracusa/cluster.json (peripherals/dma, mchan version 7) */

/* ---- cluster events [SDK-PROP] ------------------------------------------------------------------------------ */
#define EF_PULP_EVT_DMA0 8u                        /* ARCHI_CL_EVT_DMA0 */
#define EF_PULP_EVT_ACC0 12u                       /* ARCHI_CL_EVT_ACC0 (REDMULE_EVT0 in [RM-SDK]) */

/* ---- event unit, core demux area [EU] ------------------------------------------------------------------------ */
#define EF_EU_CORE_MASK_AND 0x04u                  /* clear bits of the event mask */
#define EF_EU_CORE_MASK_OR 0x08u                   /* set bits of the event mask */
#define EF_EU_CORE_EVENT_WAIT_CLEAR 0x3Cu          /* read: sleep until a masked event, then clear the buffer */
#define EF_EU_BARRIER_DEMUX_OFFSET 0x200u          /* hardware barriers, EU_BARRIER_SIZE = 0x20 apart */
#define EF_EU_HW_BARR_TRIGGER_WAIT_CLEAR 0x1Cu     /* read: arrive at the barrier, sleep until all arrived */

/* ---- MCHAN cluster DMA [MCHAN] ---------------------------------------------------------------------------- */
#define EF_MCHAN_CMD 0x0u          /* read: allocate a transfer counter (TID); write: push command words */
#define EF_MCHAN_STATUS 0x4u       /* read: bit i = counter i busy; write 1 << i: free counter i */
#define EF_MCHAN_CMD_LEN_BIT 0     /* 17 bits: bytes of the command (all rows of a 2-D command) */
#define EF_MCHAN_CMD_TYPE_BIT 17   /* 1: external (L2) to TCDM (L1); 0: TCDM to external */
#define EF_MCHAN_CMD_INC_BIT 18    /* 1: incrementing addresses */
#define EF_MCHAN_CMD_2D_EXT_BIT 19 /* 1: 2-D on the external side; two more words follow: row bytes, stride */
#define EF_MCHAN_CMD_ELE_BIT 20    /* 1: event at the end of the transfer */
#define EF_MCHAN_CMD_BLE_BIT 22    /* 1: the event goes to every core (the runtime's PLP_DMA_SHARED) */
/* the runtime's plp_dma_* calls take 16-bit sizes, row lengths and strides; this HAL keeps within them */
#define EF_MCHAN_MAX_BYTES 0xFFFFu

/* ---- RedMulE HWPE register file [RM], at the accelerator slot [RM-SDK] --------------------------------------- */
#define EF_REDMULE_BASE (EF_PULP_CLUSTER_GLOBAL_BASE + EF_PULP_CLUSTER_PERIPH_OFFSET + EF_PULP_HWPE_OFFSET) /* 0x10201000 */
#define EF_REDMULE_TRIGGER 0x00u     /* write 0: commit and start the programmed job */
#define EF_REDMULE_ACQUIRE 0x04u     /* read: a job slot id (>= 0) or a negative value while busy */
#define EF_REDMULE_STATUS 0x0Cu      /* read: non-zero while a job runs */
#define EF_REDMULE_SOFT_CLEAR 0x14u  /* write: reset the accelerator's state */
#define EF_REDMULE_JOB 0x40u         /* job registers start here */
#define EF_REDMULE_X_PTR 0x00u
#define EF_REDMULE_W_PTR 0x04u
#define EF_REDMULE_Z_PTR 0x08u       /* Z, and Y for the GEMM op: the hardware reads Y at Z's address */
#define EF_REDMULE_MCFG0 0x0Cu       /* [31:16] K (columns of W), [15:0] M (rows of X) */
#define EF_REDMULE_MCFG1 0x10u       /* [15:0] N (columns of X = rows of W) */
#define EF_REDMULE_ARITH 0x14u       /* [12:10] operation, [9:7] format */
#define EF_REDMULE_OP_BIT 10
#define EF_REDMULE_FMT_BIT 7
#define EF_REDMULE_OP_MATMUL 0x0u    /* Z = X W */
#define EF_REDMULE_OP_GEMM 0x1u      /* Z = X W + Y */
#define EF_REDMULE_FMT_FP32 0x4u     /* Float32 [RM-FP32]; master's formats stop at Float16Alt = 0x3 */

#endif /* EF_HAL_PULP_REGS_H */
