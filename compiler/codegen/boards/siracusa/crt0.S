/* Reset entry for board siracusa, shared by the fabric controller (FC) and the cluster cores: GVSoC starts the FC
 * at the ELF entry; the FC starts the cluster cores at the same address (boot address registers, fc.c).
 * mhartid: cluster id in bits [10:5] (the FC is cluster 31), core id in bits [4:0].
 * Assembled for rv32imc: the FC has no F, and nothing here touches floating point. */
    .section .text.start, "ax"
    .globl _start
_start:
    .option push
    .option norelax
    la gp, __global_pointer$
    .option pop
    csrr t0, mhartid
    srli t1, t0, 5
    andi t1, t1, 0x3f
    li t2, 31
    beq t1, t2, 1f
    /* a cluster core: its stack is the id-th slot below __l1_stack_top */
    andi t0, t0, 0x1f
    la sp, __l1_stack_top
    li t2, EF_SIRACUSA_CORE_STACK_BYTES
    mul t3, t0, t2
    sub sp, sp, t3
    mv a0, t0
    call ef_cluster_main
    j 2f
1:  /* the FC: its stack in L2, .bss cleared before anything runs */
    la sp, __fc_stack_top
    la t0, __bss_start
    la t1, __bss_end
3:  bgeu t0, t1, 4f
    sw zero, 0(t0)
    addi t0, t0, 4
    j 3b
4:  call ef_fc_main
2:  wfi
    j 2b
