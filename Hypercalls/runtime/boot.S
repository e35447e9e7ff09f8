/*
 * boot.S — the first instructions of every Vireo guest: the PVH entry (32-bit protected
 * mode, paging off, EBX = physical address of hvm_start_info), the switch to long mode,
 * the exception table, and the call into the C runtime (runtime.c).
 *
 * The 32-bit part does as little as it can (32-bit code is emulated slowly on some hosts):
 * the page tables are built by the assembler, so it only loads registers and jumps.
 */

#include <vireo/elfnote.h>
#include "vireo_guest.h"

#define CR0_PE          (1 << 0)
#define CR0_WP          (1 << 16)
#define CR0_PG          (1 << 31)
#define CR4_PAE         (1 << 5)
#define MSR_EFER        0xc0000080
#define EFER_LME        (1 << 8)

#define SEL_CODE64      0x08
#define SEL_DATA        0x10

#define PTE_PRESENT     (1 << 0)
#define PTE_WRITABLE    (1 << 1)
#define PTE_LARGE       (1 << 7)

/* Every exception stub is this long, so the IDT loop can step through them. */
#define FAULT_STUB_SIZE 16

/* ---------------------------------------------------------------------------------------
 * Xen ELF notes: the loader finds the entry point here (PT_NOTE, see guest.ld).
 * PHYS32_ENTRY's value is 8 bytes (QEMU reads 8 in ELF64 images; Xen accepts 4 or 8).
 * ------------------------------------------------------------------------------------- */

.macro xen_note type, desc_begin, desc_end
    .p2align 2
    .long 4                         /* namesz: "Xen" and its NUL */
    .long \desc_end - \desc_begin   /* descsz */
    .long \type
    .asciz "Xen"
    .p2align 2
.endm

    .section .note.Xen, "a", @note
    xen_note VIREO_XEN_ELFNOTE_PHYS32_ENTRY, 1f, 2f
1:  .quad vireo_start32
2:
    xen_note VIREO_XEN_ELFNOTE_GUEST_OS, 1f, 2f
1:  .asciz "Vireo"
2:
    xen_note VIREO_XEN_ELFNOTE_XEN_VERSION, 1f, 2f
1:  .asciz "xen-3.0"
2:
    xen_note VIREO_XEN_ELFNOTE_LOADER, 1f, 2f
1:  .asciz "generic"
2:
    .p2align 2

/* ---------------------------------------------------------------------------------------
 * 32-bit entry. Promised: CS/DS/ES flat 32-bit, CR0.PE, paging off, EBX. Nothing else:
 * no stack, no GDT of ours, so no push, call or segment-relative access before lgdt.
 * ------------------------------------------------------------------------------------- */

    .section .text.boot, "ax", @progbits
    .code32
    .globl vireo_start32
    .type vireo_start32, @function
vireo_start32:
    cli
    cld
    lgdt    gdt_pointer

    /* Long mode: PAE, the identity map, EFER.LME, then paging (CPUID must allow LM). */
    movl    %cr4, %eax
    orl     $CR4_PAE, %eax
    movl    %eax, %cr4
    movl    $pml4, %eax
    movl    %eax, %cr3
    movl    $MSR_EFER, %ecx
    rdmsr
    orl     $EFER_LME, %eax
    wrmsr
    movl    %cr0, %eax
    orl     $(CR0_PG | CR0_WP | CR0_PE), %eax
    movl    %eax, %cr0

    /* EBX (hvm_start_info) survives the jump; the 64-bit code passes it on. */
    ljmp    $SEL_CODE64, $vireo_start64
    .size vireo_start32, . - vireo_start32

/* ---------------------------------------------------------------------------------------
 * 64-bit: segments, stack, BSS, exception table, then the runtime.
 * ------------------------------------------------------------------------------------- */

    .code64
    .type vireo_start64, @function
vireo_start64:
    movl    $SEL_DATA, %eax
    movl    %eax, %ds
    movl    %eax, %es
    movl    %eax, %ss
    xorl    %eax, %eax
    movl    %eax, %fs
    movl    %eax, %gs

    /* The loader zero-fills BSS as ELF asks; do it again, as nothing else may be trusted. */
    movl    %ebx, %r12d
    leaq    __bss_start(%rip), %rdi
    leaq    __bss_end(%rip), %rcx
    subq    %rdi, %rcx
    shrq    $3, %rcx
    xorl    %eax, %eax
    rep stosq

    leaq    boot_stack_top(%rip), %rsp
    xorl    %ebp, %ebp

    /* IDT: one 16-byte interrupt gate per exception vector 0..31. */
    leaq    idt(%rip), %rdi
    leaq    fault_stubs(%rip), %rsi
    xorl    %ecx, %ecx
1:  movq    %rsi, %rax
    movw    %ax, (%rdi)                 /* offset 15:0 */
    movw    $SEL_CODE64, 2(%rdi)
    movw    $0x8e00, 4(%rdi)            /* present, DPL 0, 64-bit interrupt gate, IST 0 */
    shrq    $16, %rax
    movw    %ax, 6(%rdi)                /* offset 31:16 */
    shrq    $16, %rax
    movl    %eax, 8(%rdi)               /* offset 63:32 */
    movl    $0, 12(%rdi)
    addq    $16, %rdi
    addq    $FAULT_STUB_SIZE, %rsi
    incl    %ecx
    cmpl    $32, %ecx
    jb      1b
    /* The event-channel upcall (HVM_PARAM_CALLBACK_IRQ, vector type) at its vector. */
    leaq    idt + VIREO_GUEST_UPCALL_VECTOR * 16(%rip), %rdi
    leaq    upcall_stub(%rip), %rax
    movw    %ax, (%rdi)
    movw    $SEL_CODE64, 2(%rdi)
    movw    $0x8e00, 4(%rdi)
    shrq    $16, %rax
    movw    %ax, 6(%rdi)
    shrq    $16, %rax
    movl    %eax, 8(%rdi)
    movl    $0, 12(%rdi)
    lidt    idt_pointer(%rip)

    movl    %r12d, %edi                 /* vireo_runtime_start(start_info_paddr) */
    call    vireo_runtime_start
    /* It does not return; if it ever does, stop here. */
2:  cli
    hlt
    jmp     2b
    .size vireo_start64, . - vireo_start64

/* ---------------------------------------------------------------------------------------
 * Exception stubs, one per vector, all FAULT_STUB_SIZE bytes: each pushes a zero where
 * the CPU pushes no error code, then the vector, so that every fault reaches
 * vireo_runtime_fault with the same frame (struct vireo_fault_frame in runtime.c).
 * ------------------------------------------------------------------------------------- */

    .p2align 4
fault_stubs:
    .irp vector, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .p2align 4
    /* #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX push an error code themselves. */
    .if !((\vector == 8) || (\vector == 10) || (\vector == 11) || (\vector == 12) || (\vector == 13) || (\vector == 14) || (\vector == 17) || (\vector == 21) || (\vector == 29) || (\vector == 30))
    pushq   $0
    .endif
    pushq   $\vector
    jmp     fault_common
    .endr

fault_common:
    /* The frame, lowest address first: r15..rax, vector, error code, rip, cs, rflags, rsp, ss. */
    pushq   %rax
    pushq   %rbx
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    pushq   %rdi
    pushq   %rbp
    pushq   %r8
    pushq   %r9
    pushq   %r10
    pushq   %r11
    pushq   %r12
    pushq   %r13
    pushq   %r14
    pushq   %r15
    movq    %rsp, %rdi
    andq    $-16, %rsp                  /* the ABI's call alignment */
    call    vireo_runtime_fault
3:  cli
    hlt
    jmp     3b

/* ---------------------------------------------------------------------------------------
 * The event-channel upcall: Xen's callback vector, injected while the guest waits with
 * interrupts on (vireo_guest_wait_for_event). It saves what a C call may clobber (the CPU
 * aligned the stack to 16 before its 5-word frame; 9 pushes realign it), calls the runtime
 * and returns with IRETQ: no EOI, as Xen's callback-vector semantics say.
 * ------------------------------------------------------------------------------------- */

    .p2align 4
upcall_stub:
    pushq   %rax
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    pushq   %rdi
    pushq   %r8
    pushq   %r9
    pushq   %r10
    pushq   %r11
    cld
    call    vireo_runtime_upcall
    popq    %r11
    popq    %r10
    popq    %r9
    popq    %r8
    popq    %rdi
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rax
    iretq

/* ---------------------------------------------------------------------------------------
 * Descriptor tables and the identity map.
 * ------------------------------------------------------------------------------------- */

    .section .rodata.boot, "a", @progbits
    .p2align 3
gdt:
    .quad 0                             /* null */
    .quad 0x00af9a000000ffff            /* 0x08: 64-bit code, DPL 0 */
    .quad 0x00cf92000000ffff            /* 0x10: flat data */
gdt_end:
    .p2align 1
gdt_pointer:
    .word gdt_end - gdt - 1
    .quad gdt                           /* lgdt in 32-bit mode reads the low 4 bytes */
idt_pointer:
    .word 256 * 16 - 1
    .quad idt

    /*
     * The first 1 GiB identity-mapped with 2 MiB pages, written by the assembler so that
     * the 32-bit code never loops. The guest's image, stack and heap live below 1 GiB.
     */
    .section .data.pagetables, "aw", @progbits
    .p2align 12
pml4:
    .quad pdpt + (PTE_PRESENT | PTE_WRITABLE)
    .fill 511, 8, 0
pdpt:
    .quad pd + (PTE_PRESENT | PTE_WRITABLE)
    .fill 511, 8, 0
pd:
    .set page, 0
    .rept 512
    .quad (page << 21) | (PTE_PRESENT | PTE_WRITABLE | PTE_LARGE)
    .set page, page + 1
    .endr

    .section .bss.boot, "aw", @nobits
    .p2align 4
idt:
    .skip 256 * 16
    .p2align 4
boot_stack:
    .skip 65536
boot_stack_top:
