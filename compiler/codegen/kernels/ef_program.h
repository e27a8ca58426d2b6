/* The interface between a generated program (program.c from compiler.codegen) and a board's firmware entry. */
#ifndef EF_PROGRAM_H
#define EF_PROGRAM_H

#include <stdint.h>

typedef struct {
    void *input;            /* where the phase's input batch goes (input_bytes, the program's input dtype) */
    uint32_t input_bytes;
    void *label;            /* labels / targets; NULL when the loss targets the input itself */
    uint32_t label_bytes;
    float *loss;            /* the scalar loss after run() */
    void *output;           /* the model output after run() (evaluate only; NULL in train) */
    uint32_t output_bytes;
    void (*run)(void);      /* one step: forward (+ backward and SGD updates in train) */
} ef_phase_t;

typedef struct {
    const char *model;
    uint32_t fingerprint;   /* layout hash: params.bin / batches.bin must carry the same value */
    uint32_t batch;
    uint8_t *params;        /* the parameter region: every persistent tensor at its planned offset */
    uint32_t params_bytes;
    ef_phase_t train;
    ef_phase_t evaluate;
} ef_program_t;

extern const ef_program_t ef_program;

#endif /* EF_PROGRAM_H */
