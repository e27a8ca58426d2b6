/* Board host: the firmware entry compiled for the build machine (tests, debugging). No counters. */
#ifndef EF_BOARD_H
#define EF_BOARD_H

#include <stdint.h>

#define EF_BOARD_NAME "host"

static inline uint64_t ef_board_cycles(void) { return 0; }
static inline uint64_t ef_board_instructions(void) { return 0; }

#endif /* EF_BOARD_H */
