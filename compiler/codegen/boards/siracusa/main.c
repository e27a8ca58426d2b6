/* Firmware entry for Siracusa (board siracusa): the job protocol of boards/main.c (params.bin, batches.bin,
 * out.bin and the exit codes; layouts in docs/codegen.md) over the PULP SDK's host file system (GVSoC or a debug
 * bridge), with every step run on the cluster.
 *
 * The fabric controller reads the job and, per step, sends one cluster task. On the cluster, core 0 runs the
 * program: the GEMM steps lowered onto RedMulE go through the pulp HAL (MCHAN tiles into L1, RedMulE jobs, the
 * transposes and epilogues forked onto all cores); every other kernel runs on core 0 while cores 1-7 idle.
 * Counters are the cluster's performance counters (cycles and instructions of core 0).
 *
 * Built only by the PULP SDK (compiler/codegen/siracusa.py); this repository's tests cannot run it.
 */
#include <pmsis.h>
#include <bsp/fs.h>
#include <bsp/fs/hostfs.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "ef_board.h"
#include "ef_hal.h"
#include "ef_io.h"
#include "ef_program.h"

#define EXIT_CLUSTER 14

typedef struct {
    const ef_phase_t *phase;
    uint32_t cycles, instructions;
    int status;
} step_job_t;

static struct pi_device fs_dev, cluster_dev;

static int fail(int code, const char *what) {
    printf("edgefleet firmware: %s\n", what);
    return code;
}

static int read_all(pi_fs_file_t *file, void *buf, uint32_t n) {
    uint8_t *p = (uint8_t *)buf;
    while (n > 0) {
        int32_t got = pi_fs_read(file, p, n);
        if (got <= 0) return -1;
        p += got;
        n -= (uint32_t)got;
    }
    return 0;
}

static int write_all(pi_fs_file_t *file, const void *buf, uint32_t n) {
    return n == 0 || pi_fs_write(file, (void *)buf, n) == (int32_t)n ? 0 : -1;
}

/* On cluster core 0: one step, counted. */
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

static int run_step(const ef_phase_t *phase, step_job_t *job) {
    struct pi_cluster_task task;
    job->phase = phase;
    job->status = -1;
    pi_cluster_task(&task, cluster_step, job);
    task.stack_size = EF_SIRACUSA_MASTER_STACK_BYTES;
    task.slave_stack_size = EF_SIRACUSA_WORKER_STACK_BYTES;
    pi_cluster_send_task_to_cl(&cluster_dev, &task);
    return job->status;
}

static int load_params(void) {
    params_header_t h;
    pi_fs_file_t *file = pi_fs_open(&fs_dev, "params.bin", PI_FS_FLAGS_READ);
    if (!file) return fail(EXIT_PARAMS, "cannot open params.bin");
    int status = 0;
    if (read_all(file, &h, sizeof h) != 0 || memcmp(h.magic, "EFPM", 4) != 0 || h.version != EF_IO_VERSION)
        status = fail(EXIT_PARAMS, "params.bin: bad header");
    else if (h.fingerprint != ef_program.fingerprint || h.params_bytes != ef_program.params_bytes)
        status = fail(EXIT_MISMATCH, "params.bin was written for another program layout");
    else if (read_all(file, ef_program.params, ef_program.params_bytes) != 0)
        status = fail(EXIT_PARAMS, "params.bin: truncated");
    pi_fs_close(file);
    return status;
}

static int run_job(void) {
    batches_header_t job;
    int status = load_params();
    if (status) return status;
    pi_fs_file_t *in = pi_fs_open(&fs_dev, "batches.bin", PI_FS_FLAGS_READ);
    if (!in) return fail(EXIT_BATCHES, "cannot open batches.bin");
    if (read_all(in, &job, sizeof job) != 0 || memcmp(job.magic, "EFBT", 4) != 0 || job.version != EF_IO_VERSION ||
        job.mode > MODE_EVALUATE) {
        pi_fs_close(in);
        return fail(EXIT_BATCHES, "batches.bin: bad header");
    }
    const ef_phase_t *phase = job.mode == MODE_TRAIN ? &ef_program.train : &ef_program.evaluate;
    if (job.fingerprint != ef_program.fingerprint || job.input_bytes != phase->input_bytes ||
        job.label_bytes != phase->label_bytes) {
        pi_fs_close(in);
        return fail(EXIT_MISMATCH, "batches.bin was written for another program layout");
    }
    pi_fs_file_t *out = pi_fs_open(&fs_dev, "out.bin", PI_FS_FLAGS_WRITE);
    if (!out) {
        pi_fs_close(in);
        return fail(EXIT_OUT, "cannot create out.bin");
    }
    const uint32_t output_bytes = job.mode == MODE_EVALUATE ? phase->output_bytes : 0u;
    out_header_t head = {{'E', 'F', 'O', 'T'}, EF_IO_VERSION, ef_program.fingerprint, job.mode, job.steps,
                         job.mode == MODE_TRAIN ? ef_program.params_bytes : 0u, output_bytes,
                         (uint32_t)sizeof(step_record_t) + output_bytes};
    if (write_all(out, &head, sizeof head) != 0) status = fail(EXIT_OUT, "out.bin: write failed");
    for (uint32_t s = 0; s < job.steps && !status; s++) {
        if (read_all(in, phase->input, phase->input_bytes) != 0 ||
            (phase->label_bytes && read_all(in, phase->label, phase->label_bytes) != 0)) {
            status = fail(EXIT_BATCHES, "batches.bin: truncated");
            break;
        }
        step_job_t step;
        if (run_step(phase, &step) != 0) {
            status = fail(EXIT_CLUSTER, "cannot allocate the HAL's L1 pool on the cluster");
            break;
        }
        step_record_t rec = {*phase->loss, 0u, step.cycles, step.instructions};
        if (write_all(out, &rec, sizeof rec) != 0 || (output_bytes && write_all(out, phase->output, output_bytes) != 0))
            status = fail(EXIT_OUT, "out.bin: write failed");
    }
    if (!status && job.mode == MODE_TRAIN && write_all(out, ef_program.params, ef_program.params_bytes) != 0)
        status = fail(EXIT_OUT, "out.bin: write failed");
    trailer_t end = {{'E', 'F', 'N', 'D'}, job.steps};
    if (!status && write_all(out, &end, sizeof end) != 0) status = fail(EXIT_OUT, "out.bin: write failed");
    pi_fs_close(in);
    pi_fs_close(out);
    return status;
}

static void firmware(void) {
    struct pi_hostfs_conf fs_conf;
    struct pi_cluster_conf cl_conf;
    int status;
    pi_hostfs_conf_init(&fs_conf);
    pi_open_from_conf(&fs_dev, &fs_conf);
    pi_cluster_conf_init(&cl_conf);
    cl_conf.id = 0;
    pi_open_from_conf(&cluster_dev, &cl_conf);
    if (pi_fs_mount(&fs_dev) != 0) {
        status = fail(EXIT_PARAMS, "cannot mount the host file system");
    } else if (pi_cluster_open(&cluster_dev) != 0) {
        status = fail(EXIT_CLUSTER, "cannot open the cluster");
        pi_fs_unmount(&fs_dev);
    } else {
        status = run_job();
        pi_cluster_close(&cluster_dev);
        pi_fs_unmount(&fs_dev);
    }
    pmsis_exit(status);
}

int main(void) { return pmsis_kickoff((void *)firmware); }
