/* The pmsis pulp HAL: ef_hal.h on the PULP cluster of Siracusa through the PULP runtime (8 cores, MCHAN cluster DMA,
 * RedMulE in the HWPE slot), for boards built by the PULP SDK (siracusa-serial). The bare-metal one for GVSoC is
 * hal/pulp; both share hal/pulp/ef_hal_pulp_regs.h and the DMA and RedMulE code of hal/pulp/ef_hal_pulp_mchan.h
 * (copied beside this file by compiler/codegen/pulp_sdk.py).
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

/* Sleep until `event` arrives (or has arrived: the event unit buffers it), then clear the buffer. */
static void eu_wait_event(uint32_t event);

/* DMA (MCHAN) and RedMulE: ef_hal_pulp_mchan.h, shared with the bare-metal HAL; here the transfers raise an event
 * for every core and the waiting core sleeps on the event unit. */
#define EF_HAL_REDMULE
#define EF_HAL_MCHAN_EVENT_BITS ((1u << EF_MCHAN_CMD_ELE_BIT) | (1u << EF_MCHAN_CMD_BLE_BIT))
#define EF_HAL_IDLE_DMA() eu_wait_event(EF_PULP_EVT_DMA0)
#define EF_HAL_IDLE_REDMULE() eu_wait_event(EF_PULP_EVT_ACC0)
#include "ef_hal_pulp_mchan.h"

static void eu_wait_event(uint32_t event) {
    ef_hal_reg_write(EF_PULP_EU_DEMUX_ADDR + EF_EU_CORE_MASK_OR, 1u << event);
    (void)ef_hal_reg_read(EF_PULP_EU_DEMUX_ADDR + EF_EU_CORE_EVENT_WAIT_CLEAR);
    ef_hal_reg_write(EF_PULP_EU_DEMUX_ADDR + EF_EU_CORE_MASK_AND, 1u << event);
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
    ef_hal_reg_write(EF_REDMULE_BASE + EF_REDMULE_SOFT_CLEAR, 0);
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
    EF_HAL_COMPILER_BARRIER();
    (void)ef_hal_reg_read(EF_PULP_EU_DEMUX_ADDR + EF_EU_BARRIER_DEMUX_OFFSET + EF_EU_HW_BARR_TRIGGER_WAIT_CLEAR);
    EF_HAL_COMPILER_BARRIER();
}
