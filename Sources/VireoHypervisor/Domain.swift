import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls

/// How a domain ended (SCHEDOP_shutdown's reasons, plus the host's own verdicts).
public enum ShutdownReason: Equatable, Sendable, CustomStringConvertible {
    case poweroff, reboot, suspend, crash, watchdog, softReset
    /// A reason number outside Xen's list.
    case unknown(UInt32)

    public init(xenReason: UInt32) {
        switch Int32(bitPattern: xenReason) {
        case VIREO_SHUTDOWN_poweroff: self = .poweroff
        case VIREO_SHUTDOWN_reboot: self = .reboot
        case VIREO_SHUTDOWN_suspend: self = .suspend
        case VIREO_SHUTDOWN_crash: self = .crash
        case VIREO_SHUTDOWN_watchdog: self = .watchdog
        case VIREO_SHUTDOWN_soft_reset: self = .softReset
        default: self = .unknown(xenReason)
        }
    }

    public var description: String {
        switch self {
        case .poweroff: "poweroff"
        case .reboot: "reboot"
        case .suspend: "suspend"
        case .crash: "crash"
        case .watchdog: "watchdog"
        case .softReset: "soft_reset"
        case .unknown(let r): "unknown reason \(r)"
        }
    }
}

/// What a domain is made of.
public struct DomainConfig: Sendable {
    public var id: DomainID
    public var name: String
    public var memoryBytes: UInt64
    public var vcpus: Int
    /// Grant table frames the guest may set up (512 grants each).
    public var maxGrantFrames: Int
    public var portLimit: Int
    /// Console bytes per second the host accepts from the guest (beyond, output is dropped
    /// and counted: SECURITY.md 19); the burst is one second's worth.
    public var consoleBytesPerSecond: Int

    public init(id: DomainID, name: String, memoryBytes: UInt64, vcpus: Int = 1, maxGrantFrames: Int = 32,
                portLimit: Int = EventChannels.defaultPortLimit, consoleBytesPerSecond: Int = 1 << 20) {
        self.id = id
        self.name = name
        self.memoryBytes = memoryBytes
        self.vcpus = vcpus
        self.maxGrantFrames = maxGrantFrames
        self.portLimit = portLimit
        self.consoleBytesPerSecond = consoleBytesPerSecond
    }
}

/// One guest domain's hypervisor-side state: its memory (RAM plus special frames: shared_info
/// at 0, the grant table after it), its grant table and event channel registration, HVM
/// parameters, timers, console and shutdown state. Engines run its vCPUs and hand it their
/// hypercalls (``HypercallDispatcher``).
public final class Domain: @unchecked Sendable {  // mutable state sits behind `state`
    public let config: DomainConfig
    public var id: DomainID { config.id }
    public let memory: GuestMemory
    public let grantTable: GrantTable
    public let hub: EventChannels
    public let grantTables: GrantTables
    /// Ranges of RAM the toolstack reserved (console and XenStore pages), marked so in the
    /// memory map.
    public let reservedRanges: [PVHLoader.ReservedRange]

    public static let sharedInfoSpecialFrame = 0
    public static let firstGrantSpecialFrame = 1

    struct State {
        var params: [UInt32: UInt64] = [:]
        var shutdown: ShutdownReason?
        var timers: [UInt64?]
        var consoleBudget: Double
        var consoleRefilled: UInt64
        var consoleDropped = 0
        var hypercalls = 0
        var vcpuInfo: [SharedRegion?]
        var vcpuStart: [VCPUStart?] = []
        var online: [Bool] = []
    }
    let state: Mutex<State>
    private let consoleSink: @Sendable ([UInt8]) -> Void
    private let physmapHook = Mutex<(@Sendable (Int, GuestFrame) throws -> Void)?>(nil)
    private let timerHook = Mutex<(@Sendable () -> Void)?>(nil)
    private let vcpuUpHook = Mutex<(@Sendable (Int, VCPUStart) -> Void)?>(nil)
    private let bootTime: UInt64

    /// Creates the domain's memory and registers it with the hub and the grant tables.
    /// `upcall` is the engine's hook for event upcalls; `console` receives console_io output.
    public init(config: DomainConfig, hub: EventChannels, grantTables: GrantTables,
                reserved: [PVHLoader.ReservedRange] = [],
                console: @escaping @Sendable ([UInt8]) -> Void,
                upcall: @escaping @Sendable (Int) -> Void) throws {
        let memory = try GuestMemory(ramBytes: config.memoryBytes, specialFrames: 1 + config.maxGrantFrames,
                                     name: "vireo-\(config.name)")
        let table = try GrantTable(domain: config.id, memory: memory, firstSpecialFrame: Self.firstGrantSpecialFrame,
                                   maxFrames: config.maxGrantFrames, initialFrames: 1)
        try hub.registerDomain(config.id, vcpus: config.vcpus, sharedInfo: try memory.specialRegion(Self.sharedInfoSpecialFrame),
                               portLimit: config.portLimit, owner: memory, upcall: upcall)
        do {
            try grantTables.add(table)
        } catch {
            try? hub.removeDomain(config.id)
            throw error
        }
        self.config = config
        self.memory = memory
        self.grantTable = table
        self.hub = hub
        self.grantTables = grantTables
        self.reservedRanges = reserved
        self.consoleSink = console
        self.bootTime = Self.monotonicNanoseconds()
        self.state = Mutex(State(timers: Array(repeating: nil, count: config.vcpus),
                                 consoleBudget: Double(config.consoleBytesPerSecond), consoleRefilled: Self.monotonicNanoseconds(),
                                 vcpuInfo: Array(repeating: nil, count: config.vcpus),
                                 vcpuStart: Array(repeating: nil, count: config.vcpus),
                                 online: (0..<config.vcpus).map { $0 == 0 }))
    }

    /// The domain is gone: its ports close, its grants end. Idempotent.
    public func destroy() {
        try? hub.removeDomain(id)
        grantTables.remove(id)
    }

    static func monotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    /// Xen's system time: nanoseconds since the domain was created.
    public func systemTime() -> UInt64 { Self.monotonicNanoseconds() &- bootTime }

    // MARK: The guest's physical address space

    /// The engine's hook for special frames the guest places (it maps them into the VM); a
    /// hook that throws refuses the placement (for example a KVM slot that would overlap RAM).
    public func setPhysmapHook(_ hook: (@Sendable (Int, GuestFrame) throws -> Void)?) {
        physmapHook.withLock { $0 = hook }
    }

    /// XENMEM_add_to_physmap for a special frame: the engine first, then guest memory.
    public func placeSpecialFrame(_ index: Int, at frame: GuestFrame) throws(XenError) {
        if let hook = physmapHook.withLock({ $0 }) {
            do { try hook(index, frame) } catch { throw .EINVAL }
        }
        do { try memory.placeSpecialFrame(index, at: frame) } catch { throw error.xenError }
    }

    /// XENMEM_add_to_physmap(XENMAPSPACE_grant_table): frame `index` of the table at `frame`.
    public func placeGrantFrame(_ index: Int, at frame: GuestFrame) throws(XenError) {
        guard index >= 0, index < grantTable.maxFrames else { throw .EINVAL }
        if let hook = physmapHook.withLock({ $0 }) {
            do { try hook(Self.firstGrantSpecialFrame + index, frame) } catch { throw .EINVAL }
        }
        try grantTable.place(frame: index, at: frame)
    }

    // MARK: Secondary vCPUs (VCPUOP_initialise, VCPUOP_up)

    /// VCPUOP_initialise: records `vcpu`'s initial state. EEXIST when it was initialised already.
    public func initialiseVCPU(_ vcpu: Int, _ start: VCPUStart) throws(XenError) {
        try state.withLock { (s: inout State) throws(XenError) in
            guard vcpu > 0, vcpu < config.vcpus else { throw .EINVAL }
            guard s.vcpuStart[vcpu] == nil, !s.online[vcpu] else { throw .EEXIST }
            s.vcpuStart[vcpu] = start
        }
    }

    /// VCPUOP_up: brings an initialised vCPU online (the engine starts running it). Bringing up
    /// an online vCPU does nothing; an uninitialised one is EINVAL.
    public func bringUpVCPU(_ vcpu: Int) throws(XenError) {
        let start: VCPUStart? = try state.withLock { (s: inout State) throws(XenError) -> VCPUStart? in
            guard vcpu >= 0, vcpu < config.vcpus else { throw .EINVAL }
            if s.online[vcpu] { return nil }
            guard let start = s.vcpuStart[vcpu] else { throw .EINVAL }
            s.online[vcpu] = true
            return start
        }
        if let start { vcpuUpHook.withLock { $0 }?(vcpu, start) }
    }

    public func isOnline(_ vcpu: Int) -> Bool {
        state.withLock { vcpu >= 0 && vcpu < $0.online.count && $0.online[vcpu] }
    }

    /// The engine's hook for a vCPU coming online, with its initial state.
    public func setVCPUUpHook(_ hook: (@Sendable (Int, VCPUStart) -> Void)?) {
        vcpuUpHook.withLock { $0 = hook }
    }

    // MARK: HVM parameters

    public func setParam(_ index: Int32, _ value: UInt64) {
        state.withLock { $0.params[UInt32(index)] = value }
    }

    public func param(_ index: Int32) -> UInt64 {
        state.withLock { $0.params[UInt32(index)] ?? 0 }
    }

    /// The upcall vector the guest chose (HVM_PARAM_CALLBACK_IRQ of type vector), if any.
    public var callbackVector: UInt8? {
        let value = param(VIREO_HVM_PARAM_CALLBACK_IRQ)
        guard value >> 56 == UInt64(VIREO_HVM_PARAM_CALLBACK_TYPE_VECTOR) else { return nil }
        return UInt8(truncatingIfNeeded: value)
    }

    // MARK: Timers

    /// Arms vCPU `vcpu`'s single-shot timer at `deadline` (system time), or disarms it (nil).
    public func setTimer(vcpu: Int, deadline: UInt64?) {
        state.withLock { $0.timers[vcpu] = deadline }
        timerHook.withLock { $0 }?()
    }

    /// Called whenever a timer is armed or disarmed: the engine's timer thread re-reads the
    /// earliest deadline (a vCPU spinning in the guest takes no exits to notice one).
    public func setTimerHook(_ hook: (@Sendable () -> Void)?) {
        timerHook.withLock { $0 = hook }
    }

    /// The earliest armed deadline (system time), if any.
    public var nextTimerDeadline: UInt64? { state.withLock { $0.timers.compactMap { $0 }.min() } }

    public func timer(vcpu: Int) -> UInt64? { state.withLock { $0.timers[vcpu] } }

    /// Fires every timer whose deadline has passed (VIRQ_TIMER on its vCPU); returns the
    /// earliest deadline still armed.
    @discardableResult
    public func fireDueTimers() -> UInt64? {
        let now = systemTime()
        let due: [Int] = state.withLock { s in
            var fired: [Int] = []
            for (vcpu, deadline) in s.timers.enumerated() {
                if let deadline, deadline <= now {
                    s.timers[vcpu] = nil
                    fired.append(vcpu)
                }
            }
            return fired
        }
        for vcpu in due { _ = try? hub.raiseVirq(in: id, virq: VirtualIRQ(UInt32(VIREO_VIRQ_TIMER)), vcpu: vcpu) }
        return state.withLock { $0.timers.compactMap { $0 }.min() }
    }

    // MARK: Time (pvclock and wallclock)

    /// Where vCPU `vcpu`'s vcpu_info lives: where the guest registered it, else its slot in
    /// shared_info (vCPUs from 32 up have none until they register one).
    public func vcpuInfoRegion(_ vcpu: Int) -> SharedRegion? {
        if let moved = state.withLock({ $0.vcpuInfo[vcpu] }) { return moved }
        guard vcpu < Int(VIREO_XEN_LEGACY_MAX_VCPUS),
              let shared = try? memory.specialRegion(Self.sharedInfoSpecialFrame) else { return nil }
        return shared.slice(offset: vcpu * 64, count: 64)
    }

    func noteVcpuInfo(_ vcpu: Int, _ region: SharedRegion) {
        state.withLock { $0.vcpuInfo[vcpu] = region }
    }

    /// The pvclock scale for a TSC of `hz`: ns = ((delta << shift) * mul) >> 32 (negative
    /// shift: >> -shift), with mul < 2^32.
    public static func pvclockScale(tscHz hz: UInt64) -> (mul: UInt32, shift: Int8) {
        let nsPerSecond: UInt64 = 1_000_000_000
        var ticks = max(hz, 1)
        var shift: Int8 = 0
        while ticks > 2 * nsPerSecond { ticks >>= 1; shift -= 1 }
        while ticks <= nsPerSecond { ticks <<= 1; shift += 1 }
        return (UInt32((nsPerSecond << 32) / ticks), shift)
    }

    /// Marks vCPU `vcpu` as in SCHEDOP_poll, or no longer: while it polls, any of the domain's
    /// ports becoming pending wakes it through the upcall hook (Xen's evtchn_check_pollers).
    public func setPolling(vcpu: Int, _ polling: Bool) { hub.setPolling(id, vcpu: vcpu, polling) }

    /// Publishes vCPU `vcpu`'s pvclock record: at guest TSC `tsc`, system time is now. The
    /// record is a seqlock: version odd while it is written (vireo/xen.h).
    public func publishTime(vcpu: Int, guestTSC tsc: UInt64, tscHz: UInt64) {
        guard let info = vcpuInfoRegion(vcpu) else { return }
        let (mul, shift) = Self.pvclockScale(tscHz: tscHz)
        let timeAt = 32  // vcpu_info.time
        let version = info.loadAcquire32(at: timeAt)
        info.storeRelease32((version | 1) &+ (version & 1 == 0 ? 0 : 2), at: timeAt)
        Barrier.write()
        info.store(tsc, at: timeAt + 8)
        info.store(systemTime(), at: timeAt + 16)
        info.store(mul, at: timeAt + 24)
        info.store(shift, at: timeAt + 28)
        info.store(UInt8(VIREO_XEN_PVCLOCK_TSC_STABLE_BIT), at: timeAt + 29)
        Barrier.write()
        info.storeRelease32((version | 1) &+ 1, at: timeAt)
    }

    /// Publishes the wallclock at domain boot (system time 0) in shared_info.
    public func publishWallclock() {
        guard let shared = try? memory.specialRegion(Self.sharedInfoSpecialFrame) else { return }
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let boot = (UInt64(now.tv_sec) * 1_000_000_000 + UInt64(now.tv_nsec)) &- systemTime()
        let version = shared.loadAcquire32(at: 3072)
        shared.storeRelease32((version | 1) &+ (version & 1 == 0 ? 0 : 2), at: 3072)
        Barrier.write()
        let seconds = boot / 1_000_000_000
        shared.store(UInt32(truncatingIfNeeded: seconds), at: 3076)
        shared.store(UInt32(boot % 1_000_000_000), at: 3080)
        shared.store(UInt32(truncatingIfNeeded: seconds >> 32), at: 3084)
        Barrier.write()
        shared.storeRelease32((version | 1) &+ 1, at: 3072)
    }

    // MARK: Console and shutdown

    /// Console output from the guest, rate-limited to `consoleBytesPerSecond`.
    public func writeConsole(_ bytes: [UInt8]) {
        let now = Self.monotonicNanoseconds()
        let accepted: Int = state.withLock { s in
            let rate = Double(config.consoleBytesPerSecond)
            s.consoleBudget = min(rate, s.consoleBudget + Double(now &- s.consoleRefilled) * rate / 1e9)
            s.consoleRefilled = now
            let n = min(bytes.count, Int(s.consoleBudget))
            s.consoleBudget -= Double(n)
            s.consoleDropped += bytes.count - n
            return n
        }
        if accepted > 0 { consoleSink(Array(bytes.prefix(accepted))) }
    }

    /// Console bytes dropped by the rate limit.
    public var consoleDropped: Int { state.withLock { $0.consoleDropped } }

    /// Records the first shutdown; later ones do not change it.
    public func shutDown(_ reason: ShutdownReason) {
        state.withLock { s in if s.shutdown == nil { s.shutdown = reason } }
    }

    public var shutdownReason: ShutdownReason? { state.withLock { $0.shutdown } }

    func countHypercall() { state.withLock { $0.hypercalls += 1 } }
    public var hypercallCount: Int { state.withLock { $0.hypercalls } }
}

/// A secondary vCPU's initial state (VCPUOP_initialise's vcpu_hvm_context), validated.
public struct VCPUStart: Sendable, Equatable {
    public enum Mode: Sendable, Equatable {
        /// Straight into 64-bit mode with flat segments.
        case long
        /// 32-bit protected mode with flat segments (bases 0, 4 GiB limits).
        case protected32
    }
    public var mode: Mode
    public var rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, rip, rflags: UInt64
    public var cr0, cr3, cr4, efer: UInt64

    /// Reads and checks a vcpu_hvm_context: 64-bit mode needs paging, PAE and LME|LMA; the
    /// 32-bit form is accepted with flat segments only (base 0).
    public init(context bytes: [UInt8]) throws(XenError) {
        guard bytes.count >= MemoryLayout<vireo_vcpu_hvm_context>.size else { throw .EINVAL }
        func u32(_ at: Int) -> UInt64 { (0..<4).reduce(0) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) } }
        func u64(_ at: Int) -> UInt64 { u32(at) | u32(at + 4) << 32 }
        let regs = 8  // cpu_regs
        switch Int32(truncatingIfNeeded: u32(0)) {
        case VIREO_VCPU_HVM_MODE_64B:
            mode = .long
            (rax, rcx, rdx, rbx) = (u64(regs), u64(regs + 8), u64(regs + 16), u64(regs + 24))
            (rsp, rbp, rsi, rdi) = (u64(regs + 32), u64(regs + 40), u64(regs + 48), u64(regs + 56))
            (rip, rflags) = (u64(regs + 64), u64(regs + 72))
            (cr0, cr3, cr4, efer) = (u64(regs + 80), u64(regs + 88), u64(regs + 96), u64(regs + 104))
            guard cr0 & (1 << 31) != 0, cr0 & 1 != 0, cr4 & (1 << 5) != 0, efer & 0x500 == 0x500 else { throw .EINVAL }
        case VIREO_VCPU_HVM_MODE_32B:
            mode = .protected32
            (rax, rcx, rdx, rbx) = (u32(regs), u32(regs + 4), u32(regs + 8), u32(regs + 12))
            (rsp, rbp, rsi, rdi) = (u32(regs + 16), u32(regs + 20), u32(regs + 24), u32(regs + 28))
            (rip, rflags) = (u32(regs + 32), u32(regs + 36))
            (cr0, cr3, cr4) = (u32(regs + 40), u32(regs + 44), u32(regs + 48))
            efer = u64(regs + 56)
            for base in stride(from: regs + 64, to: regs + 84, by: 4) where u32(base) != 0 { throw .EINVAL }
            guard cr0 & 1 != 0 else { throw .EINVAL }
        default:
            throw .EINVAL
        }
        rflags = (rflags | 0x2) & ~UInt64(0x200)  // bit 1 always set; interrupts start disabled
    }
}
