/* Firmware entry for a board on a serial line: the command loop of the serial protocol (ef_serial.h,
 * docs/boards.md) around the generated training program. The same source builds for every board with a
 * serial port (serial/uart_16550.c: QEMU virt and 16550-compatible UARTs; serial/uart_pulp.c: Siracusa).
 *
 * The parameter region starts zeroed (the generated program holds no values) and unusable: RUN is refused
 * until the host has written it and a COMMIT's CRC-32 over the written spans matched. Any later WRITE into it
 * makes it unusable again until the next matching COMMIT: a transfer cut short or corrupted is never trained
 * on. A RUN carries the CRC-32 of its batch (input bytes, then label bytes) and is refused when the
 * staged batch does not match. */
#include <stdint.h>
#include <string.h>

#include "ef_program.h"
#include "ef_serial.h"

static uint8_t rx_packet[EF_SERIAL_ENCODED_MAX];
static uint8_t rx_frame[EF_SERIAL_FRAME_MAX];
static uint8_t tx_frame[EF_SERIAL_FRAME_MAX];
static uint8_t tx_packet[EF_SERIAL_ENCODED_MAX + 1];
static uint32_t tx_packet_len;            /* the cached reply to the last frame */
static uint32_t last_request_crc;
static uint16_t last_seq = EF_SERIAL_SEQ_NONE;
static int params_valid;                  /* set by a matching COMMIT; a WRITE clears it */
static uint64_t total_cycles, total_instructions;
static uint32_t total_steps;

static uint32_t rd32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint8_t *wr32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
    return p + 4;
}
static uint8_t *wr16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    return p + 2;
}
static uint8_t *wr64(uint8_t *p, uint64_t v) {
    p = wr32(p, (uint32_t)v);
    return wr32(p, (uint32_t)(v >> 32));
}

static int region(uint8_t id, uint8_t **base, uint32_t *size) {
    const ef_phase_t *t = &ef_program.train, *e = &ef_program.evaluate;
    switch (id) {
    case REGION_PARAMS: *base = ef_program.params; *size = ef_program.params_bytes; return 0;
    case REGION_TRAIN_INPUT: *base = t->input; *size = t->input_bytes; return 0;
    case REGION_TRAIN_LABEL: *base = t->label; *size = t->label_bytes; return 0;
    case REGION_EVAL_INPUT: *base = e->input; *size = e->input_bytes; return 0;
    case REGION_EVAL_LABEL: *base = e->label; *size = e->label_bytes; return 0;
    case REGION_EVAL_OUTPUT: *base = e->output; *size = e->output_bytes; return 0;
    default: return -1;
    }
}

static void send_packet(const uint8_t *frame, uint32_t n, int cache) {
    uint8_t scratch[EF_SERIAL_ENCODED_MAX + 1];
    uint8_t *out = cache ? tx_packet : scratch;
    uint32_t len = ef_cobs_encode(frame, n, out);
    out[len++] = 0;
    ef_serial_port_write(out, len);
    if (cache) tx_packet_len = len;
}

/* Reply with `kind` and `len` payload bytes already in tx_frame + header. */
static void reply(uint8_t kind, uint16_t seq, uint32_t len) {
    tx_frame[0] = EF_SERIAL_FRAME_VERSION;
    tx_frame[1] = kind;
    wr16(tx_frame + 2, seq);
    wr32(tx_frame + EF_SERIAL_HEADER + len, ef_crc32(0, tx_frame, EF_SERIAL_HEADER + len));
    send_packet(tx_frame, EF_SERIAL_HEADER + len + EF_SERIAL_CRC, 1);
}

static uint32_t error(uint8_t code, const char *text) {
    uint8_t *p = tx_frame + EF_SERIAL_HEADER;
    uint32_t n = (uint32_t)strlen(text);
    p[0] = code;
    memcpy(p + 1, text, n);
    return 0x80000000u | (n + 1);   /* marks an error reply of n + 1 bytes */
}

static void reply_corrupt(void) {
    uint8_t frame[EF_SERIAL_HEADER + EF_SERIAL_CRC] = {EF_SERIAL_FRAME_VERSION, REPLY_CORRUPT, 0xFF, 0xFF};
    wr32(frame + EF_SERIAL_HEADER, ef_crc32(0, frame, EF_SERIAL_HEADER));
    send_packet(frame, sizeof frame, 0);   /* not cached: the previous reply stays the answer to a duplicate */
}

/* Spans (offset, length) at p, n of them, inside a region: 0 and their CRC-32, or an error code. */
static int spans_crc(uint8_t id, const uint8_t *p, uint32_t count, uint32_t avail, uint32_t *crc) {
    uint8_t *base;
    uint32_t size;
    if (region(id, &base, &size) != 0) return ERR_BAD_REGION;
    if (avail != count * 8u) return ERR_BAD_LENGTH;
    uint32_t c = 0;
    for (uint32_t i = 0; i < count; i++) {
        uint32_t off = rd32(p + 8 * i), len = rd32(p + 8 * i + 4);
        if (off > size || len > size - off) return ERR_OUT_OF_RANGE;
        c = ef_crc32(c, base + off, len);
    }
    *crc = c;
    return 0;
}

static uint32_t hello(uint8_t *p) {
    const ef_phase_t *t = &ef_program.train, *e = &ef_program.evaluate;
    uint8_t *q = wr16(p, EF_SERIAL_PROTOCOL_VERSION);
    q = wr16(q, EF_SERIAL_FIRMWARE_VERSION);
    uint32_t numbers[] = {ef_program.fingerprint, ef_program.params_bytes, t->input_bytes, t->label_bytes,
                          e->input_bytes, e->label_bytes, e->output_bytes, ef_program.batch,
                          ef_serial_port_ram_bytes(), ef_serial_port_stack_bytes(), EF_SERIAL_MAX_PAYLOAD};
    for (uint32_t i = 0; i < sizeof numbers / sizeof numbers[0]; i++) q = wr32(q, numbers[i]);
    const char *target = ef_serial_port_target();
    uint32_t room = EF_SERIAL_MAX_PAYLOAD - (uint32_t)(q - p) - 1;
    uint32_t n = (uint32_t)strlen(target);
    n = n < room ? n : room;
    memcpy(q, target, n);
    q += n;
    *q++ = 0;
    room -= n;
    n = (uint32_t)strlen(ef_program.model);
    n = n < room ? n : room;
    memcpy(q, ef_program.model, n);
    return (uint32_t)(q - p) + n;
}

static uint32_t run(const uint8_t *a, uint32_t n, uint8_t *p) {
    if (n != 7) return error(ERR_BAD_LENGTH, "run");
    uint8_t mode = a[0];
    uint16_t steps = rd16(a + 1);
    if (mode > 1) return error(ERR_BAD_MODE, "mode");
    if (!params_valid) return error(ERR_NOT_COMMITTED, "parameter transfer not committed");
    const ef_phase_t *phase = mode == 0 ? &ef_program.train : &ef_program.evaluate;
    uint32_t crc = ef_crc32(ef_crc32(0, phase->input, phase->input_bytes), phase->label, phase->label_bytes);
    if (crc != rd32(a + 3)) return error(ERR_BATCH_CHECKSUM, "staged batch");
    uint64_t cycles = 0, instructions = 0;
    for (uint16_t s = 0; s < steps; s++) {
        uint64_t c, i;
        if (ef_serial_port_run_step(phase, &c, &i) != 0) return error(ERR_BAD_MODE, "step failed on the board");
        cycles += c;
        instructions += i;
    }
    total_cycles += cycles;
    total_instructions += instructions;
    total_steps += steps;
    float loss = *phase->loss;
    memcpy(p, &loss, 4);
    uint8_t *q = wr32(p + 4, steps);
    q = wr64(q, cycles);
    wr64(q, instructions);
    return 24;
}

/* Handles one frame; the reply payload goes to tx_frame + header. Returns its length, with the top bit set
 * for an error reply. */
static uint32_t handle(uint8_t kind, const uint8_t *a, uint32_t n) {
    uint8_t *p = tx_frame + EF_SERIAL_HEADER;
    uint8_t *base;
    uint32_t size, crc;
    int err;
    switch (kind) {
    case CMD_HELLO: return hello(p);
    case CMD_RESET:
        total_cycles = total_instructions = 0;
        total_steps = 0;
        return 0;
    case CMD_WRITE: {
        if (n < 5) return error(ERR_BAD_LENGTH, "write");
        if (region(a[0], &base, &size) != 0) return error(ERR_BAD_REGION, "write");
        uint32_t off = rd32(a + 1), len = n - 5;
        if (off > size || len > size - off) return error(ERR_OUT_OF_RANGE, "write");
        if (a[0] == REGION_PARAMS) params_valid = 0;
        memcpy(base + off, a + 5, len);
        return 0;
    }
    case CMD_COMMIT:
        if (n < 7) return error(ERR_BAD_LENGTH, "commit");
        if (a[0] != REGION_PARAMS) return error(ERR_BAD_REGION, "commit");
        err = spans_crc(a[0], a + 7, rd16(a + 5), n - 7, &crc);
        if (err) return error((uint8_t)err, "commit");
        if (crc != rd32(a + 1)) return error(ERR_CHECKSUM, "parameters differ from what the host sent");
        params_valid = 1;
        return 0;
    case CMD_CHECKSUM:
        if (n < 3) return error(ERR_BAD_LENGTH, "checksum");
        err = spans_crc(a[0], a + 3, rd16(a + 1), n - 3, &crc);
        if (err) return error((uint8_t)err, "checksum");
        wr32(p, crc);
        return 4;
    case CMD_READ: {
        if (n != 9) return error(ERR_BAD_LENGTH, "read");
        if (region(a[0], &base, &size) != 0) return error(ERR_BAD_REGION, "read");
        uint32_t off = rd32(a + 1), len = rd32(a + 5);
        if (len > EF_SERIAL_MAX_PAYLOAD || off > size || len > size - off) return error(ERR_OUT_OF_RANGE, "read");
        memcpy(p, base + off, len);
        return len;
    }
    case CMD_RUN: return run(a, n, p);
    case CMD_COUNTERS: {
        uint8_t *q = wr64(p, total_cycles);
        q = wr64(q, total_instructions);
        q = wr32(q, total_steps);
        q = wr32(q, ef_serial_port_stack_peak_bytes());
        wr32(q, ef_serial_port_static_bytes());
        return 28;
    }
    default: return error(ERR_UNKNOWN_COMMAND, "unknown command");
    }
}

static void serve_packet(uint32_t n) {
    int32_t len = ef_cobs_decode(rx_packet, n, rx_frame, sizeof rx_frame);
    if (len < (int32_t)(EF_SERIAL_HEADER + EF_SERIAL_CRC)) {
        reply_corrupt();
        return;
    }
    uint32_t body = (uint32_t)len - EF_SERIAL_CRC;
    uint32_t crc = rd32(rx_frame + body);
    if (ef_crc32(0, rx_frame, body) != crc || rx_frame[0] != EF_SERIAL_FRAME_VERSION) {
        reply_corrupt();
        return;
    }
    uint16_t seq = rd16(rx_frame + 2);
    if (seq == last_seq && crc == last_request_crc && tx_packet_len) {
        ef_serial_port_write(tx_packet, tx_packet_len);   /* a retry: the same answer, the command not rerun */
        return;
    }
    uint32_t out = handle(rx_frame[1], rx_frame + EF_SERIAL_HEADER, body - EF_SERIAL_HEADER);
    last_seq = seq;
    last_request_crc = crc;
    reply((out & 0x80000000u) ? REPLY_ERROR : REPLY_OK, seq, out & 0x7FFFFFFFu);
}

int main(void) {
    if (ef_serial_port_init() != 0) return 1;
    for (;;) {
        uint32_t n = 0;
        int overflow = 0;
        for (;;) {
            int c = ef_serial_port_getc();
            if (c == 0) break;
            if (n < sizeof rx_packet) rx_packet[n++] = (uint8_t)c;
            else overflow = 1;
        }
        if (overflow) reply_corrupt();
        else if (n) serve_packet(n);
    }
}
