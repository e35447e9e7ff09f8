/*
 * vireo/sched.h — sched_op(cmd, arg): giving up the CPU, waiting for events, and
 * shutting the domain down.
 *
 * Layouts and numbers are Xen's public ABI for x86_64 (Xen's sched.h); see
 * Hypercalls/README.md for the naming rules.
 */
#ifndef VIREO_ABI_SCHED_H
#define VIREO_ABI_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "xen.h"
#include "event_channel.h"

/* ---------------------------------------------------------------------------------------
 * sched_op(cmd, arg): arg is the guest-virtual address of the structure named with each
 * command, or 0. Returns 0 or -VIREO_XEN_E*. "Vireo:" says whether Vireo implements
 * the operation; the others return -VIREO_XEN_ENOSYS (38).
 * (sched_op_compat, hypercall 6, is the older form of this call; Vireo does not
 * implement it.)
 * ------------------------------------------------------------------------------------- */

/* Let another vCPU run; this one stays runnable. arg: 0. Vireo: supported. */
#define VIREO_SCHEDOP_yield            0
/*
 * Sleep until an event is pending for this vCPU (evtchn_upcall_pending), returning at
 * once if one already is; the test and the sleep are atomic, so no wakeup is missed
 * between the guest's last check and the call. arg: 0. Vireo: supported.
 */
#define VIREO_SCHEDOP_block            1
/* Stop the whole domain for a reason. arg: vireo_sched_shutdown. Vireo: supported. */
#define VIREO_SCHEDOP_shutdown         2
/* Wait for one of a set of ports, with a timeout. arg: vireo_sched_poll. Vireo: supported. */
#define VIREO_SCHEDOP_poll             3
/* Shut down another domain (privileged). Vireo: not supported. */
#define VIREO_SCHEDOP_remote_shutdown  4
/* Record a reason for a later shutdown without stopping now. Vireo: not supported. */
#define VIREO_SCHEDOP_shutdown_code    5
/* Domain watchdog timers. Vireo: not supported. */
#define VIREO_SCHEDOP_watchdog         6
/* Pin the vCPU to a physical CPU (hardware domain only). Vireo: not supported. */
#define VIREO_SCHEDOP_pin_override     7

/*
 * SCHEDOP_shutdown: every vCPU of the domain stops and the toolstack is told `reason`.
 * The call does not return, except for SHUTDOWN_suspend: under Xen that returns after
 * the domain is resumed (0 when resumed in a new domain, 1 when the suspend was
 * cancelled).
 */
struct vireo_sched_shutdown {
    uint32_t reason; /* IN: VIREO_SHUTDOWN_* */
};
typedef struct vireo_sched_shutdown vireo_sched_shutdown_t;
_Static_assert(sizeof(struct vireo_sched_shutdown) == 4, "sched_shutdown size");
_Static_assert(offsetof(struct vireo_sched_shutdown, reason) == 0, "reason");

/* Shutdown reasons: what the guest asks the toolstack to do with it. */
#define VIREO_SHUTDOWN_poweroff   0 /* finished normally: destroy the domain */
#define VIREO_SHUTDOWN_reboot     1 /* destroy and start again */
#define VIREO_SHUTDOWN_suspend    2 /* save state for a later resume */
#define VIREO_SHUTDOWN_crash      3 /* the guest failed */
#define VIREO_SHUTDOWN_watchdog   4 /* a watchdog expired: restart */
#define VIREO_SHUTDOWN_soft_reset 5 /* reset hypervisor-side state, keep memory and vCPUs */
#define VIREO_SHUTDOWN_MAX        5 /* the highest valid reason */

/*
 * SCHEDOP_poll: sleep until one of the listed ports of the caller is pending (masked
 * or not: polling a masked port is the point of this call) or until system time reaches
 * `timeout`. Returns 0 in both cases, and at once if a listed port is already pending
 * or an upcall is due for the vCPU; the caller looks at the pending bits to tell which.
 * At most 128 ports (-EINVAL beyond).
 */
struct vireo_sched_poll {
    vireo_guest_handle_t ports; /* IN: guest-virtual address of nr_ports vireo_evtchn_port_t */
    uint32_t nr_ports;          /* IN: entries in ports */
    uint64_t timeout;           /* IN: deadline in system time (ns since boot); 0: none */
};
typedef struct vireo_sched_poll vireo_sched_poll_t;
_Static_assert(sizeof(struct vireo_sched_poll) == 24, "sched_poll size");
_Static_assert(offsetof(struct vireo_sched_poll, ports) == 0, "ports");
_Static_assert(offsetof(struct vireo_sched_poll, nr_ports) == 8, "nr_ports");
_Static_assert(offsetof(struct vireo_sched_poll, timeout) == 16, "timeout");

#endif /* VIREO_ABI_SCHED_H */
