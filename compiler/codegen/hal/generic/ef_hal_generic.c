/* The generic HAL: ef_hal.h for any C target, single-threaded (the host and rv32-qemu boards).
 *
 *   fork      the team's cores run one after another on the calling thread (EF_HAL_GENERIC_CORES, default 1);
 *             a barrier inside a team of more than one core cannot be honoured that way and aborts
 *   DMA       memcpy, done when started; handles are counted so that waits can be checked
 *   RedMulE   a C loop with the hardware's semantics (Z = X W [+ Y]), summing over n in order
 *   L1        a static pool of EF_HAL_L1_BYTES (default 64 KiB)
 *   cycles    mcycle on RISC-V (bare metal, M-mode), the time stamp counter on x86, else 0
 *
 * ef_hal_generic_stats() reports what went through the HAL (tests check that the tiled path really ran).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ef_hal.h"
#include "ef_hal_generic.h"

#ifndef EF_HAL_GENERIC_CORES
#define EF_HAL_GENERIC_CORES 1
#endif
#ifndef EF_HAL_L1_BYTES
#define EF_HAL_L1_BYTES (64u * 1024u)
#endif
#define L1_ALIGN_BYTES 16u

static uint8_t l1_pool[EF_HAL_L1_BYTES] __attribute__((aligned(16)));
static uint32_t l1_top;
static int team_size = 1, core_id;
static ef_hal_generic_stats_t stats;
static const ef_hal_redmule_job_t *pending_job;

static void fail(const char *what) {
    printf("edgefleet hal: %s\n", what);
    exit(1);
}

int ef_hal_init(void) { return 0; }

/* ---- cluster ------------------------------------------------------------------------------------------ */
int ef_hal_cores(void) { return EF_HAL_GENERIC_CORES; }

void ef_hal_fork(int cores, ef_hal_task_t task, void *arg) {
    if (team_size != 1) fail("nested ef_hal_fork");
    if (cores <= 0 || cores > EF_HAL_GENERIC_CORES) cores = EF_HAL_GENERIC_CORES;
    stats.forks++;
    team_size = cores;
    for (core_id = 0; core_id < cores; core_id++) task(arg);
    team_size = 1;
    core_id = 0;
}

int ef_hal_core_id(void) { return core_id; }

int ef_hal_team_size(void) { return team_size; }

void ef_hal_barrier(void) {
    if (team_size > 1) fail("ef_hal_barrier in a team of more than one core: the generic HAL runs cores in turn");
}

/* ---- DMA ------------------------------------------------------------------------------------------------- */
static ef_hal_dma_t next_transfer = 1;

static ef_hal_dma_t copy_rows(uint8_t *dst, const uint8_t *src, uint32_t row_bytes, uint32_t rows,
                              uint32_t dst_stride, uint32_t src_stride) {
    for (uint32_t r = 0; r < rows; r++) memcpy(dst + (size_t)r * dst_stride, src + (size_t)r * src_stride, row_bytes);
    stats.dma_transfers++;
    stats.dma_bytes += (uint64_t)row_bytes * rows;
    return next_transfer++;
}

ef_hal_dma_t ef_hal_dma_in(void *l1, const void *l2, uint32_t bytes) {
    return copy_rows((uint8_t *)l1, (const uint8_t *)l2, bytes, 1, bytes, bytes);
}

ef_hal_dma_t ef_hal_dma_out(void *l2, const void *l1, uint32_t bytes) {
    return copy_rows((uint8_t *)l2, (const uint8_t *)l1, bytes, 1, bytes, bytes);
}

ef_hal_dma_t ef_hal_dma_in_2d(void *l1, const void *l2, uint32_t row_bytes, uint32_t rows, uint32_t l2_stride_bytes) {
    return copy_rows((uint8_t *)l1, (const uint8_t *)l2, row_bytes, rows, row_bytes, l2_stride_bytes);
}

ef_hal_dma_t ef_hal_dma_out_2d(void *l2, const void *l1, uint32_t row_bytes, uint32_t rows,
                               uint32_t l2_stride_bytes) {
    return copy_rows((uint8_t *)l2, (const uint8_t *)l1, row_bytes, rows, l2_stride_bytes, row_bytes);
}

void ef_hal_dma_wait(ef_hal_dma_t transfer) {
    if (transfer == 0 || transfer >= next_transfer) fail("ef_hal_dma_wait on a transfer that was never started");
}

/* ---- RedMulE stand-in ------------------------------------------------------------------------------------- */
void ef_hal_redmule_start(const ef_hal_redmule_job_t *job) {
    if (pending_job) fail("ef_hal_redmule_start while a job is running");
    const int m = job->m, n = job->n, k = job->k;
    if (job->y && job->y != job->z) memcpy(job->z, job->y, sizeof(float) * (size_t)m * (size_t)k);
    for (int i = 0; i < m; i++) {   /* i-p-j: each z[i][j] still sums p = 0, 1, ... in order */
        float *zr = job->z + (long)i * k;
        if (!job->y) memset(zr, 0, sizeof(float) * (size_t)k);
        for (int p = 0; p < n; p++) {
            const float xv = job->x[(long)i * n + p];
            const float *wr = job->w + (long)p * k;
            for (int j = 0; j < k; j++) zr[j] += xv * wr[j];
        }
    }
    stats.redmule_jobs++;
    stats.redmule_macs += (uint64_t)m * (uint64_t)n * (uint64_t)k;
    pending_job = job;
}

void ef_hal_redmule_wait(void) {
    if (!pending_job) fail("ef_hal_redmule_wait without a job");
    pending_job = NULL;
}

/* ---- counters and L1 ---------------------------------------------------------------------------------- */
uint64_t ef_hal_cycles(void) {
#if defined(__riscv) && __riscv_xlen == 32
    uint32_t hi, lo, hi2;
    do {
        __asm__ volatile("csrr %0, mcycleh" : "=r"(hi));
        __asm__ volatile("csrr %0, mcycle" : "=r"(lo));
        __asm__ volatile("csrr %0, mcycleh" : "=r"(hi2));
    } while (hi != hi2);
    return ((uint64_t)hi << 32) | lo;
#elif defined(__riscv)
    uint64_t c;
    __asm__ volatile("rdcycle %0" : "=r"(c));
    return c;
#elif defined(__x86_64__) || defined(__i386__)
    return __builtin_ia32_rdtsc();
#else
    return 0;
#endif
}

void *ef_hal_l1_alloc(uint32_t bytes) {
    const uint32_t size = (bytes + L1_ALIGN_BYTES - 1) & ~(L1_ALIGN_BYTES - 1);
    if (size < bytes || size > EF_HAL_L1_BYTES - l1_top) return NULL;
    void *p = l1_pool + l1_top;
    l1_top += size;
    if (l1_top > stats.l1_peak_bytes) stats.l1_peak_bytes = l1_top;
    return p;
}

uint32_t ef_hal_l1_mark(void) { return l1_top; }

void ef_hal_l1_release(uint32_t mark) {
    if (mark > l1_top) fail("ef_hal_l1_release past the top of the L1 pool");
    l1_top = mark;
}

uint32_t ef_hal_l1_free_bytes(void) { return EF_HAL_L1_BYTES - l1_top; }

/* ---- inspection ------------------------------------------------------------------------------------------ */
void ef_hal_generic_stats(ef_hal_generic_stats_t *out) { *out = stats; }

void ef_hal_generic_reset_stats(void) { memset(&stats, 0, sizeof stats); }
