import Glibc
import VireoABI
import VireoCore
import VireoHypercalls
import VireoKVMSys

/// Which MSR accesses KVM sends to user space (KVM_CAP_X86_USER_SPACE_MSR's argument).
public struct MSRExitReasons: OptionSet, Hashable, Sendable {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// Accesses KVM would answer with #GP (an invalid value for a known MSR).
    public static let invalid = MSRExitReasons(rawValue: UInt32(KVM_MSR_EXIT_REASON_INVAL))
    /// Accesses to MSRs KVM does not know.
    public static let unknown = MSRExitReasons(rawValue: UInt32(KVM_MSR_EXIT_REASON_UNKNOWN))
    /// Accesses the MSR filter denies: how Xen's hypercall-page MSR reaches Vireo.
    public static let filter = MSRExitReasons(rawValue: UInt32(KVM_MSR_EXIT_REASON_FILTER))
}

/// A KVM virtual machine: its memory slots, its MSR policy, and the factory of its vCPUs.
/// Owns its fd and a reference to its GuestMemory (so the mapping KVM uses outlives the VM).
///
/// Created by ``KVMSystem/makeVirtualMachine(memory:)``, which leaves it with:
/// - slot 0: the GuestMemory's RAM at guest-physical 0;
/// - on hosts that want them (VMX without unrestricted guest), the identity-map page and the
///   three TSS pages KVM needs for real-mode emulation, just below 4 GiB at
///   ``identityMapAddress`` and ``tssAddress`` — guests must not be given RAM there;
/// - user-space MSR exits for filtered MSRs, and a filter that denies (so exits on) Xen's
///   hypercall-page MSR 0x40000000, reads and writes; KVM handles every other MSR.
public struct KVMVirtualMachine: ~Copyable {
    let fd: Int32
    /// The guest's memory, which slot 0 maps.
    public let memory: GuestMemory
    let vcpuMmapSize: Int

    /// The slot holding RAM.
    public static let ramSlot: UInt32 = 0
    /// KVM_SET_IDENTITY_MAP_ADDR's page and KVM_SET_TSS_ADDR's three pages, just below the
    /// 4 GiB boundary where a PVH guest has no RAM (and the BIOS area of PCs would be).
    public static let identityMapAddress: UInt64 = 0xFFFB_C000
    public static let tssAddress: UInt64 = 0xFFFB_D000
    /// The MSRs the filter sends to user space: Xen's hypercall-page MSR.
    public static let trappedMSRs: [UInt32] = [VIREO_ABI_HYPERCALL_PAGE_MSR]

    init(fd: Int32, memory: GuestMemory, vcpuMmapSize: Int, setTSS: Bool, setIdentityMap: Bool,
         msrExits: MSRExitReasons = .filter) throws(KVMError) {
        do throws(KVMError) {
            if setIdentityMap {
                var address = Self.identityMapAddress
                try kvmIoctl(fd, .setIdentityMapAddr, &address)
            }
            if setTSS { try kvmIoctl(fd, .setTSSAddr, integer: UInt(Self.tssAddress)) }
            try Self.setRegion(fd, slot: Self.ramSlot, guestPhysical: 0, size: memory.ramSize,
                               host: memory.hostBase, readOnly: false)
            try Self.enableUserSpaceMSR(fd, reasons: msrExits)
            try Self.installMSRFilter(fd, trapping: Self.trappedMSRs)
        } catch {
            close(fd)
            throw error
        }
        self.fd = fd
        self.memory = memory
        self.vcpuMmapSize = vcpuMmapSize
    }

    deinit { close(fd) }

    // MARK: Memory slots

    /// KVM_SET_USER_MEMORY_REGION: maps `size` bytes of host memory at `host` into the guest
    /// at `guestPhysical`, as `slot` (replacing what the slot held). Page-aligned; slots must
    /// not overlap.
    public func setMemoryRegion(slot: UInt32, guestPhysical: GuestPhysicalAddress, size: UInt64,
                                host: UnsafeMutableRawPointer, readOnly: Bool = false) throws(KVMError) {
        try Self.setRegion(fd, slot: slot, guestPhysical: guestPhysical.rawValue, size: size, host: host, readOnly: readOnly)
    }

    /// Removes a slot (a region of size 0).
    public func removeMemoryRegion(slot: UInt32) throws(KVMError) {
        var region = kvm_userspace_memory_region(slot: slot, flags: 0, guest_phys_addr: 0, memory_size: 0, userspace_addr: 0)
        try kvmIoctl(fd, .setUserMemoryRegion, &region)
    }

    /// Maps special frame `index` of the GuestMemory (shared_info, a grant-table frame) at
    /// guest frame `frame`, as `slot`. The frame must lie outside RAM (in a hole above it):
    /// KVM slots cannot overlap, and hiding a RAM page would mean splitting slot 0.
    public func mapSpecialFrame(_ index: Int, at frame: GuestFrame, slot: UInt32) throws(KVMError) {
        guard index >= 0, index < memory.specialFrameCount else {
            throw .invalidArgument("special frame \(index) of \(memory.specialFrameCount)")
        }
        guard slot != Self.ramSlot else { throw .invalidArgument("slot \(slot) holds RAM") }
        let page = UInt64(GuestMemory.pageSize)
        let (gpa, overflow) = frame.rawValue.multipliedReportingOverflow(by: page)
        guard !overflow, gpa >= memory.ramSize else {
            throw .invalidArgument("guest frame \(frame.rawValue) is inside RAM or out of range")
        }
        let host = memory.hostBase + Int(memory.ramSize) + index * GuestMemory.pageSize
        try Self.setRegion(fd, slot: slot, guestPhysical: gpa, size: page, host: host, readOnly: false)
    }

    static func setRegion(_ fd: Int32, slot: UInt32, guestPhysical: UInt64, size: UInt64,
                          host: UnsafeMutableRawPointer, readOnly: Bool) throws(KVMError) {
        let page = UInt64(GuestMemory.pageSize)
        guard guestPhysical % page == 0, size % page == 0, UInt(bitPattern: host) % UInt(page) == 0 else {
            throw .invalidArgument("memory region \(guestPhysical)+\(size) is not page-aligned")
        }
        var region = kvm_userspace_memory_region(
            slot: slot, flags: readOnly ? UInt32(KVM_MEM_READONLY) : 0, guest_phys_addr: guestPhysical,
            memory_size: size, userspace_addr: UInt64(UInt(bitPattern: host)))
        try kvmIoctl(fd, .setUserMemoryRegion, &region)
    }

    // MARK: MSRs

    static func enableUserSpaceMSR(_ fd: Int32, reasons: MSRExitReasons) throws(KVMError) {
        var cap = kvm_enable_cap()
        cap.cap = UInt32(KVM_CAP_X86_USER_SPACE_MSR)
        cap.args.0 = UInt64(reasons.rawValue)
        try kvmIoctl(fd, .enableCap, &cap)
    }

    /// Installs an MSR filter that allows everything except `msrs`, whose reads and writes
    /// are denied and so exit to user space (with MSRExitReasons.filter enabled).
    static func installMSRFilter(_ fd: Int32, trapping msrs: [UInt32]) throws(KVMError) {
        guard msrs.count <= Int(KVM_MSR_FILTER_MAX_RANGES) else {
            throw .invalidArgument("\(msrs.count) trapped MSRs, at most \(KVM_MSR_FILTER_MAX_RANGES)")
        }
        var filter = kvm_msr_filter()
        filter.flags = UInt32(KVM_MSR_FILTER_DEFAULT_ALLOW)
        // One range per MSR, each with a 1-bit bitmap whose bit is clear: deny. KVM copies the
        // bitmaps during the ioctl, so stack storage is enough.
        let bitmaps = UnsafeMutableRawPointer.allocate(byteCount: max(msrs.count, 1) * 8, alignment: 8)
        defer { bitmaps.deallocate() }
        bitmaps.initializeMemory(as: UInt8.self, repeating: 0, count: max(msrs.count, 1) * 8)
        withUnsafeMutableBytes(of: &filter.ranges) { ranges in
            let r = ranges.baseAddress!.assumingMemoryBound(to: kvm_msr_filter_range.self)
            for (i, msr) in msrs.enumerated() {
                r[i].flags = UInt32(KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE)
                r[i].base = msr
                r[i].nmsrs = 1
                r[i].bitmap = (bitmaps + i * 8).assumingMemoryBound(to: UInt8.self)
            }
        }
        try kvmIoctl(fd, .setMSRFilter, &filter)
    }

    // MARK: vCPUs and checks

    /// Creates vCPU `id` (KVM_CREATE_VCPU), maps its run area and turns on sync regs.
    public func makeVirtualCPU(id: UInt32) throws(KVMError) -> KVMVirtualCPU {
        let vcpuFD = try kvmIoctl(fd, .createVCPU, integer: UInt(id))
        return try KVMVirtualCPU(fd: vcpuFD, id: id, runSize: vcpuMmapSize, memory: memory)
    }

    /// KVM_CHECK_EXTENSION on the VM fd (some answers are per VM). Also the cheapest ioctl
    /// round trip, which the raw-exit benchmark uses as its baseline.
    public func checkExtension(_ capability: KVMCapability) throws(KVMError) -> Int32 {
        try kvmIoctl(fd, .checkExtension, integer: UInt(capability.rawValue))
    }
}
