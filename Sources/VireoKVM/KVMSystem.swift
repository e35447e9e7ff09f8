import Glibc
import VireoCore
import VireoKVMSys

/// /dev/kvm: the API version, capabilities, the vCPU run-area size, the CPUID KVM supports,
/// and the factory of virtual machines. Owns its fd and closes it when it goes away.
public struct KVMSystem: ~Copyable {
    public static let devicePath = "/dev/kvm"
    /// The one stable KVM API version (KVM_GET_API_VERSION).
    public static let requiredAPIVersion: Int32 = 12

    let fd: Int32

    /// Opens /dev/kvm and checks its API version.
    public init(path: String = KVMSystem.devicePath) throws(KVMError) {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw .system(call: "open(\(path))", errno: errno) }
        var e: Int32 = 0
        let version = kvmIoctlRaw(fd, .getAPIVersion, pointer: nil, error: &e)
        guard version == Self.requiredAPIVersion else {
            close(fd)
            if version < 0 { throw .ioctl(name: KVMIoctl.getAPIVersion.name, errno: e) }
            throw .unsupportedAPIVersion(version)
        }
        self.fd = fd
    }

    deinit { close(fd) }

    /// Why the KVM engine cannot run on this host (no /dev/kvm, no access, an old API, a
    /// missing capability), or nil when it can.
    public static func unavailableReason(path: String = KVMSystem.devicePath) -> String? {
        guard access(path, F_OK) == 0 else { return "\(path) does not exist" }
        do {
            let kvm = try KVMSystem(path: path)
            try kvm.requireCapabilities()
            return nil
        } catch {
            return error.description
        }
    }

    /// KVM_GET_API_VERSION.
    public func apiVersion() throws(KVMError) -> Int32 {
        try kvmIoctl(fd, .getAPIVersion)
    }

    /// KVM_CHECK_EXTENSION: 0 when absent; otherwise positive, sometimes a count or a mask.
    public func checkExtension(_ capability: KVMCapability) throws(KVMError) -> Int32 {
        try kvmIoctl(fd, .checkExtension, integer: UInt(capability.rawValue))
    }

    /// Whether the capability is present (false if the check itself fails).
    public func has(_ capability: KVMCapability) -> Bool {
        ((try? checkExtension(capability)) ?? 0) > 0
    }

    /// Throws `missingCapability` for the first of `capabilities` this host lacks.
    public func requireCapabilities(_ capabilities: [KVMCapability] = KVMCapability.required) throws(KVMError) {
        for cap in capabilities where try checkExtension(cap) <= 0 {
            throw .missingCapability(cap)
        }
    }

    /// The bytes to mmap from a vCPU fd for its run area (kvm_run and what follows it).
    public func vcpuMmapSize() throws(KVMError) -> Int {
        Int(try kvmIoctl(fd, .getVCPUMmapSize))
    }

    /// KVM_GET_SUPPORTED_CPUID: every leaf KVM can present to a guest, with the bits it supports.
    public func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
        var capacity = 128
        while true {
            let buffer = CPUIDBuffer(capacity: capacity)
            var e: Int32 = 0
            if kvmIoctlRaw(fd, .getSupportedCPUID, pointer: buffer.raw, error: &e) >= 0 {
                return buffer.entries
            }
            // E2BIG: the buffer was too small; try a bigger one.
            guard e == E2BIG, capacity < 4096 else { throw .ioctl(name: KVMIoctl.getSupportedCPUID.name, errno: e) }
            capacity *= 2
        }
    }

    /// Creates a VM whose RAM is `memory` (slot 0 at guest-physical 0) and whose MSR accesses to
    /// Xen's hypercall-page MSR exit to user space. See ``KVMVirtualMachine``.
    public func makeVirtualMachine(memory: GuestMemory) throws(KVMError) -> KVMVirtualMachine {
        try requireCapabilities()
        let runSize = try vcpuMmapSize()
        let setTSS = has(.setTSSAddress), setIdentityMap = has(.setIdentityMapAddress)
        let vmFD = try kvmIoctl(fd, .createVM, integer: 0)
        return try KVMVirtualMachine(fd: vmFD, memory: memory, vcpuMmapSize: runSize,
                                     setTSS: setTSS, setIdentityMap: setIdentityMap)
    }
}
