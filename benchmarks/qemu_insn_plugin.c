/* A QEMU TCG plugin counting executed guest instructions (plugin API version 1, QEMU 7.2), for
 * benchmarks/qemu_instructions.py. Every translated instruction gets an inline "add 1" to one counter, so an
 * instruction is counted when it executes (a block left early by a trap counts only what ran). At exit the total
 * goes to the file named by the plugin argument out=PATH.
 *
 * Built at benchmark time against QEMU's qemu-plugin.h, which Debian does not ship: the benchmark looks for it in
 * $EF_QEMU_PLUGIN_INCLUDE and the usual include directories, and falls back to the firmware's minstret counter
 * without it.
 *     gcc -shared -fPIC -O2 -I<dir with qemu-plugin.h> qemu_insn_plugin.c -o libefinsn.so
 *     qemu-system-riscv32 ... -plugin ./libefinsn.so,out=insn.txt
 */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

static uint64_t executed;
static char out_path[4096];

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb) {
    (void)id;
    const size_t n = qemu_plugin_tb_n_insns(tb);
    for (size_t i = 0; i < n; i++)
        qemu_plugin_register_vcpu_insn_exec_inline(qemu_plugin_tb_get_insn(tb, i), QEMU_PLUGIN_INLINE_ADD_U64,
                                                   &executed, 1);
}

static void on_exit(qemu_plugin_id_t id, void *userdata) {
    (void)id, (void)userdata;
    FILE *f = fopen(out_path, "w");
    if (!f) {
        qemu_plugin_outs("edgefleet insn plugin: cannot write the count\n");
        return;
    }
    fprintf(f, "%" PRIu64 "\n", executed);
    fclose(f);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv) {
    (void)info;
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0 && strlen(argv[i] + 4) < sizeof out_path) strcpy(out_path, argv[i] + 4);
    }
    if (!out_path[0]) return -1;   /* nowhere to report */
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_exit, NULL);
    return 0;
}
