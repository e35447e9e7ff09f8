/*
 * vireo/memory.h — memory_op(cmd, arg): the guest's physical memory, its map, and
 * placing host-provided pages (shared_info, grant table frames) in it.
 *
 * Layouts and numbers are Xen's public ABI for x86_64 (Xen's memory.h); see
 * Hypercalls/README.md for the naming rules.
 *
 * Vireo guests are HVM/PVH guests: their frame numbers are guest frame numbers (GFNs,
 * guest-physical address >> 12), never host or machine frames. Where Xen's names say
 * "mfn" or "gmfn", read GFN.
 */
#ifndef VIREO_ABI_MEMORY_H
#define VIREO_ABI_MEMORY_H

#include <stddef.h>
#include <stdint.h>

#include "xen.h"

/* ---------------------------------------------------------------------------------------
 * memory_op(cmd, arg): cmd is one of these numbers; arg is the guest-virtual address of
 * the structure named with each. "Vireo:" says whether Vireo implements the operation;
 * the others return -VIREO_XEN_ENOSYS (38).
 *
 * Xen also numbers 18-22, 24 and 27 (sharing, paging, access and claim operations and
 * the reserved-device-memory map); Xen shows them to the toolstack only and they are not
 * part of the guest ABI. Vireo returns -ENOSYS for them too. Number 8 is retired.
 * ------------------------------------------------------------------------------------- */

#define VIREO_XENMEM_increase_reservation  0  /* Vireo: not supported; use populate_physmap */
#define VIREO_XENMEM_decrease_reservation  1  /* Vireo: supported. arg: vireo_xen_memory_reservation */
#define VIREO_XENMEM_maximum_ram_page      2  /* Vireo: not supported */
#define VIREO_XENMEM_current_reservation   3  /* Vireo: supported. arg: vireo_xen_memory_domain */
#define VIREO_XENMEM_maximum_reservation   4  /* Vireo: not supported */
#define VIREO_XENMEM_machphys_mfn_list     5  /* Vireo: not supported (PV-MMU only) */
#define VIREO_XENMEM_populate_physmap      6  /* Vireo: supported. arg: vireo_xen_memory_reservation */
#define VIREO_XENMEM_add_to_physmap        7  /* Vireo: supported for XENMAPSPACE_shared_info and
                                                 XENMAPSPACE_grant_table. arg: vireo_xen_add_to_physmap */
#define VIREO_XENMEM_memory_map            9  /* Vireo: supported. arg: vireo_xen_memory_map */
#define VIREO_XENMEM_machine_memory_map   10  /* Vireo: not supported (host's map; privileged) */
#define VIREO_XENMEM_exchange             11  /* Vireo: not supported */
#define VIREO_XENMEM_machphys_mapping     12  /* Vireo: not supported (PV-MMU only) */
#define VIREO_XENMEM_set_memory_map       13  /* Vireo: not supported (toolstack) */
#define VIREO_XENMEM_maximum_gpfn         14  /* Vireo: not supported */
#define VIREO_XENMEM_remove_from_physmap  15  /* Vireo: not supported */
#define VIREO_XENMEM_set_pod_target       16  /* Vireo: not supported (toolstack) */
#define VIREO_XENMEM_get_pod_target       17  /* Vireo: not supported (toolstack) */
#define VIREO_XENMEM_add_to_physmap_batch 23  /* Vireo: not supported */
#define VIREO_XENMEM_machphys_compat_mfn_list 25 /* Vireo: not supported (PV-MMU only) */
#define VIREO_XENMEM_get_vnumainfo        26  /* Vireo: not supported */
#define VIREO_XENMEM_acquire_resource     28  /* Vireo: not supported (toolstack) */

/* ---------------------------------------------------------------------------------------
 * populate_physmap / decrease_reservation (and increase_reservation, exchange)
 *
 * populate_physmap: for each of the nr_extents GFNs in the array at extent_start, give
 *   the guest 2^extent_order fresh zeroed pages starting at that GFN. The array is
 *   rewritten with the GFNs populated.
 * decrease_reservation: for each GFN in the array, give its 2^extent_order pages back
 *   to the host ("ballooning out"); the range is unpopulated afterwards.
 * Both return the number of extents fully processed (>= 0), which is less than
 * nr_extents if the host ran out of memory or hit a bad GFN; or -VIREO_XEN_E*.
 * ------------------------------------------------------------------------------------- */

/*
 * Flags for vireo_xen_memory_reservation.mem_flags. Bits 0-7 ask for memory below
 * 2^n bytes of host-physical address (0: anywhere) and bits 8-15 name a NUMA node plus
 * one; Xen builds those with function-like macros that Vireo does not repeat.
 * Vireo implements none of these placement requests: pass mem_flags = 0.
 */
#define VIREO_XENMEMF_populate_on_demand 0x10000 /* populate lazily on first touch */
#define VIREO_XENMEMF_exact_node_request 0x20000 /* fail rather than use another node */
#define VIREO_XENMEMF_vnode              0x40000 /* bits 8-15 name a virtual node */

struct vireo_xen_memory_reservation {
    /*
     * IN: guest-virtual address of nr_extents vireo_xen_pfn_t values (the GFNs to
     * populate or release); OUT for populate_physmap: rewritten with the GFNs populated.
     */
    vireo_guest_handle_t extent_start;
    vireo_xen_ulong_t nr_extents; /* IN: number of array entries */
    uint32_t extent_order;        /* IN: each extent is 2^extent_order pages (0: one page) */
    uint32_t mem_flags;           /* IN: VIREO_XENMEMF_* (see above; Vireo: 0) */
    vireo_domid_t domid;          /* IN: DOMID_SELF (other domains need privilege) */
};
typedef struct vireo_xen_memory_reservation vireo_xen_memory_reservation_t;
_Static_assert(sizeof(struct vireo_xen_memory_reservation) == 32, "xen_memory_reservation size");
_Static_assert(offsetof(struct vireo_xen_memory_reservation, extent_start) == 0, "extent_start");
_Static_assert(offsetof(struct vireo_xen_memory_reservation, nr_extents) == 8, "nr_extents");
_Static_assert(offsetof(struct vireo_xen_memory_reservation, extent_order) == 16, "extent_order");
_Static_assert(offsetof(struct vireo_xen_memory_reservation, mem_flags) == 20, "mem_flags");
_Static_assert(offsetof(struct vireo_xen_memory_reservation, domid) == 24, "domid");

/*
 * current_reservation (and maximum_reservation, maximum_gpfn): arg points to this.
 * current_reservation returns the number of pages the domain holds now (>= 0).
 */
struct vireo_xen_memory_domain {
    vireo_domid_t domid; /* IN: DOMID_SELF (other domains need privilege) */
};
_Static_assert(sizeof(struct vireo_xen_memory_domain) == 2, "xen_memory_domain size");
_Static_assert(offsetof(struct vireo_xen_memory_domain, domid) == 0, "domid");

/* ---------------------------------------------------------------------------------------
 * add_to_physmap: place a host-provided page in the guest's physical address space.
 *   XENMAPSPACE_shared_info: idx = 0; the domain's shared_info page (vireo/xen.h)
 *     appears at gpfn.
 *   XENMAPSPACE_grant_table: idx = table frame number (0, 1, ...); that frame of the
 *     domain's grant table appears at gpfn (see grant_table.h, setup_table).
 * Whatever page was at gpfn before is no longer mapped there, and if the page being
 * placed was already mapped at another GFN it moves: each has one place at a time.
 * Returns 0 or -VIREO_XEN_E*.
 * ------------------------------------------------------------------------------------- */

#define VIREO_XENMAPSPACE_shared_info  0 /* Vireo: supported */
#define VIREO_XENMAPSPACE_grant_table  1 /* Vireo: supported (v1 frames only) */
#define VIREO_XENMAPSPACE_gmfn         2 /* Vireo: not supported (move one of the guest's pages) */
#define VIREO_XENMAPSPACE_gmfn_range   3 /* Vireo: not supported (move `size` pages) */
#define VIREO_XENMAPSPACE_gmfn_foreign 4 /* Vireo: not supported (another domain's page; batch only) */
#define VIREO_XENMAPSPACE_dev_mmio     5 /* Vireo: not supported (Arm only) */

struct vireo_xen_add_to_physmap {
    vireo_domid_t domid; /* IN: DOMID_SELF (other domains need privilege) */
    uint16_t size;       /* IN: page count for XENMAPSPACE_gmfn_range; otherwise ignored */
    uint32_t space;      /* IN: VIREO_XENMAPSPACE_* */
    vireo_xen_ulong_t idx; /* IN: which page of the space (see above) */
    vireo_xen_pfn_t gpfn;  /* IN: the GFN where it appears */
};
typedef struct vireo_xen_add_to_physmap vireo_xen_add_to_physmap_t;
_Static_assert(sizeof(struct vireo_xen_add_to_physmap) == 24, "xen_add_to_physmap size");
_Static_assert(offsetof(struct vireo_xen_add_to_physmap, domid) == 0, "domid");
_Static_assert(offsetof(struct vireo_xen_add_to_physmap, size) == 2, "size");
_Static_assert(offsetof(struct vireo_xen_add_to_physmap, space) == 4, "space");
_Static_assert(offsetof(struct vireo_xen_add_to_physmap, idx) == 8, "idx");
_Static_assert(offsetof(struct vireo_xen_add_to_physmap, gpfn) == 16, "gpfn");

/* ---------------------------------------------------------------------------------------
 * memory_map: the guest's physical memory map as the toolstack laid it out at boot.
 * The buffer holds E820-style entries, each 20 bytes with no padding:
 *   uint64_t addr (offset 0), uint64_t size (offset 8), uint32_t type (offset 16),
 * type using the same numbers as VIREO_XEN_HVM_MEMMAP_TYPE_* (hvm/start_info.h).
 * The call returns 0 with nr_entries = the number of entries written, or
 * -VIREO_XEN_E*. A PVH guest may also be handed a map in hvm_start_info at boot.
 * ------------------------------------------------------------------------------------- */

#define VIREO_ABI_E820_ENTRY_SIZE 20

struct vireo_xen_memory_map {
    uint32_t nr_entries;         /* IN: room in buffer, in entries; OUT: entries written */
    vireo_guest_handle_t buffer; /* IN: guest-virtual address of the entry array (OUT there) */
};
typedef struct vireo_xen_memory_map vireo_xen_memory_map_t;
_Static_assert(sizeof(struct vireo_xen_memory_map) == 16, "xen_memory_map size");
_Static_assert(offsetof(struct vireo_xen_memory_map, nr_entries) == 0, "nr_entries");
_Static_assert(offsetof(struct vireo_xen_memory_map, buffer) == 8, "buffer");

#endif /* VIREO_ABI_MEMORY_H */
