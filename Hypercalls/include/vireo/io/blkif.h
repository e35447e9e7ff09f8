/*
 * vireo/io/blkif.h — the paravirtual block device (vbd): request and response formats,
 * the ring that carries them, and the xenstore keys both ends negotiate with.
 *
 * Layout: Xen's public io/blkif.h for x86_64. Text: Vireo's.
 * Naming: Hypercalls/README.md (VIREO_X <-> X, struct vireo_x <-> struct x).
 * IN = the frontend (guest) writes, the backend (Vireo) reads; OUT = the reverse.
 *
 * ---------------------------------------------------------------------------------------
 * Units
 *
 * Every sector quantity on the ring (sector_number, nr_sectors, first_sect, last_sect)
 * counts 512-byte units, whatever "sector-size" says. The "sectors" key counts 512-byte
 * units too: that is what Linux and the BSDs do at both ends (Linux's blkfront passes it
 * to set_capacity, which counts 512-byte sectors; its blkback publishes the device's size
 * in 512-byte sectors). Xen's prose says "sector-size" units, and a frontend's
 * "feature-large-sector-size" asks for that reading; Vireo's backend does not honour it.
 * "sector-size" is the logical block size (512 or 4096 for Vireo): with 4096, every
 * transfer and discard must start and end on a multiple of 8 of these 512-byte units.
 * A data page is one 4096-byte granted frame: sectors 0..7 of it.
 *
 * ---------------------------------------------------------------------------------------
 * Xenstore
 *
 * The toolstack creates the frontend directory /local/domain/<front-domid>/device/vbd/<devid>
 * (with "backend", "backend-id", "virtual-device", "device-type", "state") and the backend
 * directory /local/domain/<back-domid>/backend/vbd/<front-domid>/<devid> (with "frontend",
 * "frontend-id", "mode", "params", "state"). Each end writes only its own directory. Values
 * are decimal ASCII unless stated; a missing key means its default.
 *
 * Written by the backend (read by the frontend):
 *   feature-flush-cache            "1": BLKIF_OP_FLUSH_DISKCACHE is accepted (default 0)
 *   feature-barrier                "1": BLKIF_OP_WRITE_BARRIER is accepted (default 0)
 *   feature-discard                "1": BLKIF_OP_DISCARD is accepted (default 0)
 *   discard-granularity            bytes per discardable extent (default: sector-size)
 *   discard-alignment              byte offset of the first extent (default 0)
 *   discard-secure                 "1": BLKIF_DISCARD_SECURE is honoured (default 0)
 *   feature-max-indirect-segments  most segments one BLKIF_OP_INDIRECT request may carry;
 *                                  absent: no indirect requests
 *   feature-persistent             "1": the backend keeps grants mapped across requests
 *   max-ring-page-order            the largest ring the backend maps: 2^order pages
 *                                  (default 0)
 *   multi-queue-max-queues         most rings (queues) the backend serves (default 1)
 *   sectors                        disk size, in 512-byte units (see Units)
 *   info                           VIREO_VDISK_* bits
 *   sector-size                    logical block size in bytes (power of two, >= 512)
 *   physical-sector-size           physical block size in bytes (default: sector-size)
 *
 * Written by the frontend (read by the backend):
 *   ring-ref                       grant reference of the ring page (one-page ring)
 *   ring-ref0 .. ring-ref<N-1>     grant references of a ring of N = 2^ring-page-order
 *                                  pages, in ring order; "ring-ref" is then absent
 *   ring-page-order                log2 of the ring's page count (default 0)
 *   event-channel                  the unbound event-channel port the backend binds to
 *   protocol                       the request layout: "x86_64-abi" (the only one Vireo
 *                                  accepts; absent means the native one, x86_64)
 *   multi-queue-num-queues         how many rings the frontend uses (1..max); with more
 *                                  than one, ring-ref* and event-channel move under
 *                                  queue-0 .. queue-<n-1> and are absent at the top
 *   feature-persistent             "1": the frontend reuses the same grants
 *   feature-large-sector-size      see Units
 *
 * The "state" nodes and their order are in xenbus.h. The backend publishes its features
 * before it enters InitWait, and sectors/info/sector-size before it enters Connected.
 *
 * virtual-device encodes the guest's name for the disk: (202 << 8) | (disk << 4) | partition
 * for xvda..xvdp, (1 << 28) | (disk << 8) | partition beyond them.
 *
 * ---------------------------------------------------------------------------------------
 * Requests
 *
 * Every request occupies one ring slot (112 bytes: the size of struct vireo_blkif_request)
 * and is read as one of three layouts chosen by its first byte, `operation`. In all of
 * them `id` is at offset 8, so a backend can answer a request whose operation it does not
 * understand (with VIREO_BLKIF_RSP_EOPNOTSUPP).
 *
 *   READ, WRITE            struct vireo_blkif_request, 1..11 segments. For READ the
 *                          backend writes into the granted frames (the frontend must grant
 *                          them writable); for WRITE it only reads them.
 *   WRITE_BARRIER          struct vireo_blkif_request: a write (0..11 segments) that may
 *                          start only after every earlier write has completed, and that
 *                          every later write waits for.
 *   FLUSH_DISKCACHE        struct vireo_blkif_request: make every write completed before
 *                          it durable; 0 segments is a pure flush, with segments it is also
 *                          a write of them (Linux sends preflush and FUA writes this way).
 *   DISCARD                struct vireo_blkif_request_discard: the range may be forgotten.
 *   INDIRECT               struct vireo_blkif_request_indirect: a READ or WRITE whose
 *                          segment list lives in separate granted pages.
 *   RESERVED_1             never valid (once a SUSE device-specific command).
 *
 * The backend copies each request out of the ring once (see ring.h) and then checks, on
 * the copy: a known operation the backend advertised; nr_segments within bounds; for each
 * segment first_sect <= last_sect <= 7; the whole transfer inside the disk; and writes
 * refused for a read-only disk. A failed check is answered with VIREO_BLKIF_RSP_ERROR (or
 * EOPNOTSUPP for an operation not offered); it does not stop the ring.
 *
 * Responses carry the request's id and may complete in any order; the frontend finds the
 * request by id only.
 * ---------------------------------------------------------------------------------------
 */
#ifndef VIREO_ABI_IO_BLKIF_H
#define VIREO_ABI_IO_BLKIF_H

#include <stddef.h>
#include <stdint.h>

#include "ring.h"
#include "../grant_table.h"

/* The frontend's number for the disk (its virtual-device value, truncated to 16 bits). */
typedef uint16_t vireo_blkif_vdev_t;
/* A disk address in 512-byte sectors. */
typedef uint64_t vireo_blkif_sector_t;

/* The unit of every sector quantity on the ring. */
#define VIREO_ABI_BLKIF_SECTOR_SIZE 512

/* ---------------------------------------------------------------------------------------
 * Operations (the `operation` byte of a request)
 * ------------------------------------------------------------------------------------- */

#define VIREO_BLKIF_OP_READ            0
#define VIREO_BLKIF_OP_WRITE           1
#define VIREO_BLKIF_OP_WRITE_BARRIER   2 /* needs feature-barrier */
#define VIREO_BLKIF_OP_FLUSH_DISKCACHE 3 /* needs feature-flush-cache */
#define VIREO_BLKIF_OP_RESERVED_1      4 /* never valid */
#define VIREO_BLKIF_OP_DISCARD         5 /* needs feature-discard */
#define VIREO_BLKIF_OP_INDIRECT        6 /* needs feature-max-indirect-segments */

/* Segments carried directly in a request (what fits in a one-page ring's 112-byte slot). */
#define VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST 11

/* Indirect pages one BLKIF_OP_INDIRECT request may name. */
#define VIREO_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST 8

/* Segment descriptors in one 4096-byte indirect page: 4096 / 8. (Linux spells this
 * XEN_BLKIF_SEGS_PER_INDIRECT_FRAME; Xen's public header states only the rule.) */
#define VIREO_ABI_BLKIF_SEGS_PER_INDIRECT_FRAME 512

/* Slots in a one-page blkif ring: the largest power of two <= (4096 - 64) / 112. */
#define VIREO_ABI_BLKIF_RING_SIZE 32

/* ---------------------------------------------------------------------------------------
 * Segments
 * ------------------------------------------------------------------------------------- */

/*
 * One contiguous piece of the transfer, inside one granted 4096-byte frame: sectors
 * first_sect .. last_sect inclusive, i.e. bytes first_sect * 512 up to (last_sect + 1) * 512.
 * Consecutive segments continue the transfer at the next disk sector.
 */
struct vireo_blkif_request_segment {
    vireo_grant_ref_t gref;       /* IN: grant of the data frame */
    uint8_t           first_sect; /* IN: first 512-byte sector used in the frame, 0..7 */
    uint8_t           last_sect;  /* IN: last sector used (inclusive), first_sect..7 */
    /* 2 bytes of padding */
};
_Static_assert(sizeof(struct vireo_blkif_request_segment) == 8, "blkif_request_segment");
_Static_assert(offsetof(struct vireo_blkif_request_segment, gref) == 0, "gref");
_Static_assert(offsetof(struct vireo_blkif_request_segment, first_sect) == 4, "first_sect");
_Static_assert(offsetof(struct vireo_blkif_request_segment, last_sect) == 5, "last_sect");

/* ---------------------------------------------------------------------------------------
 * Requests
 * ------------------------------------------------------------------------------------- */

/* READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE (and the size of every slot). */
struct vireo_blkif_request {
    uint8_t              operation;     /* IN: VIREO_BLKIF_OP_* */
    uint8_t              nr_segments;   /* IN: entries of seg[] in use, 0..11 */
    vireo_blkif_vdev_t   handle;        /* IN: the frontend's disk number; backends
                                           do not rely on it */
    /* 4 bytes of padding */
    uint64_t             id;            /* IN: opaque to the backend, echoed in the
                                           response */
    vireo_blkif_sector_t sector_number; /* IN: first disk sector (512-byte units) */
    struct vireo_blkif_request_segment seg[VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST]; /* IN */
};
typedef struct vireo_blkif_request vireo_blkif_request_t;
_Static_assert(sizeof(struct vireo_blkif_request) == 112, "blkif_request");
_Static_assert(offsetof(struct vireo_blkif_request, operation) == 0, "operation");
_Static_assert(offsetof(struct vireo_blkif_request, nr_segments) == 1, "nr_segments");
_Static_assert(offsetof(struct vireo_blkif_request, handle) == 2, "handle");
_Static_assert(offsetof(struct vireo_blkif_request, id) == 8, "id");
_Static_assert(offsetof(struct vireo_blkif_request, sector_number) == 16, "sector_number");
_Static_assert(offsetof(struct vireo_blkif_request, seg) == 24, "seg");

/* Set in `flag` to ask that the discarded data become unrecoverable; honoured only when
 * the backend advertised discard-secure. */
#define VIREO_BLKIF_DISCARD_SECURE 0x1

/* DISCARD: the same slot read with this layout; the rest of the slot is unused. */
struct vireo_blkif_request_discard {
    uint8_t              operation;     /* IN: VIREO_BLKIF_OP_DISCARD */
    uint8_t              flag;          /* IN: 0 or VIREO_BLKIF_DISCARD_SECURE */
    vireo_blkif_vdev_t   handle;        /* IN: as in vireo_blkif_request */
    /* 4 bytes of padding */
    uint64_t             id;            /* IN: echoed in the response */
    vireo_blkif_sector_t sector_number; /* IN: first sector to discard (512-byte units) */
    uint64_t             nr_sectors;    /* IN: number of sectors to discard */
};
typedef struct vireo_blkif_request_discard vireo_blkif_request_discard_t;
_Static_assert(sizeof(struct vireo_blkif_request_discard) == 32, "blkif_request_discard");
_Static_assert(offsetof(struct vireo_blkif_request_discard, operation) == 0, "operation");
_Static_assert(offsetof(struct vireo_blkif_request_discard, flag) == 1, "flag");
_Static_assert(offsetof(struct vireo_blkif_request_discard, handle) == 2, "handle");
_Static_assert(offsetof(struct vireo_blkif_request_discard, id) == 8, "id");
_Static_assert(offsetof(struct vireo_blkif_request_discard, sector_number) == 16,
               "sector_number");
_Static_assert(offsetof(struct vireo_blkif_request_discard, nr_sectors) == 24, "nr_sectors");

/*
 * INDIRECT: a READ or WRITE of nr_segments segments whose descriptors (struct
 * vireo_blkif_request_segment, 512 per page) fill the granted pages indirect_grefs[0 ..
 * ceil(nr_segments / 512) - 1] in order. The backend maps those pages (a read-only grant
 * is enough), copies the descriptors out once and validates them like direct segments.
 * Note that `handle` sits at offset 24 here, not 2.
 */
struct vireo_blkif_request_indirect {
    uint8_t              operation;     /* IN: VIREO_BLKIF_OP_INDIRECT */
    uint8_t              indirect_op;   /* IN: VIREO_BLKIF_OP_READ or _WRITE */
    uint16_t             nr_segments;   /* IN: 1..feature-max-indirect-segments */
    /* 4 bytes of padding */
    uint64_t             id;            /* IN: echoed in the response */
    vireo_blkif_sector_t sector_number; /* IN: first disk sector (512-byte units) */
    vireo_blkif_vdev_t   handle;        /* IN: as in vireo_blkif_request */
    /* 2 bytes of padding */
    vireo_grant_ref_t    indirect_grefs[VIREO_BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST]; /* IN */
    /* 4 bytes of padding */
};
typedef struct vireo_blkif_request_indirect vireo_blkif_request_indirect_t;
_Static_assert(sizeof(struct vireo_blkif_request_indirect) == 64, "blkif_request_indirect");
_Static_assert(offsetof(struct vireo_blkif_request_indirect, operation) == 0, "operation");
_Static_assert(offsetof(struct vireo_blkif_request_indirect, indirect_op) == 1, "indirect_op");
_Static_assert(offsetof(struct vireo_blkif_request_indirect, nr_segments) == 2, "nr_segments");
_Static_assert(offsetof(struct vireo_blkif_request_indirect, id) == 8, "id");
_Static_assert(offsetof(struct vireo_blkif_request_indirect, sector_number) == 16,
               "sector_number");
_Static_assert(offsetof(struct vireo_blkif_request_indirect, handle) == 24, "handle");
_Static_assert(offsetof(struct vireo_blkif_request_indirect, indirect_grefs) == 28,
               "indirect_grefs");

/* ---------------------------------------------------------------------------------------
 * Responses
 * ------------------------------------------------------------------------------------- */

struct vireo_blkif_response {
    uint64_t id;        /* OUT: the request's id */
    uint8_t  operation; /* OUT: the request's operation (informational) */
    /* 1 byte of padding */
    int16_t  status;    /* OUT: VIREO_BLKIF_RSP_* */
    /* 4 bytes of padding */
};
typedef struct vireo_blkif_response vireo_blkif_response_t;
_Static_assert(sizeof(struct vireo_blkif_response) == 16, "blkif_response");
_Static_assert(offsetof(struct vireo_blkif_response, id) == 0, "id");
_Static_assert(offsetof(struct vireo_blkif_response, operation) == 8, "operation");
_Static_assert(offsetof(struct vireo_blkif_response, status) == 10, "status");

#define VIREO_BLKIF_RSP_EOPNOTSUPP (-2) /* operation not offered (or not understood) */
#define VIREO_BLKIF_RSP_ERROR      (-1) /* failed: I/O error or an invalid request */
#define VIREO_BLKIF_RSP_OKAY       0    /* done */

/* ---------------------------------------------------------------------------------------
 * The ring: struct vireo_blkif_sring and friends (see ring.h). Slots are 112 bytes.
 * ------------------------------------------------------------------------------------- */

VIREO_DEFINE_RING_TYPES(blkif, struct vireo_blkif_request, struct vireo_blkif_response);
_Static_assert(sizeof(union vireo_blkif_sring_entry) == 112, "blkif slot");
_Static_assert(sizeof(struct vireo_blkif_sring) == 176, "blkif_sring");

/* ---------------------------------------------------------------------------------------
 * Bits of the backend's "info" key
 * ------------------------------------------------------------------------------------- */

#define VIREO_VDISK_CDROM     0x1 /* present it as a CD-ROM */
#define VIREO_VDISK_REMOVABLE 0x2 /* removable medium */
#define VIREO_VDISK_READONLY  0x4 /* writes will fail */

#endif /* VIREO_ABI_IO_BLKIF_H */
