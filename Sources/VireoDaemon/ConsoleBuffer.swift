import Foundation

/// A domain's recent console output: a bounded ring of bytes with a running offset, so a
/// reader that remembers where it stopped gets exactly what came after (or learns how much it
/// missed when the ring wrapped). What a guest writes can never make the daemon hold more
/// than `capacity` bytes (SECURITY.md 4, 19).
public final class ConsoleBuffer: @unchecked Sendable {  // every field under `lock`
    public let capacity: Int
    private var storage: [UInt8]
    /// Bytes ever appended: the offset just past the newest byte.
    private var total: UInt64 = 0
    private let lock = NSLock()

    public init(capacity: Int = 64 << 10) {
        precondition(capacity > 0)
        self.capacity = capacity
        storage = []  // grows as output comes, up to `capacity`: an idle domain's costs nothing
    }

    public func append(_ bytes: [UInt8]) {
        lock.withLock {
            // Only the last `capacity` bytes can survive.
            let kept = bytes.count > capacity ? bytes[(bytes.count - capacity)...] : bytes[...]
            let skipped = bytes.count - kept.count
            if skipped > 0 && storage.count < capacity {
                storage.append(contentsOf: repeatElement(0, count: capacity - storage.count))
            }
            total &+= UInt64(skipped)
            for byte in kept {
                let index = Int(total % UInt64(capacity))
                if index == storage.count { storage.append(byte) } else { storage[index] = byte }
                total &+= 1
            }
        }
    }

    /// Bytes ever written.
    public var endOffset: UInt64 { lock.withLock { total } }

    /// What was written from `offset` on (nil: the most recent `capacity` bytes), the offset to
    /// ask for next time, and how many bytes since `offset` were lost to wrapping.
    public func read(from offset: UInt64?) -> (bytes: [UInt8], next: UInt64, missed: UInt64) {
        lock.withLock {
            let oldest = total > UInt64(capacity) ? total - UInt64(capacity) : 0
            let start = min(max(offset ?? oldest, oldest), total)
            let missed = offset.map { $0 < oldest ? oldest - $0 : 0 } ?? 0
            var out: [UInt8] = []
            out.reserveCapacity(Int(total - start))
            var at = start
            while at < total {
                out.append(storage[Int(at % UInt64(capacity))])
                at += 1
            }
            return (out, total, missed)
        }
    }
}
