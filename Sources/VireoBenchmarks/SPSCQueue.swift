import Synchronization

/// The benchmark's baseline: a plain single-producer single-consumer queue of fixed-size
/// messages between two threads, with atomic head and tail counters and nothing else (no
/// event indices, no responses, no hostile-input checks). It moves a message with the least
/// work two threads can share: what a shared ring is measured against.
final class SPSCQueue<Message: BitwiseCopyable>: @unchecked Sendable {
    let capacity: Int
    private let mask: Int
    private let buffer: UnsafeMutableRawPointer
    private let stride: Int
    /// head (consumed count) and tail (produced count), one cache line each.
    private let counters: UnsafeMutableRawPointer

    init(capacity: Int) {
        precondition(capacity > 0 && capacity & (capacity - 1) == 0, "capacity must be a power of two")
        self.capacity = capacity
        self.mask = capacity - 1
        self.stride = (MemoryLayout<Message>.stride + 63) & ~63
        buffer = .allocate(byteCount: capacity * stride, alignment: 64)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: capacity * stride)
        counters = .allocate(byteCount: 128, alignment: 64)
        counters.bindMemory(to: Atomic<UInt64>.self, capacity: 1).initialize(to: Atomic(0))
        (counters + 64).bindMemory(to: Atomic<UInt64>.self, capacity: 1).initialize(to: Atomic(0))
    }

    deinit {
        head.deinitialize(count: 1)
        tail.deinitialize(count: 1)
        buffer.deallocate()
        counters.deallocate()
    }

    @inline(__always)
    private var head: UnsafeMutablePointer<Atomic<UInt64>> { counters.assumingMemoryBound(to: Atomic<UInt64>.self) }
    @inline(__always)
    private var tail: UnsafeMutablePointer<Atomic<UInt64>> {
        (counters + 64).assumingMemoryBound(to: Atomic<UInt64>.self)
    }

    /// The producer's end (one thread).
    struct Producer {
        let queue: SPSCQueue
        var produced: UInt64 = 0
        var headSeen: UInt64 = 0

        /// Appends `message`; false when the queue is full.
        @inline(__always)
        mutating func push(_ message: Message) -> Bool {
            if produced &- headSeen == UInt64(queue.capacity) {
                headSeen = queue.head.pointee.load(ordering: .acquiring)
                if produced &- headSeen == UInt64(queue.capacity) { return false }
            }
            queue.buffer.storeBytes(of: message, toByteOffset: Int(produced) & queue.mask &* queue.stride, as: Message.self)
            produced &+= 1
            queue.tail.pointee.store(produced, ordering: .releasing)
            return true
        }
    }

    /// The consumer's end (one thread).
    struct Consumer {
        let queue: SPSCQueue
        var consumed: UInt64 = 0
        var tailSeen: UInt64 = 0

        /// Takes the oldest message, or nil when the queue is empty.
        @inline(__always)
        mutating func pop() -> Message? {
            if consumed == tailSeen {
                tailSeen = queue.tail.pointee.load(ordering: .acquiring)
                if consumed == tailSeen { return nil }
            }
            let message = queue.buffer.load(fromByteOffset: Int(consumed) & queue.mask &* queue.stride, as: Message.self)
            consumed &+= 1
            queue.head.pointee.store(consumed, ordering: .releasing)
            return message
        }
    }
}
