import VireoKVMSys

/// A KVM capability (KVM_CHECK_EXTENSION's argument), with its name for errors and docs.
public struct KVMCapability: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    public static let userMemory = KVMCapability(rawValue: KVM_CAP_USER_MEMORY)
    public static let setTSSAddress = KVMCapability(rawValue: KVM_CAP_SET_TSS_ADDR)
    public static let setIdentityMapAddress = KVMCapability(rawValue: KVM_CAP_SET_IDENTITY_MAP_ADDR)
    public static let extendedCPUID = KVMCapability(rawValue: KVM_CAP_EXT_CPUID)
    public static let memorySlots = KVMCapability(rawValue: KVM_CAP_NR_MEMSLOTS)
    public static let maxVCPUs = KVMCapability(rawValue: KVM_CAP_MAX_VCPUS)
    public static let syncRegisters = KVMCapability(rawValue: KVM_CAP_SYNC_REGS)
    public static let immediateExit = KVMCapability(rawValue: KVM_CAP_IMMEDIATE_EXIT)
    public static let userSpaceMSR = KVMCapability(rawValue: KVM_CAP_X86_USER_SPACE_MSR)
    public static let msrFilter = KVMCapability(rawValue: KVM_CAP_X86_MSR_FILTER)
    public static let vcpuEvents = KVMCapability(rawValue: KVM_CAP_VCPU_EVENTS)
    public static let readOnlyMemory = KVMCapability(rawValue: KVM_CAP_READONLY_MEM)
    public static let tscFrequency = KVMCapability(rawValue: KVM_CAP_GET_TSC_KHZ)
    /// In-kernel Xen support; Vireo does not use it (it traps hypercalls itself).
    public static let xenHVM = KVMCapability(rawValue: KVM_CAP_XEN_HVM)

    /// What the KVM engine cannot work without, and why (Docs/kvm.md):
    /// user memory slots (guest RAM is a GuestMemory mapping), extended CPUID (the Xen leaves
    /// and long mode), sync regs (registers read per exit without extra ioctls), immediate
    /// exit (kicking a vCPU without losing the kick), user-space MSR exits and the MSR filter
    /// (the hypercall-page MSR reaches Vireo).
    public static let required: [KVMCapability] = [
        .userMemory, .extendedCPUID, .syncRegisters, .immediateExit, .userSpaceMSR, .msrFilter,
    ]

    public var name: String {
        switch self {
        case .userMemory: "KVM_CAP_USER_MEMORY"
        case .setTSSAddress: "KVM_CAP_SET_TSS_ADDR"
        case .setIdentityMapAddress: "KVM_CAP_SET_IDENTITY_MAP_ADDR"
        case .extendedCPUID: "KVM_CAP_EXT_CPUID"
        case .memorySlots: "KVM_CAP_NR_MEMSLOTS"
        case .maxVCPUs: "KVM_CAP_MAX_VCPUS"
        case .syncRegisters: "KVM_CAP_SYNC_REGS"
        case .immediateExit: "KVM_CAP_IMMEDIATE_EXIT"
        case .userSpaceMSR: "KVM_CAP_X86_USER_SPACE_MSR"
        case .msrFilter: "KVM_CAP_X86_MSR_FILTER"
        case .vcpuEvents: "KVM_CAP_VCPU_EVENTS"
        case .readOnlyMemory: "KVM_CAP_READONLY_MEM"
        case .tscFrequency: "KVM_CAP_GET_TSC_KHZ"
        case .xenHVM: "KVM_CAP_XEN_HVM"
        default: "KVM capability \(rawValue)"
        }
    }

    public var description: String { name }
}
