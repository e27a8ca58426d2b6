/* Firmware entry shared by the boards: runs a job given as files in the working directory (semihosting on
 * QEMU, the file system on the host board), little-endian, layouts in docs/codegen.md:
 *
 *   params.bin   "EFPM" header + the parameter region (every persistent tensor at its planned offset)
 *   batches.bin  "EFBT" header (mode 0 train / 1 evaluate, steps) + per step: input bytes, label bytes
 *   out.bin      "EFOT" header + per step: loss, cycles, instructions [+ output bytes in evaluate]
 *                + the parameter region after training (train only) + "EFND" trailer
 *
 * Exit codes: 0 done; 10 params.bin; 11 batches.bin; 12 out.bin; 13 the job does not fit this program.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "ef_board.h"
#include "ef_io.h"
#include "ef_program.h"


static int fail(int code, const char *what) {
    printf("edgefleet firmware: %s\n", what);
    return code;
}

static int read_all(int fd, void *buf, uint32_t n) {
    uint8_t *p = (uint8_t *)buf;
    while (n > 0) {
        ssize_t got = read(fd, p, n);
        if (got <= 0) return -1;
        p += got;
        n -= (uint32_t)got;
    }
    return 0;
}

static int write_all(int fd, const void *buf, uint32_t n) {
    const uint8_t *p = (const uint8_t *)buf;
    while (n > 0) {
        ssize_t put = write(fd, p, n);
        if (put <= 0) return -1;
        p += put;
        n -= (uint32_t)put;
    }
    return 0;
}

static int load_params(void) {
    params_header_t h;
    int fd = open("params.bin", O_RDONLY);
    if (fd < 0) return fail(EXIT_PARAMS, "cannot open params.bin");
    if (read_all(fd, &h, sizeof h) != 0 || memcmp(h.magic, "EFPM", 4) != 0 || h.version != EF_IO_VERSION) {
        close(fd);
        return fail(EXIT_PARAMS, "params.bin: bad header");
    }
    if (h.fingerprint != ef_program.fingerprint || h.params_bytes != ef_program.params_bytes) {
        close(fd);
        return fail(EXIT_MISMATCH, "params.bin was written for another program layout");
    }
    int bad = read_all(fd, ef_program.params, ef_program.params_bytes);
    close(fd);
    return bad ? fail(EXIT_PARAMS, "params.bin: truncated") : 0;
}

int main(void) {
    batches_header_t job;
    int status = load_params();
    if (status) return status;

    int in = open("batches.bin", O_RDONLY);
    if (in < 0) return fail(EXIT_BATCHES, "cannot open batches.bin");
    if (read_all(in, &job, sizeof job) != 0 || memcmp(job.magic, "EFBT", 4) != 0 || job.version != EF_IO_VERSION ||
        job.mode > MODE_EVALUATE) {
        close(in);
        return fail(EXIT_BATCHES, "batches.bin: bad header");
    }
    const ef_phase_t *phase = job.mode == MODE_TRAIN ? &ef_program.train : &ef_program.evaluate;
    if (job.fingerprint != ef_program.fingerprint || job.input_bytes != phase->input_bytes ||
        job.label_bytes != phase->label_bytes) {
        close(in);
        return fail(EXIT_MISMATCH, "batches.bin was written for another program layout");
    }

    int out = open("out.bin", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (out < 0) {
        close(in);
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
        const uint64_t c0 = ef_board_cycles(), i0 = ef_board_instructions();
        phase->run();
        const uint64_t c1 = ef_board_cycles(), i1 = ef_board_instructions();
        step_record_t rec = {*phase->loss, 0u, c1 - c0, i1 - i0};
        if (write_all(out, &rec, sizeof rec) != 0 ||
            (output_bytes && write_all(out, phase->output, output_bytes) != 0))
            status = fail(EXIT_OUT, "out.bin: write failed");
    }
    if (!status && job.mode == MODE_TRAIN && write_all(out, ef_program.params, ef_program.params_bytes) != 0)
        status = fail(EXIT_OUT, "out.bin: write failed");
    trailer_t end = {{'E', 'F', 'N', 'D'}, job.steps};
    if (!status && write_all(out, &end, sizeof end) != 0) status = fail(EXIT_OUT, "out.bin: write failed");
    close(in);
    close(out);
    return status;
}
