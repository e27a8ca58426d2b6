/* Board siracusa: what the FC side (fc.c) and the cluster side (main.c) share. */
#ifndef EF_SIRACUSA_H
#define EF_SIRACUSA_H

#include <stdint.h>

#ifndef EF_SIRACUSA_CORE_STACK_BYTES
#define EF_SIRACUSA_CORE_STACK_BYTES 4096
#endif
#define EF_SIRACUSA_DONE 0x100u   /* ef_siracusa_done = EF_SIRACUSA_DONE | exit code, set by cluster core 0 */

extern volatile uint32_t ef_siracusa_done;

#endif /* EF_SIRACUSA_H */
