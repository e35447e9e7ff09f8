import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoLinux

/// Ring pages in a real GuestMemory (memfd, MAP_SHARED), kept alive with their region.
final class RingPages: @unchecked Sendable {
    let memory: GuestMemory
    let region: SharedRegion

    init(pages: Int = 1) throws {
        memory = try GuestMemory(ramBytes: UInt64(pages * GuestMemory.pageSize))
        region = try memory.translate(GuestPhysicalAddress(0), count: pages * GuestMemory.pageSize)
    }

    /// A copy of `count` bytes at `offset`.
    func bytes(at offset: Int, count: Int) -> [UInt8] {
        region.withUnsafeMutableBytes(offset: offset, count: count) { Array($0) }
    }

    func word(at offset: Int) -> UInt32 { region.loadAcquire32(at: offset) }
    func setWord(_ value: UInt32, at offset: Int) { region.storeRelease32(value, at: offset) }

    /// Sets up a ring whose indices all start at `index` (to exercise wrap-around): the front
    /// initialises the header, then moves every index as if `index` requests had come and gone.
    func startRing(at index: UInt32) {
        setWord(index, at: RingLayout.requestProducerOffset)
        setWord(index &+ 1, at: RingLayout.requestEventOffset)
        setWord(index, at: RingLayout.responseProducerOffset)
        setWord(index &+ 1, at: RingLayout.responseEventOffset)
    }
}


/// A 64-byte request made of integers (valid for every bit pattern).
struct Message64: BitwiseCopyable, Equatable {
    var sequence: UInt64
    var words: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64)

    init(sequence: UInt64) {
        self.sequence = sequence
        let w = sequence &* 0x9e37_79b9_7f4a_7c15
        words = (w, w ^ 1, w ^ 2, w ^ 3, w ^ 4, w ^ 5, w ^ 6)
    }

    var isIntact: Bool { self == Message64(sequence: sequence) }

    static func == (a: Message64, b: Message64) -> Bool {
        a.sequence == b.sequence && a.words.0 == b.words.0 && a.words.1 == b.words.1 && a.words.2 == b.words.2
            && a.words.3 == b.words.3 && a.words.4 == b.words.4 && a.words.5 == b.words.5 && a.words.6 == b.words.6
    }
}

/// A 12-byte reply with 4 bytes of tail padding (size 12, alignment 8).
struct Reply12: BitwiseCopyable, Equatable {
    var sequence: UInt64
    var status: UInt32
}

/// An event channel stand-in for two host threads: a counter that a notifier bumps and a
/// waiter sleeps on (futex), with a timeout so a lost wakeup fails a test instead of hanging it.
final class TestDoorbell: @unchecked Sendable {
    private let counter: UnsafeMutablePointer<Atomic<UInt32>>
    private let sleepers = Atomic<UInt32>(0)
    let rings = Atomic<Int>(0)

    init() {
        counter = .allocate(capacity: 1)
        counter.initialize(to: Atomic(0))
    }
    deinit {
        counter.deinitialize(count: 1)
        counter.deallocate()
    }

    private var futexWord: UnsafeMutablePointer<UInt32> {
        UnsafeMutableRawPointer(counter).assumingMemoryBound(to: UInt32.self)
    }

    /// Read before the final check; a ring after this makes ``wait(for:timeoutNanoseconds:)`` return.
    func ticket() -> UInt32 { counter.pointee.load(ordering: .sequentiallyConsistent) }

    func ring() {
        rings.add(1, ordering: .relaxed)
        counter.pointee.add(1, ordering: .sequentiallyConsistent)
        if sleepers.load(ordering: .sequentiallyConsistent) != 0 { _ = vireo_futex_wake(futexWord, Int32.max) }
    }

    /// Waits until the doorbell rang after `ticket` was taken; false on timeout.
    func wait(for ticket: UInt32, timeoutNanoseconds: Int64) -> Bool {
        let deadline = now() + UInt64(timeoutNanoseconds)
        sleepers.add(1, ordering: .sequentiallyConsistent)
        defer { sleepers.subtract(1, ordering: .sequentiallyConsistent) }
        while counter.pointee.load(ordering: .sequentiallyConsistent) == ticket {
            let left = Int64(bitPattern: deadline &- now())
            if left <= 0 { return false }
            _ = vireo_futex_wait(futexWord, ticket, left)
        }
        return true
    }

    private func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }
}

/// Runs `body` on a new POSIX thread; join with `pthread_join`.
func startThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
    final class Box: @unchecked Sendable {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }
    var thread = pthread_t()
    let box = Unmanaged.passRetained(Box(body)).toOpaque()
    let status = pthread_create(&thread, nil, { raw in
        let box = Unmanaged<Box>.fromOpaque(raw!).takeRetainedValue()
        box.body()
        return nil
    }, box)
    precondition(status == 0, "pthread_create failed: \(status)")
    return thread
}
