/*
 * vireo/grant_table.h — grant tables, version 1 only: the shared entry layout, the
 * protocol for granting and revoking, and grant_table_op(cmd, arg, count).
 *
 * Layouts and numbers are Xen's public ABI for x86_64 (Xen's grant_table.h); see
 * Hypercalls/README.md for the naming rules. Vireo does not implement grant table
 * version 2, transitive grants or sub-page grants; their numbers appear only so that a
 * guest's request is recognised and refused.
 *
 * A domain shares one of its pages with another by writing an entry in its own grant
 * table (frames of memory it shares with the host). The entry's index, the grant
 * reference, is what it passes to the other domain (e.g. through XenStore or a ring);
 * the grantee then maps or copies that page through the host, which checks the entry.
 */
#ifndef VIREO_ABI_GRANT_TABLE_H
#define VIREO_ABI_GRANT_TABLE_H

#include <stddef.h>
#include <stdint.h>

#include "xen.h"

/* Index of an entry in the granting domain's table. */
typedef uint32_t vireo_grant_ref_t;

/* Returned by GNTTABOP_map_grant_ref; names one mapping until it is unmapped. */
typedef uint32_t vireo_grant_handle_t;

/* ---------------------------------------------------------------------------------------
 * The v1 entry (8 bytes; 512 per 4 KiB table frame)
 * ------------------------------------------------------------------------------------- */

struct vireo_grant_entry_v1 {
    /*
     * Type and permission bits (VIREO_GTF_*). The granter writes the type and
     * GTF_readonly (IN); the host sets and clears GTF_reading / GTF_writing while the
     * grantee uses the page (OUT). Both sides change it only with atomic operations.
     */
    uint16_t flags;
    vireo_domid_t domid; /* IN: the one domain the grant is for */
    uint32_t frame;      /* IN: the granted page's guest frame number (GFN) */
};
typedef struct vireo_grant_entry_v1 vireo_grant_entry_v1_t;
_Static_assert(sizeof(struct vireo_grant_entry_v1) == 8, "grant_entry_v1 size");
_Static_assert(offsetof(struct vireo_grant_entry_v1, flags) == 0, "flags");
_Static_assert(offsetof(struct vireo_grant_entry_v1, domid) == 2, "domid");
_Static_assert(offsetof(struct vireo_grant_entry_v1, frame) == 4, "frame");

/*
 * The first entries of a table are reserved: the toolstack may fill them before the
 * guest runs (the console and XenStore ring pages, granted to their backend).
 * A guest allocates its own references from VIREO_GNTTAB_NR_RESERVED_ENTRIES upwards.
 */
#define VIREO_GNTTAB_NR_RESERVED_ENTRIES 8
#define VIREO_GNTTAB_RESERVED_CONSOLE    0
#define VIREO_GNTTAB_RESERVED_XENSTORE   1

/* Entry type: flags & GTF_type_mask. */
#define VIREO_GTF_invalid         0U /* the entry grants nothing */
#define VIREO_GTF_permit_access   1U /* domid may map or copy `frame` */
#define VIREO_GTF_accept_transfer 2U /* domid may give this domain a page (transfer; Vireo: never) */
#define VIREO_GTF_type_mask       3U

/* Bits for GTF_permit_access entries. The _GTF_ names are bit numbers. */
#define VIREO__GTF_readonly 2
#define VIREO_GTF_readonly  4U    /* IN: grantee may only read */
#define VIREO__GTF_reading  3
#define VIREO_GTF_reading   8U    /* OUT: the page is mapped or being copied, for reading */
#define VIREO__GTF_writing  4
#define VIREO_GTF_writing   16U   /* OUT: the page is mapped or being copied, for writing */
/*
 * x86 cache attributes the granter asks the grantee's mapping to use (IN). Vireo maps
 * granted pages as ordinary host memory, so they have no effect there.
 */
#define VIREO__GTF_PWT      5
#define VIREO_GTF_PWT       32U
#define VIREO__GTF_PCD      6
#define VIREO_GTF_PCD       64U
#define VIREO__GTF_PAT      7
#define VIREO_GTF_PAT       128U

/*
 * Bits for GTF_accept_transfer entries (OUT). Vireo does not implement
 * GNTTABOP_transfer, so it never sets them.
 *   committed: the host has started a transfer; leave the entry alone until completed.
 *   completed: the host has written the new page's frame number into `frame`.
 */
#define VIREO__GTF_transfer_committed 2
#define VIREO_GTF_transfer_committed  4U
#define VIREO__GTF_transfer_completed 3
#define VIREO_GTF_transfer_completed  8U

/* ---------------------------------------------------------------------------------------
 * Granting and revoking (the granter writes its own table; the host reads it)
 *
 * Grant page G to domain D, read-only or read-write:
 *   1. Pick a free reference r (flags == 0).
 *   2. Write entry[r].domid = D and entry[r].frame = G.
 *   3. Write barrier. The host may act on the entry the moment it sees a valid type in
 *      `flags`, so domid and frame must be visible first. On x86 stores are not
 *      reordered with other stores: a compiler barrier is enough.
 *   4. Write entry[r].flags = GTF_permit_access (| GTF_readonly) in one 16-bit store.
 *   5. Pass r to D.
 *
 * Revoke (only when the grantee no longer uses the page):
 *   1. f = entry[r].flags.
 *   2. If f & (GTF_reading | GTF_writing), the grantee still has it mapped or a copy is
 *      in flight: do not reuse the page; try again later.
 *   3. 16-bit compare-and-swap entry[r].flags from f to 0. If it fails, the host changed
 *      the flags in between (a new mapping began): go back to 1.
 *   4. Once the swap succeeded the host will not start a new access, and the page and
 *      r may be reused. No barrier is needed: reuse happens only after the swap succeeded.
 *
 * Change permissions of a live entry:
 *   read-write -> read-only: compare-and-swap flags to add GTF_readonly, succeeding only
 *     while GTF_writing is clear.
 *   read-only -> read-write: atomically clear GTF_readonly.
 *
 * What the host does when a grantee maps or copies (r, D):
 *   1. Read flags and domid together as one 32-bit value; check the type is
 *      GTF_permit_access, domid is the grantee, and GTF_readonly is clear if write
 *      access is asked for.
 *   2. 32-bit compare-and-swap that word to add GTF_reading (and GTF_writing for write
 *      access); if it changed meanwhile, go back to 1. This is what makes the granter's
 *      revoke (step 3 above) and the host's pin exclusive.
 *   3. Only then read `frame`: the granter's barrier guarantees it is valid once the
 *      type was visible, and the pin keeps the granter from changing it.
 *   4. When the last mapping for writing (or reading) of that entry goes away, or the
 *      copy finishes, atomically clear GTF_writing (or GTF_reading).
 * The host copies each entry out once per check and never trusts a second read.
 * --------------------------------------------------------------------------------------- */

/* ---------------------------------------------------------------------------------------
 * grant_table_op(cmd, arg, count): arg is the guest-virtual address of an array of
 * `count` structures of the command's type, processed in order. The call returns 0 once
 * the array was processed (each element's `status` says whether that element worked,
 * VIREO_GNTST_*), or -VIREO_XEN_E* if the call itself was invalid. "Vireo:" says
 * whether Vireo implements the operation; the others return -VIREO_XEN_ENOSYS (38).
 * ------------------------------------------------------------------------------------- */

#define VIREO_GNTTABOP_map_grant_ref      0  /* Vireo: supported */
#define VIREO_GNTTABOP_unmap_grant_ref    1  /* Vireo: supported */
#define VIREO_GNTTABOP_setup_table        2  /* Vireo: supported */
#define VIREO_GNTTABOP_dump_table         3  /* Vireo: not supported */
#define VIREO_GNTTABOP_transfer           4  /* Vireo: not supported (PV-MMU only) */
#define VIREO_GNTTABOP_copy               5  /* Vireo: supported */
#define VIREO_GNTTABOP_query_size         6  /* Vireo: supported */
#define VIREO_GNTTABOP_unmap_and_replace  7  /* Vireo: not supported (PV-MMU only) */
#define VIREO_GNTTABOP_set_version        8  /* Vireo: not supported (v1 only) */
#define VIREO_GNTTABOP_get_status_frames  9  /* Vireo: not supported (v2 only) */
#define VIREO_GNTTABOP_get_version       10  /* Vireo: not supported (the version is 1) */
#define VIREO_GNTTABOP_swap_grant_ref    11  /* Vireo: not supported */
#define VIREO_GNTTABOP_cache_flush       12  /* Vireo: not supported (Arm only in Xen) */

/* Flags of vireo_gnttab_map_grant_ref.flags. The _GNTMAP_ names are bit numbers. */
#define VIREO__GNTMAP_device_map      0
#define VIREO_GNTMAP_device_map       1   /* also make the page reachable by DMA: dev_bus_addr */
#define VIREO__GNTMAP_host_map        1
#define VIREO_GNTMAP_host_map         2   /* map it for the CPU at host_addr (HVM/PVH: required) */
#define VIREO__GNTMAP_readonly        2
#define VIREO_GNTMAP_readonly         4   /* map read-only (needed if the grant is GTF_readonly) */
#define VIREO__GNTMAP_application_map 3
#define VIREO_GNTMAP_application_map  8   /* PV-MMU only: user-accessible mapping */
#define VIREO__GNTMAP_contains_pte    4
#define VIREO_GNTMAP_contains_pte     16  /* PV-MMU only: host_addr is a PTE's machine address */
/* PV-MMU only: bits 16..31 are copied into the PTE's software-available bits. */
#define VIREO__GNTMAP_guest_avail0    16
#define VIREO_GNTMAP_guest_avail_mask 0xFFFF0000U

/* Per-element results (`status` fields). All failures are negative. */
#define VIREO_GNTST_okay               0   /* done */
#define VIREO_GNTST_general_error     (-1) /* failed for a reason not listed below */
#define VIREO_GNTST_bad_domain        (-2) /* no such domain */
#define VIREO_GNTST_bad_gntref        (-3) /* reference out of range, or entry not valid for this use */
#define VIREO_GNTST_bad_handle        (-4) /* handle unknown or not the caller's */
#define VIREO_GNTST_bad_virt_addr     (-5) /* host_addr unusable */
#define VIREO_GNTST_bad_dev_addr      (-6) /* dev_bus_addr does not match the mapping */
#define VIREO_GNTST_no_device_space   (-7) /* no room for a DMA mapping */
#define VIREO_GNTST_permission_denied (-8) /* not the grantee, or write to a read-only grant */
#define VIREO_GNTST_bad_page          (-9) /* the frame is not a usable page */
#define VIREO_GNTST_bad_copy_arg      (-10) /* offset + len crosses the end of a page */
#define VIREO_GNTST_address_too_big   (-11) /* transfer: frame number does not fit */
#define VIREO_GNTST_eagain            (-12) /* page temporarily unavailable; retry */
#define VIREO_GNTST_no_space          (-13) /* out of handles or similar resources */

/*
 * GNTTABOP_map_grant_ref: map the page that (dom, ref) grants to the caller.
 * For an HVM/PVH caller, flags must contain GNTMAP_host_map (and not
 * GNTMAP_contains_pte) and host_addr is the guest-physical address where the page
 * appears; it stays there until unmapped. The host pins the entry (GTF_reading /
 * GTF_writing) for as long as the mapping exists.
 */
struct vireo_gnttab_map_grant_ref {
    uint64_t host_addr;          /* IN: where to map (guest-physical for HVM/PVH callers) */
    uint32_t flags;              /* IN: VIREO_GNTMAP_* */
    vireo_grant_ref_t ref;       /* IN: the reference in the granter's table */
    vireo_domid_t dom;           /* IN: the granting domain */
    int16_t status;              /* OUT: VIREO_GNTST_* */
    vireo_grant_handle_t handle; /* OUT: pass to unmap_grant_ref */
    uint64_t dev_bus_addr;       /* OUT: DMA address, if GNTMAP_device_map was asked */
};
typedef struct vireo_gnttab_map_grant_ref vireo_gnttab_map_grant_ref_t;
_Static_assert(sizeof(struct vireo_gnttab_map_grant_ref) == 32, "gnttab_map_grant_ref size");
_Static_assert(offsetof(struct vireo_gnttab_map_grant_ref, host_addr) == 0, "host_addr");
_Static_assert(offsetof(struct vireo_gnttab_map_grant_ref, flags) == 8, "flags");
_Static_assert(offsetof(struct vireo_gnttab_map_grant_ref, ref) == 12, "ref");
_Static_assert(offsetof(struct vireo_gnttab_map_grant_ref, dom) == 16, "dom");
_Static_assert(offsetof(struct vireo_gnttab_map_grant_ref, status) == 18, "status");
_Static_assert(offsetof(struct vireo_gnttab_map_grant_ref, handle) == 20, "handle");
_Static_assert(offsetof(struct vireo_gnttab_map_grant_ref, dev_bus_addr) == 24, "dev_bus_addr");

/*
 * GNTTABOP_unmap_grant_ref: undo a mapping made by map_grant_ref. A zero host_addr or
 * dev_bus_addr means "not that kind of mapping"; a non-zero one must be the value of
 * the original map. When the call returns, no stale translation of the page remains.
 */
struct vireo_gnttab_unmap_grant_ref {
    uint64_t host_addr;          /* IN: host_addr passed to map, or 0 */
    uint64_t dev_bus_addr;       /* IN: dev_bus_addr returned by map, or 0 */
    vireo_grant_handle_t handle; /* IN: handle returned by map */
    int16_t status;              /* OUT: VIREO_GNTST_* */
};
typedef struct vireo_gnttab_unmap_grant_ref vireo_gnttab_unmap_grant_ref_t;
_Static_assert(sizeof(struct vireo_gnttab_unmap_grant_ref) == 24, "gnttab_unmap_grant_ref size");
_Static_assert(offsetof(struct vireo_gnttab_unmap_grant_ref, host_addr) == 0, "host_addr");
_Static_assert(offsetof(struct vireo_gnttab_unmap_grant_ref, dev_bus_addr) == 8, "dev_bus_addr");
_Static_assert(offsetof(struct vireo_gnttab_unmap_grant_ref, handle) == 16, "handle");
_Static_assert(offsetof(struct vireo_gnttab_unmap_grant_ref, status) == 20, "status");

/*
 * GNTTABOP_setup_table: make the caller's table at least nr_frames frames long and
 * report its frames. An HVM/PVH guest then places each table frame in its physical
 * address space with memory_op(XENMEM_add_to_physmap, XENMAPSPACE_grant_table,
 * idx = frame index, gpfn = where), and writes entries there.
 * Use count = 1.
 */
struct vireo_gnttab_setup_table {
    vireo_domid_t dom;               /* IN: DOMID_SELF (other domains need privilege) */
    uint32_t nr_frames;              /* IN: frames wanted; at most max_nr_frames (query_size) */
    int16_t status;                  /* OUT: VIREO_GNTST_* */
    vireo_guest_handle_t frame_list; /* IN: address of nr_frames vireo_xen_pfn_t; OUT there:
                                        the frame number of each table frame */
};
typedef struct vireo_gnttab_setup_table vireo_gnttab_setup_table_t;
_Static_assert(sizeof(struct vireo_gnttab_setup_table) == 24, "gnttab_setup_table size");
_Static_assert(offsetof(struct vireo_gnttab_setup_table, dom) == 0, "dom");
_Static_assert(offsetof(struct vireo_gnttab_setup_table, nr_frames) == 4, "nr_frames");
_Static_assert(offsetof(struct vireo_gnttab_setup_table, status) == 8, "status");
_Static_assert(offsetof(struct vireo_gnttab_setup_table, frame_list) == 16, "frame_list");

/*
 * GNTTABOP_copy: the host copies bytes between two pages, either of which may be named
 * by a grant reference (checked and pinned for the duration of the copy as in the
 * host's steps above) or by a frame number of the caller's own memory.
 * Neither range may cross the end of its page (GNTST_bad_copy_arg).
 */
#define VIREO__GNTCOPY_source_gref 0
#define VIREO_GNTCOPY_source_gref  1 /* source.u is a grant reference, else a frame number */
#define VIREO__GNTCOPY_dest_gref   1
#define VIREO_GNTCOPY_dest_gref    2 /* dest.u is a grant reference, else a frame number */

/*
 * One end of a copy (IN). Xen declares this structure inside struct gnttab_copy; in C
 * the tag is file-scope either way, and declaring it first keeps it usable from C++.
 */
struct vireo_gnttab_copy_ptr {
    union {
        vireo_grant_ref_t ref; /* with GNTCOPY_*_gref: reference in domid's table */
        vireo_xen_pfn_t gmfn;  /* without: GFN of the caller's page (domid = DOMID_SELF) */
    } u;
    vireo_domid_t domid;       /* the granting domain, or DOMID_SELF for a frame number */
    uint16_t offset;           /* byte offset in the page */
};
_Static_assert(sizeof(struct vireo_gnttab_copy_ptr) == 16, "gnttab_copy_ptr size");
_Static_assert(offsetof(struct vireo_gnttab_copy_ptr, u) == 0, "u");
_Static_assert(offsetof(struct vireo_gnttab_copy_ptr, u.ref) == 0, "u.ref");
_Static_assert(offsetof(struct vireo_gnttab_copy_ptr, u.gmfn) == 0, "u.gmfn");
_Static_assert(offsetof(struct vireo_gnttab_copy_ptr, domid) == 8, "domid");
_Static_assert(offsetof(struct vireo_gnttab_copy_ptr, offset) == 10, "offset");

struct vireo_gnttab_copy {
    struct vireo_gnttab_copy_ptr source, dest; /* IN: where from, where to */
    uint16_t len;                  /* IN: bytes to copy */
    uint16_t flags;                /* IN: VIREO_GNTCOPY_* */
    int16_t status;                /* OUT: VIREO_GNTST_* */
};
typedef struct vireo_gnttab_copy vireo_gnttab_copy_t;
_Static_assert(sizeof(struct vireo_gnttab_copy) == 40, "gnttab_copy size");
_Static_assert(offsetof(struct vireo_gnttab_copy, source) == 0, "source");
_Static_assert(offsetof(struct vireo_gnttab_copy, dest) == 16, "dest");
_Static_assert(offsetof(struct vireo_gnttab_copy, len) == 32, "len");
_Static_assert(offsetof(struct vireo_gnttab_copy, flags) == 34, "flags");
_Static_assert(offsetof(struct vireo_gnttab_copy, status) == 36, "status");

/* GNTTABOP_query_size: the current and the largest allowed size of the caller's table.
 * Use count = 1. */
struct vireo_gnttab_query_size {
    vireo_domid_t dom;      /* IN: DOMID_SELF (other domains need privilege) */
    uint32_t nr_frames;     /* OUT: frames the table has now */
    uint32_t max_nr_frames; /* OUT: frames setup_table may grow it to */
    int16_t status;         /* OUT: VIREO_GNTST_* */
};
typedef struct vireo_gnttab_query_size vireo_gnttab_query_size_t;
_Static_assert(sizeof(struct vireo_gnttab_query_size) == 16, "gnttab_query_size size");
_Static_assert(offsetof(struct vireo_gnttab_query_size, dom) == 0, "dom");
_Static_assert(offsetof(struct vireo_gnttab_query_size, nr_frames) == 4, "nr_frames");
_Static_assert(offsetof(struct vireo_gnttab_query_size, max_nr_frames) == 8, "max_nr_frames");
_Static_assert(offsetof(struct vireo_gnttab_query_size, status) == 12, "status");

#endif /* VIREO_ABI_GRANT_TABLE_H */
