import Glibc
import Synchronization
import VireoLinux

/// How long a thread about to sleep on a futex first spins, watching for its wake-up: KVM's
/// halt polling (`halt_poll_ns`) applied to Vireo's own sleepers (dom0's event dispatcher, a
/// vCPU in SCHEDOP_block/poll or HLT). A ping-pong's partner usually answers within a few
/// microseconds, and a sleep plus a wake-up through the kernel costs more than that.
///
/// The window adapts per sleeper as KVM's does: a sleep that ended (by a wake-up) within
/// ``maximumNanoseconds`` of its start grows it (doubling from ``startNanoseconds``), one that
/// lasted longer halves it, so an idle sleeper soon spins not at all and an idle domain uses
/// no CPU. On a host with one CPU it never spins (the partner cannot run while this thread does).
public final class WakeSpin: Sendable {
    /// The longest spin: a few microseconds, short against a scheduler's slice (a blocked
    /// domain's spins are microseconds per sleep, and stop once its sleeps are long). 20 and
    /// 50 µs were tried and measured no better on a 2-core host shared with other work
    /// (Docs/scheduling.md, `vireo bench evtchn`).
    public static let maximumNanoseconds: Int64 = 10_000
    /// The first window after a quick wake-up.
    public static let startNanoseconds: Int64 = 2_000
    /// Whether any spinning happens on this host (more than one CPU online).
    public static let enabled: Bool = sysconf(Int32(_SC_NPROCESSORS_ONLN)) > 1

    private let window = Atomic<Int64>(0)

    public init() {}

    /// The current window in nanoseconds (0: sleep at once).
    public var windowNanoseconds: Int64 { window.load(ordering: .relaxed) }

    /// Monotonic nanoseconds (the vDSO's clock_gettime: no system call).
    public static func now() -> Int64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return Int64(t.tv_sec) * 1_000_000_000 + Int64(t.tv_nsec)
    }

    /// Spins for at most the window, starting at `start`, until `done()`; returns whether it did.
    /// Neither locks nor allocates; `done` should be a few loads.
    public func spin(from start: Int64, until done: () -> Bool) -> Bool {
        let limit = window.load(ordering: .relaxed)
        guard Self.enabled, limit > 0 else { return done() }
        while true {
            for _ in 0..<16 {
                if done() { return true }
                vireo_cpu_relax()
            }
            if Self.now() - start >= limit { return done() }
        }
    }

    /// Adapts the window after a wait of `waitedNanoseconds` (from its start to its wake-up);
    /// `slept` when the thread went to sleep in the kernel (the spin did not see the wake-up).
    public func record(waitedNanoseconds waited: Int64, slept: Bool) {
        guard Self.enabled, slept else { return }  // a wake-up seen while spinning: the window serves
        let current = window.load(ordering: .relaxed)
        let next: Int64
        if waited <= Self.maximumNanoseconds {
            // Woken soon after the spin gave up: a longer spin would have caught it.
            next = min(Self.maximumNanoseconds, max(Self.startNanoseconds, current * 2))
        } else {
            next = current / 2 < Self.startNanoseconds ? 0 : current / 2
        }
        if next != current { window.store(next, ordering: .relaxed) }
    }
}
