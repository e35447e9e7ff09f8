/*
 * vireo/io/netif.h — the paravirtual network interface (vif): the transmit ring, the
 * receive ring, the optional control ring, and the xenstore keys both ends negotiate with.
 *
 * Layout: Xen's public io/netif.h for x86_64. Text: Vireo's.
 * Naming: Hypercalls/README.md (VIREO_X <-> X, struct vireo_x <-> struct x). Xen's
 * bit-number constants (_NETTXF_csum_blank, ...) keep their leading underscore after the
 * prefix: VIREO__NETTXF_csum_blank.
 * IN = the frontend (guest) writes, the backend (Vireo) reads; OUT = the reverse.
 *
 * ---------------------------------------------------------------------------------------
 * Xenstore
 *
 * Frontend directory /local/domain/<front-domid>/device/vif/<devid>, backend directory
 * /local/domain/<back-domid>/backend/vif/<front-domid>/<devid>. The toolstack writes "mac"
 * ("aa:bb:cc:dd:ee:ff") and "handle" (the devid) in both, and optionally "mtu" (bytes,
 * default 1500) and "trusted" in the frontend's. Values are decimal ASCII; a missing key
 * means its default.
 *
 * Capabilities, each written by an end about what it can RECEIVE (the backend receives
 * the guest's transmit ring, the frontend the receive ring):
 *   feature-sg                  "1": packets may span several slots (default 0)
 *   feature-gso-tcpv4           "1": TCPv4 packets larger than the MTU with a GSO extra
 *   feature-gso-tcpv6           "1": likewise for TCPv6
 *   feature-no-csum-offload     "1": no IPv4 TCP/UDP packets with a blank checksum
 *                               (default 0: they are accepted)
 *   feature-ipv6-csum-offload   "1": IPv6 TCP/UDP packets with a blank checksum are
 *                               accepted (default 0: they are not)
 *
 * Written by the backend:
 *   feature-rx-copy             "1": the backend copies into frontend pages (Vireo: always)
 *   feature-rx-flip             "0": page flipping is not offered
 *   feature-split-event-channels "1": separate tx and rx event channels are accepted
 *   multi-queue-max-queues      most queues (tx/rx ring pairs) the backend serves
 *   feature-multicast-control   "1": MCAST_ADD/DEL extras are understood
 *   feature-dynamic-multicast-control "1": request-multicast-control is watched, not
 *                               only sampled when the frontend connects
 *   feature-ctrl-ring           "1": a control ring is accepted
 *   carrier                     "1" link up (default), "0" link down
 *
 * Written by the frontend:
 *   tx-ring-ref, rx-ring-ref    grant references of the one-page tx and rx rings
 *   event-channel               the port for both rings, or instead
 *   event-channel-tx, event-channel-rx  one port per ring (needs split event channels)
 *   request-rx-copy             "1": mandatory for Vireo (the only receive mode)
 *   feature-rx-notify           "1": the frontend notifies after posting rx requests;
 *                               mandatory for Vireo, as for Linux backends
 *   multi-queue-num-queues      queues used (1..max); with more than one, the ring refs and
 *                               ports move under queue-0 .. queue-<n-1>
 *   request-multicast-control   "1": drop multicast not in the filter list
 *   ctrl-ring-ref, event-channel-ctrl   the control ring and its port
 *   feature-sg, feature-gso-*, feature-*-csum-offload   as above
 *
 * The "state" nodes are in xenbus.h. Linux frontends go from Initialising straight to
 * Connected once their rings are published; a backend must accept that.
 *
 * ---------------------------------------------------------------------------------------
 * Transmit (guest -> host): the frontend produces vireo_netif_tx_request slots, the
 * backend answers each slot with a vireo_netif_tx_response.
 *
 *   slot 0        tx_request: gref, offset, id, flags, size = the WHOLE packet's length
 *   [extras]      only if slot 0 has NETTXF_extra_info: one netif_extra_info per slot,
 *                 each but the last with XEN_NETIF_EXTRA_FLAG_MORE
 *   more slots    only while the previous data slot has NETTXF_more_data: tx_request with
 *                 size = this fragment's length
 *
 * Slot 0 carries size minus the sum of the later fragments (a packet where that is
 * negative is invalid). Every fragment lies inside its granted page (offset + length <=
 * 4096); the frontend grants the page at least read-only and keeps the grant until the
 * response for that slot arrives. A packet is at least 14 bytes (an Ethernet header) and at
 * most XEN_NETIF_MAX_TX_SIZE; it uses at most as many data slots as the backend accepts,
 * which is never fewer than XEN_NETIF_NR_SLOTS_MIN.
 *
 * The backend copies each slot out once, validates the whole chain, then answers every
 * data slot with {id, status} (NETIF_RSP_OKAY, _ERROR for an invalid packet, _DROPPED if it
 * could not be delivered), and every extra slot with status NETIF_RSP_NULL (its id means
 * nothing). Responses are matched by id. A chain that breaks the ring rules (runs past the
 * producer index, or has a fragment crossing its page) is a protocol error: the backend
 * disconnects, as Linux backends do. A well-formed packet that uses more data slots than
 * the backend accepts is answered with NETIF_RSP_ERROR.
 *
 * Checksums on transmit: NETTXF_csum_blank says the TCP/UDP checksum field has not been
 * computed and whoever delivers the packet beyond the guest must fill it in;
 * NETTXF_data_validated says the data is known to be intact. Linux sends both for a
 * checksum-offloaded packet and data_validated alone for one whose checksum was checked.
 *
 * ---------------------------------------------------------------------------------------
 * Receive (host -> guest): the frontend posts empty pages as vireo_netif_rx_request
 * slots, and the backend fills them and turns each used slot into a vireo_netif_rx_response.
 *
 * Refill: the frontend grants whole pages writable, one per request, and keeps the ring
 * stocked, notifying the backend as it posts (feature-rx-notify). The backend takes a
 * packet off its queue only when enough requests are posted for all of its slots, and
 * otherwise waits for that notification.
 *
 * The backend copies the data into the granted pages and writes the response for
 * request i into slot i (the same slot, so a response never lands elsewhere; Linux
 * frontends depend on this because an extra slot has no id):
 *   slot 0        rx_response: id = the request's id, offset = where the data starts in the
 *                 page, flags = NETRXF_*, status = bytes in this slot (> 0) or a negative
 *                 NETIF_RSP_* for the whole packet
 *   [extras]      only if slot 0 has NETRXF_extra_info: netif_extra_info (GSO, HASH); each
 *                 consumes a request whose page stays untouched
 *   more slots    while the previous data slot has NETRXF_more_data
 * The packet's length is the sum of the statuses of its data slots. offset + status never
 * exceeds 4096.
 *
 * Checksums on receive: NETRXF_data_validated says the backend vouches that the data is
 * intact; NETRXF_csum_blank says the TCP/UDP checksum field was never filled in, so the
 * frontend must neither verify it nor forward the packet without completing it. The
 * backend sends csum_blank only to a frontend that accepts it (the csum-offload keys).
 * NETRXF_gso_prefix is obsolete; Vireo never sets it.
 *
 * ---------------------------------------------------------------------------------------
 * Extra info slots (struct vireo_netif_extra_info, in either direction)
 *
 *   GSO        u.gso.size = the segment payload size (the MSS for TCP), u.gso.type =
 *              XEN_NETIF_GSO_TYPE_*, u.gso.features = 0 (none is defined), pad = 0.
 *              Sent only to an end that advertised the matching feature-gso-* key.
 *   MCAST_ADD  u.mcast.addr = an Ethernet multicast address to add to (DEL: remove from)
 *   MCAST_DEL  the filter. Transmit only, attached to a request that carries no packet:
 *              the backend updates the filter and answers that request without
 *              forwarding anything.
 *   HASH       u.hash.type = the hash's type as a bit number (_XEN_NETIF_CTRL_HASH_TYPE_*),
 *              u.hash.algorithm = XEN_NETIF_CTRL_HASH_ALGORITHM_*, u.hash.value = the
 *              32-bit hash, least significant byte first.
 * ---------------------------------------------------------------------------------------
 */
#ifndef VIREO_ABI_IO_NETIF_H
#define VIREO_ABI_IO_NETIF_H

#include <stddef.h>
#include <stdint.h>

#include "ring.h"
#include "../grant_table.h"

/* Data slots per packet every backend must accept (older Linux's MAX_SKB_FRAGS). */
#define VIREO_XEN_NETIF_NR_SLOTS_MIN 18

/* The largest packet on the transmit ring, in bytes (size is 16 bits). */
#define VIREO_XEN_NETIF_MAX_TX_SIZE 0xFFFF

/* Slots in one-page rings: the largest power of two <= (4096 - 64) / slot size. */
#define VIREO_ABI_NETIF_TX_RING_SIZE   256 /* 12-byte slots */
#define VIREO_ABI_NETIF_RX_RING_SIZE   256 /*  8-byte slots */
#define VIREO_ABI_NETIF_CTRL_RING_SIZE 128 /* 16-byte slots */

/* ---------------------------------------------------------------------------------------
 * Transmit requests: flags (bit numbers, then masks)
 * ------------------------------------------------------------------------------------- */

#define VIREO__NETTXF_csum_blank     0
#define VIREO_NETTXF_csum_blank      (1U << 0) /* TCP/UDP checksum not computed */
#define VIREO__NETTXF_data_validated 1
#define VIREO_NETTXF_data_validated  (1U << 1) /* data known to be intact */
#define VIREO__NETTXF_more_data      2
#define VIREO_NETTXF_more_data       (1U << 2) /* another data slot of this packet follows */
#define VIREO__NETTXF_extra_info     3
#define VIREO_NETTXF_extra_info      (1U << 3) /* extra info slots follow this one */

/* One transmit slot: a fragment of a packet (or the whole of it). */
struct vireo_netif_tx_request {
    vireo_grant_ref_t gref;   /* IN: grant of the page holding the fragment */
    uint16_t          offset; /* IN: where the fragment starts in that page */
    uint16_t          flags;  /* IN: VIREO_NETTXF_* */
    uint16_t          id;     /* IN: echoed in the response; unique among slots in flight */
    uint16_t          size;   /* IN: first slot: packet length; later slots: fragment
                                 length */
};
typedef struct vireo_netif_tx_request vireo_netif_tx_request_t;
_Static_assert(sizeof(struct vireo_netif_tx_request) == 12, "netif_tx_request");
_Static_assert(offsetof(struct vireo_netif_tx_request, gref) == 0, "gref");
_Static_assert(offsetof(struct vireo_netif_tx_request, offset) == 4, "offset");
_Static_assert(offsetof(struct vireo_netif_tx_request, flags) == 6, "flags");
_Static_assert(offsetof(struct vireo_netif_tx_request, id) == 8, "id");
_Static_assert(offsetof(struct vireo_netif_tx_request, size) == 10, "size");

/* ---------------------------------------------------------------------------------------
 * Extra info slots
 * ------------------------------------------------------------------------------------- */

#define VIREO_XEN_NETIF_EXTRA_TYPE_NONE      0 /* never valid */
#define VIREO_XEN_NETIF_EXTRA_TYPE_GSO       1 /* u.gso */
#define VIREO_XEN_NETIF_EXTRA_TYPE_MCAST_ADD 2 /* u.mcast */
#define VIREO_XEN_NETIF_EXTRA_TYPE_MCAST_DEL 3 /* u.mcast */
#define VIREO_XEN_NETIF_EXTRA_TYPE_HASH      4 /* u.hash */
#define VIREO_XEN_NETIF_EXTRA_TYPE_MAX       5 /* one past the last type */

#define VIREO__XEN_NETIF_EXTRA_FLAG_MORE 0
#define VIREO_XEN_NETIF_EXTRA_FLAG_MORE  (1U << 0) /* another extra slot follows */

#define VIREO_XEN_NETIF_GSO_TYPE_NONE  0
#define VIREO_XEN_NETIF_GSO_TYPE_TCPV4 1
#define VIREO_XEN_NETIF_GSO_TYPE_TCPV6 2

/*
 * Extra information about the packet, in a slot of its own right after the packet's first
 * slot. Written by whichever end produces the packet (IN on transmit, OUT on receive). It
 * fits both a transmit request (12 bytes) and a receive response (8 bytes).
 */
struct vireo_netif_extra_info {
    uint8_t type;  /* VIREO_XEN_NETIF_EXTRA_TYPE_* */
    uint8_t flags; /* VIREO_XEN_NETIF_EXTRA_FLAG_* */
    union {
        struct {
            uint16_t size;     /* payload bytes per segment (the MSS) */
            uint8_t  type;     /* VIREO_XEN_NETIF_GSO_TYPE_* */
            uint8_t  pad;      /* zero */
            uint16_t features; /* zero: no GSO feature bits are defined */
        } gso;
        struct {
            uint8_t addr[6];   /* Ethernet multicast address */
        } mcast;
        struct {
            uint8_t type;      /* hash type, as a bit number: VIREO__XEN_NETIF_CTRL_HASH_TYPE_* */
            uint8_t algorithm; /* VIREO_XEN_NETIF_CTRL_HASH_ALGORITHM_* */
            uint8_t value[4];  /* the hash, least significant byte first */
        } hash;
        uint16_t pad[3];
    } u;
};
typedef struct vireo_netif_extra_info vireo_netif_extra_info_t;
_Static_assert(sizeof(struct vireo_netif_extra_info) == 8, "netif_extra_info");
_Static_assert(offsetof(struct vireo_netif_extra_info, type) == 0, "type");
_Static_assert(offsetof(struct vireo_netif_extra_info, flags) == 1, "flags");
_Static_assert(offsetof(struct vireo_netif_extra_info, u) == 2, "u");
_Static_assert(offsetof(struct vireo_netif_extra_info, u.gso.size) == 2, "u.gso.size");
_Static_assert(offsetof(struct vireo_netif_extra_info, u.gso.type) == 4, "u.gso.type");
_Static_assert(offsetof(struct vireo_netif_extra_info, u.gso.pad) == 5, "u.gso.pad");
_Static_assert(offsetof(struct vireo_netif_extra_info, u.gso.features) == 6, "u.gso.features");
_Static_assert(offsetof(struct vireo_netif_extra_info, u.mcast.addr) == 2, "u.mcast.addr");
_Static_assert(offsetof(struct vireo_netif_extra_info, u.hash.type) == 2, "u.hash.type");
_Static_assert(offsetof(struct vireo_netif_extra_info, u.hash.algorithm) == 3,
               "u.hash.algorithm");
_Static_assert(offsetof(struct vireo_netif_extra_info, u.hash.value) == 4, "u.hash.value");
_Static_assert(offsetof(struct vireo_netif_extra_info, u.pad) == 2, "u.pad");

/* ---------------------------------------------------------------------------------------
 * Transmit responses
 * ------------------------------------------------------------------------------------- */

struct vireo_netif_tx_response {
    uint16_t id;     /* OUT: the request's id (meaningless when status is NETIF_RSP_NULL) */
    int16_t  status; /* OUT: VIREO_NETIF_RSP_* */
};
typedef struct vireo_netif_tx_response vireo_netif_tx_response_t;
_Static_assert(sizeof(struct vireo_netif_tx_response) == 4, "netif_tx_response");
_Static_assert(offsetof(struct vireo_netif_tx_response, id) == 0, "id");
_Static_assert(offsetof(struct vireo_netif_tx_response, status) == 2, "status");

/* ---------------------------------------------------------------------------------------
 * Receive requests and responses
 * ------------------------------------------------------------------------------------- */

/* One empty page offered for received data. */
struct vireo_netif_rx_request {
    uint16_t          id;   /* IN: echoed in the response */
    uint16_t          pad;
    vireo_grant_ref_t gref; /* IN: writable grant of a whole page */
};
typedef struct vireo_netif_rx_request vireo_netif_rx_request_t;
_Static_assert(sizeof(struct vireo_netif_rx_request) == 8, "netif_rx_request");
_Static_assert(offsetof(struct vireo_netif_rx_request, id) == 0, "id");
_Static_assert(offsetof(struct vireo_netif_rx_request, pad) == 2, "pad");
_Static_assert(offsetof(struct vireo_netif_rx_request, gref) == 4, "gref");

#define VIREO__NETRXF_data_validated 0
#define VIREO_NETRXF_data_validated  (1U << 0) /* data known to be intact */
#define VIREO__NETRXF_csum_blank     1
#define VIREO_NETRXF_csum_blank      (1U << 1) /* TCP/UDP checksum never filled in */
#define VIREO__NETRXF_more_data      2
#define VIREO_NETRXF_more_data       (1U << 2) /* another data slot of this packet follows */
#define VIREO__NETRXF_extra_info     3
#define VIREO_NETRXF_extra_info      (1U << 3) /* extra info slots follow this one */
#define VIREO__NETRXF_gso_prefix     4
#define VIREO_NETRXF_gso_prefix      (1U << 4) /* obsolete; never set by Vireo */

/* One filled page (or the failure of a packet). */
struct vireo_netif_rx_response {
    uint16_t id;     /* OUT: the request's id */
    uint16_t offset; /* OUT: where the data starts in the page */
    uint16_t flags;  /* OUT: VIREO_NETRXF_* */
    int16_t  status; /* OUT: > 0: bytes of data in this slot; < 0: VIREO_NETIF_RSP_* */
};
typedef struct vireo_netif_rx_response vireo_netif_rx_response_t;
_Static_assert(sizeof(struct vireo_netif_rx_response) == 8, "netif_rx_response");
_Static_assert(offsetof(struct vireo_netif_rx_response, id) == 0, "id");
_Static_assert(offsetof(struct vireo_netif_rx_response, offset) == 2, "offset");
_Static_assert(offsetof(struct vireo_netif_rx_response, flags) == 4, "flags");
_Static_assert(offsetof(struct vireo_netif_rx_response, status) == 6, "status");

/* ---------------------------------------------------------------------------------------
 * The rings (see ring.h)
 * ------------------------------------------------------------------------------------- */

VIREO_DEFINE_RING_TYPES(netif_tx, struct vireo_netif_tx_request, struct vireo_netif_tx_response);
_Static_assert(sizeof(union vireo_netif_tx_sring_entry) == 12, "netif_tx slot");
_Static_assert(sizeof(struct vireo_netif_tx_sring) == 76, "netif_tx_sring");

VIREO_DEFINE_RING_TYPES(netif_rx, struct vireo_netif_rx_request, struct vireo_netif_rx_response);
_Static_assert(sizeof(union vireo_netif_rx_sring_entry) == 8, "netif_rx slot");
_Static_assert(sizeof(struct vireo_netif_rx_sring) == 72, "netif_rx_sring");

/* Response status (a negative status ends a receive packet; see above for NULL). */
#define VIREO_NETIF_RSP_DROPPED (-2) /* not delivered */
#define VIREO_NETIF_RSP_ERROR   (-1) /* invalid or failed */
#define VIREO_NETIF_RSP_OKAY    0
#define VIREO_NETIF_RSP_NULL    1    /* the answer to an extra info slot */

/* ---------------------------------------------------------------------------------------
 * Control ring (feature-ctrl-ring; ctrl-ring-ref, event-channel-ctrl)
 *
 * A third one-page ring, frontend to backend, for settings too large for xenstore
 * (receive-side hashing, static grant mappings). One response per request, matched by id,
 * not necessarily in order. The frontend sets it up before it enters Connected.
 *
 *   type                      data[0]            data[1]        data[2]    response data
 *   SET_HASH_ALGORITHM        HASH_ALGORITHM_*   0              0          0
 *   GET_HASH_FLAGS            0                  0              0          HASH_TYPE_* mask
 *   SET_HASH_FLAGS            HASH_TYPE_* mask   0              0          0
 *   SET_HASH_KEY              gref of the key    key bytes      0          0
 *   GET_HASH_MAPPING_SIZE     0                  0              0          max entries
 *   SET_HASH_MAPPING_SIZE     entries            0              0          0
 *   SET_HASH_MAPPING          gref of uint32_t   entries        first      0
 *                             queue numbers                     entry
 *   GET_GREF_MAPPING_SIZE     queue              0              0          max grefs
 *   ADD_GREF_MAPPING          queue              gref of a      entries    0
 *                                                xen_netif_gref[]
 *   DEL_GREF_MAPPING          queue              as above       entries    entries removed
 *
 * A granted key or table starts at offset 0 of its page and stays granted until the
 * response; a key or hash mapping may be granted read-only, a gref table must be
 * writable. Hash flags, the key, the mapping size and the mapping need a
 * selected algorithm; algorithm NONE, flags 0 or mapping size 0 leave queue choice to the
 * backend (or to modular arithmetic). With SET_HASH_FLAGS, the most specific selected type
 * applies to each packet (IPV4_TCP over IPV4 for TCP).
 * For DEL_GREF_MAPPING the backend writes each entry's status (OUT); for ADD it leaves them
 * alone and the response status covers the whole list, which is added entirely or not
 * at all.
 * ------------------------------------------------------------------------------------- */

/* Hash types: bit numbers (as in extra info u.hash.type), then masks (as in flags). */
#define VIREO__XEN_NETIF_CTRL_HASH_TYPE_IPV4     0 /* IPv4 source + destination address */
#define VIREO_XEN_NETIF_CTRL_HASH_TYPE_IPV4      (1 << 0)
#define VIREO__XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP 1 /* ... + TCP source + destination port */
#define VIREO_XEN_NETIF_CTRL_HASH_TYPE_IPV4_TCP  (1 << 1)
#define VIREO__XEN_NETIF_CTRL_HASH_TYPE_IPV6     2 /* IPv6 source + destination address */
#define VIREO_XEN_NETIF_CTRL_HASH_TYPE_IPV6      (1 << 2)
#define VIREO__XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP 3 /* ... + TCP source + destination port */
#define VIREO_XEN_NETIF_CTRL_HASH_TYPE_IPV6_TCP  (1 << 3)

#define VIREO_XEN_NETIF_CTRL_HASH_ALGORITHM_NONE     0
#define VIREO_XEN_NETIF_CTRL_HASH_ALGORITHM_TOEPLITZ 1 /* the result is 32 bits */

#define VIREO_XEN_NETIF_CTRL_TYPE_INVALID               0
#define VIREO_XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS        1
#define VIREO_XEN_NETIF_CTRL_TYPE_SET_HASH_FLAGS        2
#define VIREO_XEN_NETIF_CTRL_TYPE_SET_HASH_KEY          3
#define VIREO_XEN_NETIF_CTRL_TYPE_GET_HASH_MAPPING_SIZE 4
#define VIREO_XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING_SIZE 5
#define VIREO_XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING      6
#define VIREO_XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM    7
#define VIREO_XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE 8
#define VIREO_XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING      9
#define VIREO_XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING      10

#define VIREO_XEN_NETIF_CTRL_STATUS_SUCCESS           0
#define VIREO_XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED     1
#define VIREO_XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER 2
#define VIREO_XEN_NETIF_CTRL_STATUS_BUFFER_OVERFLOW   3 /* larger than the backend allows */

struct vireo_xen_netif_ctrl_request {
    uint16_t id;      /* IN: echoed in the response */
    uint16_t type;    /* IN: VIREO_XEN_NETIF_CTRL_TYPE_* */
    uint32_t data[3]; /* IN: per type, see the table above; unused words are 0 */
};
_Static_assert(sizeof(struct vireo_xen_netif_ctrl_request) == 16, "xen_netif_ctrl_request");
_Static_assert(offsetof(struct vireo_xen_netif_ctrl_request, id) == 0, "id");
_Static_assert(offsetof(struct vireo_xen_netif_ctrl_request, type) == 2, "type");
_Static_assert(offsetof(struct vireo_xen_netif_ctrl_request, data) == 4, "data");

struct vireo_xen_netif_ctrl_response {
    uint16_t id;     /* OUT: the request's id */
    uint16_t type;   /* OUT: the request's type */
    uint32_t status; /* OUT: VIREO_XEN_NETIF_CTRL_STATUS_* */
    uint32_t data;   /* OUT: per type, see the table above (only on SUCCESS) */
};
_Static_assert(sizeof(struct vireo_xen_netif_ctrl_response) == 12, "xen_netif_ctrl_response");
_Static_assert(offsetof(struct vireo_xen_netif_ctrl_response, id) == 0, "id");
_Static_assert(offsetof(struct vireo_xen_netif_ctrl_response, type) == 2, "type");
_Static_assert(offsetof(struct vireo_xen_netif_ctrl_response, status) == 4, "status");
_Static_assert(offsetof(struct vireo_xen_netif_ctrl_response, data) == 8, "data");

#define VIREO__XEN_NETIF_CTRLF_GREF_readonly 0
#define VIREO_XEN_NETIF_CTRLF_GREF_readonly  (1U << 0) /* map the grant read-only */

/* One entry of the table named by ADD_/DEL_GREF_MAPPING (in a granted page). */
struct vireo_xen_netif_gref {
    vireo_grant_ref_t ref;    /* IN: the grant to map or unmap */
    uint16_t          flags;  /* IN: VIREO_XEN_NETIF_CTRLF_GREF_* */
    uint16_t          status; /* OUT (DEL only): VIREO_XEN_NETIF_CTRL_STATUS_* */
};
_Static_assert(sizeof(struct vireo_xen_netif_gref) == 8, "xen_netif_gref");
_Static_assert(offsetof(struct vireo_xen_netif_gref, ref) == 0, "ref");
_Static_assert(offsetof(struct vireo_xen_netif_gref, flags) == 4, "flags");
_Static_assert(offsetof(struct vireo_xen_netif_gref, status) == 6, "status");

VIREO_DEFINE_RING_TYPES(xen_netif_ctrl, struct vireo_xen_netif_ctrl_request,
                        struct vireo_xen_netif_ctrl_response);
_Static_assert(sizeof(union vireo_xen_netif_ctrl_sring_entry) == 16, "xen_netif_ctrl slot");
_Static_assert(sizeof(struct vireo_xen_netif_ctrl_sring) == 80, "xen_netif_ctrl_sring");

#endif /* VIREO_ABI_IO_NETIF_H */
