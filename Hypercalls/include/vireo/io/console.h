/*
 * vireo/io/console.h — the paravirtual console page: two byte rings, one per direction.
 *
 * Layout: Xen's public io/console.h for x86_64. Text: Vireo's.
 * Naming: Hypercalls/README.md (VIREO_X <-> X, struct vireo_x <-> struct x).
 * IN = the guest writes, the host (Vireo's console backend) reads; OUT = the reverse.
 *
 * ---------------------------------------------------------------------------------------
 * Where it is
 *
 * The host provides the page and an event channel when it builds the domain. A PVH or
 * HVM guest reads their location with hvm_op get_param: the HVM parameters CONSOLE_PFN
 * (a guest frame number) and CONSOLE_EVTCHN (hvm/params.h).
 * Secondary consoles are ordinary devices under device/console/<n> in xenstore and use
 * the same page layout.
 *
 * ---------------------------------------------------------------------------------------
 * Protocol
 *
 *   in[]   host -> guest (keyboard input). The host writes in[] and in_prod; the guest
 *          writes in_cons.
 *   out[]  guest -> host (output). The guest writes out[] and out_prod; the host writes
 *          out_cons.
 *
 * Indices are free-running 32-bit byte counts that wrap modulo 2^32. Byte number i of a
 * stream is stored at in[i & (VIREO_ABI_XENCONS_IN_SIZE - 1)] or
 * out[i & (VIREO_ABI_XENCONS_OUT_SIZE - 1)] (Xen's MASK_XENCONS_IDX). A stream holds
 * prod - cons bytes (uint32_t arithmetic); a value above the buffer's size is a protocol
 * error, and the host then stops reading that ring (it never trusts either index).
 *
 * Producer:  read cons; full barrier (no byte may be overwritten before the consumer has
 *            released it); write at most size - (prod - cons) bytes; write barrier (the
 *            bytes must be visible before the index); store prod; notify.
 * Consumer:  read prod; read barrier (no byte may be read before prod); copy the bytes out;
 *            full barrier (the copies must be complete before the space is handed back);
 *            store cons; notify (a producer may be waiting for space).
 * There are no event indices: every update of an index is followed by a notification
 * on the console event channel, and either side may also poll.
 * On x86_64 the read and write barriers only constrain the compiler; the full barriers
 * are an MFENCE or a locked instruction (in Swift, sequentially consistent fences).
 * ---------------------------------------------------------------------------------------
 */
#ifndef VIREO_ABI_IO_CONSOLE_H
#define VIREO_ABI_IO_CONSOLE_H

#include <stddef.h>
#include <stdint.h>

/* A free-running console ring index (Xen's XENCONS_RING_IDX). */
typedef uint32_t vireo_XENCONS_RING_IDX;

/* The sizes of in[] and out[] (powers of two, so an index is masked with size - 1). */
#define VIREO_ABI_XENCONS_IN_SIZE  1024
#define VIREO_ABI_XENCONS_OUT_SIZE 2048

struct vireo_xencons_interface {
    char in[1024];                   /* OUT: input bytes for the guest */
    char out[2048];                  /* IN: output bytes from the guest */
    vireo_XENCONS_RING_IDX in_cons;  /* IN: input bytes the guest has consumed */
    vireo_XENCONS_RING_IDX in_prod;  /* OUT: input bytes the host has produced */
    vireo_XENCONS_RING_IDX out_cons; /* OUT: output bytes the host has consumed */
    vireo_XENCONS_RING_IDX out_prod; /* IN: output bytes the guest has produced */
};
_Static_assert(sizeof(struct vireo_xencons_interface) == 3088, "xencons_interface");
_Static_assert(offsetof(struct vireo_xencons_interface, in) == 0, "in");
_Static_assert(offsetof(struct vireo_xencons_interface, out) == 1024, "out");
_Static_assert(offsetof(struct vireo_xencons_interface, in_cons) == 3072, "in_cons");
_Static_assert(offsetof(struct vireo_xencons_interface, in_prod) == 3076, "in_prod");
_Static_assert(offsetof(struct vireo_xencons_interface, out_cons) == 3080, "out_cons");
_Static_assert(offsetof(struct vireo_xencons_interface, out_prod) == 3084, "out_prod");

#endif /* VIREO_ABI_IO_CONSOLE_H */
