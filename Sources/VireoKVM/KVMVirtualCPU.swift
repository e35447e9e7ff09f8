import Glibc
import Synchronization
import VireoCore
import VireoKVMSys
import VireoLinux

/// One vCPU: its fd, its run area (kvm_run, mapped from the fd), and the thread it runs on.
///
/// Threading: ``run()`` and every accessor of registers and exit answers are for one thread at
/// a time (the vCPU's own thread). ``kick()`` may be called from any thread at any time.
/// A final class rather than a `~Copyable` value because kicks need a shared reference.
///
/// Registers go through the run area (KVM_CAP_SYNC_REGS): KVM stores them there at every exit
/// and loads them at entry when marked dirty, so reading or changing them costs no ioctl.
public final class KVMVirtualCPU: @unchecked Sendable {
    public let id: UInt32
    let fd: Int32
    let runArea: UnsafeMutablePointer<kvm_run>
    let runSize: Int
    /// Keeps the guest's memory mapped while this vCPU may run.
    let memory: GuestMemory
    /// The thread inside ``run()``, so a kick can signal it; the lock makes sure the thread
    /// is still inside run() (so still alive) while it is signalled.
    private let runningThread = Mutex<UInt?>(nil)
    /// The last thread on which run() unblocked the wakeup signal (touched only by run()).
    private var unblockedThread: UInt = 0

    /// The signal that kicks vCPU threads out of KVM_RUN, with its empty handler installed once.
    static let wakeupSignal: Int32 = {
        let signo = vireo_wakeup_signal()
        let installed = vireo_install_wakeup_handler(signo)
        precondition(installed == 0, "installing the vCPU wakeup signal handler failed: errno \(errno)")
        return signo
    }()

    init(fd: Int32, id: UInt32, runSize: Int, memory: GuestMemory) throws(KVMError) {
        guard runSize >= MemoryLayout<kvm_run>.size else {
            close(fd)
            throw .invalidArgument("vCPU run area of \(runSize) bytes")
        }
        let mapped = mmap(nil, runSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
        guard let mapped, mapped != MAP_FAILED else {
            let e = errno
            close(fd)
            throw .system(call: "mmap(kvm_run)", errno: e)
        }
        self.fd = fd
        self.id = id
        self.runSize = runSize
        self.runArea = mapped.assumingMemoryBound(to: kvm_run.self)
        self.memory = memory
        _ = Self.wakeupSignal
        // Ask KVM to store the registers in the run area at every exit, and seed it now so
        // the registers are readable before the first run.
        runArea.pointee.kvm_valid_regs = VIREO_KVM_SYNC_X86_REGS | VIREO_KVM_SYNC_X86_SREGS
        var regs = kvm_regs()
        do {
            try kvmIoctl(fd, .getRegs, &regs)
        } catch {
            munmap(mapped, runSize)
            close(fd)
            throw error
        }
        runArea.pointee.s.regs.regs = regs
    }

    deinit {
        munmap(runArea, runSize)
        close(fd)
    }

    // MARK: Registers

    /// The general-purpose registers, RIP and RFLAGS, through the run area. Setting them
    /// marks them dirty, so KVM loads them at the next entry.
    public var registers: X86Registers {
        get { X86Registers(runArea.pointee.s.regs.regs) }
        set {
            runArea.pointee.s.regs.regs = newValue.kvm
            runArea.pointee.kvm_dirty_regs |= VIREO_KVM_SYNC_X86_REGS
        }
    }

    /// The special registers as KVM stored them in the run area at the last exit (sync regs):
    /// no ioctl. Valid after a ``run()``; use ``specialRegisters()`` before the first run.
    public var syncedSpecialRegisters: X86SpecialRegisters {
        X86SpecialRegisters(runArea.pointee.s.regs.sregs)
    }

    /// KVM_GET_SREGS.
    public func specialRegisters() throws(KVMError) -> X86SpecialRegisters {
        var sregs = kvm_sregs()
        try kvmIoctl(fd, .getSRegs, &sregs)
        return X86SpecialRegisters(sregs)
    }

    /// KVM_SET_SREGS.
    public func setSpecialRegisters(_ registers: X86SpecialRegisters) throws(KVMError) {
        var sregs = registers.raw
        try kvmIoctl(fd, .setSRegs, &sregs)
    }

    /// KVM_GET_REGS, bypassing the run area: the cost sync regs avoids (for benchmarks and
    /// for checking that the run area agrees).
    public func registersByIoctl() throws(KVMError) -> X86Registers {
        var regs = kvm_regs()
        try kvmIoctl(fd, .getRegs, &regs)
        return X86Registers(regs)
    }

    /// KVM_SET_CPUID2: what `cpuid` returns to the guest. Set it before the guest enables long
    /// mode (EFER.LME faults until CPUID advertises long mode).
    public func setCPUID(_ entries: [CPUIDEntry]) throws(KVMError) {
        let buffer = CPUIDBuffer(entries)
        try kvmIoctl(fd, .setCPUID2, buffer.raw)
    }

    /// KVM_GET_MSRS for one MSR (e.g. 0x10, the guest's TSC).
    public func readMSR(_ index: UInt32) throws(KVMError) -> UInt64 {
        // struct kvm_msrs { u32 nmsrs; u32 pad; struct kvm_msr_entry { u32 index; u32 reserved; u64 data; } entries[1]; }
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 24, alignment: 8)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: 24)
        buffer.storeBytes(of: UInt32(1), as: UInt32.self)
        buffer.storeBytes(of: index, toByteOffset: 8, as: UInt32.self)
        let read = try kvmIoctl(fd, .getMSRs, buffer)
        guard read == 1 else { throw .invalidArgument("KVM_GET_MSRS read \(read) of 1 MSR (0x\(String(index, radix: 16)))") }
        return buffer.load(fromByteOffset: 16, as: UInt64.self)
    }

    /// KVM_GET_TSC_KHZ: the guest's TSC rate.
    public func tscKilohertz() throws(KVMError) -> UInt64 {
        UInt64(try kvmIoctl(fd, .getTSCKHz))
    }

    // MARK: Running

    /// KVM_RUN until the next exit to user space.
    public func run() throws(KVMError) -> KVMExit {
        let me = vireo_current_thread()
        if me != unblockedThread {
            // A kick must be able to interrupt KVM_RUN on whichever thread runs the vCPU.
            _ = vireo_unblock_signal(Self.wakeupSignal)
            unblockedThread = me
        }
        runningThread.withLock { $0 = me }
        var e: Int32 = 0
        let result = kvmIoctlRaw(fd, .run, pointer: nil, error: &e)
        runningThread.withLock { $0 = nil }
        guard result >= 0 else {
            if e == EINTR {
                // The kick (if any) is consumed here; a later kick sets it again.
                vireo_kvm_set_immediate_exit(runArea, 0)
                return .interrupted
            }
            throw .ioctl(name: KVMIoctl.run.name, errno: e)
        }
        return decodeExit()
    }

    /// Makes the vCPU's current or next KVM_RUN return `.interrupted` soon: sets
    /// immediate_exit (covers a vCPU about to enter) and signals its thread if it is inside
    /// run() (covers a vCPU in the guest). Safe from any thread. A kick is never lost, but
    /// kicks close together may merge into one `.interrupted`, so put the work a kick
    /// announces where the vCPU thread will look before kicking.
    public func kick() {
        vireo_kvm_set_immediate_exit(runArea, 1)
        runningThread.withLock { thread in
            if let thread { _ = vireo_signal_thread(thread, Self.wakeupSignal) }
        }
    }

    // MARK: Interrupts (no in-kernel irqchip: Xen's callback-vector semantics)

    /// Asks KVM to exit with `.interruptWindowOpen` as soon as the guest can take an interrupt.
    public var requestInterruptWindow: Bool {
        get { runArea.pointee.request_interrupt_window != 0 }
        set { runArea.pointee.request_interrupt_window = newValue ? 1 : 0 }
    }

    /// Whether KVM_INTERRUPT would be taken at the next entry (RFLAGS.IF set, no interrupt
    /// shadow, nothing else pending), as of the last exit.
    public var readyForInterruptInjection: Bool { runArea.pointee.ready_for_interrupt_injection != 0 }

    /// The guest's RFLAGS.IF as of the last exit.
    public var interruptFlag: Bool { runArea.pointee.if_flag != 0 }

    /// KVM_INTERRUPT: queues `vector` for delivery at the next entry, through the guest's IDT.
    /// The guest returns with IRET and never EOIs a LAPIC (there is none in the kernel). Only
    /// valid when ``readyForInterruptInjection`` is true.
    public func injectInterrupt(vector: UInt8) throws(KVMError) {
        var irq = kvm_interrupt(irq: UInt32(vector))
        try kvmIoctl(fd, .interrupt, &irq)
    }

    // MARK: Answering exits (before the next run)

    /// The bytes of the current port exit (size × count), in the run area.
    public var portData: UnsafeMutableRawBufferPointer {
        let io = runArea.pointee.io
        let base = UnsafeMutableRawPointer(runArea) + Int(io.data_offset)
        return UnsafeMutableRawBufferPointer(start: base, count: min(Int(io.size) * Int(io.count), runSize - Int(io.data_offset)))
    }

    /// Answers a port input: the value `in` reads (truncated to the access size), for every item.
    public func completeInput(_ value: UInt32) {
        let data = portData
        let size = Int(runArea.pointee.io.size)
        guard size > 0 else { return }
        var offset = 0
        while offset + size <= data.count {
            for i in 0..<size { data[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
            offset += size
        }
    }

    /// Answers an MMIO read with `value` (little-endian, truncated to the access size).
    public func completeMemoryRead(_ value: UInt64) {
        withUnsafeMutableBytes(of: &runArea.pointee.mmio.data) { bytes in
            for i in 0..<8 { bytes[i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
        }
    }

    /// Answers a trapped `rdmsr` with `value` (EDX:EAX).
    public func completeMSRRead(_ value: UInt64) {
        runArea.pointee.msr.data = value
        runArea.pointee.msr.error = 0
    }

    /// Makes the trapped `rdmsr`/`wrmsr` fault with #GP in the guest.
    public func failMSRAccess() {
        runArea.pointee.msr.error = 1
    }

    // MARK: Decoding

    private func decodeExit() -> KVMExit {
        let run = runArea
        switch Int32(bitPattern: run.pointee.exit_reason) {
        case KVM_EXIT_IO:
            let io = run.pointee.io
            let direction: KVMPortAccess.Direction = io.direction == UInt8(KVM_EXIT_IO_OUT) ? .output : .input
            var value: UInt32 = 0
            if direction == .output {
                let data = UnsafeRawPointer(run) + Int(io.data_offset)
                for i in 0..<min(Int(io.size), 4) { value |= UInt32(data.load(fromByteOffset: i, as: UInt8.self)) << (8 * i) }
            }
            return .port(KVMPortAccess(direction: direction, port: io.port, size: Int(io.size), count: Int(io.count), value: value))
        case KVM_EXIT_MMIO:
            let mmio = run.pointee.mmio
            var value: UInt64 = 0
            if mmio.is_write != 0 {
                withUnsafeBytes(of: mmio.data) { bytes in
                    for i in 0..<min(Int(mmio.len), 8) { value |= UInt64(bytes[i]) << (8 * i) }
                }
            }
            return .memory(KVMMemoryAccess(address: mmio.phys_addr, size: Int(mmio.len), isWrite: mmio.is_write != 0, value: value))
        case KVM_EXIT_HLT:
            return .halt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_X86_RDMSR:
            let msr = run.pointee.msr
            return .readMSR(index: msr.index, reason: MSRExitReason(rawValue: msr.reason))
        case KVM_EXIT_X86_WRMSR:
            let msr = run.pointee.msr
            return .writeMSR(index: msr.index, value: msr.data, reason: MSRExitReason(rawValue: msr.reason))
        case KVM_EXIT_IRQ_WINDOW_OPEN:
            return .interruptWindowOpen
        case KVM_EXIT_INTERNAL_ERROR:
            let failure = run.pointee.`internal`
            let count = min(Int(failure.ndata), 16)
            let data = withUnsafeBytes(of: failure.data) { Array($0.bindMemory(to: UInt64.self).prefix(count)) }
            return .internalError(suberror: failure.suberror, data: data)
        case KVM_EXIT_FAIL_ENTRY:
            let fail = run.pointee.fail_entry
            return .failedEntry(reason: fail.hardware_entry_failure_reason, cpu: fail.cpu)
        case KVM_EXIT_SYSTEM_EVENT:
            let event = run.pointee.system_event
            let count = min(Int(event.ndata), 16)
            let data = withUnsafeBytes(of: event) { raw in
                // type (4), ndata (4), then data[16].
                (0..<count).map { raw.load(fromByteOffset: 8 + 8 * $0, as: UInt64.self) }
            }
            return .systemEvent(type: event.type, data: data)
        case KVM_EXIT_INTR:
            return .interrupted
        case KVM_EXIT_DEBUG:
            return .debug
        default:
            return .other(reason: run.pointee.exit_reason, hardwareReason: run.pointee.hw.hardware_exit_reason)
        }
    }
}
