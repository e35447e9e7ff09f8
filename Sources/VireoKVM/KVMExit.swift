/// An I/O-port access the guest made (KVM_EXIT_IO).
public struct KVMPortAccess: Equatable, Sendable {
    public enum Direction: Sendable { case input, output }
    public var direction: Direction
    public var port: UInt16
    /// Bytes per item: 1, 2 or 4.
    public var size: Int
    /// Items (greater than 1 for `rep ins`/`rep outs`).
    public var count: Int
    /// For output, the first item, zero-extended; 0 for input (answer with
    /// ``KVMVirtualCPU/completeInput(_:)``). Every item: ``KVMVirtualCPU/portData``.
    public var value: UInt32

    public init(direction: Direction, port: UInt16, size: Int, count: Int = 1, value: UInt32 = 0) {
        self.direction = direction
        self.port = port
        self.size = size
        self.count = count
        self.value = value
    }
}

/// A memory access outside every slot (KVM_EXIT_MMIO).
public struct KVMMemoryAccess: Equatable, Sendable {
    public var address: UInt64
    /// 1 to 8 bytes.
    public var size: Int
    public var isWrite: Bool
    /// For writes, the bytes written (little-endian); 0 for reads (answer with
    /// ``KVMVirtualCPU/completeMemoryRead(_:)``).
    public var value: UInt64
}

/// Why KVM sent an MSR access to user space.
public typealias MSRExitReason = MSRExitReasons

/// Why KVM_RUN returned.
public enum KVMExit: Equatable, Sendable {
    /// `in`/`out` (and their string forms). Output data is in the value; input waits for
    /// ``KVMVirtualCPU/completeInput(_:)`` before the next run.
    case port(KVMPortAccess)
    /// A load or store to guest-physical memory no slot backs.
    case memory(KVMMemoryAccess)
    /// `hlt` (with no in-kernel irqchip, a halted vCPU comes back to Vireo; RIP is past it).
    case halt
    /// Triple fault or similar: the vCPU cannot continue.
    case shutdown
    /// `rdmsr` of a trapped MSR. Answer with ``KVMVirtualCPU/completeMSRRead(_:)`` or
    /// ``KVMVirtualCPU/failMSRAccess()`` (#GP) before the next run.
    case readMSR(index: UInt32, reason: MSRExitReason)
    /// `wrmsr` of a trapped MSR. It completes as is on the next run unless
    /// ``KVMVirtualCPU/failMSRAccess()`` turns it into #GP.
    case writeMSR(index: UInt32, value: UInt64, reason: MSRExitReason)
    /// The guest can take an interrupt now (after `requestInterruptWindow`).
    case interruptWindowOpen
    /// KVM failed on the guest's behalf; suberror 1 is an emulation failure (on this host's
    /// kvm_pvm, any SSE or x87 instruction). `data` is KVM's extra words.
    case internalError(suberror: UInt32, data: [UInt64])
    /// VM entry failed (invalid guest state).
    case failedEntry(reason: UInt64, cpu: UInt32)
    /// A system event: shutdown (1), reset (2), crash (3)...
    case systemEvent(type: UInt32, data: [UInt64])
    /// KVM_RUN returned EINTR: a kick (``KVMVirtualCPU/kick()``) or another signal.
    case interrupted
    /// A debug exit (single step, breakpoint).
    case debug
    /// An exit reason this wrapper does not decode, with the hardware reason when known.
    case other(reason: UInt32, hardwareReason: UInt64)
}
