import Testing
import VireoCore
import VireoHypercalls

/// SECURITY.md items 1-3: a hostile frontend against Vireo's backend end of a ring.
@Suite struct SharedRingHostileTests {
    typealias Front = FrontRing<vireo_blkif_request, vireo_blkif_response>
    typealias Back = BackRing<vireo_blkif_request, vireo_blkif_response>

    static func request(id: UInt64, sector: UInt64, segments: UInt8 = 1) -> vireo_blkif_request {
        var r = vireo_blkif_request()
        r.operation = UInt8(VIREO_BLKIF_OP_WRITE)
        r.nr_segments = segments
        r.id = id
        r.sector_number = sector
        r.seg.0 = vireo_blkif_request_segment(gref: 8, first_sect: 0, last_sect: 7)
        return r
    }

    static func response(to request: vireo_blkif_request, status: Int16 = Int16(VIREO_BLKIF_RSP_OKAY)) -> vireo_blkif_response {
        var r = vireo_blkif_response()
        r.id = request.id
        r.operation = request.operation
        r.status = status
        return r
    }

    static func slotOffset(_ index: UInt32, size: Int, entry: Int = 112) -> Int {
        RingLayout.headerSize + Int(index & UInt32(size - 1)) * entry
    }

    /// Runs `count` requests through the ring normally, so the indices are somewhere
    /// in the middle (and the slots hold old responses).
    static func warmUp(_ front: inout Front, _ back: inout Back, count: Int) throws {
        for i in 0..<count {
            try front.produceRequest(request(id: UInt64(i), sector: UInt64(i)))
            _ = front.pushRequestsAndCheckNotify()
            let copy = try #require(try back.consumeRequest())
            try back.produceResponse(response(to: copy))
            _ = back.pushResponsesAndCheckNotify()
            _ = try #require(try front.consumeResponse())
        }
    }

    // MARK: 1

    /// SECURITY.md 1 (XSA-155): the back copies each request out once; the frontend rewriting
    /// the slot afterwards cannot change what the back validated and uses.
    @Test func item1_requestIsCopiedOutOnce() throws {
        let pages = try RingPages()
        var front = try Front(initializing: pages.region)
        var back = try Back(attaching: pages.region)
        try Self.warmUp(&front, &back, count: 5)

        try front.produceRequest(Self.request(id: 77, sector: 2048, segments: 1))
        _ = front.pushRequestsAndCheckNotify()
        let copy = try #require(try back.consumeRequest())
        // The backend validates its copy...
        #expect(copy.nr_segments == 1 && copy.nr_segments <= VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST)
        // ...then the frontend rewrites the slot: too many segments, another sector, another id.
        let offset = Self.slotOffset(5, size: front.size)
        pages.region.fill(0xee, at: offset, count: 112)
        pages.region.store(UInt8(200), at: offset + 1)
        #expect(pages.region.load(vireo_blkif_request.self, at: offset).nr_segments == 200)
        // The copy the backend holds is what it validated.
        #expect(copy.id == 77)
        #expect(copy.sector_number == 2048)
        #expect(copy.nr_segments == 1)
        #expect(copy.seg.0.gref == 8 && copy.seg.0.last_sect == 7)
        // Consuming again does not re-read the slot: there is nothing more to consume.
        #expect(try back.consumeRequest() == nil)
        #expect(back.requestsConsumed == 6 && back.requestsInFlight == 1)
        // Answering it writes the response over the rewritten slot.
        try back.produceResponse(Self.response(to: copy))
        _ = back.pushResponsesAndCheckNotify()
        #expect(try front.consumeResponse()?.id == 77)
    }

    // MARK: 2

    /// Hostile values of req_prod, relative to a back that has consumed and answered
    /// everything up to `cons`. (value offset from cons, label)
    static let hostileProducers: [(Int64, String)] = [
        (33, "size + 1 ahead"), (64, "2 * size ahead"), (-1, "one behind"), (-32, "size behind"),
        (0x7fff_ffff, "2^31 - 1 ahead"), (0x8000_0000, "2^31 ahead"), (0xffff_fff0, "wrapped, 16 behind"),
    ]

    /// SECURITY.md 2: a req_prod more than the ring's size ahead of the back (or behind it)
    /// is a protocol error: a typed error, no slot read, and the ring stays disconnected.
    @Test(arguments: hostileProducers, [UInt32(0), 5, UInt32.max - 3])
    func item2_producerRunningAheadIsAProtocolError(hostile: (Int64, String), start: UInt32) throws {
        let pages = try RingPages()
        var front = try Front(initializing: pages.region)
        if start != 0 { pages.startRing(at: start); front = try Front(attaching: pages.region, at: start) }
        var back = try Back(attaching: pages.region, at: start)
        try Self.warmUp(&front, &back, count: 3)
        let cons = back.requestsConsumed
        #expect(cons == start &+ 3)

        // Every slot holds a plausible request, so a back that read one would return it.
        for i in 0..<UInt32(32) {
            pages.region.store(Self.request(id: 0xbad, sector: 0xbad), at: Self.slotOffset(i, size: 32))
        }
        let hostile = cons &+ UInt32(truncatingIfNeeded: hostile.0)
        pages.setWord(hostile, at: RingLayout.requestProducerOffset)
        let responseProducer = pages.word(at: RingLayout.responseProducerOffset)

        #expect(throws: RingError.producerOutOfRange(.requestProducer, value: hostile, consumed: cons, size: 32)) {
            _ = try back.consumeRequest()
        }
        #expect(back.disconnected)
        #expect(back.requestsConsumed == cons, "nothing consumed")
        // From now on the back reads and writes nothing, whatever the front does.
        pages.setWord(cons &+ 1, at: RingLayout.requestProducerOffset)
        #expect(throws: RingError.disconnected) { _ = try back.consumeRequest() }
        #expect(throws: RingError.disconnected) { _ = try back.unconsumedRequests() }
        #expect(throws: RingError.disconnected) { _ = try back.finalCheckForRequests() }
        #expect(throws: RingError.disconnected) { try back.produceResponse(vireo_blkif_response()) }
        let notify = back.pushResponsesAndCheckNotify()
        #expect(!notify)
        #expect(pages.word(at: RingLayout.responseProducerOffset) == responseProducer)
        #expect(back.requestsConsumed == cons)
    }

    /// The bound counts requests the back holds unanswered: with 3 in flight, the front may
    /// publish only size - 3 more.
    @Test func item2_theBoundCountsRequestsInFlight() throws {
        let pages = try RingPages()
        var front = try Front(initializing: pages.region)
        var back = try Back(attaching: pages.region)
        for i in 0..<3 { try front.produceRequest(Self.request(id: UInt64(i), sector: 0)) }
        _ = front.pushRequestsAndCheckNotify()
        for _ in 0..<3 { _ = try #require(try back.consumeRequest()) }
        #expect(back.requestsInFlight == 3)

        // req_prod = 3 + 29 = 32: exactly size ahead of rsp_prod_pvt (0): allowed.
        pages.setWord(32, at: RingLayout.requestProducerOffset)
        #expect(try back.unconsumedRequests() == 29)
        // 33: one more than the ring can hold while 3 are unanswered.
        pages.setWord(33, at: RingLayout.requestProducerOffset)
        #expect(throws: RingError.producerOutOfRange(.requestProducer, value: 33, consumed: 3, size: 32)) {
            _ = try back.unconsumedRequests()
        }
        #expect(back.requestsConsumed == 3)
    }

    /// req_prod may not move backwards, even within the bound.
    @Test func item2_producerMovingBackwardsIsAProtocolError() throws {
        let pages = try RingPages()
        var front = try Front(initializing: pages.region)
        var back = try Back(attaching: pages.region)
        for i in 0..<10 { try front.produceRequest(Self.request(id: UInt64(i), sector: 0)) }
        _ = front.pushRequestsAndCheckNotify()
        _ = try #require(try back.consumeRequest())  // sees req_prod = 10
        pages.setWord(4, at: RingLayout.requestProducerOffset)
        #expect(throws: RingError.producerOutOfRange(.requestProducer, value: 4, consumed: 1, size: 32)) {
            _ = try back.unconsumedRequests()
        }
        #expect(throws: RingError.disconnected) { _ = try back.consumeRequest() }
        #expect(back.requestsConsumed == 1)
    }

    /// The same bound on the front's side: a back cannot publish more responses than there are
    /// published requests.
    @Test func responsesBeyondThePublishedRequestsAreAProtocolError() throws {
        let pages = try RingPages()
        var front = try Front(initializing: pages.region)
        for i in 0..<4 { try front.produceRequest(Self.request(id: UInt64(i), sector: 0)) }
        _ = front.pushRequestsAndCheckNotify()
        try front.produceRequest(Self.request(id: 4, sector: 0))  // produced, not published
        pages.setWord(5, at: RingLayout.responseProducerOffset)
        #expect(throws: RingError.producerOutOfRange(.responseProducer, value: 5, consumed: 0, size: 32)) {
            _ = try front.consumeResponse()
        }
        #expect(throws: RingError.disconnected) { try front.produceRequest(Self.request(id: 5, sector: 0)) }
        let notify = front.pushRequestsAndCheckNotify()
        #expect(!notify)
        #expect(pages.word(at: RingLayout.requestProducerOffset) == 4)
    }

    /// The back never answers more requests than it consumed, so it never writes a slot the
    /// front may be filling.
    @Test func backCannotProduceMoreResponsesThanItConsumed() throws {
        let pages = try RingPages()
        var front = try Front(initializing: pages.region)
        var back = try Back(attaching: pages.region)
        #expect(throws: RingError.noRequestToAnswer) { try back.produceResponse(vireo_blkif_response()) }
        try front.produceRequest(Self.request(id: 1, sector: 0))
        try front.produceRequest(Self.request(id: 2, sector: 0))
        _ = front.pushRequestsAndCheckNotify()
        let first = try #require(try back.consumeRequest())
        try back.produceResponse(Self.response(to: first))
        #expect(throws: RingError.noRequestToAnswer) { try back.produceResponse(Self.response(to: first)) }
        #expect(back.responsesProduced == 1)
        let slot2 = pages.bytes(at: Self.slotOffset(1, size: 32), count: 112)
        #expect(pages.region.load(vireo_blkif_request.self, at: Self.slotOffset(1, size: 32)).id == 2)
        #expect(slot2 == pages.bytes(at: Self.slotOffset(1, size: 32), count: 112))
    }

    // MARK: 3

    /// SECURITY.md 3 (XSA-216): a response writes every byte of its slot. The slot held a
    /// 112-byte request of 0xAA; after a 16-byte response, no 0xAA is left, the rest of the
    /// union is zero, and so is the response's own padding.
    @Test func item3_responsesWriteEveryByteOfTheSlot() throws {
        let pages = try RingPages()
        var front = try Front(initializing: pages.region)
        var back = try Back(attaching: pages.region)
        try Self.warmUp(&front, &back, count: 2)

        var poison = vireo_blkif_request()
        withUnsafeMutableBytes(of: &poison) { _ = $0.initializeMemory(as: UInt8.self, repeating: 0xaa) }
        try front.produceRequest(poison)
        _ = front.pushRequestsAndCheckNotify()
        let offset = Self.slotOffset(2, size: 32)
        #expect(pages.bytes(at: offset, count: 112) == [UInt8](repeating: 0xaa, count: 112))

        let copy = try #require(try back.consumeRequest())
        #expect(copy.id == 0xaaaa_aaaa_aaaa_aaaa)
        // The backend answers with an id and operation of its own (a request it rejects as
        // invalid), so any 0xAA left in the slot is a stale byte.
        var answer = vireo_blkif_response()
        answer.id = 3
        answer.operation = UInt8(VIREO_BLKIF_OP_READ)
        answer.status = Int16(VIREO_BLKIF_RSP_ERROR)
        Self.dirtyTheStack()
        try back.produceResponse(answer)
        let slot = pages.bytes(at: offset, count: 112)
        #expect(!slot.contains(0xaa), "no byte of the old request is left")
        #expect(slot[16...].allSatisfy { $0 == 0 }, "the rest of the union is zero")
        // blkif_response: id @0 (8), operation @8, padding @9, status @10 (2), padding @12..15.
        #expect(slot[9] == 0 && slot[12..<16].allSatisfy { $0 == 0 }, "the response's padding is zero")
        _ = back.pushResponsesAndCheckNotify()
        let response = try #require(try front.consumeResponse())
        #expect(response.id == 3 && response.status == Int16(VIREO_BLKIF_RSP_ERROR))
    }

    /// The field-by-field form: whatever padding a Swift value of the response type would
    /// carry, the slot gets exactly the fields set and zeroes everywhere else.
    @Test func item3_fieldWritesLeaveEveryOtherByteZero() throws {
        let pages = try RingPages()
        var front = try Front(initializing: pages.region)
        var back = try Back(attaching: pages.region)
        var poison = vireo_blkif_request()
        withUnsafeMutableBytes(of: &poison) { _ = $0.initializeMemory(as: UInt8.self, repeating: 0xaa) }
        try front.produceRequest(poison)
        _ = front.pushRequestsAndCheckNotify()
        _ = try #require(try back.consumeRequest())
        Self.dirtyTheStack()
        try back.produceResponse { slot in
            slot.set(\.id, to: 0x0102_0304_0506_0708)
            slot.set(\.operation, to: UInt8(VIREO_BLKIF_OP_FLUSH_DISKCACHE))
            slot.set(\.status, to: Int16(VIREO_BLKIF_RSP_EOPNOTSUPP))
        }
        let slot = pages.bytes(at: 64, count: 112)
        #expect(Array(slot[0..<16]) == [8, 7, 6, 5, 4, 3, 2, 1, 3, 0, 0xfe, 0xff, 0, 0, 0, 0])
        #expect(slot[16...].allSatisfy { $0 == 0 })
        #expect(throws: RingError.noRequestToAnswer) { try back.produceResponse { _ in } }
        _ = back.pushResponsesAndCheckNotify()
        let response = try #require(try front.consumeResponse())
        #expect(response.id == 0x0102_0304_0506_0708 && response.status == Int16(VIREO_BLKIF_RSP_EOPNOTSUPP))
    }

    /// The same for a ring with small slots (netif tx: 12-byte requests, 4-byte responses)
    /// and for Swift entry types with tail padding.
    @Test func item3_smallResponsesZeroTheirWholeSlot() throws {
        let pages = try RingPages()
        var front = try FrontRing<vireo_netif_tx_request, vireo_netif_tx_response>(initializing: pages.region)
        var back = try BackRing<vireo_netif_tx_request, vireo_netif_tx_response>(attaching: pages.region)
        var poison = vireo_netif_tx_request()
        withUnsafeMutableBytes(of: &poison) { _ = $0.initializeMemory(as: UInt8.self, repeating: 0xaa) }
        try front.produceRequest(poison)
        _ = front.pushRequestsAndCheckNotify()
        let copy = try #require(try back.consumeRequest())
        try back.produceResponse(vireo_netif_tx_response(id: copy.id, status: 0))
        #expect(pages.bytes(at: 64, count: 12) == [0xaa, 0xaa, 0, 0] + [UInt8](repeating: 0, count: 8))

        let pages2 = try RingPages()
        var front2 = try FrontRing<Message64, Reply12>(initializing: pages2.region)
        var back2 = try BackRing<Message64, Reply12>(attaching: pages2.region)
        pages2.region.fill(0xaa, at: 64, count: 64)
        try front2.produceRequest(Message64(sequence: 1))
        _ = front2.pushRequestsAndCheckNotify()
        _ = try #require(try back2.consumeRequest())
        pages2.region.fill(0xaa, at: 64, count: 64)  // the front scribbles over the slot again
        Self.dirtyTheStack()
        try back2.produceResponse(Reply12(sequence: 0x0102_0304_0506_0708, status: 9))
        let slot = pages2.bytes(at: 64, count: 64)
        #expect(!slot.contains(0xaa))
        #expect(slot[12...].allSatisfy { $0 == 0 }, "Reply12's tail padding and the rest of the slot")
    }

    /// Leaves 0xAA in the stack below the caller, where a response built in a temporary would
    /// pick up its padding from.
    @inline(never)
    static func dirtyTheStack() {
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 4096) { buffer in
            buffer.initialize(repeating: 0xaa)
            _ = buffer.withMemoryRebound(to: UInt64.self) { $0.reduce(0, &+) }
        }
    }
}
