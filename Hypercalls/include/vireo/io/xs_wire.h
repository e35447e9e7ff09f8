/*
 * vireo/io/xs_wire.h — the xenstore wire protocol: message header and types, error names,
 * and the shared page a guest uses to talk to the store.
 *
 * Layout and numbers: Xen's public io/xs_wire.h for x86_64. Text: Vireo's.
 * Naming: Hypercalls/README.md (VIREO_X <-> X, struct vireo_x <-> struct x).
 * IN = the guest (client) writes, the host (Vireo's xenstore server) reads; OUT = reverse.
 *
 * ---------------------------------------------------------------------------------------
 * Messages
 *
 * Both directions carry a byte stream of messages: a 16-byte struct vireo_xsd_sockmsg
 * followed by exactly `len` bytes of payload, len <= VIREO_XENSTORE_PAYLOAD_MAX. A longer
 * len is a protocol error: the server drops the connection (VIREO_XENSTORE_ERROR_PROTO).
 * Payloads are strings; "|" below stands for a NUL byte. Values are bytes without a
 * terminating NUL; everything else ends with one.
 *
 * A request names its type, a req_id of the client's choosing, and tx_id (0, or a
 * transaction id from TRANSACTION_START). The reply has the same type, req_id and tx_id;
 * on failure its type is VIREO_XS_ERROR and its payload the errno's NAME ("ENOENT|", see
 * vireo_xsd_errors). Replies may come in any order; clients match them by req_id.
 *
 *   request               payload                     reply payload
 *   READ                  path|                       value
 *   WRITE                 path|value                  OK|
 *   MKDIR                 path|                       OK|
 *   RM                    path|                       OK| (removes the subtree)
 *   DIRECTORY             path|                       name|name|...  (leaf names)
 *   DIRECTORY_PART        path|offset|                gencount|name|...|
 *   GET_PERMS             path|                       perm|perm|...
 *   SET_PERMS             path|perm|perm|...          OK|
 *   WATCH                 path|token|                 OK|
 *   UNWATCH               path|token|                 OK|
 *   RESET_WATCHES         |                           OK| (drops every watch and
 *                                                     transaction of the connection)
 *   TRANSACTION_START     |  (tx_id 0)                id|  (unsigned decimal)
 *   TRANSACTION_END       T| to commit, F| to abort   OK|, or ERROR EAGAIN
 *   GET_DOMAIN_PATH       domid|                      /local/domain/<domid>|
 *   IS_DOMAIN_INTRODUCED  domid|                      T| or F|
 *   INTRODUCE             domid|mfn|port|             OK|   (toolstack only: a guest
 *   RELEASE               domid|                      OK|    gets EACCES for these)
 *   RESUME                domid|                      OK|
 *   SET_TARGET            domid|target-domid|         OK|
 *   CONTROL (DEBUG)       command|args...             implementation-defined (toolstack)
 *
 * Paths are absolute ("/local/domain/3/device/vbd/768/state") or, from a guest, relative
 * to /local/domain/<its domid>. They use [A-Za-z0-9] and "-/_@", no "//", no trailing
 * "/", at most VIREO_XENSTORE_ABS_PATH_MAX bytes (VIREO_XENSTORE_REL_PATH_MAX relative).
 * A permission is one letter, n (none), r (read), w (write) or b (both), then a decimal
 * domid; the first one names the node's owner and the access of every domain not listed.
 * DIRECTORY_PART serves listings larger than a payload: offset counts bytes of the full
 * name list; the client repeats with offset advanced by the bytes received until a reply
 * holds no name (it ends with an empty string), and starts over if gencount changed.
 *
 * Watches. WATCH fires once at once, then on every change at or below path (creation,
 * write, removal, permission change; changes in a transaction only when it commits). Each
 * firing is an unsolicited message of type VIREO_XS_WATCH_EVENT with req_id 0 and tx_id 0,
 * payload path|token| (indexed by enum vireo_xs_watch_type); path is relative if the
 * watch's path was. Events can arrive between any two replies, never inside one. The special
 * paths "@introduceDomain" and "@releaseDomain" fire when domains appear and go away.
 *
 * Transactions. TRANSACTION_START returns an id; requests with that tx_id see and change a
 * private snapshot. TRANSACTION_END with T commits it, or fails with EAGAIN if something
 * it depends on changed meanwhile: the client then redoes the whole transaction.
 *
 * ---------------------------------------------------------------------------------------
 * The shared page (struct vireo_xenstore_domain_interface)
 *
 * A guest finds the page and its event channel through the HVM parameters STORE_PFN and
 * STORE_EVTCHN (hvm/params.h). It holds two byte rings of VIREO_XENSTORE_RING_SIZE bytes:
 *
 *   req[]  guest -> server. The guest writes req[] and req_prod; the server writes req_cons.
 *   rsp[]  server -> guest (replies and watch events). The server writes rsp[] and
 *          rsp_prod; the guest writes rsp_cons.
 *
 * Indices are free-running 32-bit byte counts (wrapping modulo 2^32, and not necessarily
 * 0 at start); byte i of a stream is at req[i & (VIREO_XENSTORE_RING_SIZE - 1)] (Xen's
 * MASK_XENSTORE_IDX). prod - cons (uint32_t) above the ring size is a protocol error
 * (VIREO_XENSTORE_ERROR_RINGIDX). A message may be split over several ring updates and
 * wrap around the end of the ring; readers reassemble the stream.
 *
 * Producer: read cons; full barrier; write bytes into the free space (size - (prod -
 * cons)); write barrier (bytes before index); store prod; notify the event channel.
 * Consumer: read prod; read barrier (index before bytes); copy the bytes out; full barrier
 * (copies complete before the space is released); store cons; notify.
 * Every index update is followed by a notification; there are no event indices.
 *
 * server_features, connection, error:
 *   - The server sets bits of server_features (never clears them) before it first uses the
 *     rings; the guest only reads them and ignores unknown bits.
 *   - With FEATURE_RECONNECTION, the guest may write connection = VIREO_XENSTORE_RECONNECT
 *     and notify; it then ignores everything but `connection` until the server, having
 *     discarded partial messages, pending requests, watches and transactions and emptied
 *     both rings, writes VIREO_XENSTORE_CONNECTED and notifies. Only the guest writes
 *     RECONNECT and only the server writes CONNECTED. A guest that finds RECONNECT already
 *     set at start-up waits the same way.
 *   - With FEATURE_ERROR, the server writes a nonzero `error` when it gives up on the
 *     connection (values are diagnostic; unknown ones may appear). A reconnection may
 *     recover it.
 * ---------------------------------------------------------------------------------------
 */
#ifndef VIREO_ABI_IO_XS_WIRE_H
#define VIREO_ABI_IO_XS_WIRE_H

#include <stddef.h>
#include <stdint.h>

/* The message types (the `type` of struct vireo_xsd_sockmsg). */
enum vireo_xsd_sockmsg_type {
    VIREO_XS_CONTROL              = 0,
    VIREO_XS_DEBUG                = 0, /* the old name of CONTROL */
    VIREO_XS_DIRECTORY            = 1,
    VIREO_XS_READ                 = 2,
    VIREO_XS_GET_PERMS            = 3,
    VIREO_XS_WATCH                = 4,
    VIREO_XS_UNWATCH              = 5,
    VIREO_XS_TRANSACTION_START    = 6,
    VIREO_XS_TRANSACTION_END      = 7,
    VIREO_XS_INTRODUCE            = 8,
    VIREO_XS_RELEASE              = 9,
    VIREO_XS_GET_DOMAIN_PATH      = 10,
    VIREO_XS_WRITE                = 11,
    VIREO_XS_MKDIR                = 12,
    VIREO_XS_RM                   = 13,
    VIREO_XS_SET_PERMS            = 14,
    VIREO_XS_WATCH_EVENT          = 15, /* server -> client only */
    VIREO_XS_ERROR                = 16, /* server -> client only */
    VIREO_XS_IS_DOMAIN_INTRODUCED = 17,
    VIREO_XS_RESUME               = 18,
    VIREO_XS_SET_TARGET           = 19,
    /* 20 was XS_RESTRICT, since removed; it stays unused. */
    VIREO_XS_RESET_WATCHES        = 21,
    VIREO_XS_DIRECTORY_PART       = 22,
    VIREO_XS_TYPE_COUNT           = 23,     /* one past the last type */
    VIREO_XS_INVALID              = 0xffff, /* never a valid type */
};

/* Leftovers of an older WRITE format that took a mode string; today's WRITE takes none. */
#define VIREO_XS_WRITE_NONE        "NONE"
#define VIREO_XS_WRITE_CREATE      "CREATE"
#define VIREO_XS_WRITE_CREATE_EXCL "CREATE|EXCL"

/*
 * The errors a reply can carry. Only errstring travels on the wire (as the payload of an
 * XS_ERROR reply); errnum is the Linux x86_64 errno of that name (which is also Xen's
 * VIREO_XEN_E* value), for clients that want a number. The order is Xen's, and new names
 * are only ever appended; a client maps an unknown name to EINVAL.
 */
struct vireo_xsd_errors {
    int         errnum;
    const char *errstring;
};
_Static_assert(sizeof(struct vireo_xsd_errors) == 16, "xsd_errors");
_Static_assert(offsetof(struct vireo_xsd_errors, errnum) == 0, "errnum");
_Static_assert(offsetof(struct vireo_xsd_errors, errstring) == 8, "errstring");

#define VIREO_ABI_XSD_ERRORS_COUNT 16

static const struct vireo_xsd_errors vireo_xsd_errors[]
#if defined(__GNUC__)
    __attribute__((unused))
#endif
    = {
        {22, "EINVAL"},
        {13, "EACCES"},
        {17, "EEXIST"},
        {21, "EISDIR"},
        {2, "ENOENT"},
        {12, "ENOMEM"},
        {28, "ENOSPC"},
        {5, "EIO"},
        {39, "ENOTEMPTY"},
        {38, "ENOSYS"},
        {30, "EROFS"},
        {16, "EBUSY"},
        {11, "EAGAIN"},
        {106, "EISCONN"},
        {7, "E2BIG"},
        {1, "EPERM"},
};
_Static_assert(sizeof(vireo_xsd_errors) / sizeof(vireo_xsd_errors[0]) ==
                   VIREO_ABI_XSD_ERRORS_COUNT,
               "xsd_errors count");

/* The header of every message; `len` payload bytes follow it. */
struct vireo_xsd_sockmsg {
    uint32_t type;   /* IN/OUT: VIREO_XS_* */
    uint32_t req_id; /* IN/OUT: chosen by the client, echoed in the reply; 0 in events */
    uint32_t tx_id;  /* IN/OUT: transaction id or 0, echoed in the reply; 0 in events */
    uint32_t len;    /* IN/OUT: payload bytes, at most VIREO_XENSTORE_PAYLOAD_MAX */
};
_Static_assert(sizeof(struct vireo_xsd_sockmsg) == 16, "xsd_sockmsg");
_Static_assert(offsetof(struct vireo_xsd_sockmsg, type) == 0, "type");
_Static_assert(offsetof(struct vireo_xsd_sockmsg, req_id) == 4, "req_id");
_Static_assert(offsetof(struct vireo_xsd_sockmsg, tx_id) == 8, "tx_id");
_Static_assert(offsetof(struct vireo_xsd_sockmsg, len) == 12, "len");

/* The strings of a WATCH_EVENT payload, by position. */
enum vireo_xs_watch_type {
    VIREO_XS_WATCH_PATH  = 0, /* the path that changed */
    VIREO_XS_WATCH_TOKEN = 1, /* the token given to WATCH */
};

/* ---------------------------------------------------------------------------------------
 * The shared page
 * ------------------------------------------------------------------------------------- */

#define VIREO_XENSTORE_RING_SIZE 1024

/* A free-running xenstore ring index (Xen's XENSTORE_RING_IDX). */
typedef uint32_t vireo_XENSTORE_RING_IDX;

struct vireo_xenstore_domain_interface {
    char req[1024];                    /* IN: request bytes */
    char rsp[1024];                    /* OUT: reply and watch-event bytes */
    vireo_XENSTORE_RING_IDX req_cons;  /* OUT: request bytes the server has consumed */
    vireo_XENSTORE_RING_IDX req_prod;  /* IN: request bytes the guest has produced */
    vireo_XENSTORE_RING_IDX rsp_cons;  /* IN: reply bytes the guest has consumed */
    vireo_XENSTORE_RING_IDX rsp_prod;  /* OUT: reply bytes the server has produced */
    uint32_t server_features;          /* OUT: VIREO_XENSTORE_SERVER_FEATURE_* */
    uint32_t connection;               /* IN/OUT: VIREO_XENSTORE_CONNECTED / _RECONNECT */
    uint32_t error;                    /* OUT: VIREO_XENSTORE_ERROR_* */
};
_Static_assert(sizeof(struct vireo_xenstore_domain_interface) == 2076,
               "xenstore_domain_interface");
_Static_assert(offsetof(struct vireo_xenstore_domain_interface, req) == 0, "req");
_Static_assert(offsetof(struct vireo_xenstore_domain_interface, rsp) == 1024, "rsp");
_Static_assert(offsetof(struct vireo_xenstore_domain_interface, req_cons) == 2048, "req_cons");
_Static_assert(offsetof(struct vireo_xenstore_domain_interface, req_prod) == 2052, "req_prod");
_Static_assert(offsetof(struct vireo_xenstore_domain_interface, rsp_cons) == 2056, "rsp_cons");
_Static_assert(offsetof(struct vireo_xenstore_domain_interface, rsp_prod) == 2060, "rsp_prod");
_Static_assert(offsetof(struct vireo_xenstore_domain_interface, server_features) == 2064,
               "server_features");
_Static_assert(offsetof(struct vireo_xenstore_domain_interface, connection) == 2068,
               "connection");
_Static_assert(offsetof(struct vireo_xenstore_domain_interface, error) == 2072, "error");

/* The largest payload of one message, either way. */
#define VIREO_XENSTORE_PAYLOAD_MAX 4096

/* The longest absolute path, and the longest relative one a client should send. */
#define VIREO_XENSTORE_ABS_PATH_MAX 3072
#define VIREO_XENSTORE_REL_PATH_MAX 2048

/* server_features bits. */
#define VIREO_XENSTORE_SERVER_FEATURE_RECONNECTION 1 /* `connection` is honoured */
#define VIREO_XENSTORE_SERVER_FEATURE_ERROR        2 /* `error` is maintained */

/* Values of `connection`. */
#define VIREO_XENSTORE_CONNECTED 0 /* normal operation (written by the server) */
#define VIREO_XENSTORE_RECONNECT 1 /* reset requested (written by the guest) */

/* Values of `error`. */
#define VIREO_XENSTORE_ERROR_NONE    0
#define VIREO_XENSTORE_ERROR_COMM    1 /* the event channel does not work */
#define VIREO_XENSTORE_ERROR_RINGIDX 2 /* an index was out of range */
#define VIREO_XENSTORE_ERROR_PROTO   3 /* a message was too long */

#endif /* VIREO_ABI_IO_XS_WIRE_H */
