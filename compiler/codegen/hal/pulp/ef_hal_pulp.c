/* The pulp HAL: ef_hal.h on the PULP cluster of Siracusa, bare metal (no runtime): board siracusa.
 *
 *   fork / join, barrier   a mailbox in L1 that cores 1-7 poll (ef_hal_worker); per-core arrival counters
 *                          (single writer each, so no atomics: the cluster cores have no A extension)
 *   DMA                    MCHAN command/status registers, completion polled
 *   RedMulE                EF_HAL_REDMULE defined: its HWPE register file (FP32 format); otherwise (GVSoC's
 *                          `siracusa` model has no RedMulE) the job runs on all cores, each output element summed
 *                          over n in order, as RedMulE's semantics and the generic HAL's C loop define it
 *   cycles                 mcycle of the calling core (cluster clock domain), widened to 64 bits
 *   L1 pool                a static buffer in the TCDM (.l1 section of boards/siracusa/siracusa.ld)
 * Register offsets and their sources: ef_hal_pulp_regs.h.
 *
 * ef_hal_init(), DMA and RedMulE calls come from core 0, the core that runs the program.
 */
#include <stddef.h>
#include <stdint.h>

#include "ef_hal.h"
#include "ef_hal_pulp_regs.h"

/* DMA (MCHAN) and RedMulE: ef_hal_pulp_mchan.h, shared with the pmsis HAL; here the waiting core spins. */
#define EF_HAL_MCHAN_EVENT_BITS 0u
#define EF_HAL_IDLE_DMA() ((void)0)
#define EF_HAL_IDLE_REDMULE() ((void)0)
#include "ef_hal_pulp_mchan.h"

#ifndef EF_HAL_L1_BYTES
#define EF_HAL_L1_BYTES (160u * 1024u)   /* of Siracusa's 256 KiB TCDM; the rest: stacks and the mailbox */
#endif
#ifndef EF_HAL_CORES
#define EF_HAL_CORES 8
#endif
#define L1_ALIGN_BYTES 16u

static inline uint32_t core_id(void) {
    uint32_t id;
    __asm__ volatile("csrr %0, mhartid" : "=r"(id));
    return id & 0x1fu;
}

/* ---- L1: the pool and the fork mailbox ------------------------------------------------------------------ */
static uint8_t l1_pool[EF_HAL_L1_BYTES] __attribute__((section(".l1"), aligned(16)));
static uint32_t l1_top;

typedef struct {
    volatile ef_hal_task_t task;
    void *volatile arg;
    volatile uint32_t team;          /* cores taking part in the current fork */
    volatile uint32_t generation;    /* bumped by core 0 for each fork */
    volatile uint32_t done[EF_HAL_CORES];      /* core i: the generation it finished */
    volatile uint32_t arrivals[EF_HAL_CORES];  /* core i: barriers it reached in the current fork */
    volatile uint32_t in_fork[EF_HAL_CORES];
} mailbox_t;
static mailbox_t mailbox __attribute__((section(".l1"), aligned(16)));

static uint32_t cycles_last, cycles_high;

int ef_hal_init(void) {
    l1_top = 0;
#ifdef EF_HAL_REDMULE
    ef_hal_reg_write(EF_REDMULE_BASE + EF_REDMULE_SOFT_CLEAR, 0);
#endif
    return 0;
}

uint64_t ef_hal_cycles(void) {
    uint32_t now;
    __asm__ volatile("csrr %0, mcycle" : "=r"(now));
    if (now < cycles_last) cycles_high++;
    cycles_last = now;
    return ((uint64_t)cycles_high << 32) | now;
}

void *ef_hal_l1_alloc(uint32_t bytes) {
    const uint32_t size = (bytes + L1_ALIGN_BYTES - 1) & ~(L1_ALIGN_BYTES - 1);
    if (size < bytes || size > EF_HAL_L1_BYTES - l1_top) return NULL;
    void *p = l1_pool + l1_top;
    l1_top += size;
    return p;
}

uint32_t ef_hal_l1_mark(void) { return l1_top; }

void ef_hal_l1_release(uint32_t mark) {
    if (mark <= l1_top) l1_top = mark;
}

uint32_t ef_hal_l1_free_bytes(void) { return EF_HAL_L1_BYTES - l1_top; }

/* ---- cluster ------------------------------------------------------------------------------------------ */
int ef_hal_cores(void) { return EF_HAL_CORES; }

int ef_hal_core_id(void) { return (int)core_id(); }

int ef_hal_team_size(void) { return mailbox.in_fork[core_id()] ? (int)mailbox.team : 1; }

/* Cores 1-7 live here (boards/siracusa/main.c): wait for a new generation, run the task if in the team. */
void ef_hal_worker(uint32_t core) {
    uint32_t seen = 0;
    for (;;) {
        while (mailbox.generation == seen) {
        }
        seen = mailbox.generation;
        EF_HAL_COMPILER_BARRIER();
        if (core < mailbox.team) {
            mailbox.in_fork[core] = 1;
            mailbox.task(mailbox.arg);
            mailbox.in_fork[core] = 0;
        }
        EF_HAL_COMPILER_BARRIER();
        mailbox.done[core] = seen;
    }
}

void ef_hal_fork(int cores, ef_hal_task_t task, void *arg) {
    const uint32_t team = cores <= 0 || cores > EF_HAL_CORES ? EF_HAL_CORES : (uint32_t)cores;
    if (team == 1) {                       /* no one else to wake */
        task(arg);
        return;
    }
    for (uint32_t i = 0; i < EF_HAL_CORES; i++) mailbox.arrivals[i] = 0;
    mailbox.task = task;
    mailbox.arg = arg;
    mailbox.team = team;
    EF_HAL_COMPILER_BARRIER();
    const uint32_t generation = mailbox.generation + 1;
    mailbox.generation = generation;       /* the workers start */
    mailbox.in_fork[0] = 1;
    task(arg);
    mailbox.in_fork[0] = 0;
    for (uint32_t i = 1; i < EF_HAL_CORES; i++)
        while (mailbox.done[i] != generation) {
        }
    EF_HAL_COMPILER_BARRIER();
}

void ef_hal_barrier(void) {
    const uint32_t me = core_id();
    const uint32_t team = mailbox.in_fork[me] ? mailbox.team : 1;
    EF_HAL_COMPILER_BARRIER();
    const uint32_t mine = mailbox.arrivals[me] + 1;
    mailbox.arrivals[me] = mine;
    for (uint32_t i = 0; i < team; i++)
        while (mailbox.arrivals[i] < mine) {
        }
    EF_HAL_COMPILER_BARRIER();
}

/* ---- RedMulE on the cores ------------------------------------------------------------------------------- */
#ifndef EF_HAL_REDMULE
/* No RedMulE in the model: Z (m x k) = X (m x n) W (n x k) [+ Y], rows of Z split over the cores; each element
 * sums from Y (or 0) over n in order, the generic HAL's operations in its order. */
static const ef_hal_redmule_job_t *core_job;

static void core_job_task(void *arg) {
    (void)arg;
    const ef_hal_redmule_job_t *j = core_job;
    const int cores = ef_hal_team_size(), me = ef_hal_core_id();
    for (int i = me; i < j->m; i += cores) {
        float *z = j->z + (uint32_t)i * j->k;
        const float *x = j->x + (uint32_t)i * j->n;
        const float *y = j->y ? j->y + (uint32_t)i * j->k : NULL;
        for (int c = 0; c < j->k; c++) {
            float acc = y ? y[c] : 0.0f;    /* continue from Y, as the hardware (and the generic HAL) do */
            for (int t = 0; t < j->n; t++) acc += x[t] * j->w[(uint32_t)t * j->k + c];
            z[c] = acc;
        }
    }
}

void ef_hal_redmule_start(const ef_hal_redmule_job_t *job) {
    core_job = job;
    ef_hal_fork(0, core_job_task, NULL);
}

void ef_hal_redmule_wait(void) {}
#endif
