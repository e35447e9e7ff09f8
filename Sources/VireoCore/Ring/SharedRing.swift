// Xen's io/ring.h protocol over a SharedRegion (Hypercalls/include/vireo/io/ring.h states it
// step by step; the step numbers in the comments below are that header's).
//
// Rules kept here:
// - each side's counters are private: never read back from shared memory;
// - the slot count comes from the size of the region, never from shared memory;
// - every producer index read from the peer is bounded before any slot is read;
// - every entry is copied out of shared memory once, and only the copy is returned;
// - every slot written is written whole (entry bytes, then zeroes), so stale bytes never leak.
//
// Hot paths are @inlinable so that they specialise for the concrete entry types in the
// caller's module: no existentials, no allocation, no locks.
//
// Entry types: `Request` and `Response` must be valid for every bit pattern, since the peer
// chooses the bytes: C structs of integers (the Hypercalls/ types) or Swift structs of integers.
// A `Bool`, an enum or a pointer field would let a hostile peer forge an invalid value.

/// The slots and header words of one ring, as both ends address them.
@usableFromInline
struct RingSlots<Request: BitwiseCopyable, Response: BitwiseCopyable>: Sendable {
    @usableFromInline let region: SharedRegion
    @usableFromInline let size: UInt32
    @usableFromInline let mask: UInt32
    @usableFromInline let geometry: RingGeometry

    init(_ region: SharedRegion) throws(RingError) {
        let geometry = try RingGeometry(request: Request.self, response: Response.self, byteCount: region.count)
        self.region = region
        self.geometry = geometry
        self.size = UInt32(geometry.slots)
        self.mask = UInt32(geometry.slots - 1)
    }

    /// Bytes in a slot. A compile-time constant once specialised for the entry types, so
    /// slot offsets are shifts and the zeroing of a slot is a few vector stores, not a call.
    @inlinable
    static var entrySize: Int { RingLayout.entrySize(request: Request.self, response: Response.self) }

    @inlinable @inline(__always)
    func offset(of index: UInt32) -> Int {
        RingLayout.headerSize &+ Int(truncatingIfNeeded: index & mask) &* Self.entrySize
    }

    /// Writes `value` into slot `index`, every byte of it: the slot is zeroed first, so the
    /// bytes after the value (the rest of the union) and any padding the value's stores skip
    /// hold zero, never a stale entry or host memory (XSA-216).
    @inlinable @inline(__always)
    func write<T: BitwiseCopyable>(_ value: T, at index: UInt32) {
        let offset = offset(of: index)
        region.fill(0, at: offset, count: Self.entrySize)
        region.store(value, at: offset)
    }

    /// Zeroes slot `index` and hands it to `body` to write field by field.
    @inlinable @inline(__always)
    func write<T: BitwiseCopyable>(fieldsOf type: T.Type, at index: UInt32, _ body: (RingSlotWriter<T>) -> Void) {
        let offset = offset(of: index)
        region.fill(0, at: offset, count: Self.entrySize)
        body(RingSlotWriter(region: region, offset: offset))
    }

    /// Copies slot `index` out of shared memory, once (XSA-155).
    @inlinable @inline(__always)
    func read<T: BitwiseCopyable>(_ type: T.Type, at index: UInt32) -> T {
        let value = region.load(T.self, at: offset(of: index))
        // The fence stops the compiler from sinking the copy past this point or re-reading
        // the slot for a later use of `value`: the peer may rewrite the slot at any moment,
        // and callers validate the copy, so every use must see the same bytes.
        Barrier.read()
        return value
    }

    /// Producing, steps 2-5: publishes `new` as the producer index at `producerOffset` and
    /// says whether the peer asked to be notified of the entries `old ..< new`.
    @inlinable @inline(__always)
    func publish(_ new: UInt32, previous old: UInt32, producerAt producerOffset: Int, eventAt eventOffset: Int) -> Bool {
        // 2-3. A release store: the peer sees the entries' contents before the index that
        // makes them visible (the write barrier, then the store).
        region.storeRelease32(new, at: producerOffset)
        // 4. Full barrier: the store to the producer index is visible before the peer's event
        // index is read. Otherwise the peer could set its event index and re-check the
        // producer in between, see the old value and sleep, while we read its old event index
        // and stay silent: both sides would wait forever.
        Barrier.full()
        // 5. Notify iff the event index lies in (old, new]. Any value the peer wrote is safe
        // here: it decides only whether an event is sent.
        let event = region.loadRelaxed32(at: eventOffset)
        return (new &- event) < (new &- old)
    }

    /// Before sleeping, step 2-3: asks for an event on the next entry after `consumed`, then
    /// a full barrier so the producer index is read again only after the request is visible.
    @inlinable @inline(__always)
    func requestEvent(after consumed: UInt32, eventAt eventOffset: Int) {
        region.storeRelease32(consumed &+ 1, at: eventOffset)
        Barrier.full()
    }
}

/// One ring slot, zeroed, being written field by field (see
/// ``BackRing/produceResponse(fields:)``). Only the bytes of the fields set are written; every
/// other byte of the slot, padding included, stays zero.
public struct RingSlotWriter<Entry: BitwiseCopyable> {
    @usableFromInline let region: SharedRegion
    @usableFromInline let offset: Int

    @inlinable
    init(region: SharedRegion, offset: Int) {
        self.region = region
        self.offset = offset
    }

    /// Writes one stored field of the entry (`\.status`, `\.seg.0.gref`). Set leaf fields:
    /// a field that is itself a struct with padding would copy that padding.
    @inlinable @inline(__always)
    public func set<Field: BitwiseCopyable>(_ field: WritableKeyPath<Entry, Field>, to value: Field) {
        guard let fieldOffset = MemoryLayout<Entry>.offset(of: field) else {
            preconditionFailure("a key path that is not a stored field of the ring entry")
        }
        region.store(value, at: offset + fieldOffset)
    }
}

// MARK: - Front

/// The frontend's end of a shared ring: it produces requests and consumes responses.
///
/// A value type holding private counters and a ``SharedRegion``; the region does not keep its
/// memory alive, so the owner of a `FrontRing` keeps the memory behind the region (the
/// ``GuestMemory``, the grant mapping) alive for as long as the ring is used. Keep exactly one
/// copy in use: two copies would each advance their own private counters. Not thread-safe:
/// one thread at a time drives one end (the other end may run on another thread or in
/// another domain).
public struct FrontRing<Request: BitwiseCopyable, Response: BitwiseCopyable>: Sendable {
    @usableFromInline let slots: RingSlots<Request, Response>
    /// `req_prod_pvt`: requests written so far, published or not.
    @usableFromInline var requestProducer: UInt32
    /// `req_prod` as this side last published it.
    @usableFromInline var publishedRequests: UInt32
    /// `rsp_cons`: responses consumed so far.
    @usableFromInline var responseConsumer: UInt32
    /// The last `rsp_prod` read and found valid: responses up to it may be consumed.
    @usableFromInline var responsesAvailable: UInt32
    /// Set for good after a protocol error: nothing more is read or written.
    @usableFromInline var isDisconnected = false

    /// Sets up a new ring in `region`: writes the shared header (`req_prod = rsp_prod = 0`,
    /// `req_event = rsp_event = 1`, `pvt` and `__pad` zeroed). The front does this before it
    /// grants the pages to the back.
    public init(initializing region: SharedRegion) throws(RingError) {
        let slots = try RingSlots<Request, Response>(region)
        region.fill(0, at: 0, count: RingLayout.headerSize)
        region.storeRelaxed32(0, at: RingLayout.requestProducerOffset)
        region.storeRelaxed32(1, at: RingLayout.requestEventOffset)
        region.storeRelaxed32(0, at: RingLayout.responseProducerOffset)
        region.storeRelease32(1, at: RingLayout.responseEventOffset)
        self.init(slots: slots, at: 0)
    }

    /// Takes over a ring whose header is already set up, with every request before `index`
    /// produced and answered (Xen's FRONT_RING_ATTACH). Nothing is written.
    public init(attaching region: SharedRegion, at index: UInt32 = 0) throws(RingError) {
        self.init(slots: try RingSlots(region), at: index)
    }

    init(slots: RingSlots<Request, Response>, at index: UInt32) {
        self.slots = slots
        self.requestProducer = index
        self.publishedRequests = index
        self.responseConsumer = index
        self.responsesAvailable = index
    }

    /// Slots in the ring.
    @inlinable public var size: Int { Int(slots.size) }
    /// The ring's slot size, slot count and span.
    public var geometry: RingGeometry { slots.geometry }
    /// Requests produced so far (`req_prod_pvt`), published or not.
    @inlinable public var requestsProduced: UInt32 { requestProducer }
    /// Responses consumed so far (`rsp_cons`).
    @inlinable public var responsesConsumed: UInt32 { responseConsumer }
    /// Whether a protocol error disconnected the ring.
    @inlinable public var disconnected: Bool { isDisconnected }

    /// Slots free for new requests: the ring's size less requests whose responses have not
    /// been consumed yet.
    @inlinable public var freeRequests: Int {
        Int(slots.size &- (requestProducer &- responseConsumer))
    }

    /// Writes `request` into the next free slot (the whole slot: bytes past the request are
    /// zeroed). The back sees it after ``pushRequestsAndCheckNotify()``.
    @inlinable
    public mutating func produceRequest(_ request: Request) throws(RingError) {
        guard !isDisconnected else { throw .disconnected }
        guard requestProducer &- responseConsumer < slots.size else { throw .full }
        slots.write(request, at: requestProducer)
        requestProducer &+= 1
    }

    /// Publishes the requests produced since the last push; true when the back asked for an
    /// event (its `req_event` lies among them), in which case the caller notifies it.
    @inlinable
    public mutating func pushRequestsAndCheckNotify() -> Bool {
        guard !isDisconnected else { return false }
        let old = publishedRequests
        publishedRequests = requestProducer
        return slots.publish(
            requestProducer, previous: old,
            producerAt: RingLayout.requestProducerOffset, eventAt: RingLayout.requestEventOffset)
    }

    /// Copies the next response out of the ring, or returns nil when none is published.
    /// Throws, and disconnects the ring, when the back published more responses than there
    /// are published requests, or moved `rsp_prod` backwards.
    @inlinable
    public mutating func consumeResponse() throws(RingError) -> Response? {
        guard !isDisconnected else { throw .disconnected }
        if responseConsumer == responsesAvailable {
            try readResponseProducer()
            if responseConsumer == responsesAvailable { return nil }
        }
        let response = slots.read(Response.self, at: responseConsumer)
        responseConsumer &+= 1
        return response
    }

    /// Responses published and not consumed yet (reads `rsp_prod`).
    @inlinable
    public mutating func unconsumedResponses() throws(RingError) -> Int {
        guard !isDisconnected else { throw .disconnected }
        try readResponseProducer()
        return Int(responsesAvailable &- responseConsumer)
    }

    /// Before sleeping: true when responses are pending (consume them); otherwise sets
    /// `rsp_event` so the back notifies on the next response, then checks again, since a
    /// response may have arrived without a notification in between. False: wait for an event.
    @inlinable
    public mutating func finalCheckForResponses() throws(RingError) -> Bool {
        if try unconsumedResponses() > 0 { return true }
        slots.requestEvent(after: responseConsumer, eventAt: RingLayout.responseEventOffset)
        return try unconsumedResponses() > 0
    }

    /// Consuming, steps 1-3: reads `rsp_prod` once (an acquire load: no slot is read before
    /// it) and bounds it: the back can answer only published requests, and `rsp_prod` never
    /// moves backwards.
    @inlinable
    mutating func readResponseProducer() throws(RingError) {
        let produced = slots.region.loadAcquire32(at: RingLayout.responseProducerOffset)
        let ahead = produced &- responseConsumer
        guard ahead <= publishedRequests &- responseConsumer, ahead >= responsesAvailable &- responseConsumer else {
            isDisconnected = true
            throw .producerOutOfRange(.responseProducer, value: produced, consumed: responseConsumer, size: slots.size)
        }
        responsesAvailable = produced
    }
}

// MARK: - Back

/// The backend's end of a shared ring: it consumes requests and produces responses.
///
/// The back never trusts the shared header: it only attaches (its counters start at the
/// index it is given, never at values read from the ring), bounds every `req_prod` it reads,
/// and disconnects the ring for good on a protocol error.
///
/// A value type holding private counters and a ``SharedRegion``; the region does not keep its
/// memory alive, so the owner of a `BackRing` keeps the memory behind the region (the grant
/// mapping, the ``GuestMemory``) alive for as long as the ring is used. Keep exactly one copy
/// in use. Not thread-safe: one thread at a time drives one end.
public struct BackRing<Request: BitwiseCopyable, Response: BitwiseCopyable>: Sendable {
    @usableFromInline let slots: RingSlots<Request, Response>
    /// `req_cons`: requests consumed (copied out) so far.
    @usableFromInline var requestConsumer: UInt32
    /// The last `req_prod` read and found valid: requests up to it may be consumed.
    @usableFromInline var requestsAvailable: UInt32
    /// `rsp_prod_pvt`: responses written so far, published or not.
    @usableFromInline var responseProducer: UInt32
    /// `rsp_prod` as this side last published it.
    @usableFromInline var publishedResponses: UInt32
    /// Set for good after a protocol error: nothing more is read or written.
    @usableFromInline var isDisconnected = false

    /// Attaches to a ring the front set up, with every request before `index` consumed and
    /// answered (Xen's BACK_RING_ATTACH; 0 for a new ring). Reads and writes nothing.
    public init(attaching region: SharedRegion, at index: UInt32 = 0) throws(RingError) {
        self.slots = try RingSlots(region)
        self.requestConsumer = index
        self.requestsAvailable = index
        self.responseProducer = index
        self.publishedResponses = index
    }

    /// Slots in the ring.
    @inlinable public var size: Int { Int(slots.size) }
    /// The ring's slot size, slot count and span.
    public var geometry: RingGeometry { slots.geometry }
    /// Requests consumed so far (`req_cons`).
    @inlinable public var requestsConsumed: UInt32 { requestConsumer }
    /// Responses produced so far (`rsp_prod_pvt`), published or not.
    @inlinable public var responsesProduced: UInt32 { responseProducer }
    /// Requests consumed and not answered yet.
    @inlinable public var requestsInFlight: Int { Int(requestConsumer &- responseProducer) }
    /// Whether a protocol error disconnected the ring.
    @inlinable public var disconnected: Bool { isDisconnected }

    /// Requests published and not consumed yet (reads `req_prod`): Xen's
    /// `min(req_prod - req_cons, size - (req_cons - rsp_prod_pvt))`. Throws, and disconnects
    /// the ring, when `req_prod` is out of range.
    @inlinable
    public mutating func unconsumedRequests() throws(RingError) -> Int {
        guard !isDisconnected else { throw .disconnected }
        try readRequestProducer()
        let published = requestsAvailable &- requestConsumer
        let room = slots.size &- (requestConsumer &- responseProducer)
        return Int(min(published, room))
    }

    /// Requests known to be published and not consumed yet, as of the last `req_prod` read
    /// (no read now): a lower bound of ``unconsumedRequests()``, for a back that consumes
    /// many in a row and reads `req_prod` again only when these run out.
    @inlinable public var knownRequests: Int { Int(requestsAvailable &- requestConsumer) }

    /// Copies the next request out of the ring and returns the copy, or nil when none is
    /// published. The slot is read once; validate the copy, never the ring. Throws, and
    /// disconnects the ring without reading any slot, when `req_prod` is out of range.
    @inlinable
    public mutating func consumeRequest() throws(RingError) -> Request? {
        guard !isDisconnected else { throw .disconnected }
        if requestConsumer == requestsAvailable {
            try readRequestProducer()
            if requestConsumer == requestsAvailable { return nil }
        }
        // In range: requestsAvailable - responseProducer <= size, so this slot holds a
        // request, not a response the front has yet to read.
        let request = slots.read(Request.self, at: requestConsumer)
        requestConsumer &+= 1
        return request
    }

    /// Writes `response` into the slot of the oldest unanswered request: the whole slot, the
    /// response's bytes and zeroes for the rest of it (XSA-216), so nothing of the request the
    /// slot held is left. The front sees it after ``pushResponsesAndCheckNotify()``. Throws
    /// ``RingError/noRequestToAnswer`` when every consumed request is answered: the back never
    /// writes a slot the front may be filling.
    ///
    /// The response's own padding bytes (blkif_response has five) are copied as the value
    /// holds them, and Swift makes no promise about those: code that is not specialised for
    /// the response type copies the value from a temporary whose padding is whatever the stack
    /// held. For a response type with padding, ``produceResponse(fields:)`` is the form that
    /// guarantees every padding byte is zero.
    @inlinable
    public mutating func produceResponse(_ response: Response) throws(RingError) {
        guard !isDisconnected else { throw .disconnected }
        guard responseProducer != requestConsumer else { throw .noRequestToAnswer }
        slots.write(response, at: responseProducer)
        responseProducer &+= 1
    }

    /// Writes a response field by field into the zeroed slot of the oldest unanswered request:
    /// every byte that `body` does not set, the response's padding included, is zero, whatever
    /// the compiler does with Swift values (XSA-216).
    ///
    ///     try back.produceResponse { slot in
    ///         slot.set(\.id, to: request.id)
    ///         slot.set(\.operation, to: request.operation)
    ///         slot.set(\.status, to: Int16(VIREO_BLKIF_RSP_OKAY))
    ///     }
    @inlinable
    public mutating func produceResponse(fields body: (RingSlotWriter<Response>) -> Void) throws(RingError) {
        guard !isDisconnected else { throw .disconnected }
        guard responseProducer != requestConsumer else { throw .noRequestToAnswer }
        slots.write(fieldsOf: Response.self, at: responseProducer, body)
        responseProducer &+= 1
    }

    /// Publishes the responses produced since the last push; true when the front asked for an
    /// event (its `rsp_event` lies among them), in which case the caller notifies it.
    @inlinable
    public mutating func pushResponsesAndCheckNotify() -> Bool {
        guard !isDisconnected else { return false }
        let old = publishedResponses
        publishedResponses = responseProducer
        return slots.publish(
            responseProducer, previous: old,
            producerAt: RingLayout.responseProducerOffset, eventAt: RingLayout.responseEventOffset)
    }

    /// Before sleeping: true when requests are pending (consume them); otherwise sets
    /// `req_event` so the front notifies on the next request, then checks again, since a
    /// request may have arrived without a notification in between. False: wait for an event.
    @inlinable
    public mutating func finalCheckForRequests() throws(RingError) -> Bool {
        if try unconsumedRequests() > 0 { return true }
        slots.requestEvent(after: requestConsumer, eventAt: RingLayout.requestEventOffset)
        return try unconsumedRequests() > 0
    }

    /// Consuming, steps 1-3: reads `req_prod` once (an acquire load: no slot is read before
    /// it) and bounds it. The front can never have more than `size` requests unanswered, so
    /// `req_prod - rsp_prod_pvt <= size`; and `req_prod` never moves backwards. A hostile
    /// value disconnects the ring before any slot is read.
    @inlinable
    mutating func readRequestProducer() throws(RingError) {
        let produced = slots.region.loadAcquire32(at: RingLayout.requestProducerOffset)
        let ahead = produced &- responseProducer
        guard ahead <= slots.size, ahead >= requestsAvailable &- responseProducer else {
            isDisconnected = true
            throw .producerOutOfRange(.requestProducer, value: produced, consumed: requestConsumer, size: slots.size)
        }
        requestsAvailable = produced
    }
}
