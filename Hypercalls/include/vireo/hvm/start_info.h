/*
 * vireo/hvm/start_info.h — the PVH boot convention: the machine state at the guest's
 * first instruction and the start-of-day structure the loader hands it.
 *
 * Layouts and numbers are Xen's public ABI for x86_64 (Xen's arch-x86/hvm/start_info.h
 * and the x86 direct-boot ABI); see Hypercalls/README.md for the naming rules.
 *
 * Entry
 *   The loader places the image in guest memory and starts the boot vCPU at the
 *   32-bit physical address given by the image's XEN_ELFNOTE_PHYS32_ENTRY note
 *   (elfnote.h), in this state:
 *     EBX     physical address of a struct vireo_hvm_start_info.
 *     CR0     PE (bit 0) set; every other writable bit clear: paging is off.
 *     CR4     zero.
 *     CS      32-bit execute/read code segment, base 0, limit 0xFFFFFFFF.
 *     DS, ES  32-bit read/write data segments, base 0, limit 0xFFFFFFFF.
 *     TR      an active 32-bit TSS, base 0, limit 0x67.
 *     EFLAGS  VM (bit 17), IF (bit 9) and TF (bit 8) clear.
 *   Nothing else is promised: not the selector values, not SS, FS, GS, ESP or the
 *   other general registers, not the GDT or IDT, not EFER. The guest loads its own GDT,
 *   segments, stack and IDT before relying on them, and enables long mode itself.
 *
 * After entry
 *   - The XenStore and console rings and their ports are HVM parameters
 *     (hvm/params.h), read with hvm_op(HVMOP_get_param).
 *   - The hypercall page is installed through the CPUID leaves and MSR (vireo/xen.h).
 *   - Upcalls need HVM_PARAM_CALLBACK_IRQ set first (hvm/params.h).
 *
 * The start-of-day structures (all written by the loader, OUT; the guest only reads)
 *   No data is ever placed at physical address 0, so an address field of 0 means
 *   "not provided". The guest should copy what it needs before reusing that memory.
 */
#ifndef VIREO_ABI_HVM_START_INFO_H
#define VIREO_ABI_HVM_START_INFO_H

#include <stddef.h>
#include <stdint.h>

/* hvm_start_info.magic: "xEn3" with bit 7 of the 'E' set, read as a little-endian word. */
#define VIREO_XEN_HVM_START_MAGIC_VALUE 0x336ec578

/* The newest layout version below (1). Xen has no name for it; this is Vireo's. */
#define VIREO_ABI_HVM_START_INFO_VERSION 1

struct vireo_hvm_start_info {
    uint32_t magic;          /* OUT: VIREO_XEN_HVM_START_MAGIC_VALUE; anything else: not PVH */
    uint32_t version;        /* OUT: layout version; later versions only append fields */
    uint32_t flags;          /* OUT: SIF_* bits from Xen's xen.h (privileged, initial domain) */
    uint32_t nr_modules;     /* OUT: entries at modlist_paddr */
    uint64_t modlist_paddr;  /* OUT: physical address of nr_modules vireo_hvm_modlist_entry */
    uint64_t cmdline_paddr;  /* OUT: physical address of the NUL-terminated kernel command line */
    uint64_t rsdp_paddr;     /* OUT: physical address of the ACPI RSDP */
    /* Version 1 and later: */
    uint64_t memmap_paddr;   /* OUT: physical address of memmap_entries vireo_hvm_memmap_table_entry */
    uint32_t memmap_entries; /* OUT: entries at memmap_paddr; 0: no map given */
    uint32_t reserved;       /* OUT: 0 */
};
_Static_assert(sizeof(struct vireo_hvm_start_info) == 56, "hvm_start_info size");
_Static_assert(offsetof(struct vireo_hvm_start_info, magic) == 0, "magic");
_Static_assert(offsetof(struct vireo_hvm_start_info, version) == 4, "version");
_Static_assert(offsetof(struct vireo_hvm_start_info, flags) == 8, "flags");
_Static_assert(offsetof(struct vireo_hvm_start_info, nr_modules) == 12, "nr_modules");
_Static_assert(offsetof(struct vireo_hvm_start_info, modlist_paddr) == 16, "modlist_paddr");
_Static_assert(offsetof(struct vireo_hvm_start_info, cmdline_paddr) == 24, "cmdline_paddr");
_Static_assert(offsetof(struct vireo_hvm_start_info, rsdp_paddr) == 32, "rsdp_paddr");
_Static_assert(offsetof(struct vireo_hvm_start_info, memmap_paddr) == 40, "memmap_paddr");
_Static_assert(offsetof(struct vireo_hvm_start_info, memmap_entries) == 48, "memmap_entries");
_Static_assert(offsetof(struct vireo_hvm_start_info, reserved) == 52, "reserved");

/* One module (e.g. an initrd) loaded next to the kernel. */
struct vireo_hvm_modlist_entry {
    uint64_t paddr;         /* OUT: physical address of the module's first byte */
    uint64_t size;          /* OUT: length in bytes */
    uint64_t cmdline_paddr; /* OUT: physical address of its NUL-terminated command line, or 0 */
    uint64_t reserved;      /* OUT: 0 */
};
_Static_assert(sizeof(struct vireo_hvm_modlist_entry) == 32, "hvm_modlist_entry size");
_Static_assert(offsetof(struct vireo_hvm_modlist_entry, paddr) == 0, "paddr");
_Static_assert(offsetof(struct vireo_hvm_modlist_entry, size) == 8, "size");
_Static_assert(offsetof(struct vireo_hvm_modlist_entry, cmdline_paddr) == 16, "cmdline_paddr");
_Static_assert(offsetof(struct vireo_hvm_modlist_entry, reserved) == 24, "reserved");

/* One range of the guest-physical memory map. */
struct vireo_hvm_memmap_table_entry {
    uint64_t addr;     /* OUT: first byte of the range */
    uint64_t size;     /* OUT: length in bytes */
    uint32_t type;     /* OUT: VIREO_XEN_HVM_MEMMAP_TYPE_* */
    uint32_t reserved; /* OUT: 0 */
};
_Static_assert(sizeof(struct vireo_hvm_memmap_table_entry) == 24, "hvm_memmap_table_entry size");
_Static_assert(offsetof(struct vireo_hvm_memmap_table_entry, addr) == 0, "addr");
_Static_assert(offsetof(struct vireo_hvm_memmap_table_entry, size) == 8, "size");
_Static_assert(offsetof(struct vireo_hvm_memmap_table_entry, type) == 16, "type");
_Static_assert(offsetof(struct vireo_hvm_memmap_table_entry, reserved) == 20, "reserved");

/* Range types; the numbers are the E820 ones. */
#define VIREO_XEN_HVM_MEMMAP_TYPE_RAM      1 /* usable memory */
#define VIREO_XEN_HVM_MEMMAP_TYPE_RESERVED 2 /* do not use */
#define VIREO_XEN_HVM_MEMMAP_TYPE_ACPI     3 /* ACPI tables; usable once they are read */
#define VIREO_XEN_HVM_MEMMAP_TYPE_NVS      4 /* ACPI non-volatile storage; keep */
#define VIREO_XEN_HVM_MEMMAP_TYPE_UNUSABLE 5 /* faulty memory */
#define VIREO_XEN_HVM_MEMMAP_TYPE_DISABLED 6 /* disabled memory */
#define VIREO_XEN_HVM_MEMMAP_TYPE_PMEM     7 /* persistent memory */

#endif /* VIREO_ABI_HVM_START_INFO_H */
