/* Serial board port for a 16550-compatible UART, polled (QEMU virt: the UART at 0x10000000, 3.6864 MHz
 * clock; override EF_UART_BASE / EF_UART_CLOCK_HZ / EF_UART_BAUD for another board). Counters are the
 * board's mcycle/minstret (ef_board.h; QEMU needs -icount for them to count instructions). The stack is
 * painted at start so that its deepest use can be reported. */
#include <stdint.h>

#include "ef_board.h"
#include "ef_serial.h"

#ifndef EF_UART_BASE
#define EF_UART_BASE 0x10000000u
#endif
#ifndef EF_UART_CLOCK_HZ
#define EF_UART_CLOCK_HZ 3686400u
#endif
#ifndef EF_UART_BAUD
#define EF_UART_BAUD 115200u
#endif
#define STACK_PAINT 0xA5u
#define STACK_GUARD_BYTES 512u   /* left unpainted below the stack pointer at start */

enum { RBR = 0, THR = 0, DLL = 0, IER = 1, DLM = 1, FCR = 2, LCR = 3, MCR = 4, LSR = 5 };
#define LSR_DATA_READY 0x01u
#define LSR_THR_EMPTY 0x20u

extern char __stack[], __stack_size[], __data_start[], __bss_end[];

static inline volatile uint8_t *reg(int r) { return (volatile uint8_t *)(uintptr_t)(EF_UART_BASE + (uint32_t)r); }

static uint8_t *stack_bottom(void) { return (uint8_t *)__stack - (uintptr_t)__stack_size; }

static void paint_stack(void) {
    uint8_t marker;
    volatile uint8_t *p = stack_bottom();
    uint8_t *top = &marker - STACK_GUARD_BYTES;
    while (p < top) *p++ = STACK_PAINT;
}

int ef_serial_port_init(void) {
    uint32_t divisor = EF_UART_CLOCK_HZ / (16u * EF_UART_BAUD);
    *reg(IER) = 0x00;
    *reg(LCR) = 0x80;                      /* divisor latch */
    *reg(DLL) = (uint8_t)divisor;
    *reg(DLM) = (uint8_t)(divisor >> 8);
    *reg(LCR) = 0x03;                      /* 8 data bits, no parity, 1 stop bit */
    *reg(FCR) = 0xC7;                      /* FIFOs on and cleared, receive trigger at 14 bytes */
    *reg(MCR) = 0x03;                      /* DTR, RTS */
    paint_stack();
    return 0;
}

int ef_serial_port_getc(void) {
    while (!(*reg(LSR) & LSR_DATA_READY)) {
    }
    return *reg(RBR);
}

void ef_serial_port_write(const uint8_t *buf, uint32_t n) {
    for (uint32_t i = 0; i < n; i++) {
        while (!(*reg(LSR) & LSR_THR_EMPTY)) {
        }
        *reg(THR) = buf[i];
    }
}

int ef_serial_port_run_step(const ef_phase_t *phase, uint64_t *cycles, uint64_t *instructions) {
    const uint64_t c0 = ef_board_cycles(), i0 = ef_board_instructions();
    phase->run();
    *cycles = ef_board_cycles() - c0;
    *instructions = ef_board_instructions() - i0;
    return 0;
}

uint32_t ef_serial_port_ram_bytes(void) { return (uint32_t)((uintptr_t)__stack - (uintptr_t)__data_start); }
uint32_t ef_serial_port_stack_bytes(void) { return (uint32_t)(uintptr_t)__stack_size; }
uint32_t ef_serial_port_static_bytes(void) { return (uint32_t)((uintptr_t)__bss_end - (uintptr_t)__data_start); }

uint32_t ef_serial_port_stack_peak_bytes(void) {
    const uint8_t *p = stack_bottom();
    while (p < (const uint8_t *)__stack && *p == STACK_PAINT) p++;
    return (uint32_t)((const uint8_t *)__stack - p);
}

const char *ef_serial_port_target(void) { return EF_BOARD_NAME; }
