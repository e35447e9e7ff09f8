import VireoABI
import VireoHypercalls

/// The CPUID a Vireo guest sees: what KVM supports, with KVM's own paravirtual leaves replaced
/// by Xen's (DESIGN.md, "How a hypercall reaches Vireo"), as Xen HVM presents them, limited to
/// what Vireo implements.
public enum XenCPUID {
    /// Leaf 0x40000000.
    public static let firstLeaf = UInt32(VIREO_XEN_CPUID_FIRST_LEAF)
    /// The last Xen leaf Vireo answers: base + 4, the HVM-features leaf (Xen's five leaves).
    public static let lastLeaf = firstLeaf + UInt32(VIREO_XEN_CPUID_MAX_NUM_LEAVES) - 1
    /// CPUID.1:ECX bit 31, "running on a hypervisor", which guests check before probing 0x4000_0000.
    public static let hypervisorPresentBit: UInt32 = 1 << 31
    /// The Xen version leaf +1 reports, from the interface version Vireo's headers state.
    public static let version: UInt32 = {
        let v = UInt32(VIREO_ABI_XEN_INTERFACE_VERSION)
        return ((v >> 16) & 0xFF) << 16 | ((v >> 8) & 0xFF)
    }()

    /// Xen's leaves for vCPU `vcpu` of `domain`:
    /// - +0: the largest Xen leaf; "XenVMMXenVMM";
    /// - +1: version (major << 16 | minor);
    /// - +2: one hypercall page, installed through MSR 0x40000000; no PV feature flags;
    /// - +3: time (three sub-leaves), all zero: no TSC information is promised;
    /// - +4: HVM features: the vCPU id in EBX and the domain id in ECX, nothing else (no APIC
    ///   or x2APIC virtualization, no per-vCPU upcall vectors: Vireo has neither).
    public static func leaves(vcpu: UInt32, domain: DomainID) -> [CPUIDEntry] {
        let flags = UInt32(VIREO_XEN_HVM_CPUID_VCPU_ID_PRESENT) | UInt32(VIREO_XEN_HVM_CPUID_DOMID_PRESENT)
        return [
            CPUIDEntry(function: firstLeaf, eax: lastLeaf, ebx: UInt32(VIREO_XEN_CPUID_SIGNATURE_EBX),
                       ecx: UInt32(VIREO_XEN_CPUID_SIGNATURE_ECX), edx: UInt32(VIREO_XEN_CPUID_SIGNATURE_EDX)),
            CPUIDEntry(function: firstLeaf + 1, eax: version),
            CPUIDEntry(function: firstLeaf + 2, eax: 1, ebx: VIREO_ABI_HYPERCALL_PAGE_MSR),
            CPUIDEntry(function: firstLeaf + 3, index: 0, significantIndex: true),
            CPUIDEntry(function: firstLeaf + 3, index: 1, significantIndex: true),
            CPUIDEntry(function: firstLeaf + 3, index: 2, significantIndex: true),
            CPUIDEntry(function: firstLeaf + 4, eax: flags, ebx: vcpu, ecx: UInt32(domain.rawValue)),
        ]
    }

    /// `supported` (KVM_GET_SUPPORTED_CPUID) with every leaf in 0x40000000–0x4FFFFFFF (KVM's
    /// "KVMKVMKVM" leaves) removed, Xen's leaves added, the hypervisor bit set, and the initial
    /// APIC id (CPUID.1:EBX[31:24]) set to the vCPU id. Long mode stays as KVM reports it.
    public static func guestCPUID(supported: [CPUIDEntry], vcpu: UInt32, domain: DomainID) -> [CPUIDEntry] {
        var entries = supported.filter { $0.function < 0x4000_0000 || $0.function > 0x4FFF_FFFF }
        for i in entries.indices where entries[i].function == 1 {
            entries[i].ecx |= hypervisorPresentBit
            entries[i].ebx = (entries[i].ebx & 0x00FF_FFFF) | (vcpu & 0xFF) << 24
        }
        return entries + leaves(vcpu: vcpu, domain: domain)
    }
}
