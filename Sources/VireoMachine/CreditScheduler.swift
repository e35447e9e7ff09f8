import Foundation
import Glibc
import Synchronization

/// A credit scheduler in the manner of Xen's (`sched_credit.c`) for SoftCPU vCPUs: the vCPUs of
/// many domains share a pool of host threads. Each domain has a weight (its share of the CPU the
/// pool gives out, relative to the other domains that want CPU) and a cap (the most it may use,
/// in percent of one host CPU; 0 = none). A vCPU runs in steps (``Step``; a SoftCPU step is one
/// instruction budget) for up to a time slice, then goes to the back of the run queue; the host
/// CPU time each step really took is charged to its domain.
///
/// Priorities, as in Xen: BOOST (an UNDER vCPU just woken from blocked, so an I/O-bound vCPU
/// runs promptly, preempting a running UNDER/OVER one; it lasts one slice), UNDER (its domain's
/// credit is not negative), OVER.
/// Every accounting period the CPU time the pool gave out in that period is handed back to the
/// domains that want CPU in proportion to their weights; a domain that used more than its share
/// goes OVER and yields to the others. Because credit is the CPU really consumed (not wall time
/// times threads), the shares hold on a host where the pool's threads themselves get less than
/// a core each. A capped domain that used its cap's worth of CPU time in a period is not picked
/// again until the next period. A blocked vCPU is on no queue and uses nothing; ``ScheduledVCPU/wake()``
/// (an event, its timer, a pause change, a stop) or its wake-up time makes it runnable.
///
/// The scheduler is work-conserving: an OVER vCPU runs when nothing UNDER wants the thread.
public final class CreditScheduler: @unchecked Sendable {  // all state behind `lock`
    /// Xen's default weight, and the range `xl sched-credit -w` accepts.
    public static let defaultWeight = 256
    public static let weights = 1...65535
    /// Caps in percent of one host CPU: 0 (none) to 128 CPUs' worth.
    public static let caps = 0...12800

    /// The host's active cores: the default pool size.
    public static var activeCores: Int { max(1, ProcessInfo.processInfo.activeProcessorCount) }

    /// What a vCPU's step asks of the scheduler next.
    public enum Step: Sendable, Equatable {
        /// More to run: the vCPU keeps its thread until its slice ends or a higher priority waits.
        case run
        /// SCHEDOP_yield: the slice ends; the vCPU goes to the back of the queue.
        case yield
        /// Nothing to do until ``ScheduledVCPU/wake()`` or the host monotonic time `wakeAt` (ns).
        case block(wakeAt: UInt64?)
        /// The vCPU has ended (its domain shut down).
        case done
    }

    /// A vCPU's priority class, best first.
    public enum Priority: Int, Sendable, Comparable {
        case boost, under, over
        public static func < (a: Priority, b: Priority) -> Bool { a.rawValue < b.rawValue }
    }

    /// Host threads in the pool.
    public let threadCount: Int
    /// The longest a vCPU runs before the others in the queue get the thread (CPU time, ns).
    public let sliceNanoseconds: UInt64
    /// How often credit is handed out and caps start again (wall time, ns).
    public let periodNanoseconds: UInt64

    let lock = NSCondition()  // taken before a domain's own `changes`, never after
    private var domains: [ScheduledDomain] = []
    private var queue: [ScheduledVCPU] = []
    /// Blocked vCPUs with a wake-up time (one blocked until a wake is on no list at all).
    private var blocked: [ObjectIdentifier: ScheduledVCPU] = [:]
    private var running: [ScheduledVCPU] = []
    private var idleThreads = 0
    private var stopping = false
    private var lastAccounting: UInt64
    private var poolThreads: [Thread] = []
    private let finished = Atomic<Int>(0)

    /// A pool of `threads` host threads (default: the active cores), Xen's 30 ms accounting
    /// period and a 10 ms slice (Xen's default slice is 30 ms; a shorter one evens shares out
    /// over a few seconds).
    public init(threads: Int = CreditScheduler.activeCores, sliceMilliseconds: Int = 10, periodMilliseconds: Int = 30) {
        threadCount = max(1, threads)
        sliceNanoseconds = UInt64(max(1, sliceMilliseconds)) * 1_000_000
        periodNanoseconds = UInt64(max(1, periodMilliseconds)) * 1_000_000
        lastAccounting = Self.now()
        for index in 0..<threadCount {
            let thread = Thread { [self] in
                poolThread()
                finished.add(1, ordering: .releasing)
            }
            thread.name = "vireo-sched\(index)"
            poolThreads.append(thread)
        }
        for thread in poolThreads { thread.start() }
    }

    /// Stops the pool threads (after the vCPUs they run return from their step) and waits for
    /// them. vCPUs still registered are left as they are.
    public func shutdown() {
        lock.lock()
        stopping = true
        lock.broadcast()
        lock.unlock()
        while finished.load(ordering: .acquiring) < threadCount { usleep(200) }
    }

    /// Host monotonic time in nanoseconds (the clock of ``Step/block(wakeAt:)``).
    public static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    static func threadCPUNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    // MARK: Domains

    /// Registers a domain with the given weight and cap (checked as ``ScheduledDomain/set(weight:cap:)`` checks them).
    public func addDomain(name: String, weight: Int = CreditScheduler.defaultWeight, cap: Int = 0) throws(CreditError) -> ScheduledDomain {
        try Self.check(weight: weight, cap: cap)
        let domain = ScheduledDomain(scheduler: self, name: name, weight: weight, cap: cap)
        lock.lock()
        domains.append(domain)
        lock.unlock()
        return domain
    }

    /// The domains registered now.
    public var registeredDomains: [ScheduledDomain] {
        lock.lock()
        defer { lock.unlock() }
        return domains
    }

    static func check(weight: Int, cap: Int) throws(CreditError) {
        guard weights.contains(weight) else { throw .weight(weight) }
        guard caps.contains(cap) else { throw .cap(cap) }
    }

    func remove(_ domain: ScheduledDomain) {
        lock.lock()
        domains.removeAll { $0 === domain }
        lock.unlock()
    }

    func add(_ vcpu: ScheduledVCPU) {
        lock.lock()
        guard case .new = vcpu.state else {
            lock.unlock()
            return
        }
        vcpu.domain.started()
        vcpu.state = .runnable
        queue.append(vcpu)
        signalLocked(for: vcpu)
        lock.unlock()
    }

    // MARK: Waking

    func wake(_ vcpu: ScheduledVCPU) {
        lock.lock()
        switch vcpu.state {
        case .blocked:
            blocked[ObjectIdentifier(vcpu)] = nil
            vcpu.state = .runnable
            vcpu.boost = vcpu.domain.credit >= 0  // as Xen: an UNDER vCPU that wakes is BOOSTed, an OVER one is not
            queue.append(vcpu)
            let victim = signalLocked(for: vcpu)
            lock.unlock()
            victim?.preempt()
            return
        case .running:
            vcpu.woken = true  // its step may be deciding to block: it looks again instead
        case .new, .runnable, .done:
            break
        }
        lock.unlock()
    }

    /// Wakes an idle pool thread for `vcpu`, or names the running vCPU it should preempt (the
    /// worst priority running, when worse than `vcpu`'s). Called with the lock held.
    @discardableResult
    private func signalLocked(for vcpu: ScheduledVCPU) -> ScheduledVCPU? {
        if idleThreads > 0 {
            lock.signal()
            return nil
        }
        let mine = priority(of: vcpu)
        guard let worst = running.max(by: { priority(of: $0) < priority(of: $1) }), mine < priority(of: worst) else { return nil }
        return worst
    }

    func priority(of vcpu: ScheduledVCPU) -> Priority {
        if vcpu.boost { return .boost }
        return vcpu.domain.credit >= 0 ? .under : .over
    }

    private func capReached(_ domain: ScheduledDomain) -> Bool {
        domain.cap > 0 && domain.capUsed >= capBudget(domain)
    }

    private func capBudget(_ domain: ScheduledDomain) -> UInt64 {
        UInt64(domain.cap) * periodNanoseconds / 100
    }

    // MARK: Accounting

    /// Hands out the CPU time used in the elapsed period(s) to the domains that want CPU, by
    /// weight, and starts caps again. Called with the lock held.
    private func accountIfDue(_ now: UInt64) {
        guard now &- lastAccounting >= periodNanoseconds else { return }
        // Periods fall on a fixed grid: a late look (a long step, a busy host) does not stretch
        // them, which would give a capped domain less than its cap.
        let periods = (now &- lastAccounting) / periodNanoseconds
        lastAccounting &+= periods &* periodNanoseconds
        let active = domains.filter { d in d.periodUsed > 0 || d.wantsCPU }
        let used = domains.reduce(UInt64(0)) { $0 &+ $1.periodUsed }
        let totalWeight = active.reduce(0) { $0 + $1.weight }
        // A bound on banked credit and debt: a domain idle for a while does not return with
        // seconds of credit, a long-running one does not owe seconds.
        let bound = Int64(periodNanoseconds) * Int64(threadCount) * 2
        for domain in domains {
            if totalWeight > 0, active.contains(where: { $0 === domain }) {
                var share = Int64(used / UInt64(totalWeight) * UInt64(domain.weight))
                if domain.cap > 0 { share = min(share, Int64(capBudget(domain))) }
                domain.credit = min(bound, max(-bound, domain.credit &+ share))
            } else {
                domain.credit = 0  // inactive (all its vCPUs blocked): neither banks credit nor keeps a debt
            }
            domain.periodUsed = 0
            // A step that ran past the cap's budget is paid for in the next period.
            let budget = capBudget(domain) &* periods
            domain.capUsed = domain.cap > 0 && domain.capUsed > budget ? domain.capUsed - budget : 0
        }
        // Capped-out vCPUs left on the queue may run again: give them threads.
        if idleThreads > 0 && !queue.isEmpty { lock.broadcast() }
    }

    // MARK: The pool

    private func pick() -> ScheduledVCPU? {
        var best: (index: Int, priority: Priority)?
        for (index, vcpu) in queue.enumerated() where !capReached(vcpu.domain) {
            let p = priority(of: vcpu)
            if best == nil || p < best!.priority { best = (index, p) }
            if p == .boost { break }
        }
        guard let best else { return nil }
        return queue.remove(at: best.index)
    }

    /// Whether something on the queue should take the thread from `vcpu` now: a better priority,
    /// or (when its slice is over) anything runnable of equal or better priority.
    private func shouldPreempt(_ vcpu: ScheduledVCPU, sliceOver: Bool) -> Bool {
        let mine = priority(of: vcpu)
        return queue.contains { other in
            guard !capReached(other.domain) else { return false }
            let theirs = priority(of: other)
            return theirs < mine || (sliceOver && theirs <= mine)
        }
    }

    private func wakeExpired(_ now: UInt64) -> UInt64? {
        var earliest: UInt64?
        for (key, vcpu) in blocked {
            guard case .blocked(let wakeAt?) = vcpu.state else { continue }
            if wakeAt <= now {
                blocked[key] = nil
                vcpu.state = .runnable
                vcpu.boost = vcpu.domain.credit >= 0  // a timer or poll deadline: woken as by an event
                queue.append(vcpu)
                if idleThreads > 0 { lock.signal() }
            } else {
                earliest = min(earliest ?? wakeAt, wakeAt)
            }
        }
        return earliest
    }

    private func poolThread() {
        lock.lock()
        while !stopping {
            let now = Self.now()
            accountIfDue(now)
            let nextWake = wakeExpired(now)
            guard let vcpu = pick() else {
                // Sleep until a wake, the earliest wake-up time, or the next period when a
                // capped-out vCPU waits for it.
                var until = nextWake
                if !queue.isEmpty { until = min(until ?? .max, lastAccounting &+ periodNanoseconds) }
                idleThreads += 1
                if let until {
                    let seconds = Double(until &- min(until, Self.now())) / 1e9
                    _ = lock.wait(until: Date(timeIntervalSinceNow: seconds))
                } else {
                    lock.wait()
                }
                idleThreads -= 1
                continue
            }
            runSlice(vcpu)  // returns with the lock held
        }
        lock.unlock()
    }

    /// Runs `vcpu` for up to one slice. Called and returns with the lock held.
    private func runSlice(_ vcpu: ScheduledVCPU) {
        vcpu.state = .running
        running.append(vcpu)
        var sliceUsed: UInt64 = 0
        defer { running.removeAll { $0 === vcpu } }
        while true {
            vcpu.woken = false
            lock.unlock()
            let before = Self.threadCPUNanoseconds()
            let step = vcpu.step()
            let spent = Self.threadCPUNanoseconds() &- before
            lock.lock()
            let domain = vcpu.domain
            domain.consumed &+= spent
            domain.periodUsed &+= spent
            domain.capUsed &+= spent
            domain.credit &-= Int64(clamping: spent)
            sliceUsed &+= spent
            let now = Self.now()
            accountIfDue(now)
            _ = wakeExpired(now)  // a poll deadline or timer passed while this thread was busy
            switch step {
            case .done:
                vcpu.state = .done
                domain.ended()
                return
            case .block(let wakeAt):
                if vcpu.woken {
                    requeue(vcpu, boost: domain.credit >= 0)
                } else {
                    vcpu.state = .blocked(wakeAt: wakeAt)
                    vcpu.boost = false
                    if wakeAt != nil { blocked[ObjectIdentifier(vcpu)] = vcpu }  // only timed sleeps need looking at
                }
                return
            case .yield:
                requeue(vcpu, boost: false)
                return
            case .run:
                if stopping || capReached(domain) {
                    requeue(vcpu, boost: vcpu.boost)
                    return
                }
                let sliceOver = sliceUsed >= sliceNanoseconds
                if sliceOver { vcpu.boost = false }  // BOOST lasts one slice
                if shouldPreempt(vcpu, sliceOver: sliceOver) {
                    requeue(vcpu, boost: vcpu.boost)
                    return
                }
                if sliceOver { sliceUsed = 0 }
            }
        }
    }

    private func requeue(_ vcpu: ScheduledVCPU, boost: Bool) {
        vcpu.state = .runnable
        vcpu.boost = boost
        queue.append(vcpu)
        if idleThreads > 0 { lock.signal() }
    }
}

/// Why a weight or cap was refused: the field and the value.
public enum CreditError: Error, Equatable, CustomStringConvertible {
    case weight(Int)
    case cap(Int)
    /// The engine cannot apply it here (the reason says why).
    case unsupported(String)

    public var description: String {
        switch self {
        case .weight(let w): "weight \(w) is out of range (1...65535)"
        case .cap(let c): "cap \(c) is out of range (0 = none, else percent of one host CPU, 1...12800)"
        case .unsupported(let why): why
        }
    }
}

/// A domain's place in a ``CreditScheduler``: its weight, cap, credit and the CPU time its vCPUs
/// were given.
public final class ScheduledDomain: @unchecked Sendable {  // mutable state behind the scheduler's lock
    public let name: String
    unowned let scheduler: CreditScheduler
    var weightValue: Int
    var capValue: Int
    var credit: Int64 = 0
    var periodUsed: UInt64 = 0
    var capUsed: UInt64 = 0
    var consumed: UInt64 = 0
    private var liveVCPUs = 0  // behind `changes`
    var vcpus: [ScheduledVCPU] = []
    private let changes = NSCondition()

    init(scheduler: CreditScheduler, name: String, weight: Int, cap: Int) {
        self.scheduler = scheduler
        self.name = name
        weightValue = weight
        capValue = cap
    }

    var weight: Int { weightValue }
    var cap: Int { capValue }
    var wantsCPU: Bool {
        vcpus.contains { vcpu in
            switch vcpu.state {
            case .runnable, .running: true
            case .new, .blocked, .done: false
            }
        }
    }

    private func locked<T>(_ body: () -> T) -> T {
        scheduler.lock.lock()
        defer { scheduler.lock.unlock() }
        return body()
    }

    /// The weight and cap in force.
    public var parameters: (weight: Int, cap: Int) { locked { (weightValue, capValue) } }

    /// Sets the weight (1...65535) and cap (0 = none, else percent of one host CPU); `nil`
    /// keeps the value. Takes effect at once.
    public func set(weight: Int? = nil, cap: Int? = nil) throws(CreditError) {
        let (w, c) = parameters
        try CreditScheduler.check(weight: weight ?? w, cap: cap ?? c)
        locked {
            weightValue = weight ?? w
            capValue = cap ?? c
        }
    }

    /// Host CPU time the scheduler has given this domain's vCPUs.
    public var cpuTimeNanoseconds: UInt64 { locked { consumed } }

    /// Adds a vCPU, runnable at once: the pool calls `step` (never two at a time) while it
    /// holds a thread; `preempt` makes a running step return soon (the SoftCPU's kick).
    public func addVCPU(step: @escaping @Sendable () -> CreditScheduler.Step, preempt: @escaping @Sendable () -> Void) -> ScheduledVCPU {
        let vcpu = makeVCPU(step: step, preempt: preempt)
        vcpu.start()
        return vcpu
    }

    /// A vCPU that runs from its ``ScheduledVCPU/start()`` on (so its owner can record it
    /// first, and a wake for it cannot come before it is known).
    public func makeVCPU(step: @escaping @Sendable () -> CreditScheduler.Step, preempt: @escaping @Sendable () -> Void) -> ScheduledVCPU {
        let vcpu = ScheduledVCPU(domain: self, step: step, preempt: preempt)
        locked { vcpus.append(vcpu) }
        return vcpu
    }

    /// Waits until every vCPU added has returned ``CreditScheduler/Step/done``.
    public func waitForVCPUs() {
        changes.lock()
        while liveVCPUs > 0 { changes.wait() }
        changes.unlock()
    }

    func started() {
        changes.lock()
        liveVCPUs += 1
        changes.unlock()
    }

    func ended() {
        changes.lock()
        liveVCPUs -= 1
        changes.broadcast()
        changes.unlock()
    }

    /// Leaves the scheduler (after the vCPUs are done).
    public func remove() { scheduler.remove(self) }
}

/// One vCPU in a ``CreditScheduler``.
public final class ScheduledVCPU: @unchecked Sendable {  // mutable state behind the scheduler's lock
    enum State { case new, runnable, running, blocked(wakeAt: UInt64?), done }
    let domain: ScheduledDomain
    let step: @Sendable () -> CreditScheduler.Step
    let preempt: @Sendable () -> Void
    var state = State.new
    var boost = false
    var woken = false

    init(domain: ScheduledDomain, step: @escaping @Sendable () -> CreditScheduler.Step, preempt: @escaping @Sendable () -> Void) {
        self.domain = domain
        self.step = step
        self.preempt = preempt
    }

    /// Makes a blocked vCPU runnable (BOOSTed); a running one looks again before it blocks.
    public func wake() { domain.scheduler.wake(self) }

    /// Makes a vCPU from ``ScheduledDomain/makeVCPU(step:preempt:)`` runnable (once).
    public func start() { domain.scheduler.add(self) }
}
