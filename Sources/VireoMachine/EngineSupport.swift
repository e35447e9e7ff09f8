import Foundation
import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoHypervisor

/// Which engine runs a domain's vCPUs.
public enum ExecutionEngine: String, Sendable, CaseIterable {
    /// Linux KVM (`/dev/kvm`).
    case kvm
    /// Vireo's own x86-64 interpreter (``SoftDomainRunner``).
    case soft

    /// KVM where it is hardware-accelerated (`/dev/kvm` opens, has what Vireo needs, and is
    /// served by kvm_intel or kvm_amd), else the SoftCPU: on a host whose `/dev/kvm` comes from
    /// kvm_pvm alone, guests that are not PVM-aware run through KVM's instruction emulator
    /// (about 2 M instructions/s), and the SoftCPU is the fast engine.
    public static var automatic: ExecutionEngine {
        guard access("/dev/kvm", R_OK | W_OK) == 0, hardwareAccelerated else { return .soft }
        return KVMDomainRunner.kvmUsable ? .kvm : .soft
    }

    /// Whether KVM here is hardware virtualization (VMX or SVM), as the loaded modules say.
    public static var hardwareAccelerated: Bool {
        access("/sys/module/kvm_intel", F_OK) == 0 || access("/sys/module/kvm_amd", F_OK) == 0
    }
}

/// The engine-independent half of running a vCPU: the hypercall's arguments taken from the
/// registers as Xen passes them, the dispatcher's outcome turned into what the engine must do,
/// the sleep on HLT and SCHEDOP_block/poll, and the timer thread. KVMDomainRunner and
/// SoftDomainRunner each supply registers and a way to wake their vCPU.
struct VCPUServices {
    let domain: Domain
    let dispatcher: HypercallDispatcher
    let wakers: [VCPUWaker]
    /// Wakes vCPU `i` if it sleeps and kicks it out of guest code if it runs (so a running vCPU
    /// takes an upcall at once): the domain's upcall hook.
    let wake: @Sendable (Int) -> Void
    /// ``wake`` for every vCPU, so each looks at events, timers and the domain's state.
    let wakeAll: @Sendable () -> Void

    /// One waker per vCPU; `kick` makes vCPU `i` leave guest code now (the engine's kick).
    init(domain: Domain, vcpus: Int, kick: @escaping @Sendable (Int) -> Void) {
        self.domain = domain
        dispatcher = HypercallDispatcher(domain: domain)
        let wakers = (0..<vcpus).map { _ in VCPUWaker() }
        self.wakers = wakers
        let wake: @Sendable (Int) -> Void = { index in
            guard index < wakers.count else { return }
            let waker = wakers[index]
            // A vCPU in its sleep looks at events before it next enters the guest, so only a
            // running one needs the engine's kick (which on KVM would cost an extra KVM_RUN).
            // The sequentially consistent load orders after the caller's pending bit (the
            // upcall follows a locked update), and `sleep` clears the flag before it returns.
            let sleeping = waker.inSleep.load(ordering: .sequentiallyConsistent)
            waker.wake()
            if !sleeping { kick(index) }
        }
        self.wake = wake
        wakeAll = { for index in wakers.indices { wake(index) } }
    }

    /// The registers a hypercall reads (RDI, RSI, RDX, R10, R8 in 64-bit mode; EBX, ECX, EDX,
    /// ESI, EDI in 32-bit mode) and its number (EAX).
    struct Call {
        var number: UInt64
        var longMode: Bool
        var userMode: Bool
        var rdi, rsi, rdx, r10, r8, rbx, rcx: UInt64
        var paging: PagingMode
    }

    /// What the engine does next.
    enum Completion {
        /// Write this to RAX (already truncated to 32 bits outside long mode) and resume;
        /// `slept` when the vCPU slept (block, poll): the engine republishes its pvclock.
        case result(UInt64, slept: Bool)
        /// Set these argument registers (RDI, RSI, RDX in 64-bit mode; EBX, ECX, EDX in 32-bit
        /// mode) and run the same hypercall instruction again.
        case restart([UInt64])
        /// The domain shut down.
        case stop
    }

    /// What a hypercall asks of a vCPU whose engine must not sleep on its thread (a vCPU run by
    /// a ``CreditScheduler``): the completion, or a sleep or yield the engine arranges itself.
    enum Step {
        case completion(Completion)
        /// SCHEDOP_block (`ports` nil) or SCHEDOP_poll: RAX gets `result`, then the vCPU sleeps
        /// until ``checkSleep(vcpu:ports:deadline:)`` says ready.
        case sleep(result: UInt64, ports: [EventPort]?, deadline: UInt64?)
        /// SCHEDOP_yield: RAX gets `result`; the vCPU gives up the rest of its slice.
        case yield(result: UInt64)
    }

    /// The hypercall on a thread that may sleep: block and poll sleep here, yield yields the thread.
    func hypercall(_ call: Call, vcpu: Int) -> Completion {
        switch hypercallStep(call, vcpu: vcpu) {
        case .completion(let completion):
            return completion
        case .yield(let result):
            sched_yield()
            return .result(result, slept: false)
        case .sleep(let result, let ports, let deadline):
            // SCHEDOP_block: sleep until an event is pending (delivered after return).
            sleep(vcpu: vcpu, ports: ports, deadline: deadline)
            return .result(result, slept: true)
        }
    }

    /// The hypercall without sleeping: block, poll and yield are handed back to the engine.
    func hypercallStep(_ call: Call, vcpu: Int) -> Step {
        if call.userMode {
            return .completion(.result(UInt64(bitPattern: XenError.EPERM.hypercallResult), slept: false))  // for the kernel only
        }
        let arguments = call.longMode ? [call.rdi, call.rsi, call.rdx, call.r10, call.r8]
            : [call.rbx, call.rcx, call.rdx, call.rsi, call.rdi].map { $0 & 0xFFFF_FFFF }
        let space = GuestAddressSpace(memory: domain.memory, mode: call.paging)
        switch dispatcher.dispatch(HypercallPage.number(fromEAX: call.number), arguments, vcpu: vcpu, space: space) {
        case .result(let r):
            let result = UInt64(bitPattern: r)
            return .completion(.result(call.longMode ? result : result & 0xFFFF_FFFF, slept: false))
        case .yield:
            return .yield(result: 0)
        case .block:
            return .sleep(result: 0, ports: nil, deadline: nil)
        case .poll(let ports, let deadline):
            // Before any look at the ports: an event from now on wakes this vCPU even if its
            // port is masked (checkSleep clears the mark when the poll ends).
            domain.setPolling(vcpu: vcpu, true)
            return .sleep(result: 0, ports: ports, deadline: deadline)
        case .shutdown:
            return .completion(.stop)
        case .restart(let args):
            return .completion(.restart(args))
        }
    }

    func upcallPending(_ vcpu: Int) -> Bool {
        domain.vcpuInfoRegion(vcpu).map { $0.loadAcquire8(at: 0) != 0 } ?? false
    }

    func upcallMasked(_ vcpu: Int) -> Bool {
        domain.vcpuInfoRegion(vcpu).map { $0.loadAcquire8(at: 1) != 0 } ?? true
    }

    /// The callback vector when an upcall should be injected into `vcpu` now (pending,
    /// unmasked, a vector chosen); the engine still checks the vCPU's IF.
    func upcallVector(_ vcpu: Int) -> UInt8? {
        guard let vector = domain.callbackVector, upcallPending(vcpu), !upcallMasked(vcpu) else { return nil }
        return vector
    }

    /// Whether a sleeping vCPU should run again: an event is pending for it (or one of `ports`,
    /// for SCHEDOP_poll), or the domain stops.
    private func isReady(vcpu: Int, ports: [EventPort]?, events: GuestEventState?) -> Bool {
        if domain.shutdownReason != nil { return true }
        if let ports, let events { return ports.contains { events.isPending($0) } }
        return upcallPending(vcpu)
    }

    private var eventState: GuestEventState? {
        (try? domain.memory.specialRegion(Domain.sharedInfoSpecialFrame)).map { GuestEventState(sharedInfo: $0) }
    }

    /// What a sleeping vCPU's sleep comes to now (firing timers that fell due): ready, or sleep
    /// on until an event or until the domain system time `until` (a timer or the deadline).
    enum SleepCheck: Equatable {
        case ready
        case sleep(until: UInt64?)
    }

    func checkSleep(vcpu: Int, ports: [EventPort]?, deadline: UInt64?) -> SleepCheck {
        let check = sleepCheck(vcpu: vcpu, ports: ports, deadline: deadline)
        if check == .ready, ports != nil { domain.setPolling(vcpu: vcpu, false) }  // the poll ends
        return check
    }

    private func sleepCheck(vcpu: Int, ports: [EventPort]?, deadline: UInt64?) -> SleepCheck {
        let events = eventState
        if isReady(vcpu: vcpu, ports: ports, events: events) { return .ready }
        let next = domain.fireDueTimers()
        if isReady(vcpu: vcpu, ports: ports, events: events) { return .ready }
        if let deadline, domain.systemTime() >= deadline { return .ready }
        return .sleep(until: [next, deadline].compactMap { $0 }.min())
    }

    /// Sleeps the vCPU until an event is pending for it (or one of `ports`, for SCHEDOP_poll),
    /// a timer fires, the deadline passes, or the domain stops.
    func sleep(vcpu: Int, ports: [EventPort]?, deadline: UInt64?) {
        let events = eventState
        wakers[vcpu].inSleep.store(true, ordering: .sequentiallyConsistent)
        // Cleared (a full barrier) before the caller looks at the upcall and enters the guest:
        // a wake that saw the flag set and skipped the kick is seen by that look.
        defer { wakers[vcpu].inSleep.store(false, ordering: .sequentiallyConsistent) }
        while case .sleep(let wakeAt) = checkSleep(vcpu: vcpu, ports: ports, deadline: deadline) {
            let timeout = wakeAt.map { Int64(clamping: $0 &- min($0, domain.systemTime())) } ?? -1
            wakers[vcpu].wait(until: { isReady(vcpu: vcpu, ports: ports, events: events) }, timeoutNanoseconds: timeout)
        }
    }

    /// Fires timers when they fall due and calls `kickAll` so the vCPUs deliver the event,
    /// even when a vCPU is running guest code that makes no exits. Ends with the domain
    /// (wake `waker` to make it look).
    static func startTimerThread(domain: Domain, waker: VCPUWaker, kickAll: @escaping @Sendable () -> Void) -> Thread {
        domain.setTimerHook { waker.wake() }
        let thread = Thread {
            while domain.shutdownReason == nil {
                let next = domain.nextTimerDeadline
                let now = domain.systemTime()
                if let next, next <= now {
                    domain.fireDueTimers()
                    kickAll()  // the upcall hook wakes the right one; kick all to deliver
                    continue
                }
                let timeout = next.map { Int64(clamping: $0 - now) } ?? -1
                waker.wait(until: { domain.shutdownReason != nil || domain.nextTimerDeadline != next }, timeoutNanoseconds: timeout)
            }
        }
        thread.name = "vireo-timers"
        thread.start()
        return thread
    }
}

/// What a toolstack holds of a running domain, whichever engine runs it: pause and unpause
/// (the vCPUs park between exits or slices), stop, and the counters it reports.
public protocol DomainRunner: AnyObject, Sendable {
    /// Engine exits taken so far (KVM exits; the SoftCPU's exits to its runner).
    var exits: Int { get }
    /// Hypercalls the guest made so far.
    var hypercalls: Int { get }
    /// Host CPU time of the vCPU threads so far.
    var cpuTimeNanoseconds: UInt64 { get }
    func pause()
    func unpause()
    /// The domain's weight and cap (Docs/scheduling.md).
    var creditParameters: CreditParameters { get }
    /// Sets the weight and/or cap (nil keeps it), or says why not.
    func setCredit(weight: Int?, cap: Int?) throws(CreditError)
    /// Stops the domain from another thread (the reason is recorded; the vCPUs stop soon).
    func stop(_ reason: ShutdownReason)
    /// Runs the domain until it shuts down, the calling thread waiting; returns the reason.
    func run() -> ShutdownReason
    /// Why the run ended beyond the guest's own shutdown reason (a triple fault, an exit the
    /// engine could not handle), if it did.
    var failureDescription: String? { get }
}

/// The half of pause, CPU time and counting that both runners share: a vCPU thread registers
/// its CPU-time clock while it runs and parks here between exits while a pause is requested.
final class RunControl: @unchecked Sendable {  // state behind atomics and a mutex
    private let pauseRequested = Atomic<Bool>(false)
    private let pauseWaker = VCPUWaker()
    private let clocks = Mutex<(live: [Int: clockid_t], finishedNanoseconds: UInt64)>(([:], 0))
    let exitCount = Atomic<Int>(0)
    let hypercallCount = Atomic<Int>(0)

    var isPaused: Bool { pauseRequested.load(ordering: .acquiring) }

    // MARK: Threads

    /// Wakes the timer thread (``VCPUServices/startTimerThread``).
    private let timerWaker = VCPUWaker()
    /// One flag per secondary vCPU thread, set as it ends.
    private let secondaries = Mutex<[Finished]>([])
    private final class Finished: Sendable { let flag = Atomic<Bool>(false) }

    /// Runs the boot vCPU (`boot`) on the calling thread, with the timer thread beside it when
    /// `timerThread` (a runner whose vCPUs look at timers themselves, as the SoftCPU's do on the
    /// scheduler, needs none); when it returns, stops every vCPU (`stopAll`) and waits for the
    /// timer thread and the threads of vCPUs started with ``startSecondary(_:_:)``. Returns the
    /// domain's shutdown reason.
    func run(_ services: VCPUServices, timerThread: Bool = true, boot: () -> Void, stopAll: () -> Void) -> ShutdownReason {
        let timers = timerThread
            ? VCPUServices.startTimerThread(domain: services.domain, waker: timerWaker, kickAll: services.wakeAll) : nil
        boot()
        stopAll()
        timerWaker.wake()
        while let timers, !timers.isFinished { usleep(200) }
        for done in secondaries.withLock({ $0 }) {
            while !done.flag.load(ordering: .acquiring) { usleep(200) }
        }
        return services.domain.shutdownReason ?? .crash
    }

    /// VCPUOP_up's thread: runs vCPU `index` (`body`, which stops the others when it returns).
    func startSecondary(_ index: Int, _ body: @escaping @Sendable () -> Void) {
        let finished = Finished()
        secondaries.withLock { $0.append(finished) }
        let thread = Thread {
            body()
            finished.flag.store(true, ordering: .releasing)
        }
        thread.name = "vireo-vcpu\(index)"
        thread.start()
    }

    func pause() { pauseRequested.store(true, ordering: .releasing) }

    func unpause() {
        pauseRequested.store(false, ordering: .releasing)
        pauseWaker.wake()
    }

    /// Wakes parked vCPUs (to see a stop).
    func wakeParked() { pauseWaker.wake() }

    /// Parks the calling vCPU while a pause is requested and the domain runs.
    func parkWhilePaused(_ domain: Domain) {
        while pauseRequested.load(ordering: .acquiring) && domain.shutdownReason == nil {
            pauseWaker.wait(until: { !self.pauseRequested.load(ordering: .acquiring) || domain.shutdownReason != nil },
                            timeoutNanoseconds: 100_000_000)
        }
    }

    /// Runs `body` as vCPU `index`'s thread, its CPU time counted.
    func counting(vcpu index: Int, _ body: () -> Void) {
        var clock = clockid_t()
        if pthread_getcpuclockid(pthread_self(), &clock) == 0 { clocks.withLock { $0.live[index] = clock } }
        defer {
            clocks.withLock { clocks in
                if let clock = clocks.live.removeValue(forKey: index) { clocks.finishedNanoseconds &+= Self.nanoseconds(of: clock) }
            }
        }
        body()
    }

    var cpuTimeNanoseconds: UInt64 {
        clocks.withLock { clocks in
            clocks.live.values.reduce(clocks.finishedNanoseconds) { $0 &+ Self.nanoseconds(of: $1) }
        }
    }

    private static func nanoseconds(of clock: clockid_t) -> UInt64 {
        var now = timespec()
        guard clock_gettime(clock, &now) == 0 else { return 0 }
        return UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec)
    }
}
