import Glibc
import Synchronization
import VireoKVMSys
import VireoLinux

/// One KVM ioctl request: its name (for errors and traces) and its number.
public struct KVMIoctl: Sendable, Equatable, CustomStringConvertible {
    public let name: String
    public let number: UInt

    init(_ name: String, _ number: UInt) {
        self.name = name
        self.number = number
    }

    public var description: String { name }

    static let getAPIVersion = KVMIoctl("KVM_GET_API_VERSION", VIREO_KVM_GET_API_VERSION)
    static let createVM = KVMIoctl("KVM_CREATE_VM", VIREO_KVM_CREATE_VM)
    static let checkExtension = KVMIoctl("KVM_CHECK_EXTENSION", VIREO_KVM_CHECK_EXTENSION)
    static let getVCPUMmapSize = KVMIoctl("KVM_GET_VCPU_MMAP_SIZE", VIREO_KVM_GET_VCPU_MMAP_SIZE)
    static let getSupportedCPUID = KVMIoctl("KVM_GET_SUPPORTED_CPUID", VIREO_KVM_GET_SUPPORTED_CPUID)
    static let createVCPU = KVMIoctl("KVM_CREATE_VCPU", VIREO_KVM_CREATE_VCPU)
    static let setUserMemoryRegion = KVMIoctl("KVM_SET_USER_MEMORY_REGION", VIREO_KVM_SET_USER_MEMORY_REGION)
    static let setTSSAddr = KVMIoctl("KVM_SET_TSS_ADDR", VIREO_KVM_SET_TSS_ADDR)
    static let setIdentityMapAddr = KVMIoctl("KVM_SET_IDENTITY_MAP_ADDR", VIREO_KVM_SET_IDENTITY_MAP_ADDR)
    static let enableCap = KVMIoctl("KVM_ENABLE_CAP", VIREO_KVM_ENABLE_CAP)
    static let setMSRFilter = KVMIoctl("KVM_X86_SET_MSR_FILTER", VIREO_KVM_X86_SET_MSR_FILTER)
    static let run = KVMIoctl("KVM_RUN", VIREO_KVM_RUN)
    static let getRegs = KVMIoctl("KVM_GET_REGS", VIREO_KVM_GET_REGS)
    static let setRegs = KVMIoctl("KVM_SET_REGS", VIREO_KVM_SET_REGS)
    static let getSRegs = KVMIoctl("KVM_GET_SREGS", VIREO_KVM_GET_SREGS)
    static let setSRegs = KVMIoctl("KVM_SET_SREGS", VIREO_KVM_SET_SREGS)
    static let setCPUID2 = KVMIoctl("KVM_SET_CPUID2", VIREO_KVM_SET_CPUID2)
    static let interrupt = KVMIoctl("KVM_INTERRUPT", VIREO_KVM_INTERRUPT)
    static let getMSRs = KVMIoctl("KVM_GET_MSRS", VIREO_KVM_GET_MSRS)
    static let getTSCKHz = KVMIoctl("KVM_GET_TSC_KHZ", VIREO_KVM_GET_TSC_KHZ)
}

/// One traced ioctl: what was asked of which fd, and what came back.
public struct KVMTraceEvent: Sendable, Equatable {
    public var request: KVMIoctl
    public var fd: Int32
    /// The ioctl's return value (-1 on failure).
    public var result: Int32
    /// errno when result is -1, else 0.
    public var errno: Int32
}

/// Tracing of every KVM ioctl Vireo makes. Off by default; while off, the cost per ioctl is
/// one relaxed atomic load.
public enum KVMTrace {
    private static let enabled = Atomic<Bool>(false)
    private static let handler = Mutex<(@Sendable (KVMTraceEvent) -> Void)?>(nil)

    /// Calls `handler` after every KVM ioctl, on the calling thread; nil turns tracing off.
    public static func install(_ handler: (@Sendable (KVMTraceEvent) -> Void)?) {
        self.handler.withLock { $0 = handler }
        enabled.store(handler != nil, ordering: .releasing)
    }

    @inline(__always)
    static var isEnabled: Bool { enabled.load(ordering: .relaxed) }

    static func record(_ event: KVMTraceEvent) {
        let h = handler.withLock { $0 }
        h?(event)
    }
}

/// The one place Vireo calls ioctl on a KVM fd. Returns the result, or -1 with `error` set.
@inline(__always)
func kvmIoctlRaw(_ fd: Int32, _ request: KVMIoctl, pointer: UnsafeMutableRawPointer?, integer: UInt = 0,
                 error: inout Int32) -> Int32 {
    let result = pointer != nil || integer == 0
        ? vireo_ioctl_ptr(fd, request.number, pointer)
        : vireo_ioctl_int(fd, request.number, integer)
    error = result < 0 ? Glibc.errno : 0
    if KVMTrace.isEnabled {
        KVMTrace.record(KVMTraceEvent(request: request, fd: fd, result: result, errno: error))
    }
    return result
}

/// An ioctl with a pointer argument (or none); throws the ioctl's name and errno on failure.
@inline(__always)
@discardableResult
func kvmIoctl(_ fd: Int32, _ request: KVMIoctl, _ pointer: UnsafeMutableRawPointer? = nil) throws(KVMError) -> Int32 {
    var e: Int32 = 0
    let result = kvmIoctlRaw(fd, request, pointer: pointer, error: &e)
    guard result >= 0 else { throw .ioctl(name: request.name, errno: e) }
    return result
}

/// An ioctl with an integer argument; throws the ioctl's name and errno on failure.
@inline(__always)
@discardableResult
func kvmIoctl(_ fd: Int32, _ request: KVMIoctl, integer: UInt) throws(KVMError) -> Int32 {
    var e: Int32 = 0
    let result = kvmIoctlRaw(fd, request, pointer: nil, integer: integer, error: &e)
    guard result >= 0 else { throw .ioctl(name: request.name, errno: e) }
    return result
}
