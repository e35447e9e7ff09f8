/*
 * vireo/abi.h — the version of Vireo's statement of the guest ABI.
 *
 * VIREO_ABI_VERSION changes whenever anything a guest can see in these headers changes
 * (a number, a layout, a supported operation). Structures only ever grow by appending.
 * Vireo reports it in `vireo abi` and `vireo --version`.
 */
#ifndef VIREO_ABI_ABI_H
#define VIREO_ABI_ABI_H

#define VIREO_ABI_VERSION 1

/* The Xen interface version whose numbers and layouts these headers state (Xen 4.14+). */
#define VIREO_ABI_XEN_INTERFACE_VERSION 0x00040e00

#endif /* VIREO_ABI_ABI_H */
