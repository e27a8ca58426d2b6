/* The cluster DMA (MCHAN) and RedMulE register code both pulp HALs share: the bare-metal one (hal/pulp, board
 * siracusa on GVSoC) and the pmsis one (hal/pulp_pmsis, boards built by the PULP SDK). Included once by each, after
 * ef_hal.h and ef_hal_pulp_regs.h, with three hooks defined first:
 *
 *   EF_HAL_MCHAN_EVENT_BITS   extra MCHAN command bits (the pmsis HAL asks for an end-of-transfer event)
 *   EF_HAL_IDLE_DMA()         what the waiting core does while a transfer runs (spin, or sleep on the event unit)
 *   EF_HAL_IDLE_REDMULE()     the same while RedMulE computes
 *
 * It defines the HAL's DMA functions and ef_hal_redmule_start / ef_hal_redmule_wait (RedMulE's HWPE register
 * file, FP32 format). Register offsets and their sources: ef_hal_pulp_regs.h. */
#ifndef EF_HAL_PULP_MCHAN_H
#define EF_HAL_PULP_MCHAN_H

#include <stdint.h>

#include "ef_hal.h"
#include "ef_hal_pulp_regs.h"

#define EF_HAL_COMPILER_BARRIER() __asm__ __volatile__("" : : : "memory")

static inline void ef_hal_reg_write(uint32_t addr, uint32_t value) { *(volatile uint32_t *)(uintptr_t)addr = value; }
static inline uint32_t ef_hal_reg_read(uint32_t addr) { return *(volatile uint32_t *)(uintptr_t)addr; }

/* ---- DMA (MCHAN) ---------------------------------------------------------------------------------------- */
static uint32_t mchan_cmd(uint32_t bytes, int to_l1, int two_d) {
    return (bytes << EF_MCHAN_CMD_LEN_BIT) | ((uint32_t)(to_l1 != 0) << EF_MCHAN_CMD_TYPE_BIT) |
           (1u << EF_MCHAN_CMD_INC_BIT) | ((uint32_t)(two_d != 0) << EF_MCHAN_CMD_2D_EXT_BIT) | EF_HAL_MCHAN_EVENT_BITS;
}

static void push_1d(uint32_t l1, uint32_t l2, uint32_t bytes, int to_l1) {
    while (bytes > 0) {
        const uint32_t chunk = bytes > EF_MCHAN_MAX_BYTES ? EF_MCHAN_MAX_BYTES : bytes;
        ef_hal_reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, mchan_cmd(chunk, to_l1, 0));
        ef_hal_reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, l1);
        ef_hal_reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, l2);
        l1 += chunk, l2 += chunk, bytes -= chunk;
    }
}

/* One transfer counter for every command of the copy (the counter read from CMD counts what follows). */
static ef_hal_dma_t dma_start(uint32_t l1, uint32_t l2, uint32_t row_bytes, uint32_t rows, uint32_t l2_stride,
                              int to_l1) {
    EF_HAL_COMPILER_BARRIER();   /* the data the DMA reads must be stored before the command goes out */
    const uint32_t tid = ef_hal_reg_read(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD);
    if (rows <= 1 || l2_stride == row_bytes) {
        push_1d(l1, l2, row_bytes * rows, to_l1);
    } else if (row_bytes <= EF_MCHAN_MAX_BYTES && l2_stride <= EF_MCHAN_MAX_BYTES) {
        const uint32_t rows_per_cmd = EF_MCHAN_MAX_BYTES / row_bytes;   /* >= 1 */
        for (uint32_t r = 0; r < rows; r += rows_per_cmd) {
            const uint32_t n = rows - r < rows_per_cmd ? rows - r : rows_per_cmd;
            ef_hal_reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, mchan_cmd(n * row_bytes, to_l1, 1));
            ef_hal_reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, l1 + r * row_bytes);
            ef_hal_reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, l2 + r * l2_stride);
            ef_hal_reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, row_bytes);   /* 2-D: bytes per row, then the stride */
            ef_hal_reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, l2_stride);
        }
    } else {                                                            /* rows or strides past 16 bits */
        for (uint32_t r = 0; r < rows; r++) push_1d(l1 + r * row_bytes, l2 + r * l2_stride, row_bytes, to_l1);
    }
    return tid;
}

ef_hal_dma_t ef_hal_dma_in(void *l1, const void *l2, uint32_t bytes) {
    return dma_start((uint32_t)(uintptr_t)l1, (uint32_t)(uintptr_t)l2, bytes, 1, bytes, 1);
}

ef_hal_dma_t ef_hal_dma_out(void *l2, const void *l1, uint32_t bytes) {
    return dma_start((uint32_t)(uintptr_t)l1, (uint32_t)(uintptr_t)l2, bytes, 1, bytes, 0);
}

ef_hal_dma_t ef_hal_dma_in_2d(void *l1, const void *l2, uint32_t row_bytes, uint32_t rows, uint32_t l2_stride_bytes) {
    return dma_start((uint32_t)(uintptr_t)l1, (uint32_t)(uintptr_t)l2, row_bytes, rows, l2_stride_bytes, 1);
}

ef_hal_dma_t ef_hal_dma_out_2d(void *l2, const void *l1, uint32_t row_bytes, uint32_t rows,
                               uint32_t l2_stride_bytes) {
    return dma_start((uint32_t)(uintptr_t)l1, (uint32_t)(uintptr_t)l2, row_bytes, rows, l2_stride_bytes, 0);
}

void ef_hal_dma_wait(ef_hal_dma_t transfer) {
    const uint32_t bit = 1u << (transfer & 0x1Fu);
    while (ef_hal_reg_read(EF_PULP_MCHAN_ADDR + EF_MCHAN_STATUS) & bit) EF_HAL_IDLE_DMA();
    ef_hal_reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_STATUS, bit);   /* free the counter */
    EF_HAL_COMPILER_BARRIER();
}

/* ---- RedMulE ------------------------------------------------------------------------------------------- */
#ifdef EF_HAL_REDMULE
static inline void redmule_write(uint32_t offset, uint32_t value) { ef_hal_reg_write(EF_REDMULE_BASE + offset, value); }

void ef_hal_redmule_start(const ef_hal_redmule_job_t *job) {
    uint32_t op = EF_REDMULE_OP_MATMUL;
    if (job->y) {
        if (job->y != job->z) {   /* on this core: accumulation (y == z) is the case ef_hal_gemm uses */
            const uint32_t count = (uint32_t)job->m * job->k;
            for (uint32_t i = 0; i < count; i++) job->z[i] = job->y[i];
        }
        op = EF_REDMULE_OP_GEMM;   /* Y is read from Z's address */
    }
    while ((int32_t)ef_hal_reg_read(EF_REDMULE_BASE + EF_REDMULE_ACQUIRE) < 0) {
    }
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_X_PTR, (uint32_t)(uintptr_t)job->x);
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_W_PTR, (uint32_t)(uintptr_t)job->w);
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_Z_PTR, (uint32_t)(uintptr_t)job->z);
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_MCFG0, ((uint32_t)job->k << 16) | job->m);
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_MCFG1, job->n);
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_ARITH,
                  (op << EF_REDMULE_OP_BIT) | (EF_REDMULE_FMT_FP32 << EF_REDMULE_FMT_BIT));
    EF_HAL_COMPILER_BARRIER();   /* operands stored in L1 before the trigger */
    redmule_write(EF_REDMULE_TRIGGER, 0);
}

void ef_hal_redmule_wait(void) {
    while (ef_hal_reg_read(EF_REDMULE_BASE + EF_REDMULE_STATUS) != 0) EF_HAL_IDLE_REDMULE();
    EF_HAL_COMPILER_BARRIER();
}
#endif

#endif /* EF_HAL_PULP_MCHAN_H */
