/* Serial board port for Siracusa through the PULP SDK (pmsis): the fabric controller's UART (pi_uart) and
 * each step run on cluster core 0 with the cluster's performance counters, as boards/siracusa/main.c does.
 * Built only by the PULP SDK (board siracusa-serial); this repository's tests cannot run it. */
#include <pmsis.h>
#include <stdint.h>

#include "ef_board.h"
#include "ef_hal.h"
#include "ef_serial.h"

#ifndef EF_UART_BAUD
#define EF_UART_BAUD 115200u
#endif
#ifndef EF_SIRACUSA_L2_BYTES
#define EF_SIRACUSA_L2_BYTES (2u * 1024u * 1024u)
#endif

typedef struct {
    const ef_phase_t *phase;
    uint32_t cycles, instructions;
    int status;
} step_job_t;

static struct pi_device uart_dev, cluster_dev;

int ef_serial_port_init(void) {
    struct pi_uart_conf uart_conf;
    struct pi_cluster_conf cl_conf;
    pi_uart_conf_init(&uart_conf);
    uart_conf.baudrate_bps = EF_UART_BAUD;
    uart_conf.enable_rx = 1;
    uart_conf.enable_tx = 1;
    pi_open_from_conf(&uart_dev, &uart_conf);
    if (pi_uart_open(&uart_dev) != 0) return -1;
    pi_cluster_conf_init(&cl_conf);
    cl_conf.id = 0;
    pi_open_from_conf(&cluster_dev, &cl_conf);
    return pi_cluster_open(&cluster_dev) != 0 ? -1 : 0;
}

int ef_serial_port_getc(void) {
    uint8_t c;
    pi_uart_read(&uart_dev, &c, 1);
    return c;
}

void ef_serial_port_write(const uint8_t *buf, uint32_t n) { pi_uart_write(&uart_dev, (void *)buf, n); }

static void cluster_step(void *arg) {
    step_job_t *job = (step_job_t *)arg;
    if (ef_hal_init() != 0) {
        job->status = -1;
        return;
    }
    pi_perf_conf((1 << PI_PERF_CYCLES) | (1 << PI_PERF_INSTR));
    pi_perf_reset();
    pi_perf_start();
    job->phase->run();
    pi_perf_stop();
    job->cycles = pi_perf_read(PI_PERF_CYCLES);
    job->instructions = pi_perf_read(PI_PERF_INSTR);
    job->status = 0;
}

int ef_serial_port_run_step(const ef_phase_t *phase, uint64_t *cycles, uint64_t *instructions) {
    struct pi_cluster_task task;
    step_job_t job = {phase, 0, 0, -1};
    pi_cluster_task(&task, cluster_step, &job);
    task.stack_size = EF_SIRACUSA_MASTER_STACK_BYTES;
    task.slave_stack_size = EF_SIRACUSA_WORKER_STACK_BYTES;
    pi_cluster_send_task_to_cl(&cluster_dev, &task);
    *cycles = job.cycles;
    *instructions = job.instructions;
    return job.status;
}

uint32_t ef_serial_port_ram_bytes(void) { return EF_SIRACUSA_L2_BYTES; }
uint32_t ef_serial_port_stack_bytes(void) { return EF_SIRACUSA_MASTER_STACK_BYTES; }
uint32_t ef_serial_port_stack_peak_bytes(void) { return 0; }
uint32_t ef_serial_port_static_bytes(void) { return 0; }
const char *ef_serial_port_target(void) { return EF_BOARD_NAME "-serial"; }
