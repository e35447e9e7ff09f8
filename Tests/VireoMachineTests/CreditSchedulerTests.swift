import Foundation
import Glibc
import Synchronization
import Testing
import VireoMachine

/// The credit scheduler's properties with vCPUs whose steps burn real host CPU time (no guest):
/// shares follow weights, a cap holds, a blocked vCPU uses nothing and a wake runs it. Figures
/// are CPU time the scheduler gave, so a loaded host moves them little; tolerances are wide
/// enough for a busy 2-core machine.
@Suite(.serialized) struct CreditSchedulerTests {
    final class Flag: Sendable {
        let value = Atomic<Bool>(false)
        func set() { value.store(true, ordering: .releasing) }
        var isSet: Bool { value.load(ordering: .acquiring) }
    }

    final class Counter: Sendable {
        let value = Atomic<Int>(0)
        func next() -> Int { value.add(1, ordering: .relaxed).newValue }
        var count: Int { value.load(ordering: .relaxed) }
    }

    /// A step that spins for `microseconds` of this thread's CPU time, until `stop`.
    /// The CPU two busy domains got over 2 s, counted from 0.3 s on (past the first periods,
    /// when neither has credit yet): `a`'s over `b`'s, and each one's nanoseconds. Stops them
    /// (`stop`) and waits for their vCPUs.
    static func shares(_ a: ScheduledDomain, _ b: ScheduledDomain, stop: Flag) -> (ratio: Double, a: UInt64, b: UInt64) {
        usleep(300_000)
        let (a0, b0) = (a.cpuTimeNanoseconds, b.cpuTimeNanoseconds)
        usleep(2_000_000)
        let (a1, b1) = (a.cpuTimeNanoseconds, b.cpuTimeNanoseconds)
        stop.set()
        a.waitForVCPUs()
        b.waitForVCPUs()
        return (Double(a1 - a0) / Double(max(1, b1 - b0)), a1 - a0, b1 - b0)
    }

    static func busy(_ stop: Flag, microseconds: UInt64 = 300) -> @Sendable () -> CreditScheduler.Step {
        {
            if stop.isSet { return .done }
            let start = cpuNow()
            while cpuNow() &- start < microseconds * 1000 {}
            return .run
        }
    }

    static func cpuNow() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    @Test func sharesFollowWeightsOnOneThread() throws {
        let scheduler = CreditScheduler(threads: 1)
        defer { scheduler.shutdown() }
        let stop = Flag()
        let heavy = try scheduler.addDomain(name: "heavy", weight: 512)
        let light = try scheduler.addDomain(name: "light", weight: 256)
        _ = heavy.addVCPU(step: Self.busy(stop), preempt: {})
        _ = light.addVCPU(step: Self.busy(stop), preempt: {})
        let (ratio, h, l) = Self.shares(heavy, light, stop: stop)
        print("512:256 on one thread: \(ratio):1")
        #expect(ratio > 1.8 && ratio < 2.2, "CPU given 512:256 came to \(ratio):1 (\(h) ns, \(l) ns)")
    }

    @Test func weightsChangeAtRunTime() throws {
        let scheduler = CreditScheduler(threads: 1)
        defer { scheduler.shutdown() }
        let stop = Flag()
        let a = try scheduler.addDomain(name: "a")
        let b = try scheduler.addDomain(name: "b")
        _ = a.addVCPU(step: Self.busy(stop), preempt: {})
        _ = b.addVCPU(step: Self.busy(stop), preempt: {})
        try a.set(weight: 768)
        #expect(a.parameters == (768, 0))
        let ratio = Self.shares(a, b, stop: stop).ratio
        #expect(ratio > 2.7 && ratio < 3.3, "768:256 came to \(ratio):1")
    }

    /// A cap of 50 holds a domain at or under half a CPU alone; beside a weight-1 filler on the
    /// same one-thread pool (which takes what the capped domain leaves, so the two together show
    /// what CPU the host gave the pool) it gets near min(0.5, what the pool got), though its
    /// weight of 65535 would give it nearly everything uncapped.
    @Test func aCapHoldsADomainNearItsShare() throws {
        let scheduler = CreditScheduler(threads: 1)
        defer { scheduler.shutdown() }
        let stop = Flag()
        let capped = try scheduler.addDomain(name: "capped", weight: 65535, cap: 50)
        _ = capped.addVCPU(step: Self.busy(stop), preempt: {})
        usleep(200_000)
        var (c0, t0) = (capped.cpuTimeNanoseconds, CreditScheduler.now())
        usleep(1_500_000)
        var (c1, t1) = (capped.cpuTimeNanoseconds, CreditScheduler.now())
        let alone = Double(c1 - c0) / Double(t1 - t0)
        print("cap 50, alone: \(alone) of a CPU")
        #expect(alone <= 0.55 && alone > 0.05, "a cap of 50 alone gave \(alone) of a CPU")

        let filler = try scheduler.addDomain(name: "filler", weight: 1)
        _ = filler.addVCPU(step: Self.busy(stop), preempt: {})
        usleep(200_000)
        let f0 = filler.cpuTimeNanoseconds
        (c0, t0) = (capped.cpuTimeNanoseconds, CreditScheduler.now())
        usleep(2_000_000)
        let f1 = filler.cpuTimeNanoseconds
        (c1, t1) = (capped.cpuTimeNanoseconds, CreditScheduler.now())
        stop.set()
        capped.waitForVCPUs()
        filler.waitForVCPUs()
        let share = Double(c1 - c0) / Double(t1 - t0)
        let pool = Double(c1 - c0 + f1 - f0) / Double(t1 - t0)
        print("cap 50 beside a filler: \(share) of a CPU; the pool thread got \(pool)")
        #expect(share <= 0.55, "a cap of 50 gave \(share) of a CPU")
        #expect(share >= 0.7 * min(0.5, pool), "a cap of 50 gave \(share) of a CPU while the pool got \(pool)")
    }

    @Test func aBlockedVCPUUsesNothingAndAWakeRunsIt() throws {
        let scheduler = CreditScheduler(threads: 1)
        defer { scheduler.shutdown() }
        let steps = Counter()
        let stop = Flag()
        let sleeper = try scheduler.addDomain(name: "sleeper")
        let vcpu = sleeper.addVCPU(step: {
            if stop.isSet { return .done }
            _ = steps.next()
            return .block(wakeAt: nil)
        }, preempt: {})
        // A CPU-bound neighbour keeps the one thread busy: the wake must still get through.
        let spinner = try scheduler.addDomain(name: "spinner")
        let preempted = Counter()
        _ = spinner.addVCPU(step: Self.busy(stop), preempt: { _ = preempted.next() })
        usleep(200_000)
        #expect(steps.count == 1, "blocked: not stepped again")
        let used = sleeper.cpuTimeNanoseconds
        usleep(500_000)
        #expect(sleeper.cpuTimeNanoseconds == used, "a blocked vCPU is charged nothing")
        #expect(preempted.count == 0)
        vcpu.wake()
        #expect(preempted.count == 1, "the woken vCPU is BOOSTed: the running spinner is kicked off the one thread")
        var waited = 0
        while steps.count < 2 && waited < 5000 { usleep(1000); waited += 1 }
        #expect(steps.count == 2, "the wake ran it once, and it blocked again")
        stop.set()
        vcpu.wake()
        sleeper.waitForVCPUs()
        spinner.waitForVCPUs()
    }

    @Test func aWakeUpTimeUnblocks() throws {
        let scheduler = CreditScheduler(threads: 1)
        defer { scheduler.shutdown() }
        let steps = Counter()
        let domain = try scheduler.addDomain(name: "timer")
        _ = domain.addVCPU(step: {
            let n = steps.next()
            return n >= 3 ? .done : .block(wakeAt: CreditScheduler.now() + 20_000_000)
        }, preempt: {})
        domain.waitForVCPUs()
        #expect(steps.count == 3)
    }

    @Test func yieldLetsTheOtherRun() throws {
        let scheduler = CreditScheduler(threads: 1)
        defer { scheduler.shutdown() }
        let order = Mutex<[String]>([])
        let go = Flag()  // both queued before either counts
        let a = try scheduler.addDomain(name: "a"), b = try scheduler.addDomain(name: "b")
        for (domain, name) in [(a, "a"), (b, "b")] {
            let count = Counter()
            _ = domain.addVCPU(step: {
                guard go.isSet else { return .yield }
                order.withLock { $0.append(name) }
                return count.next() >= 3 ? .done : .yield
            }, preempt: {})
        }
        go.set()
        a.waitForVCPUs()
        b.waitForVCPUs()
        let seen = order.withLock { $0 }
        #expect(seen.count == 6 && zip(seen, seen.dropFirst()).allSatisfy { $0 != $1 }, "each yield handed over: \(seen)")
    }

    @Test func outOfRangeWeightsAndCapsAreRefusedNamingTheValue() throws {
        let scheduler = CreditScheduler(threads: 1)
        defer { scheduler.shutdown() }
        #expect(throws: CreditError.weight(0)) { try scheduler.addDomain(name: "x", weight: 0) }
        #expect(throws: CreditError.weight(65536)) { try scheduler.addDomain(name: "x", weight: 65536) }
        #expect(throws: CreditError.cap(-1)) { try scheduler.addDomain(name: "x", cap: -1) }
        let d = try scheduler.addDomain(name: "d", weight: 65535, cap: 100)
        #expect(throws: CreditError.weight(-5)) { try d.set(weight: -5) }
        #expect(d.parameters == (65535, 100), "a refused change changes nothing")
        #expect(CreditError.weight(0).description.contains("weight 0"))
        d.remove()
        #expect(scheduler.registeredDomains.isEmpty)
    }
}
