/*
 * vireo/event_channel.h — event channels: event_channel_op(cmd, arg) sub-operations,
 * virtual IRQ numbers, and the 2-level pending/mask protocol.
 *
 * Layouts and numbers are Xen's public ABI for x86_64 (Xen's event_channel.h, and the
 * VIRQ list from Xen's xen.h); see Hypercalls/README.md for the naming rules.
 *
 * An event channel is a one-bit doorbell identified by a port number local to a domain.
 * Ringing it (EVTCHNOP_send, or the host raising a VIRQ) sets the port's pending bit in
 * the receiving domain's shared_info; an upcall then tells the bound vCPU to look.
 * No payload travels with the event: the receiver finds out what happened from shared
 * memory (a ring, a counter) that it re-reads after clearing the bit.
 */
#ifndef VIREO_ABI_EVENT_CHANNEL_H
#define VIREO_ABI_EVENT_CHANNEL_H

#include <stddef.h>
#include <stdint.h>

#include "xen.h"

/* A port number, local to the domain that owns it. Port 0 is never handed out. */
typedef uint32_t vireo_evtchn_port_t;

/* ---------------------------------------------------------------------------------------
 * The 2-level ABI: bitmaps in shared_info and vcpu_info (vireo/xen.h)
 *
 * Port p is bit (p % 64) of word (p / 64) of shared_info.evtchn_pending and
 * shared_info.evtchn_mask; each vCPU's vcpu_info.evtchn_pending_sel has one bit per word.
 * 64 words of 64 bits give VIREO_EVTCHN_2L_NR_CHANNELS ports.
 *
 * Who writes what:
 *   evtchn_pending[]       host sets bits (atomic OR); guest clears them (atomic AND-NOT).
 *   evtchn_mask[]          guest sets and clears; the host only reads it, except that
 *                          EVTCHNOP_unmask clears the bit on the guest's behalf.
 *   evtchn_pending_sel     host sets bits (atomic OR); guest takes all (atomic exchange).
 *   evtchn_upcall_pending  host sets to 1; guest stores 0.
 *   evtchn_upcall_mask     guest only (see vireo/xen.h). HVM/PVH guests normally leave
 *                          it 0 and hold off upcalls with RFLAGS.IF instead.
 *
 * Send (host side; runs for EVTCHNOP_send from the peer, for a VIRQ, for an IPI):
 *   1. Atomically set the port's pending bit. If it was already set, stop here: the
 *      receiver has not consumed the previous event yet and will see this one with it.
 *   2. If the port's mask bit is set, go to 6. The event stays pending and is
 *      re-examined when the guest unmasks the port.
 *   3. Atomically set bit (p / 64) in the bound vCPU's evtchn_pending_sel.
 *      If it was already set, go to 6: an upcall for that word is already on its way.
 *   4. Atomically set evtchn_upcall_pending = 1 in the same vcpu_info. If it was
 *      already 1, go to 6.
 *   5. Deliver the upcall: inject the callback vector (HVM_PARAM_CALLBACK_IRQ) into the
 *      vCPU, waking it if it is blocked. The guest takes it when RFLAGS.IF allows and
 *      does not EOI any LAPIC for it.
 *   6. Wake any vCPU of the domain that sleeps in SCHEDOP_poll on this port, masked or
 *      not (sched.h).
 *   Steps 1, 3 and 4 are locked read-modify-writes, so each store is visible before the
 *   next: a guest that sees a selector bit will find the pending bit set behind it.
 *
 * Receive (guest's upcall handler):
 *   1. Store evtchn_upcall_pending = 0 first, so that an event arriving while the
 *      handler runs raises the flag again instead of being lost.
 *   2. sel = atomic exchange(evtchn_pending_sel, 0). The exchange is a full barrier:
 *      the clear in step 1 is ordered before this read.
 *   3. For each set bit w in sel: bits = evtchn_pending[w] & ~evtchn_mask[w];
 *      for each set bit b in bits: port = w * 64 + b;
 *        atomically clear the pending bit (before handling, so that a send during the
 *        handler sets it again and is seen on the next pass), then handle the port.
 *   4. If evtchn_upcall_pending is 1 again, go back to step 1.
 *
 * Masking and unmasking (guest):
 *   Mask:   atomically set the mask bit. The host then leaves the port pending without
 *           an upcall (send step 2).
 *   Unmask: atomically clear the mask bit, then re-read the pending bit. If it is set,
 *           an event arrived while masked and no upcall was made for it: either call
 *           EVTCHNOP_unmask, which makes the host perform send steps 3-5, or handle
 *           the port at once as the receive loop would. Setting the selector and
 *           upcall flags from the guest does not make the host inject an upcall.
 * --------------------------------------------------------------------------------------- */

/* Ports in the 2-level ABI on x86_64 (64 words x 64 bits). */
#define VIREO_EVTCHN_2L_NR_CHANNELS 4096UL

/* ---------------------------------------------------------------------------------------
 * Virtual IRQs: events the host raises itself. Bind one to a port with EVTCHNOP_bind_virq.
 * Per-vCPU VIRQs can be bound once on each vCPU and stay on it; global VIRQs are bound
 * once per domain, on vCPU 0, and can be moved with EVTCHNOP_bind_vcpu.
 * "(dom0)" marks sources meant for a control domain; Vireo never raises those for a guest.
 * (Xen keeps this list in its xen.h.)
 * ------------------------------------------------------------------------------------- */

#define VIREO_VIRQ_TIMER       0  /* per-vCPU: the vCPU's singleshot timer expired */
#define VIREO_VIRQ_DEBUG       1  /* per-vCPU: request to dump debug state */
#define VIREO_VIRQ_CONSOLE     2  /* global (dom0): input on the emergency console */
#define VIREO_VIRQ_DOM_EXC     3  /* global (dom0): some domain hit an exceptional state */
#define VIREO_VIRQ_TBUF        4  /* global (dom0): trace buffer has records */
/* 5 is unassigned. */
#define VIREO_VIRQ_DEBUGGER    6  /* global (dom0): a domain paused for a debugger */
#define VIREO_VIRQ_XENOPROF    7  /* per-vCPU: profiling sample ready */
#define VIREO_VIRQ_CON_RING    8  /* global (dom0): input on the hypervisor console ring */
#define VIREO_VIRQ_PCPU_STATE  9  /* global (dom0): a physical CPU changed state */
#define VIREO_VIRQ_MEM_EVENT  10  /* global (dom0): a memory event occurred */
#define VIREO_VIRQ_ARGO       11  /* global: Argo message notification */
#define VIREO_VIRQ_ENOMEM     12  /* global (dom0): hypervisor heap is low */
#define VIREO_VIRQ_XENPMU     13  /* per-vCPU: performance-counter interrupt */
/* 14 and 15 are unassigned; 16-23 are reserved for the architecture (none on x86). */
#define VIREO_VIRQ_ARCH_0     16
#define VIREO_VIRQ_ARCH_1     17
#define VIREO_VIRQ_ARCH_2     18
#define VIREO_VIRQ_ARCH_3     19
#define VIREO_VIRQ_ARCH_4     20
#define VIREO_VIRQ_ARCH_5     21
#define VIREO_VIRQ_ARCH_6     22
#define VIREO_VIRQ_ARCH_7     23
#define VIREO_NR_VIRQS        24  /* VIRQ numbers are below this */

/* ---------------------------------------------------------------------------------------
 * event_channel_op(cmd, arg): cmd is one of these; arg is the guest-virtual address of the
 * matching structure (IN fields read by the host, OUT fields written back on success).
 * Returns 0 or -VIREO_XEN_E*. "Vireo:" says whether Vireo implements the operation;
 * the unsupported ones return -VIREO_XEN_ENOSYS (38).
 * ------------------------------------------------------------------------------------- */

#define VIREO_EVTCHNOP_bind_interdomain  0  /* Vireo: supported */
#define VIREO_EVTCHNOP_bind_virq         1  /* Vireo: supported */
#define VIREO_EVTCHNOP_bind_pirq         2  /* Vireo: not supported (no physical IRQs) */
#define VIREO_EVTCHNOP_close             3  /* Vireo: supported */
#define VIREO_EVTCHNOP_send              4  /* Vireo: supported */
#define VIREO_EVTCHNOP_status            5  /* Vireo: supported */
#define VIREO_EVTCHNOP_alloc_unbound     6  /* Vireo: supported */
#define VIREO_EVTCHNOP_bind_ipi          7  /* Vireo: supported */
#define VIREO_EVTCHNOP_bind_vcpu         8  /* Vireo: supported */
#define VIREO_EVTCHNOP_unmask            9  /* Vireo: supported */
#define VIREO_EVTCHNOP_reset            10  /* Vireo: not supported */
#define VIREO_EVTCHNOP_init_control     11  /* Vireo: not supported (FIFO ABI) */
#define VIREO_EVTCHNOP_expand_array     12  /* Vireo: not supported (FIFO ABI) */
#define VIREO_EVTCHNOP_set_priority     13  /* Vireo: not supported (FIFO ABI) */
/* 14 is Xen-internal (the continuation of a preempted reset); guests never see it. */

/*
 * EVTCHNOP_alloc_unbound: create a port in `dom` that waits for `remote_dom` to connect
 * to it with EVTCHNOP_bind_interdomain. The usual first half of a frontend/backend
 * connection: one side allocates and advertises the port (e.g. in XenStore), the other
 * binds to it.
 */
struct vireo_evtchn_alloc_unbound {
    vireo_domid_t dom;        /* IN: owner of the new port; a guest may only pass DOMID_SELF */
    vireo_domid_t remote_dom; /* IN: the only domain allowed to bind to it (DOMID_SELF allowed) */
    vireo_evtchn_port_t port; /* OUT: the new port, state EVTCHNSTAT_unbound */
};
typedef struct vireo_evtchn_alloc_unbound vireo_evtchn_alloc_unbound_t;
_Static_assert(sizeof(struct vireo_evtchn_alloc_unbound) == 8, "evtchn_alloc_unbound size");
_Static_assert(offsetof(struct vireo_evtchn_alloc_unbound, dom) == 0, "dom");
_Static_assert(offsetof(struct vireo_evtchn_alloc_unbound, remote_dom) == 2, "remote_dom");
_Static_assert(offsetof(struct vireo_evtchn_alloc_unbound, port) == 4, "port");

/*
 * EVTCHNOP_bind_interdomain: connect a new local port to an unbound port of `remote_dom`
 * that was allocated for the caller. Both ends become EVTCHNSTAT_interdomain; a send on
 * either end rings the other. The new local port starts out pending, so that a send the
 * peer made before the connection existed is not lost: the caller should check its
 * shared state once after binding.
 */
struct vireo_evtchn_bind_interdomain {
    vireo_domid_t remote_dom;        /* IN: the peer domain (DOMID_SELF for a loopback) */
    vireo_evtchn_port_t remote_port; /* IN: the peer's unbound port */
    vireo_evtchn_port_t local_port;  /* OUT: the caller's new port */
};
typedef struct vireo_evtchn_bind_interdomain vireo_evtchn_bind_interdomain_t;
_Static_assert(sizeof(struct vireo_evtchn_bind_interdomain) == 12, "evtchn_bind_interdomain size");
_Static_assert(offsetof(struct vireo_evtchn_bind_interdomain, remote_dom) == 0, "remote_dom");
_Static_assert(offsetof(struct vireo_evtchn_bind_interdomain, remote_port) == 4, "remote_port");
_Static_assert(offsetof(struct vireo_evtchn_bind_interdomain, local_port) == 8, "local_port");

/*
 * EVTCHNOP_bind_virq: allocate a port that the host rings when `virq` fires on `vcpu`.
 * A global VIRQ must be bound with vcpu = 0. Binding the same VIRQ twice on one vCPU
 * fails with -EEXIST.
 */
struct vireo_evtchn_bind_virq {
    uint32_t virq;            /* IN: VIREO_VIRQ_* */
    uint32_t vcpu;            /* IN: the vCPU to notify */
    vireo_evtchn_port_t port; /* OUT: the new port */
};
typedef struct vireo_evtchn_bind_virq vireo_evtchn_bind_virq_t;
_Static_assert(sizeof(struct vireo_evtchn_bind_virq) == 12, "evtchn_bind_virq size");
_Static_assert(offsetof(struct vireo_evtchn_bind_virq, virq) == 0, "virq");
_Static_assert(offsetof(struct vireo_evtchn_bind_virq, vcpu) == 4, "vcpu");
_Static_assert(offsetof(struct vireo_evtchn_bind_virq, port) == 8, "port");

/*
 * EVTCHNOP_bind_ipi: allocate a port for inter-processor notifications inside the
 * domain: any vCPU sends on it, `vcpu` receives. The binding cannot be moved.
 */
struct vireo_evtchn_bind_ipi {
    uint32_t vcpu;            /* IN: the vCPU to notify */
    vireo_evtchn_port_t port; /* OUT: the new port */
};
typedef struct vireo_evtchn_bind_ipi vireo_evtchn_bind_ipi_t;
_Static_assert(sizeof(struct vireo_evtchn_bind_ipi) == 8, "evtchn_bind_ipi size");
_Static_assert(offsetof(struct vireo_evtchn_bind_ipi, vcpu) == 0, "vcpu");
_Static_assert(offsetof(struct vireo_evtchn_bind_ipi, port) == 4, "port");

/*
 * EVTCHNOP_close: free a local port. For an interdomain channel the peer's end goes
 * back to EVTCHNSTAT_unbound (bound to the caller's domain), ready for a new connection.
 */
struct vireo_evtchn_close {
    vireo_evtchn_port_t port; /* IN: the caller's port */
};
typedef struct vireo_evtchn_close vireo_evtchn_close_t;
_Static_assert(sizeof(struct vireo_evtchn_close) == 4, "evtchn_close size");
_Static_assert(offsetof(struct vireo_evtchn_close, port) == 0, "port");

/*
 * EVTCHNOP_send: ring the other end of a local port (the peer's port for an
 * interdomain channel, the bound vCPU for an IPI port). Runs the send steps above on
 * the receiving side. Sending on an unbound port is accepted and does nothing.
 */
struct vireo_evtchn_send {
    vireo_evtchn_port_t port; /* IN: the caller's port */
};
typedef struct vireo_evtchn_send vireo_evtchn_send_t;
_Static_assert(sizeof(struct vireo_evtchn_send) == 4, "evtchn_send size");
_Static_assert(offsetof(struct vireo_evtchn_send, port) == 0, "port");

/* EVTCHNOP_status: what a port is bound to. Values of vireo_evtchn_status.status: */
#define VIREO_EVTCHNSTAT_closed       0 /* port free */
#define VIREO_EVTCHNSTAT_unbound      1 /* allocated, waiting for u.unbound.dom to bind */
#define VIREO_EVTCHNSTAT_interdomain  2 /* connected to u.interdomain.{dom,port} */
#define VIREO_EVTCHNSTAT_pirq         3 /* bound to physical IRQ u.pirq (never on Vireo) */
#define VIREO_EVTCHNSTAT_virq         4 /* bound to virtual IRQ u.virq */
#define VIREO_EVTCHNSTAT_ipi          5 /* an IPI port */

struct vireo_evtchn_status {
    vireo_domid_t dom;        /* IN: the port's owner; a guest may only pass DOMID_SELF */
    vireo_evtchn_port_t port; /* IN */
    uint32_t status;          /* OUT: VIREO_EVTCHNSTAT_* */
    uint32_t vcpu;            /* OUT: the vCPU the port notifies */
    union {                   /* OUT: meaning depends on status; other members undefined */
        struct {
            vireo_domid_t dom;         /* the domain allowed to bind */
        } unbound;                     /* EVTCHNSTAT_unbound */
        struct {
            vireo_domid_t dom;         /* the peer domain */
            vireo_evtchn_port_t port;  /* the peer's port */
        } interdomain;                 /* EVTCHNSTAT_interdomain */
        uint32_t pirq;                 /* EVTCHNSTAT_pirq */
        uint32_t virq;                 /* EVTCHNSTAT_virq */
    } u;
};
typedef struct vireo_evtchn_status vireo_evtchn_status_t;
_Static_assert(sizeof(struct vireo_evtchn_status) == 24, "evtchn_status size");
_Static_assert(offsetof(struct vireo_evtchn_status, dom) == 0, "dom");
_Static_assert(offsetof(struct vireo_evtchn_status, port) == 4, "port");
_Static_assert(offsetof(struct vireo_evtchn_status, status) == 8, "status");
_Static_assert(offsetof(struct vireo_evtchn_status, vcpu) == 12, "vcpu");
_Static_assert(offsetof(struct vireo_evtchn_status, u) == 16, "u");
_Static_assert(offsetof(struct vireo_evtchn_status, u.unbound.dom) == 16, "u.unbound.dom");
_Static_assert(offsetof(struct vireo_evtchn_status, u.interdomain.dom) == 16, "u.interdomain.dom");
_Static_assert(offsetof(struct vireo_evtchn_status, u.interdomain.port) == 20, "u.interdomain.port");
_Static_assert(offsetof(struct vireo_evtchn_status, u.pirq) == 16, "u.pirq");
_Static_assert(offsetof(struct vireo_evtchn_status, u.virq) == 16, "u.virq");

/*
 * EVTCHNOP_bind_vcpu: choose which vCPU a port notifies. Works for interdomain and
 * unbound ports and for global VIRQs; IPI ports and per-vCPU VIRQs keep the vCPU they
 * were bound with (-EINVAL). A newly allocated port notifies vCPU 0.
 */
struct vireo_evtchn_bind_vcpu {
    vireo_evtchn_port_t port; /* IN: the caller's port */
    uint32_t vcpu;            /* IN: the vCPU to notify from now on */
};
typedef struct vireo_evtchn_bind_vcpu vireo_evtchn_bind_vcpu_t;
_Static_assert(sizeof(struct vireo_evtchn_bind_vcpu) == 8, "evtchn_bind_vcpu size");
_Static_assert(offsetof(struct vireo_evtchn_bind_vcpu, port) == 0, "port");
_Static_assert(offsetof(struct vireo_evtchn_bind_vcpu, vcpu) == 4, "vcpu");

/*
 * EVTCHNOP_unmask: clear the port's mask bit and, if the port is pending, run send
 * steps 3-5 for it (see "Masking and unmasking" above).
 */
struct vireo_evtchn_unmask {
    vireo_evtchn_port_t port; /* IN: the caller's port */
};
typedef struct vireo_evtchn_unmask vireo_evtchn_unmask_t;
_Static_assert(sizeof(struct vireo_evtchn_unmask) == 4, "evtchn_unmask size");
_Static_assert(offsetof(struct vireo_evtchn_unmask, port) == 0, "port");

#endif /* VIREO_ABI_EVENT_CHANNEL_H */
