import VireoHypercalls

// The ring files import only VireoHypercalls (and use SharedRegion and Barrier from this
// module): no Foundation, no Glibc, so a bare-metal guest library can compile them as they are.

/// Where a shared ring's header words are, and how many slots a ring has
/// (`Hypercalls/include/vireo/io/ring.h`).
///
/// Both ends compute the slot count themselves from the negotiated size of the shared area;
/// it is never read from shared memory.
public enum RingLayout {
    /// Bytes from the start of the shared area to slot 0.
    public static let headerSize = Int(VIREO_ABI_RING_HEADER_SIZE)
    /// `req_prod`: requests the front has published (written by the front).
    public static let requestProducerOffset = 0
    /// `req_event`: the back wants an event once `req_prod` reaches this (written by the back).
    public static let requestEventOffset = 4
    /// `rsp_prod`: responses the back has published (written by the back).
    public static let responseProducerOffset = 8
    /// `rsp_event`: the front wants an event once `rsp_prod` reaches this (written by the front).
    public static let responseEventOffset = 12
    /// `pvt`: a historical per-driver byte; zeroed by the front, ignored by Vireo.
    public static let privateOffset = 16
    /// `__pad`: zeroed by the front, never read.
    public static let paddingOffset = 20
    /// The largest slot count a ring may have: indices are free-running 32-bit counts, and the
    /// distance arithmetic needs the size to be at most half their range.
    public static let maximumSlots = 1 << 31
    /// Bytes in a page of the shared area.
    public static let pageSize = Int(VIREO_ABI_PAGE_SIZE)

    /// Bytes in one slot: the size of C's `union { Request req; Response rsp; }`, that is the
    /// larger of the two sizes rounded up to the larger of the two alignments.
    @inlinable
    public static func entrySize<Request: BitwiseCopyable, Response: BitwiseCopyable>(
        request: Request.Type, response: Response.Type
    ) -> Int {
        let alignment = max(MemoryLayout<Request>.alignment, MemoryLayout<Response>.alignment)
        let largest = max(MemoryLayout<Request>.size, MemoryLayout<Response>.size)
        return (largest + alignment - 1) & ~(alignment - 1)
    }

    /// The slot count of a ring over `byteCount` bytes: the largest power of two not above
    /// `(byteCount - headerSize) / entrySize`, or 0 when not even one slot fits.
    @inlinable
    public static func slotCount(entrySize: Int, byteCount: Int) -> Int {
        guard entrySize > 0, byteCount > headerSize else { return 0 }
        let fitting = (byteCount - headerSize) / entrySize
        guard fitting > 0 else { return 0 }
        let power = 1 << (Int.bitWidth - 1 - fitting.leadingZeroBitCount)
        return min(power, maximumSlots)
    }

    /// The slot count of a ring of `Request`s and `Response`s over `pages` pages.
    @inlinable
    public static func slotCount<Request: BitwiseCopyable, Response: BitwiseCopyable>(
        request: Request.Type, response: Response.Type, pages: Int
    ) -> Int {
        guard pages > 0, pages <= Int.max / pageSize else { return 0 }
        return slotCount(entrySize: entrySize(request: request, response: response), byteCount: pages * pageSize)
    }
}

/// The shape of one ring: slot size and count over a shared area of a given size.
public struct RingGeometry: Equatable, Sendable, CustomStringConvertible {
    /// Bytes in a slot (the union of request and response).
    public let entrySize: Int
    /// Slots in the ring: a power of two.
    public let slots: Int
    /// Bytes of the shared area the ring spans.
    public let byteCount: Int

    /// The geometry of a ring of `Request`s and `Response`s over `byteCount` bytes; throws
    /// ``RingError/regionTooSmall(byteCount:entrySize:)`` when not one slot fits.
    public init<Request: BitwiseCopyable, Response: BitwiseCopyable>(
        request: Request.Type, response: Response.Type, byteCount: Int
    ) throws(RingError) {
        let entrySize = RingLayout.entrySize(request: request, response: response)
        let slots = RingLayout.slotCount(entrySize: entrySize, byteCount: byteCount)
        guard slots > 0 else { throw .regionTooSmall(byteCount: byteCount, entrySize: entrySize) }
        self.entrySize = entrySize
        self.slots = slots
        self.byteCount = byteCount
    }

    /// Whole pages of the shared area.
    public var pages: Int { byteCount / RingLayout.pageSize }

    public var description: String { "\(slots) slots of \(entrySize) bytes over \(byteCount) bytes" }
}

/// Which producer index a ring error is about.
public enum RingIndexField: Sendable, Equatable, CustomStringConvertible {
    case requestProducer
    case responseProducer

    public var description: String {
        switch self {
        case .requestProducer: "req_prod"
        case .responseProducer: "rsp_prod"
        }
    }
}

/// Why a ring operation was refused.
public enum RingError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The shared area cannot hold the header and one slot (or the entry type is empty).
    case regionTooSmall(byteCount: Int, entrySize: Int)
    /// The peer published a producer index the protocol does not allow: more entries than the
    /// ring holds, more responses than requests, or an index that moved backwards. `value` is
    /// the index read; `consumed` is this side's private consumer count. The ring is
    /// disconnected: nothing more is read from it or written to it.
    case producerOutOfRange(RingIndexField, value: UInt32, consumed: UInt32, size: UInt32)
    /// The ring was disconnected after a protocol error.
    case disconnected
    /// The front has no free slot: `size` requests are unanswered or their responses unconsumed.
    case full
    /// The back tried to answer more requests than it consumed.
    case noRequestToAnswer

    public var description: String {
        switch self {
        case .regionTooSmall(let bytes, let entry):
            "a ring of \(entry)-byte slots does not fit in \(bytes) bytes"
        case .producerOutOfRange(let field, let value, let consumed, let size):
            "\(field) \(value) is out of range (consumed \(consumed), ring of \(size)): protocol error, ring disconnected"
        case .disconnected: "the ring was disconnected after a protocol error"
        case .full: "the ring is full"
        case .noRequestToAnswer: "no consumed request is waiting for a response"
        }
    }
}
