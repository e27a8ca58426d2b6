/* CRC-32 and COBS for the board side of the serial protocol (ef_serial.h). */
#include "ef_serial.h"

static uint32_t crc_table[256];
static int crc_ready;

static void crc_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
    crc_ready = 1;
}

uint32_t ef_crc32(uint32_t crc, const uint8_t *buf, uint32_t n) {
    if (!crc_ready) crc_init();
    crc = ~crc;
    for (uint32_t i = 0; i < n; i++) crc = crc_table[(crc ^ buf[i]) & 0xFFu] ^ (crc >> 8);
    return ~crc;
}

uint32_t ef_cobs_encode(const uint8_t *in, uint32_t n, uint8_t *out) {
    uint32_t code_at = 0, o = 1;
    uint8_t code = 1;
    for (uint32_t i = 0; i < n; i++) {
        if (in[i] == 0) {
            out[code_at] = code;
            code_at = o++;
            code = 1;
        } else {
            out[o++] = in[i];
            if (++code == 0xFF) {
                out[code_at] = code;
                code_at = o++;
                code = 1;
            }
        }
    }
    out[code_at] = code;
    return o;
}

int32_t ef_cobs_decode(const uint8_t *in, uint32_t n, uint8_t *out, uint32_t out_max) {
    uint32_t i = 0, o = 0;
    while (i < n) {
        uint8_t code = in[i++];
        if (code == 0) return -1;
        for (uint8_t k = 1; k < code; k++) {
            if (i >= n || in[i] == 0 || o >= out_max) return -1;
            out[o++] = in[i++];
        }
        if (code != 0xFF && i < n) {
            if (o >= out_max) return -1;
            out[o++] = 0;
        }
    }
    return (int32_t)o;
}
