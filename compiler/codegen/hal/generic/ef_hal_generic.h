/* What went through the generic HAL (tests and debugging only; the pulp HAL has no such counters). */
#ifndef EF_HAL_GENERIC_H
#define EF_HAL_GENERIC_H

#include <stdint.h>

typedef struct {
    uint64_t forks;
    uint64_t dma_transfers;
    uint64_t dma_bytes;
    uint64_t redmule_jobs;
    uint64_t redmule_macs;
    uint64_t l1_peak_bytes;
} ef_hal_generic_stats_t;

void ef_hal_generic_stats(ef_hal_generic_stats_t *out);
void ef_hal_generic_reset_stats(void);

#endif /* EF_HAL_GENERIC_H */
