import Glibc
import Synchronization
import VireoCore
import VireoLinux

/// A POSIX thread running one side of a benchmark. Benchmarks own threads; the cores they
/// measure (VireoCore) never do.
struct BenchThread {
    private var thread = pthread_t()

    private final class Body: @unchecked Sendable {
        let run: @Sendable () -> Void
        init(_ run: @escaping @Sendable () -> Void) { self.run = run }
    }

    /// Starts `body` on a new thread.
    init(_ body: @escaping @Sendable () -> Void) {
        let context = Unmanaged.passRetained(Body(body)).toOpaque()
        let status = pthread_create(&thread, nil, { raw in
            Unmanaged<Body>.fromOpaque(raw!).takeRetainedValue().run()
            return nil
        }, context)
        precondition(status == 0, "pthread_create failed: \(status)")
    }

    /// Waits for the thread to finish.
    func join() { pthread_join(thread, nil) }

    /// The CPUs this thread may run on (its affinity mask), in order.
    static func allowedCPUs() -> [Int] {
        var cpus = [Int32](repeating: 0, count: 1024)
        let count = vireo_allowed_cpus(&cpus, Int32(cpus.count))
        return count > 0 ? cpus[0..<Int(count)].map(Int.init) : []
    }

    /// Pins the calling thread to `cpu`, so the two sides of a measurement run on two cores
    /// instead of wherever the scheduler last put them (possibly one core, taking turns).
    @discardableResult
    static func pinCurrentThread(to cpu: Int) -> Bool {
        vireo_pin_thread(Int32(cpu)) == 0
    }
}

/// An event channel stand-in between two host threads: the notifier bumps a counter; the
/// waiter spins on it for a while, then sleeps on it (futex). A futex wake is a system call,
/// so the notifier makes one only when the waiter is asleep.
final class Doorbell: @unchecked Sendable {
    private let storage: UnsafeMutableRawPointer
    private var counter: UnsafeMutablePointer<Atomic<UInt32>> { storage.assumingMemoryBound(to: Atomic<UInt32>.self) }
    private var sleepers: UnsafeMutablePointer<Atomic<UInt32>> { counter + 1 }

    init() {
        storage = .allocate(byteCount: 64, alignment: 64)
        let words = storage.bindMemory(to: Atomic<UInt32>.self, capacity: 2)
        words.initialize(to: Atomic(0))
        (words + 1).initialize(to: Atomic(0))
    }

    deinit {
        counter.deinitialize(count: 1)
        sleepers.deinitialize(count: 1)
        storage.deallocate()
    }

    /// The counter before a final check; a ring after it ends ``wait(for:spins:)``.
    @inline(__always)
    func ticket() -> UInt32 { counter.pointee.load(ordering: .sequentiallyConsistent) }

    /// Notifies; returns whether a sleeping waiter had to be woken with a system call.
    @inline(__always)
    func ring() -> Bool {
        counter.pointee.add(1, ordering: .sequentiallyConsistent)
        guard sleepers.pointee.load(ordering: .sequentiallyConsistent) != 0 else { return false }
        _ = vireo_futex_wake(storage.assumingMemoryBound(to: UInt32.self), Int32.max)
        return true
    }

    /// Waits until the doorbell rang after `ticket` was taken, or `timeoutNanoseconds` passed:
    /// spins `spins` times, then sleeps. Returns whether it slept.
    func wait(for ticket: UInt32, spins: Int, timeoutNanoseconds: Int64) -> Bool {
        for _ in 0..<spins {
            if counter.pointee.load(ordering: .relaxed) != ticket { return false }
            Barrier.relax()
        }
        sleepers.pointee.add(1, ordering: .sequentiallyConsistent)
        defer { sleepers.pointee.subtract(1, ordering: .sequentiallyConsistent) }
        if counter.pointee.load(ordering: .sequentiallyConsistent) == ticket {
            _ = vireo_futex_wait(storage.assumingMemoryBound(to: UInt32.self), ticket, timeoutNanoseconds)
        }
        return true
    }
}
