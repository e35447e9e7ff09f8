#include "vireo_kvm.h"

void vireo_kvm_set_immediate_exit(struct kvm_run *run, uint8_t value) {
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}

uint8_t vireo_kvm_immediate_exit(const struct kvm_run *run) {
    return __atomic_load_n(&run->immediate_exit, __ATOMIC_SEQ_CST);
}

struct kvm_cpuid_entry2 *vireo_kvm_cpuid_entries(struct kvm_cpuid2 *cpuid) { return cpuid->entries; }
