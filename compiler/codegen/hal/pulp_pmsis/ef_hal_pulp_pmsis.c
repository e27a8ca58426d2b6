/* The pmsis pulp HAL: ef_hal.h on the PULP cluster of Siracusa through the PULP runtime (8 cores, MCHAN cluster DMA,
 * RedMulE in the HWPE slot), for boards built by the PULP SDK (siracusa-serial). The bare-metal one for GVSoC is
 * hal/pulp; both share hal/pulp/ef_hal_pulp_regs.h (copied beside this file by compiler/codegen/pulp_sdk.py).
 *
 *   fork, core id, team size, L1 pool, cycle counter   the PULP runtime's pmsis API (pulp-sdk)
 *   barrier, event waits                                 event-unit registers (core demux area)
 *   DMA                                                  MCHAN command/status registers
 *   RedMulE                                              its HWPE register file, FP32 format
 * Register offsets and their sources: ef_hal_pulp_regs.h.
 *
 * Runs on the cluster: ef_hal_init() and every DMA / RedMulE call come from the core that runs the program
 * (the cluster task's core 0), so no lock guards the DMA command FIFO or the accelerator.
 *
 * Not run here: it builds only with the PULP SDK (`build_elf(..., board="siracusa-serial")`); the test suite
 * type-checks it with riscv64-unknown-elf-gcc against the pmsis declarations below.
 */
#include <stddef.h>
#include <stdint.h>

#include "ef_hal.h"
#include "ef_hal_pulp_regs.h"

#if defined(__has_include)
#if __has_include(<pmsis.h>)
#include <pmsis.h>
#define EF_HAL_HAVE_PMSIS 1
#endif
#endif

#ifndef EF_HAL_HAVE_PMSIS
/* The pmsis entry points used here, declared as pulp-sdk's rtos/pmsis/pmsis_api headers declare them
 * (cluster_team/cl_team.h, rtos/malloc/cl_l1_malloc.h, drivers/perf.h, chips/default.h), so that this file
 * type-checks without the SDK. With the SDK, <pmsis.h> above provides the real ones. */
struct pi_device;
void pi_cl_team_fork(int nb_cores, void (*entry)(void *), void *arg);
int pi_cl_team_nb_cores(void);
int pi_cl_cluster_nb_cores(void);
uint32_t pi_core_id(void);
void *pi_cl_l1_malloc(struct pi_device *device, uint32_t size);
void pi_cl_l1_free(struct pi_device *device, void *chunk, uint32_t size);
void pi_perf_conf(unsigned events);
void pi_perf_reset(void);
void pi_perf_start(void);
unsigned int pi_perf_read(int id);
#define PI_PERF_CYCLES 17
#endif

#ifndef EF_HAL_L1_BYTES
#define EF_HAL_L1_BYTES (160u * 1024u)   /* of Siracusa's 256 KiB TCDM; the rest: stacks and runtime data */
#endif
#define EF_HAL_L1_MIN_BYTES (16u * 1024u)
#define L1_ALIGN_BYTES 16u

#define COMPILER_BARRIER() __asm__ __volatile__("" : : : "memory")

static inline void reg_write(uint32_t addr, uint32_t value) { *(volatile uint32_t *)(uintptr_t)addr = value; }
static inline uint32_t reg_read(uint32_t addr) { return *(volatile uint32_t *)(uintptr_t)addr; }

/* Sleep until `event` arrives (or has arrived: the event unit buffers it), then clear the buffer. */
static void eu_wait_event(uint32_t event) {
    reg_write(EF_PULP_EU_DEMUX_ADDR + EF_EU_CORE_MASK_OR, 1u << event);
    (void)reg_read(EF_PULP_EU_DEMUX_ADDR + EF_EU_CORE_EVENT_WAIT_CLEAR);
    reg_write(EF_PULP_EU_DEMUX_ADDR + EF_EU_CORE_MASK_AND, 1u << event);
}

/* ---- life cycle, L1 pool, cycles ---------------------------------------------------------------------- */
static uint8_t *l1_pool;
static uint32_t l1_pool_bytes, l1_top;
static uint32_t cycles_last, cycles_high;

int ef_hal_init(void) {
    if (l1_pool) return 0;
    for (uint32_t bytes = EF_HAL_L1_BYTES; bytes >= EF_HAL_L1_MIN_BYTES; bytes /= 2) {
        l1_pool = (uint8_t *)pi_cl_l1_malloc(NULL, bytes);
        if (l1_pool) {
            l1_pool_bytes = bytes;
            break;
        }
    }
    if (!l1_pool) return -1;
    l1_top = (uint32_t)(-(uintptr_t)l1_pool & (L1_ALIGN_BYTES - 1));
    reg_write(EF_REDMULE_BASE + EF_REDMULE_SOFT_CLEAR, 0);
    pi_perf_conf(1u << PI_PERF_CYCLES);
    pi_perf_reset();
    pi_perf_start();
    return 0;
}

uint64_t ef_hal_cycles(void) {
    const uint32_t now = pi_perf_read(PI_PERF_CYCLES);   /* 32 bits: widened here, read often enough */
    if (now < cycles_last) cycles_high++;
    cycles_last = now;
    return ((uint64_t)cycles_high << 32) | now;
}

void *ef_hal_l1_alloc(uint32_t bytes) {
    const uint32_t size = (bytes + L1_ALIGN_BYTES - 1) & ~(L1_ALIGN_BYTES - 1);
    if (!l1_pool || size < bytes || size > l1_pool_bytes - l1_top) return NULL;
    void *p = l1_pool + l1_top;
    l1_top += size;
    return p;
}

uint32_t ef_hal_l1_mark(void) { return l1_top; }

void ef_hal_l1_release(uint32_t mark) {
    if (mark <= l1_top) l1_top = mark;
}

uint32_t ef_hal_l1_free_bytes(void) { return l1_pool ? l1_pool_bytes - l1_top : 0; }

/* ---- cluster ------------------------------------------------------------------------------------------ */
int ef_hal_cores(void) { return pi_cl_cluster_nb_cores(); }

void ef_hal_fork(int cores, ef_hal_task_t task, void *arg) {
    const int all = ef_hal_cores();
    pi_cl_team_fork(cores <= 0 || cores > all ? all : cores, task, arg);  /* configures barrier 0 for the team */
}

int ef_hal_core_id(void) { return (int)pi_core_id(); }

int ef_hal_team_size(void) { return pi_cl_team_nb_cores(); }

void ef_hal_barrier(void) {
    COMPILER_BARRIER();
    (void)reg_read(EF_PULP_EU_DEMUX_ADDR + EF_EU_BARRIER_DEMUX_OFFSET + EF_EU_HW_BARR_TRIGGER_WAIT_CLEAR);
    COMPILER_BARRIER();
}

/* ---- DMA (MCHAN) ---------------------------------------------------------------------------------------- */
static uint32_t mchan_cmd(uint32_t bytes, int to_l1, int two_d) {
    return (bytes << EF_MCHAN_CMD_LEN_BIT) | ((uint32_t)(to_l1 != 0) << EF_MCHAN_CMD_TYPE_BIT) |
           (1u << EF_MCHAN_CMD_INC_BIT) | ((uint32_t)(two_d != 0) << EF_MCHAN_CMD_2D_EXT_BIT) |
           (1u << EF_MCHAN_CMD_ELE_BIT) | (1u << EF_MCHAN_CMD_BLE_BIT);
}

static void push_1d(uint32_t l1, uint32_t l2, uint32_t bytes, int to_l1) {
    while (bytes > 0) {
        const uint32_t chunk = bytes > EF_MCHAN_MAX_BYTES ? EF_MCHAN_MAX_BYTES : bytes;
        reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, mchan_cmd(chunk, to_l1, 0));
        reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, l1);
        reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, l2);
        l1 += chunk, l2 += chunk, bytes -= chunk;
    }
}

/* One transfer counter for every command of the copy (the counter read from CMD counts what follows). */
static ef_hal_dma_t dma_start(uint32_t l1, uint32_t l2, uint32_t row_bytes, uint32_t rows, uint32_t l2_stride,
                              int to_l1) {
    COMPILER_BARRIER();   /* the data the DMA reads must be stored before the command goes out */
    const uint32_t tid = reg_read(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD);
    if (rows <= 1 || l2_stride == row_bytes) {
        push_1d(l1, l2, row_bytes * rows, to_l1);
    } else if (row_bytes <= EF_MCHAN_MAX_BYTES && l2_stride <= EF_MCHAN_MAX_BYTES) {
        const uint32_t rows_per_cmd = EF_MCHAN_MAX_BYTES / row_bytes;   /* >= 1 */
        for (uint32_t r = 0; r < rows; r += rows_per_cmd) {
            const uint32_t n = rows - r < rows_per_cmd ? rows - r : rows_per_cmd;
            reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, mchan_cmd(n * row_bytes, to_l1, 1));
            reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, l1 + r * row_bytes);
            reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, l2 + r * l2_stride);
            reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, row_bytes);   /* 2-D: bytes per row, then the stride */
            reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_CMD, l2_stride);
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
    while (reg_read(EF_PULP_MCHAN_ADDR + EF_MCHAN_STATUS) & bit) eu_wait_event(EF_PULP_EVT_DMA0);
    reg_write(EF_PULP_MCHAN_ADDR + EF_MCHAN_STATUS, bit);   /* free the counter */
    COMPILER_BARRIER();
}

/* ---- RedMulE ------------------------------------------------------------------------------------------- */
static inline void redmule_write(uint32_t offset, uint32_t value) { reg_write(EF_REDMULE_BASE + offset, value); }

void ef_hal_redmule_start(const ef_hal_redmule_job_t *job) {
    uint32_t op = EF_REDMULE_OP_MATMUL;
    if (job->y) {
        if (job->y != job->z) {   /* on this core: accumulation (y == z) is the case ef_hal_gemm uses */
            const uint32_t count = (uint32_t)job->m * job->k;
            for (uint32_t i = 0; i < count; i++) job->z[i] = job->y[i];
        }
        op = EF_REDMULE_OP_GEMM;   /* Y is read from Z's address */
    }
    while ((int32_t)reg_read(EF_REDMULE_BASE + EF_REDMULE_ACQUIRE) < 0) {
    }
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_X_PTR, (uint32_t)(uintptr_t)job->x);
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_W_PTR, (uint32_t)(uintptr_t)job->w);
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_Z_PTR, (uint32_t)(uintptr_t)job->z);
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_MCFG0, ((uint32_t)job->k << 16) | job->m);
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_MCFG1, job->n);
    redmule_write(EF_REDMULE_JOB + EF_REDMULE_ARITH,
                  (op << EF_REDMULE_OP_BIT) | (EF_REDMULE_FMT_FP32 << EF_REDMULE_FMT_BIT));
    COMPILER_BARRIER();   /* operands stored in L1 before the trigger */
    redmule_write(EF_REDMULE_TRIGGER, 0);
}

void ef_hal_redmule_wait(void) {
    while (reg_read(EF_REDMULE_BASE + EF_REDMULE_STATUS) != 0) eu_wait_event(EF_PULP_EVT_ACC0);
    COMPILER_BARRIER();
}
