/*
 * vireo/hvm/hvm_op.h — hvm_op(op, arg): operations for HVM/PVH guests. Vireo implements
 * reading and writing HVM parameters (hvm/params.h) and nothing else.
 *
 * Layouts and numbers are Xen's public ABI for x86_64 (Xen's hvm/hvm_op.h); see
 * Hypercalls/README.md for the naming rules.
 */
#ifndef VIREO_ABI_HVM_HVM_OP_H
#define VIREO_ABI_HVM_HVM_OP_H

#include <stddef.h>
#include <stdint.h>

#include "../xen.h"

/* ---------------------------------------------------------------------------------------
 * hvm_op(op, arg): arg is the guest-virtual address of the structure named with each
 * operation, or 0. Returns 0 or -VIREO_XEN_E*. "Vireo:" says whether Vireo implements
 * the operation; the others return -VIREO_XEN_ENOSYS (38).
 *
 * Numbers missing below: 2-4, 6-8, 14 and 16-22 were device-model operations (IRQ
 * levels, ioreq servers, ...) that Xen moved to dm_op in 4.9; Xen's header defines only
 * 2-4 still, and only for interface versions before 4.9. 12 and 13 (memory access) are
 * toolstack-only and deprecated. Vireo returns -ENOSYS for all of them.
 * ------------------------------------------------------------------------------------- */

#define VIREO_HVMOP_set_param                0  /* Vireo: supported. arg: vireo_xen_hvm_param */
#define VIREO_HVMOP_get_param                1  /* Vireo: supported. arg: vireo_xen_hvm_param */
#define VIREO_HVMOP_flush_tlbs               5  /* Vireo: not supported */
#define VIREO_HVMOP_pagetable_dying          9  /* Vireo: not supported */
#define VIREO_HVMOP_get_time                10  /* Vireo: not supported */
#define VIREO_HVMOP_xentrace                11  /* Vireo: not supported */
#define VIREO_HVMOP_get_mem_type            15  /* Vireo: not supported */
#define VIREO_HVMOP_set_evtchn_upcall_vector 23 /* Vireo: not supported (use HVM_PARAM_CALLBACK_IRQ) */
#define VIREO_HVMOP_guest_request_vm_event  24  /* Vireo: not supported */
#define VIREO_HVMOP_altp2m                  25  /* Vireo: not supported */

/*
 * HVMOP_set_param / HVMOP_get_param: write or read parameter `index` of domain `domid`.
 * A guest passes DOMID_SELF. Indices and their meanings are in hvm/params.h.
 */
struct vireo_xen_hvm_param {
    vireo_domid_t domid; /* IN: DOMID_SELF (other domains need privilege) */
    uint16_t pad;        /* IN: write 0 */
    uint32_t index;      /* IN: VIREO_HVM_PARAM_* */
    uint64_t value;      /* IN for set_param; OUT for get_param */
};
typedef struct vireo_xen_hvm_param vireo_xen_hvm_param_t;
_Static_assert(sizeof(struct vireo_xen_hvm_param) == 16, "xen_hvm_param size");
_Static_assert(offsetof(struct vireo_xen_hvm_param, domid) == 0, "domid");
_Static_assert(offsetof(struct vireo_xen_hvm_param, pad) == 2, "pad");
_Static_assert(offsetof(struct vireo_xen_hvm_param, index) == 4, "index");
_Static_assert(offsetof(struct vireo_xen_hvm_param, value) == 8, "value");

#endif /* VIREO_ABI_HVM_HVM_OP_H */
