/*
 * vireo/elfnote.h — the ELF notes a guest kernel image carries to describe itself to
 * the loader.
 *
 * Numbers are Xen's public ABI (Xen's elfnote.h); see Hypercalls/README.md for the naming
 * rules.
 *
 * Each note is an ordinary ELF note in a PT_NOTE segment (or SHT_NOTE section) with
 * name "Xen" (namesz = 4, counting the NUL), type = one of the numbers below, and the
 * value in the descriptor: a NUL-terminated string, or a little-endian number whose
 * width is descsz (4 or 8 bytes).
 *
 * Vireo boots PVH guests only: its loader needs XEN_ELFNOTE_PHYS32_ENTRY and enters the
 * image there (see hvm/start_info.h for the machine state). The other notes describe
 * classic PV guests or crash dumps; they are listed so that the numbering is complete.
 * Loaders disagree on how wide PHYS32_ENTRY's value is (QEMU reads 8 bytes in ELF64
 * images), so emit it as an 8-byte value whose upper half is zero, in a note aligned
 * to 4 bytes; Xen's loader accepts both widths.
 */
#ifndef VIREO_ABI_ELFNOTE_H
#define VIREO_ABI_ELFNOTE_H

#define VIREO_XEN_ELFNOTE_INFO              0  /* string: NAME=VALUE */
#define VIREO_XEN_ELFNOTE_ENTRY             1  /* number: PV entry, virtual address */
#define VIREO_XEN_ELFNOTE_HYPERCALL_PAGE    2  /* number: PV hypercall page, virtual address */
#define VIREO_XEN_ELFNOTE_VIRT_BASE         3  /* number: PV virtual base of the image */
#define VIREO_XEN_ELFNOTE_PADDR_OFFSET      4  /* number: PV bias of the ELF paddr fields */
#define VIREO_XEN_ELFNOTE_XEN_VERSION       5  /* string: Xen version the kernel expects */
#define VIREO_XEN_ELFNOTE_GUEST_OS          6  /* string: guest OS name (e.g. "linux") */
#define VIREO_XEN_ELFNOTE_GUEST_VERSION     7  /* string: guest OS version */
#define VIREO_XEN_ELFNOTE_LOADER            8  /* string: loader type ("generic") */
#define VIREO_XEN_ELFNOTE_PAE_MODE          9  /* string: 32-bit PAE support */
#define VIREO_XEN_ELFNOTE_FEATURES         10  /* string: '|'-separated XENFEAT names; '!' = required */
#define VIREO_XEN_ELFNOTE_BSD_SYMTAB       11  /* string: "yes" to have the symbol table loaded */
#define VIREO_XEN_ELFNOTE_HV_START_LOW     12  /* number: PV, lowest start of the hypervisor hole */
#define VIREO_XEN_ELFNOTE_L1_MFN_VALID     13  /* numbers: PV, mask/value pairs for L1 entries */
#define VIREO_XEN_ELFNOTE_SUSPEND_CANCEL   14  /* number: 1 if the guest handles a cancelled suspend */
#define VIREO_XEN_ELFNOTE_INIT_P2M         15  /* number: PV, where to place the initial p2m */
#define VIREO_XEN_ELFNOTE_MOD_START_PFN    16  /* number: PV, initrd may lie outside the mapping */
#define VIREO_XEN_ELFNOTE_SUPPORTED_FEATURES 17 /* number: bitmap of supported XENFEAT bits */
#define VIREO_XEN_ELFNOTE_PHYS32_ENTRY     18  /* number: PVH entry, 32-bit physical address.
                                                  Vireo: required */
#define VIREO_XEN_ELFNOTE_MAX              18  /* the highest note number above */

/* Notes Xen writes into crash dumps and core files (not found in kernel images). */
#define VIREO_XEN_ELFNOTE_CRASH_INFO              0x1000001
#define VIREO_XEN_ELFNOTE_CRASH_REGS              0x1000002
#define VIREO_XEN_ELFNOTE_DUMPCORE_NONE           0x2000000
#define VIREO_XEN_ELFNOTE_DUMPCORE_HEADER         0x2000001
#define VIREO_XEN_ELFNOTE_DUMPCORE_XEN_VERSION    0x2000002
#define VIREO_XEN_ELFNOTE_DUMPCORE_FORMAT_VERSION 0x2000003

#endif /* VIREO_ABI_ELFNOTE_H */
