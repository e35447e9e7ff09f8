import Testing
import VireoCore
import VireoHypercalls

/// Random interleavings of front and back operations on one thread, each step checked
/// against a model: two FIFO queues and the event indices each side last asked for.
@Suite struct SharedRingModelTests {
    /// How one pair of entry types carries a sequence number.
    struct Codec<Request: BitwiseCopyable, Response: BitwiseCopyable>: Sendable {
        /// Bits of the sequence number the entries carry (netif ids are 16-bit).
        var bits: Int
        var request: @Sendable (UInt64) -> Request
        var requestSequence: @Sendable (Request) -> UInt64
        /// Checks the request's other fields.
        var requestIntact: @Sendable (Request) -> Bool
        var response: @Sendable (Request) -> Response
        var responseSequence: @Sendable (Response) -> UInt64
    }

    static let blkif = Codec<vireo_blkif_request, vireo_blkif_response>(
        bits: 64,
        request: { sequence in
            var r = vireo_blkif_request()
            r.operation = UInt8(VIREO_BLKIF_OP_READ)
            r.nr_segments = 1
            r.id = sequence
            r.sector_number = sequence &* 8
            r.seg.0.gref = UInt32(truncatingIfNeeded: sequence)
            r.seg.0.last_sect = 7
            return r
        },
        requestSequence: { $0.id },
        requestIntact: { $0.sector_number == $0.id &* 8 && $0.seg.0.gref == UInt32(truncatingIfNeeded: $0.id) && $0.seg.0.last_sect == 7 },
        response: { request in
            var r = vireo_blkif_response()
            r.id = request.id
            r.operation = request.operation
            r.status = Int16(VIREO_BLKIF_RSP_OKAY)
            return r
        },
        responseSequence: { $0.id })

    static let netifTx = Codec<vireo_netif_tx_request, vireo_netif_tx_response>(
        bits: 16,
        request: { sequence in
            var r = vireo_netif_tx_request()
            r.id = UInt16(truncatingIfNeeded: sequence)
            r.gref = UInt32(r.id) ^ 0xabcd
            r.size = 1500
            return r
        },
        requestSequence: { UInt64($0.id) },
        requestIntact: { $0.gref == UInt32($0.id) ^ 0xabcd && $0.size == 1500 },
        response: { request in
            var r = vireo_netif_tx_response()
            r.id = request.id
            r.status = Int16(VIREO_NETIF_RSP_OKAY)
            return r
        },
        responseSequence: { UInt64($0.id) })

    static let swiftStructs = Codec<Message64, Reply12>(
        bits: 64,
        request: { Message64(sequence: $0) },
        requestSequence: { $0.sequence },
        requestIntact: { $0.isIntact },
        response: { Reply12(sequence: $0.sequence, status: 0) },
        responseSequence: { $0.sequence })

    /// The model: what each queue holds and what each side last asked for.
    struct Model {
        var nextRequest: UInt64 = 0        // sequence of the next request to produce
        var unpublishedRequests: [UInt64] = []
        var publishedRequests: [UInt64] = []  // published, not consumed by the back
        var inFlight: [UInt64] = []           // consumed by the back, not answered
        var unpublishedResponses: [UInt64] = []
        var publishedResponses: [UInt64] = [] // published, not consumed by the front
        var requestEvent: UInt32              // req_event as the back last set it
        var responseEvent: UInt32             // rsp_event as the front last set it
        var backAsleep = false                // the back's final check said "wait", nothing since
        var frontAsleep = false
        var requestsPublishedCount: UInt32    // req_prod
        var responsesPublishedCount: UInt32   // rsp_prod
        var notifications = 0
        var requiredNotifications = 0

        /// Requests produced whose responses the front has not consumed.
        var outstanding: Int {
            unpublishedRequests.count + publishedRequests.count + inFlight.count
                + unpublishedResponses.count + publishedResponses.count
        }
    }

    static let cases: [(seed: UInt64, start: UInt32, pages: Int)] = [
        (1, 0, 1), (2, UInt32.max - 40, 1), (3, 0x7fff_ffe0, 1), (4, 0xffff_ff00, 4), (5, 12345, 2),
    ]

    @Test(arguments: cases)
    func blkifInterleavingsMatchTheModel(seed: UInt64, start: UInt32, pages: Int) throws {
        try Self.run(Self.blkif, seed: seed, start: start, pages: pages, steps: 6_000)
    }

    @Test(arguments: cases)
    func netifTxInterleavingsMatchTheModel(seed: UInt64, start: UInt32, pages: Int) throws {
        try Self.run(Self.netifTx, seed: seed &+ 100, start: start, pages: pages, steps: 6_000)
    }

    @Test(arguments: cases)
    func swiftStructInterleavingsMatchTheModel(seed: UInt64, start: UInt32, pages: Int) throws {
        try Self.run(Self.swiftStructs, seed: seed &+ 200, start: start, pages: pages, steps: 6_000)
    }

    static func run<Request, Response>(
        _ codec: Codec<Request, Response>, seed: UInt64, start: UInt32, pages count: Int, steps: Int
    ) throws {
        let pages = try RingPages(pages: count)
        var front = try FrontRing<Request, Response>(initializing: pages.region)
        if start != 0 { pages.startRing(at: start); front = try FrontRing(attaching: pages.region, at: start) }
        var back = try BackRing<Request, Response>(attaching: pages.region, at: start)
        let size = front.size
        #expect(size == back.size)
        let mask: UInt64 = codec.bits == 64 ? .max : (1 << UInt64(codec.bits)) - 1

        var model = Model(requestEvent: start &+ 1, responseEvent: start &+ 1,
                          requestsPublishedCount: start, responsesPublishedCount: start)
        var random = SeededGenerator(seed: seed)
        var requestsConsumedCount = start, responsesConsumedCount = start

        for step in 0..<steps {
            // Free-slot accounting holds before every step.
            #expect(front.freeRequests == size - model.outstanding, "step \(step)")
            #expect(back.requestsInFlight == model.inFlight.count, "step \(step)")
            let burst = Int.random(in: 1...(size + 2), using: &random)

            switch Int.random(in: 0..<8, using: &random) {
            case 0:  // front produces
                for _ in 0..<burst {
                    if model.outstanding == size {
                        #expect(throws: RingError.full) { try front.produceRequest(codec.request(model.nextRequest)) }
                        break
                    }
                    try front.produceRequest(codec.request(model.nextRequest))
                    model.unpublishedRequests.append(model.nextRequest)
                    model.nextRequest += 1
                }
            case 1:  // front pushes
                let old = model.requestsPublishedCount
                let new = old &+ UInt32(model.unpublishedRequests.count)
                let notify = front.pushRequestsAndCheckNotify()
                #expect(pages.word(at: RingLayout.requestProducerOffset) == new)
                #expect(notify == ((new &- model.requestEvent) < (new &- old)), "step \(step): event-index rule")
                if model.backAsleep && new != old {
                    #expect(notify, "step \(step): the back asked for an event and new requests came")
                    model.requiredNotifications += 1
                }
                if new == old { #expect(!notify, "nothing new, no event") }
                if notify { model.backAsleep = false; model.notifications += 1 }
                model.publishedRequests += model.unpublishedRequests
                model.unpublishedRequests.removeAll()
                model.requestsPublishedCount = new
            case 2:  // back consumes
                model.backAsleep = false
                // What the back knew from its last read never exceeds what is published.
                #expect(back.knownRequests <= model.publishedRequests.count, "step \(step)")
                #expect(try back.unconsumedRequests() == model.publishedRequests.count)
                #expect(back.knownRequests == model.publishedRequests.count, "step \(step): known after a read")
                for _ in 0..<burst {
                    let request = try back.consumeRequest()
                    guard let expected = model.publishedRequests.first else {
                        #expect(request == nil, "step \(step): nothing published, nothing consumed")
                        break
                    }
                    let copy = try #require(request, "step \(step): a published request was not seen")
                    #expect(codec.requestSequence(copy) == expected & mask, "step \(step): order")
                    #expect(codec.requestIntact(copy), "step \(step): contents")
                    model.publishedRequests.removeFirst()
                    model.inFlight.append(expected)
                    requestsConsumedCount &+= 1
                }
                #expect(back.requestsConsumed == requestsConsumedCount)
            case 3:  // back answers
                for _ in 0..<burst {
                    guard let sequence = model.inFlight.first else {
                        #expect(throws: RingError.noRequestToAnswer) {
                            try back.produceResponse(codec.response(codec.request(0)))
                        }
                        break
                    }
                    try back.produceResponse(codec.response(codec.request(sequence)))
                    model.inFlight.removeFirst()
                    model.unpublishedResponses.append(sequence)
                }
            case 4:  // back pushes
                let old = model.responsesPublishedCount
                let new = old &+ UInt32(model.unpublishedResponses.count)
                let notify = back.pushResponsesAndCheckNotify()
                #expect(pages.word(at: RingLayout.responseProducerOffset) == new)
                #expect(notify == ((new &- model.responseEvent) < (new &- old)), "step \(step): event-index rule")
                if model.frontAsleep && new != old {
                    #expect(notify, "step \(step): the front asked for an event and new responses came")
                    model.requiredNotifications += 1
                }
                if new == old { #expect(!notify, "nothing new, no event") }
                if notify { model.frontAsleep = false; model.notifications += 1 }
                model.publishedResponses += model.unpublishedResponses
                model.unpublishedResponses.removeAll()
                model.responsesPublishedCount = new
            case 5:  // front consumes
                model.frontAsleep = false
                #expect(try front.unconsumedResponses() == model.publishedResponses.count)
                for _ in 0..<burst {
                    let response = try front.consumeResponse()
                    guard let expected = model.publishedResponses.first else {
                        #expect(response == nil, "step \(step): nothing published, nothing consumed")
                        break
                    }
                    let copy = try #require(response, "step \(step): a published response was not seen")
                    #expect(codec.responseSequence(copy) == expected & mask, "step \(step): order")
                    model.publishedResponses.removeFirst()
                    responsesConsumedCount &+= 1
                }
                #expect(front.responsesConsumed == responsesConsumedCount)
            case 6:  // back's final check before sleeping
                let pending = try back.finalCheckForRequests()
                #expect(pending == !model.publishedRequests.isEmpty, "step \(step)")
                if !pending {
                    model.requestEvent = requestsConsumedCount &+ 1
                    model.backAsleep = true
                }
                #expect(pages.word(at: RingLayout.requestEventOffset) == model.requestEvent)
            default:  // front's final check before sleeping
                let pending = try front.finalCheckForResponses()
                #expect(pending == !model.publishedResponses.isEmpty, "step \(step)")
                if !pending {
                    model.responseEvent = responsesConsumedCount &+ 1
                    model.frontAsleep = true
                }
                #expect(pages.word(at: RingLayout.responseEventOffset) == model.responseEvent)
            }
        }
        // Drain: everything produced comes back, in order, exactly once.
        _ = front.pushRequestsAndCheckNotify()
        model.publishedRequests += model.unpublishedRequests
        model.unpublishedRequests.removeAll()
        for sequence in model.inFlight { try back.produceResponse(codec.response(codec.request(sequence))) }
        while let request = try back.consumeRequest() { try back.produceResponse(codec.response(request)) }
        #expect(throws: RingError.noRequestToAnswer) { try back.produceResponse(codec.response(codec.request(0))) }
        _ = back.pushResponsesAndCheckNotify()
        var drained: [UInt64] = []
        while let response = try front.consumeResponse() { drained.append(codec.responseSequence(response)) }
        let answers = model.publishedResponses + model.unpublishedResponses + model.inFlight + model.publishedRequests
        let expected = answers.map { $0 & mask }
        #expect(drained == expected)
        #expect(front.freeRequests == size)
        #expect(!front.disconnected && !back.disconnected)
        #expect(front.requestsProduced == start &+ UInt32(truncatingIfNeeded: model.nextRequest))
        #expect(model.nextRequest > UInt64(steps / 4), "the walk made progress")
        #expect(model.requiredNotifications > 10, "the walk exercised sleeping peers")
    }
}
