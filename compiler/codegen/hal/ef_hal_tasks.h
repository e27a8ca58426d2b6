/* Work for the cores shared by the kernels written against ef_hal.h (ef_hal_gemm.c, ef_hal_lora.c). Internal:
 * not part of the HAL's interface, which ef_hal.h alone defines. */
#ifndef EF_HAL_TASKS_H
#define EF_HAL_TASKS_H

/* The GEMM epilogue on an output tile, rows spread over the team: z = alpha z (+ beta C). */
typedef struct {
    float *z;              /* rows x cols (one output tile in L1, or Y itself when k == 0) */
    int rows, cols, z_rs;  /* z's row stride */
    const float *c;        /* NULL, or C at the tile's first element */
    int c_rs, c_cs;
    float alpha, beta;
} ef_hal_epilogue_t;

void ef_hal_epilogue_task(void *arg);   /* arg: an ef_hal_epilogue_t; run through ef_hal_fork */

#endif
