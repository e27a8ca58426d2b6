/* Core tasks shared by ef_hal_gemm.c and ef_hal_lora.c (ef_hal_tasks.h). */
#include "ef_hal.h"
#include "ef_hal_tasks.h"

void ef_hal_epilogue_task(void *arg) {
    const ef_hal_epilogue_t *e = (const ef_hal_epilogue_t *)arg;
    const int team = ef_hal_team_size();
    for (int i = ef_hal_core_id(); i < e->rows; i += team) {
        float *zr = e->z + (long)i * e->z_rs;
        if (e->alpha != 1.0f) {
            for (int j = 0; j < e->cols; j++) zr[j] *= e->alpha;
        }
        if (e->c) {
            const float *cr = e->c + (long)i * e->c_rs;
            if (e->beta == 1.0f) {
                for (int j = 0; j < e->cols; j++) zr[j] += cr[(long)j * e->c_cs];
            } else {
                for (int j = 0; j < e->cols; j++) zr[j] += cr[(long)j * e->c_cs] * e->beta;
            }
        }
    }
}
