/*
 * vireo/hvm/hvm_vcpu.h — the initial register state of a secondary vCPU of an HVM/PVH guest,
 * given with vcpu_op(VCPUOP_initialise, vcpu, &context) before vcpu_op(VCPUOP_up, vcpu).
 *
 * Layouts are Xen's public ABI for x86_64 (Xen's hvm/hvm_vcpu.h); see Hypercalls/README.md for
 * the naming rules. Every field is IN (the guest writes it; the host reads it once, at
 * VCPUOP_initialise, and validates the copy).
 */
#ifndef VIREO_ABI_HVM_HVM_VCPU_H
#define VIREO_ABI_HVM_HVM_VCPU_H

#include <stddef.h>
#include <stdint.h>

/* Start in 32-bit protected mode: segments from the *_base/_limit/_ar fields. */
struct vireo_vcpu_hvm_x86_32 {
    uint32_t eax, ecx, edx, ebx, esp, ebp, esi, edi; /* IN: general registers */
    uint32_t eip;                                    /* IN: entry point */
    uint32_t eflags;                                 /* IN */
    uint32_t cr0, cr3, cr4;                          /* IN: paging may be on (CR0.PG with CR3) */
    uint32_t pad1;
    uint64_t efer;                                   /* IN: NXE, or LME/LMA for compatibility mode */
    uint32_t cs_base, ds_base, ss_base, es_base, tr_base;        /* IN: hidden segment bases */
    uint32_t cs_limit, ds_limit, ss_limit, es_limit, tr_limit;   /* IN: byte-granular limits */
    uint16_t cs_ar, ds_ar, ss_ar, es_ar, tr_ar;                  /* IN: VMX-style access rights */
    uint16_t pad2[3];
};
typedef struct vireo_vcpu_hvm_x86_32 vireo_xen_vcpu_hvm_x86_32_t;
_Static_assert(sizeof(struct vireo_vcpu_hvm_x86_32) == 120, "vcpu_hvm_x86_32 size");
_Static_assert(offsetof(struct vireo_vcpu_hvm_x86_32, eip) == 32, "eip");
_Static_assert(offsetof(struct vireo_vcpu_hvm_x86_32, cr0) == 40, "cr0");
_Static_assert(offsetof(struct vireo_vcpu_hvm_x86_32, efer) == 56, "efer");
_Static_assert(offsetof(struct vireo_vcpu_hvm_x86_32, cs_base) == 64, "cs_base");
_Static_assert(offsetof(struct vireo_vcpu_hvm_x86_32, cs_limit) == 84, "cs_limit");
_Static_assert(offsetof(struct vireo_vcpu_hvm_x86_32, cs_ar) == 104, "cs_ar");
_Static_assert(offsetof(struct vireo_vcpu_hvm_x86_32, pad2) == 114, "pad2");

/* Start directly in 64-bit mode: flat segments, paging on through CR3. */
struct vireo_vcpu_hvm_x86_64 {
    uint64_t rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi; /* IN: general registers */
    uint64_t rip;                                    /* IN: entry point */
    uint64_t rflags;                                 /* IN */
    uint64_t cr0, cr3, cr4, efer;                    /* IN: long mode: PG, PAE, LME|LMA */
};
typedef struct vireo_vcpu_hvm_x86_64 vireo_xen_vcpu_hvm_x86_64_t;
_Static_assert(sizeof(struct vireo_vcpu_hvm_x86_64) == 112, "vcpu_hvm_x86_64 size");
_Static_assert(offsetof(struct vireo_vcpu_hvm_x86_64, rip) == 64, "rip");
_Static_assert(offsetof(struct vireo_vcpu_hvm_x86_64, cr0) == 80, "cr0");
_Static_assert(offsetof(struct vireo_vcpu_hvm_x86_64, efer) == 104, "efer");

#define VIREO_VCPU_HVM_MODE_32B 0 /* cpu_regs.x86_32 is used */
#define VIREO_VCPU_HVM_MODE_64B 1 /* cpu_regs.x86_64 is used */

struct vireo_vcpu_hvm_context {
    uint32_t mode; /* IN: VIREO_VCPU_HVM_MODE_* */
    uint32_t pad;
    union {
        vireo_xen_vcpu_hvm_x86_32_t x86_32;
        vireo_xen_vcpu_hvm_x86_64_t x86_64;
    } cpu_regs;    /* IN */
};
typedef struct vireo_vcpu_hvm_context vireo_vcpu_hvm_context_t;
_Static_assert(sizeof(struct vireo_vcpu_hvm_context) == 128, "vcpu_hvm_context size");
_Static_assert(offsetof(struct vireo_vcpu_hvm_context, mode) == 0, "mode");
_Static_assert(offsetof(struct vireo_vcpu_hvm_context, pad) == 4, "pad");
_Static_assert(offsetof(struct vireo_vcpu_hvm_context, cpu_regs) == 8, "cpu_regs");

#endif /* VIREO_ABI_HVM_HVM_VCPU_H */
