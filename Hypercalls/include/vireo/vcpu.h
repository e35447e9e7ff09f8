/*
 * vireo/vcpu.h — vcpu_op(cmd, vcpuid, arg): per-vCPU operations (vcpu_info placement,
 * timers).
 *
 * Layouts and numbers are Xen's public ABI for x86_64 (Xen's vcpu.h); see
 * Hypercalls/README.md for the naming rules.
 */
#ifndef VIREO_ABI_VCPU_H
#define VIREO_ABI_VCPU_H

#include <stddef.h>
#include <stdint.h>

#include "xen.h"

/* ---------------------------------------------------------------------------------------
 * vcpu_op(cmd, vcpuid, arg): vcpuid names a vCPU of the calling domain (0-based); arg is
 * the guest-virtual address of the structure named with each command, or 0.
 * Returns 0 or -VIREO_XEN_E*. "Vireo:" says whether Vireo implements the operation; the
 * others return -VIREO_XEN_ENOSYS (38).
 * ------------------------------------------------------------------------------------- */

#define VIREO_VCPUOP_initialise                    0  /* Vireo: not supported */
#define VIREO_VCPUOP_up                            1  /* Vireo: not supported */
#define VIREO_VCPUOP_down                          2  /* Vireo: not supported */
#define VIREO_VCPUOP_is_up                         3  /* Vireo: not supported */
#define VIREO_VCPUOP_get_runstate_info             4  /* Vireo: not supported */
#define VIREO_VCPUOP_register_runstate_memory_area 5  /* Vireo: not supported */
#define VIREO_VCPUOP_set_periodic_timer            6  /* Vireo: not supported. arg: vireo_vcpu_set_periodic_timer */
#define VIREO_VCPUOP_stop_periodic_timer           7  /* Vireo: supported. arg: 0 */
#define VIREO_VCPUOP_set_singleshot_timer          8  /* Vireo: supported. arg: vireo_vcpu_set_singleshot_timer */
#define VIREO_VCPUOP_stop_singleshot_timer         9  /* Vireo: supported. arg: 0 */
#define VIREO_VCPUOP_register_vcpu_info           10  /* Vireo: supported. arg: vireo_vcpu_register_vcpu_info */
#define VIREO_VCPUOP_send_nmi                     11  /* Vireo: not supported */
#define VIREO_VCPUOP_get_physid                   12  /* Vireo: not supported */
#define VIREO_VCPUOP_register_vcpu_time_memory_area 13 /* Vireo: not supported */

/*
 * VCPUOP_set_periodic_timer: raise VIRQ_TIMER on the vCPU every period_ns.
 * Vireo does not run periodic timers, so VCPUOP_stop_periodic_timer (which guests call
 * at boot to turn off the periodic tick Xen may start with) always succeeds.
 */
struct vireo_vcpu_set_periodic_timer {
    uint64_t period_ns; /* IN: interval in ns */
};
typedef struct vireo_vcpu_set_periodic_timer vireo_vcpu_set_periodic_timer_t;
_Static_assert(sizeof(struct vireo_vcpu_set_periodic_timer) == 8, "vcpu_set_periodic_timer size");
_Static_assert(offsetof(struct vireo_vcpu_set_periodic_timer, period_ns) == 0, "period_ns");

/*
 * VCPUOP_set_singleshot_timer: arm the vCPU's one-shot timer; when system time (the
 * pvclock in vcpu_info.time) reaches timeout_abs_ns, the host raises VIREO_VIRQ_TIMER on
 * this vCPU once. Arming again replaces the previous deadline;
 * VCPUOP_stop_singleshot_timer disarms it. Both must be called by the vCPU named in
 * vcpuid (-EINVAL otherwise).
 */
struct vireo_vcpu_set_singleshot_timer {
    uint64_t timeout_abs_ns; /* IN: deadline in system time, ns since domain boot */
    uint32_t flags;          /* IN: VIREO_VCPU_SSHOTTMR_* */
};
typedef struct vireo_vcpu_set_singleshot_timer vireo_vcpu_set_singleshot_timer_t;
_Static_assert(sizeof(struct vireo_vcpu_set_singleshot_timer) == 16, "vcpu_set_singleshot_timer size");
_Static_assert(offsetof(struct vireo_vcpu_set_singleshot_timer, timeout_abs_ns) == 0, "timeout_abs_ns");
_Static_assert(offsetof(struct vireo_vcpu_set_singleshot_timer, flags) == 8, "flags");

/*
 * A request, which the host may ignore: if the deadline has already passed, fail with
 * -VIREO_XEN_ETIME instead of firing at once. A guest must handle both outcomes.
 */
#define VIREO__VCPU_SSHOTTMR_future 0
#define VIREO_VCPU_SSHOTTMR_future  1U

/*
 * VCPUOP_register_vcpu_info: move the vCPU's vcpu_info (vireo/xen.h, 64 bytes) from its
 * slot in shared_info to guest memory at (mfn << 12) + offset. vCPUs 32 and above have
 * no slot in shared_info and must do this before they can receive events.
 *   - The 64 bytes must lie inside that one page (offset <= 4096 - 64).
 *   - Allowed once per vCPU; a second call fails (-EINVAL).
 *   - The host copies the current contents over, then writes only the new location.
 *     It then marks every selector bit and evtchn_upcall_pending so that no event is
 *     lost in the move: expect one upcall that may find nothing to do.
 */
struct vireo_vcpu_register_vcpu_info {
    uint64_t mfn;    /* IN: GFN of the page that will hold the vcpu_info */
    uint32_t offset; /* IN: byte offset of the vcpu_info in that page */
    uint32_t rsvd;   /* IN: unused, write 0 */
};
typedef struct vireo_vcpu_register_vcpu_info vireo_vcpu_register_vcpu_info_t;
_Static_assert(sizeof(struct vireo_vcpu_register_vcpu_info) == 16, "vcpu_register_vcpu_info size");
_Static_assert(offsetof(struct vireo_vcpu_register_vcpu_info, mfn) == 0, "mfn");
_Static_assert(offsetof(struct vireo_vcpu_register_vcpu_info, offset) == 8, "offset");
_Static_assert(offsetof(struct vireo_vcpu_register_vcpu_info, rsvd) == 12, "rsvd");

#endif /* VIREO_ABI_VCPU_H */
