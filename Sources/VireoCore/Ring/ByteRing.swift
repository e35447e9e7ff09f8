import VireoHypercalls

/// One direction of a byte ring: the console's `in`/`out` rings (`xencons_interface`) and
/// XenStore's `req`/`rsp` rings (`xenstore_domain_interface`). A power-of-two data area and two
/// free-running 32-bit indices in the same shared page: the producer writes bytes at
/// `prod & (size - 1)` and then advances `prod`; the consumer reads at `cons & (size - 1)` and
/// then advances `cons`.
///
/// Both indices live in memory the peer can write, so each call reads them once, checks that
/// `prod - cons` is at most the ring size (a peer that breaks this is a protocol error: nothing
/// is read or written), moves the bytes, and publishes its own index after a barrier:
/// - producer: bytes, then a write barrier, then `prod` (the consumer must see the bytes first);
/// - consumer: bytes copied out, then a full barrier, then `cons` (the producer must not
///   overwrite bytes before they are copied).
/// The caller notifies the peer through the ring's event channel when a call moved bytes.
///
/// Freestanding (no Foundation), so guests compile the same code.
public struct ByteRing: Sendable {
    public let region: SharedRegion
    public let dataOffset: Int
    public let size: Int
    public let consumerOffset: Int
    public let producerOffset: Int

    /// A ring whose `size` data bytes start at `dataOffset`, with its indices at
    /// `consumerOffset` and `producerOffset` of `region`. `size` must be a power of two.
    public init(region: SharedRegion, dataOffset: Int, size: Int, consumerOffset: Int, producerOffset: Int) {
        precondition(size > 0 && size & (size - 1) == 0, "byte ring size must be a power of two")
        precondition(dataOffset >= 0 && dataOffset <= region.count - size, "byte ring data outside its region")
        self.region = region
        self.dataOffset = dataOffset
        self.size = size
        self.consumerOffset = consumerOffset
        self.producerOffset = producerOffset
        // Index accesses are checked (and aligned) by the region on every use.
    }

    /// Reads both indices once; throws if the peer has put them more than a ring apart.
    @inline(__always)
    private func indices() throws(ByteRingError) -> (consumer: UInt32, producer: UInt32) {
        let producer = region.loadAcquire32(at: producerOffset)
        let consumer = region.loadAcquire32(at: consumerOffset)
        guard producer &- consumer <= UInt32(size) else {
            throw .indicesOutOfRange(producer: producer, consumer: consumer, size: UInt32(size))
        }
        return (consumer, producer)
    }

    /// Bytes waiting to be consumed.
    public func available() throws(ByteRingError) -> Int {
        let (consumer, producer) = try indices()
        return Int(producer &- consumer)
    }

    /// Free space for the producer.
    public func space() throws(ByteRingError) -> Int {
        size - (try available())
    }

    /// Producer: copies as many bytes of `bytes` as fit; returns how many.
    public func write(_ bytes: UnsafeRawBufferPointer) throws(ByteRingError) -> Int {
        let (consumer, producer) = try indices()
        let count = min(bytes.count, size - Int(producer &- consumer))
        guard count > 0 else { return 0 }
        var done = 0
        var index = producer
        while done < count {
            let at = Int(index & UInt32(size - 1))
            let chunk = min(count - done, size - at)
            region.copyBytes(from: UnsafeRawBufferPointer(rebasing: bytes[done..<(done + chunk)]), to: dataOffset + at)
            done += chunk
            index &+= UInt32(chunk)
        }
        Barrier.write()
        region.storeRelease32(index, at: producerOffset)
        return count
    }

    /// Consumer: copies up to `buffer.count` waiting bytes into `buffer`; returns how many.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(ByteRingError) -> Int {
        let (consumer, producer) = try indices()
        let count = min(buffer.count, Int(producer &- consumer))
        guard count > 0 else { return 0 }
        var done = 0
        var index = consumer
        while done < count {
            let at = Int(index & UInt32(size - 1))
            let chunk = min(count - done, size - at)
            region.copyBytes(from: dataOffset + at, into: UnsafeMutableRawBufferPointer(rebasing: buffer[done..<(done + chunk)]))
            done += chunk
            index &+= UInt32(chunk)
        }
        Barrier.full()
        region.storeRelease32(index, at: consumerOffset)
        return count
    }
}

extension ByteRing {
    /// The console page (`xencons_interface`): `in` carries input to the guest (the backend
    /// produces), `out` carries the guest's output (the guest produces).
    public static func consoleInput(_ page: SharedRegion) -> ByteRing {
        ByteRing(region: page, dataOffset: 0, size: Int(VIREO_ABI_XENCONS_IN_SIZE), consumerOffset: 3072, producerOffset: 3076)
    }
    public static func consoleOutput(_ page: SharedRegion) -> ByteRing {
        ByteRing(region: page, dataOffset: 1024, size: Int(VIREO_ABI_XENCONS_OUT_SIZE), consumerOffset: 3080, producerOffset: 3084)
    }
    /// The XenStore page (`xenstore_domain_interface`): `req` carries the guest's requests,
    /// `rsp` the store's replies and watch events.
    public static func xenstoreRequests(_ page: SharedRegion) -> ByteRing {
        ByteRing(region: page, dataOffset: 0, size: Int(VIREO_XENSTORE_RING_SIZE), consumerOffset: 2048, producerOffset: 2052)
    }
    public static func xenstoreResponses(_ page: SharedRegion) -> ByteRing {
        ByteRing(region: page, dataOffset: 1024, size: Int(VIREO_XENSTORE_RING_SIZE), consumerOffset: 2056, producerOffset: 2060)
    }
}

/// A byte ring's peer broke the protocol.
public enum ByteRingError: Error, Equatable, Sendable, CustomStringConvertible {
    /// `prod - cons` exceeds the ring size: the indices cannot both be honest.
    case indicesOutOfRange(producer: UInt32, consumer: UInt32, size: UInt32)

    public var description: String {
        switch self {
        case .indicesOutOfRange(let p, let c, let size):
            "byte ring indices out of range: prod \(p) - cons \(c) exceeds the ring size \(size)"
        }
    }
}
