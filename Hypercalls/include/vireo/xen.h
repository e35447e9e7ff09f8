/*
 * vireo/xen.h — the core of the guest ABI: basic types, hypercall numbers and calling
 * convention, Xen errno values, domain IDs, CPUID leaves, console_io, and the
 * shared_info / vcpu_info pages with their pvclock and wallclock fields.
 *
 * Layouts and numbers are Xen's public ABI for x86_64; see Hypercalls/README.md for the
 * naming rules (VIREO_X <-> X, struct vireo_x <-> struct x).
 */
#ifndef VIREO_ABI_XEN_H
#define VIREO_ABI_XEN_H

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------------------
 * Basic types
 * ------------------------------------------------------------------------------------- */

/* A domain's identity. Ordinary domains are 0 .. VIREO_DOMID_FIRST_RESERVED-1. */
typedef uint16_t vireo_domid_t;
/* A guest frame number (guest-physical address >> 12). */
typedef uint64_t vireo_xen_pfn_t;
/* Xen's `unsigned long`-sized word on x86_64. */
typedef uint64_t vireo_xen_ulong_t;
/*
 * Xen's XEN_GUEST_HANDLE(T) on x86_64: a guest-virtual address of a T (or an array of T).
 * The host translates it through the guest's page tables, checking bounds and permissions,
 * on every use; it is never a host pointer.
 */
typedef uint64_t vireo_guest_handle_t;

/* A domain's 16-byte handle (its UUID), as XENVER_guest_handle returns it. */
typedef uint8_t vireo_xen_domain_handle_t[16];

#define VIREO_ABI_PAGE_SHIFT 12
#define VIREO_ABI_PAGE_SIZE  4096

/* ---------------------------------------------------------------------------------------
 * Hypercalls
 *
 * Discovery (HVM/PVH guests):
 *   1. CPUID leaf VIREO_XEN_CPUID_FIRST_LEAF returns the maximum Xen leaf in EAX and the
 *      signature "XenVMMXenVMM" in EBX, ECX, EDX.
 *   2. Leaf +1: EAX = (major << 16) | minor version.
 *   3. Leaf +2: EAX = number of hypercall pages (1), EBX = the MSR that installs them.
 *   4. The guest writes the guest-physical address of a page it owns to that MSR
 *      (wrmsr, EDX:EAX = address | page index in the low 12 bits, index 0).
 *      The host fills the page with one 32-byte stub per hypercall number.
 *
 * Calling convention (x86_64): `call hypercall_page + nr * 32` with
 *   RDI, RSI, RDX, R10, R8 = arguments 1..5 (pointers are guest-virtual addresses),
 *   RAX = result: >= 0 on success, -VIREO_XEN_E* on failure.
 * A guest must treat RAX and the argument registers it passed as clobbered (Xen may
 * scribble on unused argument registers in debug builds); Vireo's stubs preserve every
 * other register, the flags included where Xen preserves them.
 * --------------------------------------------------------------------------------------- */

#define VIREO_ABI_HYPERCALL_STUB_SIZE 32

/* The full Xen numbering, so that a guest's number is never misread. "Vireo:" says whether
 * Vireo implements it; every unsupported number returns -VIREO_XEN_ENOSYS. */
#define VIREO_HYPERVISOR_set_trap_table          0  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_mmu_update              1  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_set_gdt                 2  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_stack_switch            3  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_set_callbacks           4  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_fpu_taskswitch          5  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_sched_op_compat         6  /* Vireo: no (use sched_op) */
#define VIREO_HYPERVISOR_platform_op             7  /* Vireo: no (toolstack ABI) */
#define VIREO_HYPERVISOR_set_debugreg            8  /* Vireo: no */
#define VIREO_HYPERVISOR_get_debugreg            9  /* Vireo: no */
#define VIREO_HYPERVISOR_update_descriptor      10  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_memory_op              12  /* Vireo: yes, sub-op subset (memory.h) */
#define VIREO_HYPERVISOR_multicall              13  /* Vireo: no */
#define VIREO_HYPERVISOR_update_va_mapping      14  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_set_timer_op           15  /* Vireo: yes: arg1 = absolute system time (ns), 0 cancels */
#define VIREO_HYPERVISOR_event_channel_op_compat 16 /* Vireo: no (use event_channel_op) */
#define VIREO_HYPERVISOR_xen_version            17  /* Vireo: yes (version.h) */
#define VIREO_HYPERVISOR_console_io             18  /* Vireo: yes: CONSOLEIO_write; read returns 0 bytes */
#define VIREO_HYPERVISOR_physdev_op_compat      19  /* Vireo: no */
#define VIREO_HYPERVISOR_grant_table_op         20  /* Vireo: yes, sub-op subset (grant_table.h) */
#define VIREO_HYPERVISOR_vm_assist              21  /* Vireo: no */
#define VIREO_HYPERVISOR_update_va_mapping_otherdomain 22 /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_iret                   23  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_vcpu_op                24  /* Vireo: yes, sub-op subset (vcpu.h) */
#define VIREO_HYPERVISOR_set_segment_base       25  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_mmuext_op              26  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_xsm_op                 27  /* Vireo: no */
#define VIREO_HYPERVISOR_nmi_op                 28  /* Vireo: no */
#define VIREO_HYPERVISOR_sched_op               29  /* Vireo: yes, sub-op subset (sched.h) */
#define VIREO_HYPERVISOR_callback_op            30  /* Vireo: no (PV-MMU only) */
#define VIREO_HYPERVISOR_xenoprof_op            31  /* Vireo: no */
#define VIREO_HYPERVISOR_event_channel_op       32  /* Vireo: yes, sub-op subset (event_channel.h) */
#define VIREO_HYPERVISOR_physdev_op             33  /* Vireo: no */
#define VIREO_HYPERVISOR_hvm_op                 34  /* Vireo: yes: set_param, get_param (hvm/hvm_op.h) */
#define VIREO_HYPERVISOR_sysctl                 35  /* Vireo: no (toolstack ABI) */
#define VIREO_HYPERVISOR_domctl                 36  /* Vireo: no (toolstack ABI) */
#define VIREO_HYPERVISOR_kexec_op               37  /* Vireo: no */
#define VIREO_HYPERVISOR_tmem_op                38  /* Vireo: no */
#define VIREO_HYPERVISOR_argo_op                39  /* Vireo: no */
#define VIREO_HYPERVISOR_xenpmu_op              40  /* Vireo: no */
#define VIREO_HYPERVISOR_dm_op                  41  /* Vireo: no */
#define VIREO_HYPERVISOR_hypfs_op               42  /* Vireo: no */
#define VIREO_HYPERVISOR_arch_0                 48  /* Vireo: no (x86: mca) */
#define VIREO_HYPERVISOR_arch_1                 49  /* Vireo: no (x86: paging_domctl_cont) */
#define VIREO_HYPERVISOR_arch_2                 50  /* Vireo: no */
#define VIREO_HYPERVISOR_arch_3                 51  /* Vireo: no */
#define VIREO_HYPERVISOR_arch_4                 52  /* Vireo: no */
#define VIREO_HYPERVISOR_arch_5                 53  /* Vireo: no */
#define VIREO_HYPERVISOR_arch_6                 54  /* Vireo: no */
#define VIREO_HYPERVISOR_arch_7                 55  /* Vireo: no */

/* One stub per number fits the page: 4096 / 32 = 128 slots. */
#define VIREO_ABI_HYPERCALL_SLOTS (VIREO_ABI_PAGE_SIZE / VIREO_ABI_HYPERCALL_STUB_SIZE)

/* ---------------------------------------------------------------------------------------
 * CPUID leaves a Xen guest probes (arch-x86/cpuid.h in Xen).
 * ------------------------------------------------------------------------------------- */

#define VIREO_XEN_CPUID_FIRST_LEAF      0x40000000
#define VIREO_XEN_CPUID_SIGNATURE_EBX   0x566e6558 /* "XenV" */
#define VIREO_XEN_CPUID_SIGNATURE_ECX   0x65584d4d /* "MMXe" */
#define VIREO_XEN_CPUID_SIGNATURE_EDX   0x4d4d566e /* "nVMM" */
#define VIREO_XEN_CPUID_MAX_NUM_LEAVES  5
/* Leaf +4, HVM-specific features, in EAX: EBX holds the vCPU id (the vcpuid of vcpu_op) and
 * ECX the domain id when these flags are set. */
#define VIREO_XEN_HVM_CPUID_VCPU_ID_PRESENT (1u << 3)
#define VIREO_XEN_HVM_CPUID_DOMID_PRESENT   (1u << 4)
/* The MSR a guest writes to install the hypercall page (reported in leaf +2, EBX). */
#define VIREO_ABI_HYPERCALL_PAGE_MSR    0x40000000u

/* Port 0xe9: a byte written here goes to the host's debug console (Xen and QEMU agree). */
#define VIREO_XEN_HVM_DEBUGCONS_IOPORT  0xe9

/* ---------------------------------------------------------------------------------------
 * console_io(cmd, count, buffer)
 *   CONSOLEIO_write: IN count bytes at guest-virtual `buffer`; returns 0 or -errno.
 *   CONSOLEIO_read:  OUT up to count bytes; returns the number read.
 * Output is rate-limited per domain by the host.
 * ------------------------------------------------------------------------------------- */

#define VIREO_CONSOLEIO_write 0
#define VIREO_CONSOLEIO_read  1

/* ---------------------------------------------------------------------------------------
 * Errors: a failing hypercall returns the negated value. These are Xen's numbers (they
 * happen to equal Linux's); a guest must not assume its own libc's errno values.
 * ------------------------------------------------------------------------------------- */

#define VIREO_XEN_EPERM          1
#define VIREO_XEN_ENOENT         2
#define VIREO_XEN_ESRCH          3
#define VIREO_XEN_EIO            5
#define VIREO_XEN_ENXIO          6
#define VIREO_XEN_E2BIG          7
#define VIREO_XEN_ENOEXEC        8
#define VIREO_XEN_EBADF          9
#define VIREO_XEN_ECHILD        10
#define VIREO_XEN_EAGAIN        11
#define VIREO_XEN_EWOULDBLOCK   11
#define VIREO_XEN_ENOMEM        12
#define VIREO_XEN_EACCES        13
#define VIREO_XEN_EFAULT        14
#define VIREO_XEN_EBUSY         16
#define VIREO_XEN_EEXIST        17
#define VIREO_XEN_EXDEV         18
#define VIREO_XEN_ENODEV        19
#define VIREO_XEN_ENOTDIR       20
#define VIREO_XEN_EISDIR        21
#define VIREO_XEN_EINVAL        22
#define VIREO_XEN_ENFILE        23
#define VIREO_XEN_EMFILE        24
#define VIREO_XEN_ENOSPC        28
#define VIREO_XEN_EROFS         30
#define VIREO_XEN_EMLINK        31
#define VIREO_XEN_EDOM          33
#define VIREO_XEN_ERANGE        34
#define VIREO_XEN_EDEADLK       35
#define VIREO_XEN_EDEADLOCK     35
#define VIREO_XEN_ENAMETOOLONG  36
#define VIREO_XEN_ENOLCK        37
#define VIREO_XEN_ENOSYS        38
#define VIREO_XEN_ENOTEMPTY     39
#define VIREO_XEN_ENODATA       61
#define VIREO_XEN_ETIME         62
#define VIREO_XEN_EBADMSG       74
#define VIREO_XEN_EOVERFLOW     75
#define VIREO_XEN_EILSEQ        84
#define VIREO_XEN_ENOTSOCK      88
#define VIREO_XEN_EMSGSIZE      90
#define VIREO_XEN_EOPNOTSUPP    95
#define VIREO_XEN_EADDRINUSE    98
#define VIREO_XEN_EADDRNOTAVAIL 99
#define VIREO_XEN_ENOBUFS      105
#define VIREO_XEN_EISCONN      106
#define VIREO_XEN_ENOTCONN     107
#define VIREO_XEN_ETIMEDOUT    110
#define VIREO_XEN_ECONNREFUSED 111

/* ---------------------------------------------------------------------------------------
 * Domain IDs
 * ------------------------------------------------------------------------------------- */

#define VIREO_DOMID_FIRST_RESERVED 0x7FF0U /* ordinary domains are below this */
#define VIREO_DOMID_SELF           0x7FF0U /* "the calling domain" in hypercall arguments */
#define VIREO_DOMID_IO             0x7FF1U
#define VIREO_DOMID_XEN            0x7FF2U
#define VIREO_DOMID_COW            0x7FF3U
#define VIREO_DOMID_INVALID        0x7FF4U
#define VIREO_DOMID_IDLE           0x7FFFU
#define VIREO_DOMID_MASK           0x7FFFU

/* ---------------------------------------------------------------------------------------
 * Start-of-day flags (hvm_start_info.flags and Xen's PV start_info.flags).
 * ------------------------------------------------------------------------------------- */

#define VIREO_SIF_PRIVILEGED      (1<<0) /* the domain may use privileged operations */
#define VIREO_SIF_INITDOMAIN      (1<<1) /* the domain is the initial (backend) domain */
#define VIREO_SIF_MULTIBOOT_MOD   (1<<2) /* PV only: mod_start is a multiboot module */
#define VIREO_SIF_MOD_START_PFN   (1<<3) /* PV only: mod_start is a frame number */
#define VIREO_SIF_VIRT_P2M_4TOOLS (1<<4) /* PV only */
#define VIREO_SIF_PM_MASK         (0xFF<<8) /* reserved for power-management options */

/* ---------------------------------------------------------------------------------------
 * Time: the pvclock record in each vcpu_info.
 *
 * The host (OUT) updates a record as a seqlock:
 *   version += 1 (odd: update in progress); write barrier;
 *   tsc_timestamp, system_time, tsc_to_system_mul, tsc_shift, flags;
 *   write barrier; version += 1 (even: stable).
 * The guest reads: v = version; read barrier; copy the fields; read barrier; retry if
 * version != v or v is odd. Then
 *   delta = rdtsc() - tsc_timestamp;
 *   delta = tsc_shift >= 0 ? delta << tsc_shift : delta >> -tsc_shift;
 *   now   = system_time + ((delta * tsc_to_system_mul) >> 32)    (ns since domain boot)
 * ------------------------------------------------------------------------------------- */

struct vireo_vcpu_time_info {
    uint32_t version;           /* OUT: seqlock counter, odd while the host updates */
    uint32_t pad0;
    uint64_t tsc_timestamp;     /* OUT: TSC value at the last update */
    uint64_t system_time;       /* OUT: ns since domain boot at tsc_timestamp */
    uint32_t tsc_to_system_mul; /* OUT: ns per TSC tick as a 32.32 fixed-point fraction */
    int8_t   tsc_shift;         /* OUT: pre-shift applied to TSC deltas */
    uint8_t  flags;             /* OUT: VIREO_XEN_PVCLOCK_* */
    uint8_t  pad1[2];
};
typedef struct vireo_vcpu_time_info vireo_vcpu_time_info_t;
_Static_assert(sizeof(struct vireo_vcpu_time_info) == 32, "vcpu_time_info size");
_Static_assert(offsetof(struct vireo_vcpu_time_info, version) == 0, "version");
_Static_assert(offsetof(struct vireo_vcpu_time_info, pad0) == 4, "pad0");
_Static_assert(offsetof(struct vireo_vcpu_time_info, tsc_timestamp) == 8, "tsc_timestamp");
_Static_assert(offsetof(struct vireo_vcpu_time_info, system_time) == 16, "system_time");
_Static_assert(offsetof(struct vireo_vcpu_time_info, tsc_to_system_mul) == 24, "tsc_to_system_mul");
_Static_assert(offsetof(struct vireo_vcpu_time_info, tsc_shift) == 28, "tsc_shift");
_Static_assert(offsetof(struct vireo_vcpu_time_info, flags) == 29, "flags");
_Static_assert(offsetof(struct vireo_vcpu_time_info, pad1) == 30, "pad1");

/* The TSC is synchronised across vCPUs: readings from different vCPUs are comparable. */
#define VIREO_XEN_PVCLOCK_TSC_STABLE_BIT (1 << 0)
/* The domain was paused since the last update (the guest may adjust its watchdogs). */
#define VIREO_XEN_PVCLOCK_GUEST_STOPPED  (1 << 1)

/* ---------------------------------------------------------------------------------------
 * vcpu_info: one per vCPU; the first 32 live in shared_info, and a guest may move any
 * vCPU's record to a page of its own (VCPUOP_register_vcpu_info).
 * ------------------------------------------------------------------------------------- */

struct vireo_arch_vcpu_info {
    uint64_t cr2;  /* unused by HVM/PVH guests */
    uint64_t pad;
};
typedef struct vireo_arch_vcpu_info vireo_arch_vcpu_info_t;
_Static_assert(sizeof(struct vireo_arch_vcpu_info) == 16, "arch_vcpu_info size");
_Static_assert(offsetof(struct vireo_arch_vcpu_info, cr2) == 0, "cr2");
_Static_assert(offsetof(struct vireo_arch_vcpu_info, pad) == 8, "pad");

struct vireo_vcpu_info {
    /*
     * OUT (host sets to 1) / IN (guest clears to 0): "some event for this vCPU is pending".
     * The host sets it after setting the pending_sel bit; the guest clears it before it
     * scans pending_sel, so an event that arrives during the scan is not lost.
     */
    uint8_t evtchn_upcall_pending;
    /*
     * IN: the guest's upcall mask. Non-zero means "do not interrupt me"; the host still
     * sets the pending bits and delivers the upcall once the guest clears it and
     * notices pending work. (Xen names this field pad0 unless XEN_HAVE_PV_UPCALL_MASK.)
     */
    uint8_t evtchn_upcall_mask;
    /*
     * OUT (host sets bits with atomic OR) / IN (guest clears with atomic exchange):
     * bit i set means word i of shared_info.evtchn_pending may hold pending ports.
     */
    vireo_xen_ulong_t evtchn_pending_sel;
    struct vireo_arch_vcpu_info arch;
    struct vireo_vcpu_time_info time; /* OUT: pvclock, see above */
};
typedef struct vireo_vcpu_info vireo_vcpu_info_t;
_Static_assert(sizeof(struct vireo_vcpu_info) == 64, "vcpu_info size");
_Static_assert(offsetof(struct vireo_vcpu_info, evtchn_upcall_pending) == 0, "evtchn_upcall_pending");
_Static_assert(offsetof(struct vireo_vcpu_info, evtchn_upcall_mask) == 1, "evtchn_upcall_mask");
_Static_assert(offsetof(struct vireo_vcpu_info, evtchn_pending_sel) == 8, "evtchn_pending_sel");
_Static_assert(offsetof(struct vireo_vcpu_info, arch) == 16, "arch");
_Static_assert(offsetof(struct vireo_vcpu_info, time) == 32, "time");

/* ---------------------------------------------------------------------------------------
 * shared_info: one page per domain, mapped by the guest with
 * memory_op(XENMEM_add_to_physmap, space = XENMAPSPACE_shared_info).
 * ------------------------------------------------------------------------------------- */

#define VIREO_XEN_LEGACY_MAX_VCPUS 32

struct vireo_arch_shared_info {
    /* Fields for PV-MMU guests; Vireo leaves them zero. */
    uint64_t max_pfn;
    vireo_xen_pfn_t pfn_to_mfn_frame_list_list;
    uint64_t nmi_reason;
    uint64_t p2m_cr3;
    uint64_t p2m_vaddr;
    uint64_t p2m_generation;
};
typedef struct vireo_arch_shared_info vireo_arch_shared_info_t;
_Static_assert(sizeof(struct vireo_arch_shared_info) == 48, "arch_shared_info size");
_Static_assert(offsetof(struct vireo_arch_shared_info, max_pfn) == 0, "max_pfn");
_Static_assert(offsetof(struct vireo_arch_shared_info, pfn_to_mfn_frame_list_list) == 8, "p2m list");
_Static_assert(offsetof(struct vireo_arch_shared_info, nmi_reason) == 16, "nmi_reason");
_Static_assert(offsetof(struct vireo_arch_shared_info, p2m_cr3) == 24, "p2m_cr3");
_Static_assert(offsetof(struct vireo_arch_shared_info, p2m_vaddr) == 32, "p2m_vaddr");
_Static_assert(offsetof(struct vireo_arch_shared_info, p2m_generation) == 40, "p2m_generation");

struct vireo_shared_info {
    struct vireo_vcpu_info vcpu_info[VIREO_XEN_LEGACY_MAX_VCPUS];
    /*
     * The 2-level event channel bitmaps (see event_channel.h for the full protocol):
     * port p is bit (p % 64) of word (p / 64).
     * evtchn_pending: OUT (host sets with atomic OR) / IN (guest clears with atomic AND).
     * evtchn_mask:    IN (guest); the host reads it, and writes it only to clear a bit
     *                 for EVTCHNOP_unmask.
     */
    vireo_xen_ulong_t evtchn_pending[sizeof(vireo_xen_ulong_t) * 8];
    vireo_xen_ulong_t evtchn_mask[sizeof(vireo_xen_ulong_t) * 8];
    /*
     * OUT: wallclock at domain boot (system_time 0), seconds and ns since the Unix epoch.
     * Same seqlock as vcpu_time_info: wc_version odd while the host writes.
     * Seconds are wc_sec | (wc_sec_hi << 32).
     */
    uint32_t wc_version;
    uint32_t wc_sec;
    uint32_t wc_nsec;
    uint32_t wc_sec_hi;
    struct vireo_arch_shared_info arch;
};
typedef struct vireo_shared_info vireo_shared_info_t;
_Static_assert(sizeof(struct vireo_shared_info) == 3136, "shared_info size");
_Static_assert(sizeof(struct vireo_shared_info) <= VIREO_ABI_PAGE_SIZE, "fits one page");
_Static_assert(offsetof(struct vireo_shared_info, vcpu_info) == 0, "vcpu_info");
_Static_assert(offsetof(struct vireo_shared_info, evtchn_pending) == 2048, "evtchn_pending");
_Static_assert(offsetof(struct vireo_shared_info, evtchn_mask) == 2560, "evtchn_mask");
_Static_assert(offsetof(struct vireo_shared_info, wc_version) == 3072, "wc_version");
_Static_assert(offsetof(struct vireo_shared_info, wc_sec) == 3076, "wc_sec");
_Static_assert(offsetof(struct vireo_shared_info, wc_nsec) == 3080, "wc_nsec");
_Static_assert(offsetof(struct vireo_shared_info, wc_sec_hi) == 3084, "wc_sec_hi");
_Static_assert(offsetof(struct vireo_shared_info, arch) == 3088, "arch");

#endif /* VIREO_ABI_XEN_H */
