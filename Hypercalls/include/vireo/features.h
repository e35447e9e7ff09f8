/*
 * vireo/features.h — feature bits reported by xen_version(XENVER_get_features).
 *
 * Numbers are Xen's public ABI (Xen's features.h); see Hypercalls/README.md for the
 * naming rules. Each number is a bit index: feature n is bit (n % 32) of submap
 * (n / 32). A guest also names features, without the XENFEAT_ prefix, in its
 * XEN_ELFNOTE_FEATURES note (see elfnote.h).
 */
#ifndef VIREO_ABI_FEATURES_H
#define VIREO_ABI_FEATURES_H

/* The guest may write its page tables directly (no PV-MMU update hypercalls). */
#define VIREO_XENFEAT_writable_page_tables       0
/* The guest may write its descriptor tables directly. */
#define VIREO_XENFEAT_writable_descriptor_tables 1
/* The host translates guest-physical to host memory (true for every HVM/PVH guest). */
#define VIREO_XENFEAT_auto_translated_physmap    2
/* The guest kernel runs in ring 0. */
#define VIREO_XENFEAT_supervisor_mode_kernel     3
/* PAE page directories may live above 4 GiB (PV-MMU). */
#define VIREO_XENFEAT_pae_pgdir_above_4gb        4
/* x86 PV-MMU: the MMU_PT_UPDATE_PRESERVE_AD update is available. */
#define VIREO_XENFEAT_mmu_pt_update_preserve_ad  5
/* x86 PV-MMU: the page clear/copy MMU extensions are available. */
#define VIREO_XENFEAT_highmem_assist             6
/* map_grant_ref honours GNTMAP_guest_avail bits (PV-MMU). */
#define VIREO_XENFEAT_gnttab_map_avail_bits      7
/* x86: HVM_PARAM_CALLBACK_IRQ accepts HVM_PARAM_CALLBACK_TYPE_VECTOR. */
#define VIREO_XENFEAT_hvm_callback_vector        8
/* x86: the pvclock in vcpu_info is safe to use from an HVM guest. */
#define VIREO_XENFEAT_hvm_safe_pvclock           9
/* x86: physical IRQs can be routed to event channels for an HVM guest. */
#define VIREO_XENFEAT_hvm_pirqs                 10
/* The domain may run as the control domain. */
#define VIREO_XENFEAT_dom0                      11
/* 12 was grant_map_identity; it is retired and Xen no longer defines it. */
/* memory_op reservations accept XENMEMF_vnode. */
#define VIREO_XENFEAT_memory_op_vnode_supported 13
/* Arm: SMC calling convention. */
#define VIREO_XENFEAT_ARM_SMCCC_supported       14
/* x86 PVH: the ACPI RSDP may be anywhere, not only in the first MiB (Linux guests). */
#define VIREO_XENFEAT_linux_rsdp_unrestricted   15
/* The domain's guest frames are not equal to host frames. */
#define VIREO_XENFEAT_not_direct_mapped         16
/* The domain's guest frames equal host frames (1:1). */
#define VIREO_XENFEAT_direct_mapped             17

/* Number of 32-bit submaps XENVER_get_features answers for (submap_idx < this). */
#define VIREO_XENFEAT_NR_SUBMAPS 1

#endif /* VIREO_ABI_FEATURES_H */
