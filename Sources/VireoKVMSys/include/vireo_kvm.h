/*
 * vireo_kvm.h — Linux's KVM ABI for Swift: the structures of <linux/kvm.h> (kvm_run,
 * kvm_regs, kvm_sregs, kvm_cpuid2, kvm_msr_filter...) and, because the ioctl numbers are
 * function-like _IOW/_IOR macros Swift cannot import, each request number as a constant.
 * Host-only; only the KVM engine (VireoKVM) imports it.
 */
#ifndef VIREO_KVM_H
#define VIREO_KVM_H

#include <stdint.h>
#include <linux/kvm.h>

/* System (/dev/kvm) ioctls. */
static const unsigned long VIREO_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long VIREO_KVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long VIREO_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long VIREO_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long VIREO_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;

/* VM ioctls. */
static const unsigned long VIREO_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long VIREO_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long VIREO_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long VIREO_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long VIREO_KVM_ENABLE_CAP = KVM_ENABLE_CAP;
static const unsigned long VIREO_KVM_X86_SET_MSR_FILTER = KVM_X86_SET_MSR_FILTER;

/* vCPU ioctls. */
static const unsigned long VIREO_KVM_RUN = KVM_RUN;
static const unsigned long VIREO_KVM_GET_REGS = KVM_GET_REGS;
static const unsigned long VIREO_KVM_SET_REGS = KVM_SET_REGS;
static const unsigned long VIREO_KVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long VIREO_KVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long VIREO_KVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long VIREO_KVM_INTERRUPT = KVM_INTERRUPT;
static const unsigned long VIREO_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long VIREO_KVM_GET_MSRS = KVM_GET_MSRS;
static const unsigned long VIREO_KVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
static const unsigned long VIREO_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;

/* Sync-regs and filter flags are unsigned long macros; give Swift fixed-width values. */
static const uint64_t VIREO_KVM_SYNC_X86_REGS = KVM_SYNC_X86_REGS;
static const uint64_t VIREO_KVM_SYNC_X86_SREGS = KVM_SYNC_X86_SREGS;
static const uint64_t VIREO_KVM_SYNC_X86_EVENTS = KVM_SYNC_X86_EVENTS;

/*
 * kvm_run.immediate_exit, written by a thread that kicks the vCPU while the vCPU's own thread
 * may be entering KVM_RUN: an atomic byte store, so the kick is a well-defined write and not
 * a data race. Read back (and cleared) only by the vCPU thread.
 */
void vireo_kvm_set_immediate_exit(struct kvm_run *run, uint8_t value);
uint8_t vireo_kvm_immediate_exit(const struct kvm_run *run);

/* The entries of a kvm_cpuid2 (a flexible array Swift does not import). */
struct kvm_cpuid_entry2 *vireo_kvm_cpuid_entries(struct kvm_cpuid2 *cpuid);

#endif
