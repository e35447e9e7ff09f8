/*
 * vireo/version.h — xen_version(cmd, arg): what the hypervisor is and offers.
 *
 * Layouts and numbers are Xen's public ABI for x86_64 (Xen's version.h); see
 * Hypercalls/README.md for the naming rules. Feature bits are in features.h.
 */
#ifndef VIREO_ABI_VERSION_H
#define VIREO_ABI_VERSION_H

#include <stddef.h>
#include <stdint.h>

#include "xen.h"
#include "features.h"

/* ---------------------------------------------------------------------------------------
 * xen_version(cmd, arg): arg is the guest-virtual address of the buffer named with each
 * command (OUT: the host fills it), or 0. Strings are NUL-terminated within their buffer.
 * Returns 0 or -VIREO_XEN_E*, except where a command says it returns a value.
 * "Vireo:" says whether Vireo implements the command; the others return
 * -VIREO_XEN_ENOSYS (38).
 * ------------------------------------------------------------------------------------- */

/* arg: 0. Returns (major << 16) | minor of the Xen interface presented. Vireo: supported. */
#define VIREO_XENVER_version             0
/* arg: vireo_xen_extraversion_t, the version suffix (e.g. ".0"). Vireo: supported. */
#define VIREO_XENVER_extraversion        1
/* arg: struct vireo_xen_compile_info. Vireo: supported. */
#define VIREO_XENVER_compile_info        2
/* arg: vireo_xen_capabilities_info_t, space-separated guest types the host runs
 * (e.g. "hvm-3.0-x86_64"). Vireo: supported. */
#define VIREO_XENVER_capabilities        3
/* arg: vireo_xen_changeset_info_t, the source revision. Vireo: supported. */
#define VIREO_XENVER_changeset           4
/* arg: struct vireo_xen_platform_parameters. Vireo: supported. */
#define VIREO_XENVER_platform_parameters 5
/* arg: struct vireo_xen_feature_info. Vireo: supported. */
#define VIREO_XENVER_get_features        6
/* arg: 0. Returns the page size, 4096. Vireo: supported. */
#define VIREO_XENVER_pagesize            7
/* arg: 16 bytes (Xen's xen_domain_handle_t): the domain's UUID. Vireo: supported. */
#define VIREO_XENVER_guest_handle        8
/* arg: vireo_xen_commandline_t, the hypervisor's command line. Vireo: not supported
 * (there is no hypervisor command line; Xen answers only privileged domains). */
#define VIREO_XENVER_commandline         9
/* arg: a length-prefixed buffer for the hypervisor's build ID. Vireo: not supported. */
#define VIREO_XENVER_build_id           10

/* XENVER_extraversion */
typedef char vireo_xen_extraversion_t[16];
_Static_assert(sizeof(vireo_xen_extraversion_t) == 16, "xen_extraversion_t size");
#define VIREO_XEN_EXTRAVERSION_LEN 16UL

/* XENVER_compile_info: all OUT, all NUL-terminated strings. */
struct vireo_xen_compile_info {
    char compiler[64];       /* OUT: the compiler that built the hypervisor */
    char compile_by[16];     /* OUT: who built it */
    char compile_domain[32]; /* OUT: where it was built */
    char compile_date[32];   /* OUT: when */
};
typedef struct vireo_xen_compile_info vireo_xen_compile_info_t;
_Static_assert(sizeof(struct vireo_xen_compile_info) == 144, "xen_compile_info size");
_Static_assert(offsetof(struct vireo_xen_compile_info, compiler) == 0, "compiler");
_Static_assert(offsetof(struct vireo_xen_compile_info, compile_by) == 64, "compile_by");
_Static_assert(offsetof(struct vireo_xen_compile_info, compile_domain) == 80, "compile_domain");
_Static_assert(offsetof(struct vireo_xen_compile_info, compile_date) == 112, "compile_date");

/* XENVER_capabilities */
typedef char vireo_xen_capabilities_info_t[1024];
_Static_assert(sizeof(vireo_xen_capabilities_info_t) == 1024, "xen_capabilities_info_t size");
#define VIREO_XEN_CAPABILITIES_INFO_LEN 1024UL

/* XENVER_changeset */
typedef char vireo_xen_changeset_info_t[64];
_Static_assert(sizeof(vireo_xen_changeset_info_t) == 64, "xen_changeset_info_t size");
#define VIREO_XEN_CHANGESET_INFO_LEN 64UL

/* XENVER_platform_parameters */
struct vireo_xen_platform_parameters {
    /* OUT: lowest virtual address the hypervisor reserves in a PV guest's address
     * space; HVM/PVH guests have no such hole and should ignore it. */
    vireo_xen_ulong_t virt_start;
};
typedef struct vireo_xen_platform_parameters vireo_xen_platform_parameters_t;
_Static_assert(sizeof(struct vireo_xen_platform_parameters) == 8, "xen_platform_parameters size");
_Static_assert(offsetof(struct vireo_xen_platform_parameters, virt_start) == 0, "virt_start");

/* XENVER_get_features: one 32-bit word of the feature bitmap (features.h) per call. */
struct vireo_xen_feature_info {
    uint32_t submap_idx; /* IN: which word; below VIREO_XENFEAT_NR_SUBMAPS (-EINVAL otherwise) */
    uint32_t submap;     /* OUT: bit i set means feature submap_idx * 32 + i is available */
};
typedef struct vireo_xen_feature_info vireo_xen_feature_info_t;
_Static_assert(sizeof(struct vireo_xen_feature_info) == 8, "xen_feature_info size");
_Static_assert(offsetof(struct vireo_xen_feature_info, submap_idx) == 0, "submap_idx");
_Static_assert(offsetof(struct vireo_xen_feature_info, submap) == 4, "submap");

/* XENVER_commandline. Xen defines no length macro for it; this is Vireo's. */
typedef char vireo_xen_commandline_t[1024];
_Static_assert(sizeof(vireo_xen_commandline_t) == 1024, "xen_commandline_t size");
#define VIREO_ABI_XEN_COMMANDLINE_LEN 1024UL

#endif /* VIREO_ABI_VERSION_H */
