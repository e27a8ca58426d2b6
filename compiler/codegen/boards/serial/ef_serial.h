/* The board side of the serial protocol (docs/boards.md; host side: device_runtime/serial/framing.py).
 *
 * A frame is COBS(header + payload + CRC-32) followed by a 0x00 delimiter. Header: version (u8), kind (u8),
 * sequence number (u16 LE). The CRC-32 is zlib's (reflected polynomial 0xEDB88320), little-endian, over header
 * and payload. The board answers every frame it can read with exactly one reply carrying the same sequence
 * number, and a repeated frame (same bytes) with its cached reply, so a host retry never runs a command twice.
 *
 * ef_serial_port_*: what a board provides (serial/uart_*.c): the UART, running one step with its counters,
 * and its memory figures. */
#ifndef EF_SERIAL_H
#define EF_SERIAL_H

#include <stdint.h>

#include "ef_program.h"

#define EF_SERIAL_FIRMWARE_VERSION 1u
#define EF_SERIAL_PROTOCOL_VERSION 1u
#define EF_SERIAL_FRAME_VERSION 1u
#define EF_SERIAL_MAX_PAYLOAD 1024u
#define EF_SERIAL_HEADER 4u
#define EF_SERIAL_CRC 4u
#define EF_SERIAL_FRAME_MAX (EF_SERIAL_HEADER + EF_SERIAL_MAX_PAYLOAD + EF_SERIAL_CRC)
#define EF_SERIAL_ENCODED_MAX (EF_SERIAL_FRAME_MAX + EF_SERIAL_FRAME_MAX / 254u + 2u)
#define EF_SERIAL_SEQ_NONE 0xFFFFu

enum { CMD_HELLO = 1, CMD_WRITE, CMD_COMMIT, CMD_READ, CMD_CHECKSUM, CMD_RUN, CMD_COUNTERS, CMD_RESET };
enum { REPLY_OK = 0x80, REPLY_ERROR = 0x81, REPLY_CORRUPT = 0x82 };
enum { REGION_PARAMS, REGION_TRAIN_INPUT, REGION_TRAIN_LABEL, REGION_EVAL_INPUT, REGION_EVAL_LABEL,
       REGION_EVAL_OUTPUT, REGION_COUNT };
enum { ERR_UNKNOWN_COMMAND = 1, ERR_BAD_REGION, ERR_OUT_OF_RANGE, ERR_BAD_LENGTH, ERR_CHECKSUM, ERR_NOT_COMMITTED,
       ERR_BATCH_CHECKSUM, ERR_BAD_MODE };

/* CRC-32 as zlib's crc32(crc, buf, n): chainable, 0 to start. */
uint32_t ef_crc32(uint32_t crc, const uint8_t *buf, uint32_t n);
/* COBS: encode n bytes into out (room for n + n/254 + 1), returns the encoded length (no delimiter);
 * decode returns the decoded length, or -1 for a malformed packet or one that does not fit out_max. */
uint32_t ef_cobs_encode(const uint8_t *in, uint32_t n, uint8_t *out);
int32_t ef_cobs_decode(const uint8_t *in, uint32_t n, uint8_t *out, uint32_t out_max);

/* The board port. */
int ef_serial_port_init(void);                 /* 0: ready */
int ef_serial_port_getc(void);                 /* blocks until a byte arrives; returns it (0..255) */
void ef_serial_port_write(const uint8_t *buf, uint32_t n);
/* Runs one step of the phase; returns 0 and its cycles / instructions, or non-zero on failure. */
int ef_serial_port_run_step(const ef_phase_t *phase, uint64_t *cycles, uint64_t *instructions);
uint32_t ef_serial_port_ram_bytes(void);
uint32_t ef_serial_port_stack_bytes(void);
uint32_t ef_serial_port_stack_peak_bytes(void);  /* the deepest the stack has been (0: not measured) */
uint32_t ef_serial_port_static_bytes(void);      /* .data + .bss: parameters, arena, buffers */
const char *ef_serial_port_target(void);

#endif /* EF_SERIAL_H */
