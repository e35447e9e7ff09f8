/*
 * vireo/io/ring.h — the shared request/response ring that every split driver runs on
 * (blkif, netif tx and rx, the netif control ring).
 *
 * Layout: Xen's DEFINE_RING_TYPES (io/ring.h) for x86_64. Text: Vireo's.
 * Naming: Hypercalls/README.md (VIREO_X <-> X, struct vireo_x <-> struct x).
 *
 * "front" is the frontend (the guest driver, which issues requests); "back" is the
 * backend (Vireo's device model, which answers them). Per the README, IN marks what the
 * front writes and the back reads, OUT what the back writes and the front reads.
 *
 * ---------------------------------------------------------------------------------------
 * The shared area
 *
 * The front allocates one or more 4096-byte pages (2^ring-page-order of them for blkif),
 * grants them to the back and publishes the grant references in xenstore. The back maps
 * them so that they are contiguous; the ring below then spans all of them.
 *
 *   offset  size  field      writer  meaning
 *   0       4     req_prod   IN      requests produced so far (free-running)
 *   4       4     req_event  OUT     the back wants an event once req_prod reaches this
 *   8       4     rsp_prod   OUT     responses produced so far (free-running)
 *   12      4     rsp_event  IN      the front wants an event once rsp_prod reaches this
 *   16      4     pvt        IN      historical per-driver byte (netif smartpoll, tapif);
 *                                    zeroed by the front, ignored by Vireo
 *   20      44    __pad      IN      zeroed by the front, never read
 *   64      ...   ring[]     slots:  a request (IN) until the back answers it, then a
 *                                    response (OUT)
 *
 * There is no shared consumer index. The front knows a slot is free once the response
 * written into it has been consumed; the back never has more requests in flight than
 * slots it can answer into.
 *
 * Indices. Producer and event indices are free-running 32-bit counts that wrap modulo
 * 2^32. Entry number i lives in slot i & (size - 1). Distances between indices are always
 * computed as uint32_t subtraction (b - a), never by comparing a < b.
 *
 * Ring size (slots). A power of two that both ends compute themselves; it is never read
 * from shared memory:
 *
 *   size = the largest power of two <= (pages * 4096 - VIREO_ABI_RING_HEADER_SIZE)
 *                                      / sizeof(union vireo_<name>_sring_entry)
 *
 * where an entry is as large as the larger of the request and the response. The one-page
 * values of Vireo's rings are stated next to them (VIREO_ABI_*_RING_SIZE in blkif.h and
 * netif.h).
 *
 * ---------------------------------------------------------------------------------------
 * Protocol
 *
 * Initialisation (front, before it publishes the grant): req_prod = rsp_prod = 0,
 * req_event = rsp_event = 1, pvt and __pad zeroed. The back starts its private counters
 * (below) at 0 and never writes the initial values.
 *
 * Producing entries (the front producing requests, or the back producing responses;
 * "prod" is req_prod or rsp_prod, "event" is the peer's req_event or rsp_event):
 *   1. old = the private producer count as last published. Write the new entries into
 *      slots old .. new-1 (masked), where new is the private count after them.
 *   2. Write barrier: the peer must see the entries' contents before the index that
 *      makes them visible.
 *   3. prod = new.
 *   4. Full barrier: the store to prod must be visible before event is read. Otherwise
 *      the peer could set event and check prod in between, see the old prod, sleep,
 *      and we would read its old event and not notify: both sides wait forever.
 *   5. Notify the peer (on the ring's event channel) only if the new entries crossed
 *      the peer's event index, that is if event lies in (old, new]:
 *          (uint32_t)(new - event) < (uint32_t)(new - old)
 *
 * Consuming entries (cons is the consumer's private count):
 *   1. Read prod once into a local p.
 *   2. Check that the peer did not produce more than the ring holds. The front checks
 *      (uint32_t)(p - rsp_cons) <= size. The back checks (uint32_t)(p - rsp_prod_pvt)
 *      <= size: the front can never have more than `size` requests unanswered. A
 *      violation (which includes prod moving backwards) is a protocol error: the
 *      consumer stops serving the ring and disconnects; it must not try to repair it.
 *   3. Read barrier: entries must not be read before p.
 *   4. For each i from cons up to p: copy the entry in slot i & (size - 1) out of the
 *      shared page exactly once, into private memory, and validate and use only that
 *      copy. The peer can rewrite the slot at any moment; reading a field twice can
 *      return two different values.
 *   5. cons = p. (Because of the check in step 2, the back always has a slot to answer
 *      every request it has taken.)
 *
 * Before sleeping (the final check; the back uses req_event, the front rsp_event):
 *   1. If entries are pending, keep consuming.
 *   2. event = cons + 1: ask for a notification on the very next entry. (A larger value
 *      batches: the producer stays silent until that many more entries exist.)
 *   3. Full barrier: the store to event must be visible before prod is read again;
 *      this is the mirror image of step 4 of producing.
 *   4. Read prod again. If entries arrived in between, consume them (they may have come
 *      without a notification); otherwise wait for the event channel.
 * Notifications can be spurious; a consumer always re-reads prod after one.
 *
 * Barriers on x86_64: the write barrier and the read barrier only need to stop the
 * compiler from reordering (x86 keeps stores in order with stores, and loads with loads);
 * the full barrier needs MFENCE or a locked instruction, because x86 lets a later load
 * pass an earlier store. In Swift: a release store of prod, an acquire load of prod, and a
 * sequentially consistent fence for each full barrier.
 *
 * Rules for the host, which must treat the whole shared area as hostile: keep its own
 * counters privately and never read them back from shared memory; derive the size from
 * the negotiated page count; bound every index distance as in step 2; copy before
 * validating; ignore pvt and __pad.
 *
 * Vireo does not provide Xen's RING_* helper macros; the Swift side implements the steps
 * above itself.
 * ---------------------------------------------------------------------------------------
 */
#ifndef VIREO_ABI_IO_RING_H
#define VIREO_ABI_IO_RING_H

#include <stddef.h>
#include <stdint.h>

/* A free-running ring index (Xen's RING_IDX). */
typedef uint32_t vireo_RING_IDX;

/* Bytes from the start of the shared area to ring[0]. */
#define VIREO_ABI_RING_HEADER_SIZE 64

/*
 * VIREO_DEFINE_RING_TYPES(name, req_t, rsp_t) declares, for a request type and a response
 * type:
 *   union  vireo_<name>_sring_entry  one slot: either a request or a response;
 *   struct vireo_<name>_sring        the shared area (header, then ring[]; the ring has as
 *                                    many slots as the formula above gives, ring[1] only
 *                                    states the type);
 *   struct vireo_<name>_front_ring   the front's private state (never shared):
 *       req_prod_pvt  requests written so far, published or not;
 *       rsp_cons      responses consumed so far;
 *       nr_ents       the ring size in slots;
 *       sring         where this side has mapped the shared area (a local pointer);
 *   struct vireo_<name>_back_ring    the back's private state (never shared):
 *       rsp_prod_pvt  responses written so far, published or not;
 *       req_cons      requests consumed so far;
 *       nr_ents, sring as above;
 * with the typedefs vireo_<name>_sring_t, vireo_<name>_front_ring_t and
 * vireo_<name>_back_ring_t, and pins the layout of the header. Write a ';' after it.
 * The header using it pins the entry size and sizeof the sring for its types.
 */
#define VIREO_DEFINE_RING_TYPES(name, req_t, rsp_t)                                        \
    union vireo_##name##_sring_entry {                                                     \
        req_t req;                                                                         \
        rsp_t rsp;                                                                         \
    };                                                                                     \
                                                                                           \
    struct vireo_##name##_sring {                                                          \
        vireo_RING_IDX req_prod, req_event; /* IN, OUT */                                  \
        vireo_RING_IDX rsp_prod, rsp_event; /* OUT, IN */                                  \
        union {                                                                            \
            struct {                                                                       \
                uint8_t smartpoll_active;                                                  \
            } netif;                                                                       \
            struct {                                                                       \
                uint8_t msg;                                                               \
            } tapif_user;                                                                  \
            uint8_t pvt_pad[4];                                                            \
        } pvt;                              /* IN: zero */                                 \
        uint8_t __pad[44];                  /* IN: zero */                                 \
        union vireo_##name##_sring_entry ring[1];                                          \
    };                                                                                     \
                                                                                           \
    struct vireo_##name##_front_ring {                                                     \
        vireo_RING_IDX req_prod_pvt;                                                       \
        vireo_RING_IDX rsp_cons;                                                           \
        unsigned int nr_ents;                                                              \
        struct vireo_##name##_sring *sring;                                                \
    };                                                                                     \
                                                                                           \
    struct vireo_##name##_back_ring {                                                      \
        vireo_RING_IDX rsp_prod_pvt;                                                       \
        vireo_RING_IDX req_cons;                                                           \
        unsigned int nr_ents;                                                              \
        struct vireo_##name##_sring *sring;                                                \
    };                                                                                     \
                                                                                           \
    typedef struct vireo_##name##_sring vireo_##name##_sring_t;                            \
    typedef struct vireo_##name##_front_ring vireo_##name##_front_ring_t;                  \
    typedef struct vireo_##name##_back_ring vireo_##name##_back_ring_t;                    \
                                                                                           \
    _Static_assert(offsetof(struct vireo_##name##_sring, req_prod) == 0, #name " sring");  \
    _Static_assert(offsetof(struct vireo_##name##_sring, req_event) == 4, #name " sring"); \
    _Static_assert(offsetof(struct vireo_##name##_sring, rsp_prod) == 8, #name " sring");  \
    _Static_assert(offsetof(struct vireo_##name##_sring, rsp_event) == 12, #name " sring"); \
    _Static_assert(offsetof(struct vireo_##name##_sring, pvt) == 16, #name " sring");      \
    _Static_assert(offsetof(struct vireo_##name##_sring, pvt.netif.smartpoll_active) == 16, \
                   #name " sring");                                                        \
    _Static_assert(offsetof(struct vireo_##name##_sring, pvt.tapif_user.msg) == 16,        \
                   #name " sring");                                                        \
    _Static_assert(offsetof(struct vireo_##name##_sring, pvt.pvt_pad) == 16, #name " sring"); \
    _Static_assert(offsetof(struct vireo_##name##_sring, __pad) == 20, #name " sring");    \
    _Static_assert(offsetof(struct vireo_##name##_sring, ring) == 64, #name " sring");     \
    _Static_assert(sizeof(struct vireo_##name##_front_ring) == 24, #name " front_ring");   \
    _Static_assert(offsetof(struct vireo_##name##_front_ring, req_prod_pvt) == 0,          \
                   #name " front_ring");                                                   \
    _Static_assert(offsetof(struct vireo_##name##_front_ring, rsp_cons) == 4,              \
                   #name " front_ring");                                                   \
    _Static_assert(offsetof(struct vireo_##name##_front_ring, nr_ents) == 8,               \
                   #name " front_ring");                                                   \
    _Static_assert(offsetof(struct vireo_##name##_front_ring, sring) == 16,                \
                   #name " front_ring");                                                   \
    _Static_assert(sizeof(struct vireo_##name##_back_ring) == 24, #name " back_ring");     \
    _Static_assert(offsetof(struct vireo_##name##_back_ring, rsp_prod_pvt) == 0,           \
                   #name " back_ring");                                                    \
    _Static_assert(offsetof(struct vireo_##name##_back_ring, req_cons) == 4,               \
                   #name " back_ring");                                                    \
    _Static_assert(offsetof(struct vireo_##name##_back_ring, nr_ents) == 8,                \
                   #name " back_ring");                                                    \
    _Static_assert(offsetof(struct vireo_##name##_back_ring, sring) == 16, #name " back_ring")

#endif /* VIREO_ABI_IO_RING_H */
