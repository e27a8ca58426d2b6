/* The job file layouts every board's firmware speaks (params.bin, batches.bin, out.bin; docs/codegen.md),
 * and the firmware's exit codes. */
#ifndef EF_IO_H
#define EF_IO_H

#include <stdint.h>

#define EF_IO_VERSION 1u
#define EXIT_PARAMS 10
#define EXIT_BATCHES 11
#define EXIT_OUT 12
#define EXIT_MISMATCH 13
#define MODE_TRAIN 0u
#define MODE_EVALUATE 1u

typedef struct {
    char magic[4];
    uint32_t version, fingerprint, params_bytes;
} params_header_t;

typedef struct {
    char magic[4];
    uint32_t version, fingerprint, mode, steps, input_bytes, label_bytes, reserved;
} batches_header_t;

typedef struct {
    char magic[4];
    uint32_t version, fingerprint, mode, steps, params_bytes, output_bytes, record_bytes;
} out_header_t;

typedef struct {
    float loss;
    uint32_t reserved;
    uint64_t cycles, instructions;
} step_record_t;

typedef struct {
    char magic[4];
    uint32_t steps;
} trailer_t;

#endif /* EF_IO_H */
