import Foundation
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls
import VireoStore

typealias BlkRequest = vireo_blkif_request
typealias BlkResponse = vireo_blkif_response

/// A raw image file in the temporary directory, removed with the value.
final class TempImage {
    let path: String
    init(sectors: Int, fill: UInt8 = 0) throws {
        path = NSTemporaryDirectory() + "vireo-blk-\(UUID().uuidString).img"
        try Data(repeating: fill, count: sectors * 512).write(to: URL(fileURLWithPath: path))
    }
    func bytes() throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: path))) }
    deinit { try? FileManager.default.removeItem(atPath: path) }
}

/// The real BlockBackend over a file and the real XenStore, with a SimulatedGuest as the
/// frontend: it publishes ring-ref and event-channel and switches to Initialised as a Xen
/// frontend does. The host domain's events are dispatched on their own thread (as EmbeddedHost
/// does) and the backend runs on another.
final class BlockRig {
    let hub = EventChannels()
    let grants = GrantTables()
    let store = XenStore()
    let guest: SimulatedGuest
    let host: HostEventDomain
    let backend: BlockBackend
    let guestStore: XenStoreConnection
    let image: TempImage
    var front: FrontRing<BlkRequest, BlkResponse>? = nil
    var ringRef = GrantRef(0)
    var ringFrame = GuestFrame(0)
    var port = EventPort(0)
    /// Every ring (queue) of a multi-queue connection; the first is also `front`/`port`.
    var fronts: [FrontRing<BlkRequest, BlkResponse>] = []
    var ports: [EventPort] = []
    var queueFrames: [GuestFrame] = []
    var queueRefs: [GrantRef] = []
    private var dispatcher: HostEventDispatcher?
    private var threads: [Thread] = []

    init(sectors: Int = 256, readOnly: Bool = false, fill: UInt8 = 0, sectorSize: Int = 512, maxQueues: Int = 4,
         counters: IOCounters? = nil) throws {
        image = try TempImage(sectors: sectors, fill: fill)
        guest = try SimulatedGuest(id: DomainID(1), ramPages: 512, hub: hub, grantTables: grants)
        host = try HostEventDomain(hub: hub)
        try store.introduceDomain(guest.id)
        backend = try BlockBackend(path: image.path, readOnly: readOnly, frontend: guest.id, sectorSize: sectorSize,
                                   maxQueues: maxQueues, counters: counters, store: store, grants: grants, host: host)
        try backend.create()
        guestStore = store.connect(domain: guest.id)
        let backend = self.backend
        dispatcher = HostEventDispatcher(host, name: "test-dom0-events")
        threads = [Thread { backend.run() }]
        for t in threads { t.start() }
    }

    func shutdown() {
        backend.stop()
        dispatcher?.stop()
        while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
    }

    deinit { shutdown() }

    @discardableResult
    func guestWrite(_ path: String, _ value: String) -> XenStoreMessage? {
        store.request(XenStoreMessage(type: .write, payload: Array(path.utf8) + [0] + Array(value.utf8)), from: guestStore)
    }

    func guestRead(_ path: String) -> String? {
        guard let reply = store.request(XenStoreMessage(.read, path), from: guestStore), reply.type == .read else { return nil }
        return String(decoding: reply.payload, as: UTF8.self)
    }

    /// Waits until the backend's published state is `state`.
    func waitForBackend(_ state: UInt32) throws {
        let deadline = ContinuousClock.now.advanced(by: .seconds(10))
        while guestRead(backend.backendPath + "/state") != "\(state)" {
            guard ContinuousClock.now < deadline else { throw BackendError("backend never reached \(state): \(backend.lastFailure ?? "-")") }
            usleep(1000)
        }
    }

    /// The frontend's half of the handshake: one ring with its keys at the top, or `queues`
    /// rings under queue-<n> with multi-queue-num-queues (written as `numQueuesValue` when set,
    /// to try bad values).
    func connect(queues: Int = 1, numQueuesValue: String? = nil, expect state: UInt32 = XenbusBackendState.connected) throws {
        try waitForBackend(XenbusBackendState.initWait)
        let node = backend.frontendPath
        for index in 0..<queues {
            let frame = try guest.allocatePage()
            let ring: FrontRing<BlkRequest, BlkResponse> = try guest.frontRing(on: frame)
            let ref = try guest.grantAccess(to: host.id, frame: frame, readOnly: false)
            let channel = try guest.allocUnbound(remote: host.id)
            if index == 0 {
                ringFrame = frame
                ringRef = ref
                port = channel
                front = ring
            }
            fronts.append(ring)
            ports.append(channel)
            queueFrames.append(frame)
            queueRefs.append(ref)
            let directory = queues == 1 && numQueuesValue == nil ? node : node + "/queue-\(index)"
            #expect(guestWrite(directory + "/ring-ref", "\(ref.rawValue)")?.type == .write)
            #expect(guestWrite(directory + "/event-channel", "\(channel.rawValue)")?.type == .write)
        }
        if queues > 1 || numQueuesValue != nil {
            #expect(guestWrite(node + "/multi-queue-num-queues", numQueuesValue ?? "\(queues)")?.type == .write)
        }
        #expect(guestWrite(node + "/protocol", "x86_64-abi")?.type == .write)
        #expect(guestWrite(node + "/state", "\(XenbusBackendState.initialised)")?.type == .write)
        try waitForBackend(state)
    }

    func page(_ fill: (Int) -> UInt8) throws -> GuestFrame {
        let page = try guest.allocatePage()
        try guest.page(page).withUnsafeMutableBytes(offset: 0, count: 4096) { bytes in
            for j in 0..<4096 { bytes[j] = fill(j) }
        }
        return page
    }

    static func request(_ op: Int32, id: UInt64, sector: UInt64, _ segments: [(GrantRef, UInt8, UInt8)]) -> BlkRequest {
        var r = BlkRequest()
        r.operation = UInt8(op)
        r.nr_segments = UInt8(segments.count)
        r.id = id
        r.sector_number = sector
        for (i, g) in segments.enumerated() {
            r.setSegment(i, gref: g.0.rawValue, firstSector: g.1, lastSector: g.2)
        }
        return r
    }

    static func indirect(_ op: Int32, id: UInt64, sector: UInt64, segments: Int, pages: [GrantRef]) -> BlkRequest {
        var i = vireo_blkif_request_indirect()
        i.operation = UInt8(VIREO_BLKIF_OP_INDIRECT)
        i.indirect_op = UInt8(truncatingIfNeeded: op)
        i.nr_segments = UInt16(truncatingIfNeeded: segments)
        i.id = id
        i.sector_number = sector
        withUnsafeMutableBytes(of: &i.indirect_grefs) { grefs in
            for (n, ref) in pages.enumerated() { grefs.storeBytes(of: ref.rawValue, toByteOffset: n * 4, as: UInt32.self) }
        }
        var r = BlkRequest()
        withUnsafeMutableBytes(of: &r) { $0.storeBytes(of: i, as: vireo_blkif_request_indirect.self) }
        return r
    }

    static func discard(id: UInt64, sector: UInt64, count: UInt64, flag: UInt8 = 0) -> BlkRequest {
        var d = vireo_blkif_request_discard()
        d.operation = UInt8(VIREO_BLKIF_OP_DISCARD)
        d.flag = flag
        d.id = id
        d.sector_number = sector
        d.nr_sectors = count
        var r = BlkRequest()
        withUnsafeMutableBytes(of: &r) { $0.storeBytes(of: d, as: vireo_blkif_request_discard.self) }
        return r
    }

    /// A page of indirect segment descriptors (granted read-only to dom0).
    func indirectPage(_ segments: [(GrantRef, UInt8, UInt8)]) throws -> GrantRef {
        let page = try guest.allocatePage()
        let region = try guest.page(page)
        for (n, s) in segments.enumerated() {
            var d = vireo_blkif_request_segment()
            d.gref = s.0.rawValue
            d.first_sect = s.1
            d.last_sect = s.2
            region.store(d, at: n * 8)
        }
        return try guest.grantAccess(to: .zero, frame: page, readOnly: true)
    }

    /// Pushes `requests` (many in flight, waiting for room) on ring `queue` and collects every
    /// response by id.
    func run(_ requests: [BlkRequest], queue: Int = 0) throws -> [UInt64: Int16] {
        var responses: [UInt64: Int16] = [:]
        var next = 0
        if fronts.isEmpty, let front { fronts = [front]; ports = [port] }
        let deadline = ContinuousClock.now.advanced(by: .seconds(30))
        defer { if queue == 0 { front = fronts[0] } }
        while responses.count < requests.count {
            while next < requests.count, fronts[queue].freeRequests > 0 {
                try fronts[queue].produceRequest(requests[next])
                next += 1
            }
            if fronts[queue].pushRequestsAndCheckNotify() { try guest.notify(ports[queue]) }
            while let r = try fronts[queue].consumeResponse() { responses[r.id] = r.status }
            if responses.count == requests.count { break }
            if try fronts[queue].finalCheckForResponses() { continue }
            _ = guest.waitForEvents(timeout: .milliseconds(20))
            guard ContinuousClock.now < deadline else { throw BackendError("no responses") }
        }
        return responses
    }
}

private let okay = Int16(VIREO_BLKIF_RSP_OKAY)
private let failed = Int16(VIREO_BLKIF_RSP_ERROR)
private let unsupported = Int16(VIREO_BLKIF_RSP_EOPNOTSUPP)

@Suite struct BlockBackendTests {
    @Test func theBackendPublishesXenKeysAndConnects() throws {
        let rig = try BlockRig(sectors: 100)
        let back = rig.backend.backendPath, front = rig.backend.frontendPath
        #expect(back == "/local/domain/0/backend/vbd/1/51712")
        #expect(front == "/local/domain/1/device/vbd/51712")
        #expect(rig.guestRead(back + "/sectors") == "100")
        #expect(rig.guestRead(back + "/sector-size") == "512")
        #expect(rig.guestRead(back + "/info") == "0")
        #expect(rig.guestRead(back + "/feature-flush-cache") == "1")
        #expect(rig.guestRead(back + "/frontend") == front)
        #expect(rig.guestRead(back + "/frontend-id") == "1")
        #expect(rig.guestRead(front + "/backend") == back)
        #expect(rig.guestRead(front + "/backend-id") == "0")
        // The frontend may not write the backend's directory.
        #expect(rig.guestWrite(back + "/sectors", "999999")?.type == .error)
        try rig.connect()
        #expect(rig.backend.connections == 1)
        // Closing from the frontend: the backend follows to Closing, then Closed.
        rig.guestWrite(front + "/state", "\(XenbusBackendState.closing)")
        try rig.waitForBackend(XenbusBackendState.closing)
        rig.guestWrite(front + "/state", "\(XenbusBackendState.closed)")
        try rig.waitForBackend(XenbusBackendState.closed)
        rig.shutdown()
        #expect(rig.guest.endAccess(rig.ringRef), "the ring grant is unmapped after Closed")
    }

    @Test func writesReadsAndFlushesReachTheFile() throws {
        let rig = try BlockRig(sectors: 1024)
        try rig.connect()
        var writes: [BlkRequest] = [], reads: [BlkRequest] = []
        var targets: [GuestFrame] = []
        for i in 0..<64 {
            let page = try rig.page { UInt8(truncatingIfNeeded: i &* 31 &+ $0) }
            let ref = try rig.guest.grantAccess(to: .zero, frame: page, readOnly: true)
            writes.append(BlockRig.request(VIREO_BLKIF_OP_WRITE, id: UInt64(i), sector: UInt64(i * 8), [(ref, 0, 7)]))
            let target = try rig.guest.allocatePage()
            let targetRef = try rig.guest.grantAccess(to: .zero, frame: target, readOnly: false)
            reads.append(BlockRig.request(VIREO_BLKIF_OP_READ, id: UInt64(1000 + i), sector: UInt64(i * 8), [(targetRef, 0, 7)]))
            targets.append(target)
        }
        let written = try rig.run(writes)
        #expect(written.count == 64 && written.values.allSatisfy { $0 == okay })
        #expect(try rig.run([BlockRig.request(VIREO_BLKIF_OP_FLUSH_DISKCACHE, id: 500, sector: 0, [])]) == [500: okay])
        let file = try rig.image.bytes()
        for i in [0, 17, 63] {
            #expect(file[i * 4096 + 5] == UInt8(truncatingIfNeeded: i &* 31 &+ 5))
        }
        let read = try rig.run(reads)
        #expect(read.count == 64 && read.values.allSatisfy { $0 == okay })
        for (i, page) in targets.enumerated() {
            let bytes = try rig.guest.memory.bytes(at: page.address!, count: 4096)
            #expect(bytes == (0..<4096).map { UInt8(truncatingIfNeeded: i &* 31 &+ $0) }, "page \(i)")
        }
        // Partial pages, several segments: sectors 2-3 of one page and 0 of another land at
        // disk sectors 600, 601, 602.
        let a = try rig.page { _ in 0xA1 }, b = try rig.page { _ in 0xB2 }
        let ra = try rig.guest.grantAccess(to: .zero, frame: a, readOnly: true)
        let rb = try rig.guest.grantAccess(to: .zero, frame: b, readOnly: true)
        #expect(try rig.run([BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 9, sector: 600, [(ra, 2, 3), (rb, 0, 0)])]) == [9: okay])
        let after = try rig.image.bytes()
        #expect(after[600 * 512] == 0xA1 && after[602 * 512 - 1] == 0xA1 && after[602 * 512] == 0xB2 && after[603 * 512] == 0)
        #expect(rig.backend.statistics.notifications < rig.backend.statistics.requests, "event suppression")
        #expect(rig.backend.statistics.flushes == 1)
    }

    /// The domain's I/O counters (what vireod's metrics show): requests answered, bytes moved
    /// each way by completed transfers, error responses.
    @Test func theDomainsCountersSeeRequestsBytesAndErrors() throws {
        let io = IOCounters()
        let rig = try BlockRig(sectors: 64, counters: io)
        try rig.connect()
        let page = try rig.page { UInt8(truncatingIfNeeded: $0) }
        let ref = try rig.guest.grantAccess(to: .zero, frame: page, readOnly: false)
        let writes = (0..<3).map { BlockRig.request(VIREO_BLKIF_OP_WRITE, id: UInt64($0), sector: UInt64($0 * 8), [(ref, 0, 7)]) }
        #expect(try rig.run(writes).values.allSatisfy { $0 == okay })
        let reads = [BlockRig.request(VIREO_BLKIF_OP_READ, id: 10, sector: 0, [(ref, 2, 3)]),
                     BlockRig.request(VIREO_BLKIF_OP_READ, id: 11, sector: 60, [(ref, 0, 7)])]  // past the end
        #expect(try rig.run(reads) == [10: okay, 11: failed])
        #expect(io.requests.load(ordering: .relaxed) == 5)
        #expect(io.blockWrittenBytes.load(ordering: .relaxed) == 3 * 4096)
        #expect(io.blockReadBytes.load(ordering: .relaxed) == 2 * 512, "the failed read moved nothing")
        #expect(io.errors.load(ordering: .relaxed) == 1)
        #expect(io.netTransmitBytes.load(ordering: .relaxed) == 0)
    }

    /// SECURITY 1-6: hostile requests get errors, and the backend carries on.
    @Test func hostileRequestsGetErrorsAndTheBackendCarriesOn() throws {
        let rig = try BlockRig(sectors: 64)
        try rig.connect()
        let page = try rig.guest.allocatePage()
        let ref = try rig.guest.grantAccess(to: .zero, frame: page, readOnly: false)
        let readOnlyRef = try rig.guest.grantAccess(to: .zero, frame: page, readOnly: true)
        let otherDomainRef = try rig.guest.grantAccess(to: DomainID(5), frame: page, readOnly: false)
        var tooMany = BlockRig.request(VIREO_BLKIF_OP_READ, id: 1, sector: 0, [(ref, 0, 7)])
        tooMany.nr_segments = 200
        var twelve = BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 2, sector: 0, [(ref, 0, 7)])
        twelve.nr_segments = 12
        let maximal = BlockRig.request(VIREO_BLKIF_OP_READ, id: 3, sector: 0, Array(repeating: (ref, 0, 0), count: 11))
        let requests = [
            tooMany, twelve, maximal,
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 4, sector: 0, []),                       // zero segments
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 5, sector: 60, [(ref, 0, 7)]),           // past the end
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 6, sector: UInt64.max - 2, [(ref, 0, 7)]),  // overflow
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 7, sector: 0, [(ref, 5, 2)]),            // first > last
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 8, sector: 0, [(ref, 0, 8)]),            // last_sect 8
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 9, sector: 0, [(GrantRef(99_999), 0, 7)]),  // bad gref
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 10, sector: 0, [(readOnlyRef, 0, 7)]),   // read into r/o
            BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 11, sector: 0, [(otherDomainRef, 0, 7)]),  // not granted to us
            BlockRig.request(42, id: 12, sector: 0, [(ref, 0, 7)]),                             // unknown
            BlockRig.request(VIREO_BLKIF_OP_WRITE_BARRIER, id: 13, sector: 0, [(ref, 0, 7)]),  // writes zeros: fine
            BlockRig.request(VIREO_BLKIF_OP_DISCARD, id: 14, sector: 0, []),                   // zero sectors: fine
            BlockRig.request(VIREO_BLKIF_OP_INDIRECT, id: 15, sector: 0, []),                  // zero segments
            BlockRig.request(VIREO_BLKIF_OP_RESERVED_1, id: 16, sector: 0, []),
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 17, sector: 63, [(ref, 7, 7)]),          // the last sector: fine
        ]
        let responses = try rig.run(requests)
        #expect(responses == [1: failed, 2: failed, 3: okay, 4: failed, 5: failed, 6: failed, 7: failed, 8: failed,
                              9: failed, 10: failed, 11: failed, 12: unsupported, 13: okay, 14: okay,
                              15: failed, 16: unsupported, 17: okay])
        #expect(try rig.image.bytes().allSatisfy { $0 == 0 }, "no hostile write reached the file")
        #expect(rig.backend.state == XenbusBackendState.connected)
    }

    /// A producer index more than a ring ahead disconnects the device (SECURITY 2).
    @Test func aRingOverflowDisconnectsTheDevice() throws {
        let rig = try BlockRig(sectors: 64)
        try rig.connect()
        try rig.guest.page(rig.ringFrame).store(UInt32(1000), at: 0)  // req_prod, far past a ring ahead
        try rig.guest.notify(rig.port)
        try rig.waitForBackend(XenbusBackendState.closing)
        #expect(rig.backend.lastFailure?.contains("ring protocol error") == true)
    }

    @Test func aReadOnlyImageRefusesWrites() throws {
        let rig = try BlockRig(sectors: 16, readOnly: true, fill: 0x5A)
        #expect(rig.guestRead(rig.backend.backendPath + "/info") == "\(VIREO_VDISK_READONLY)")
        #expect(rig.guestRead(rig.backend.backendPath + "/mode") == "r")
        try rig.connect()
        let page = try rig.page { _ in 0xEE }
        let ref = try rig.guest.grantAccess(to: .zero, frame: page, readOnly: false)
        let responses = try rig.run([
            BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 1, sector: 0, [(ref, 0, 7)]),
            BlockRig.request(VIREO_BLKIF_OP_FLUSH_DISKCACHE, id: 2, sector: 0, [(ref, 0, 7)]),
            BlockRig.request(VIREO_BLKIF_OP_FLUSH_DISKCACHE, id: 3, sector: 0, []),
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 4, sector: 8, [(ref, 0, 7)]),
        ])
        #expect(responses == [1: failed, 2: failed, 3: okay, 4: okay])
        #expect(try rig.image.bytes().allSatisfy { $0 == 0x5A })
        #expect(try rig.guest.memory.bytes(at: page.address!, count: 4096).allSatisfy { $0 == 0x5A })
    }

    @Test func aMissingImageIsRefusedByName() throws {
        let hub = EventChannels()
        let host = try HostEventDomain(hub: hub)
        #expect {
            _ = try BlockBackend(path: "/nonexistent/disk.img", readOnly: false, frontend: DomainID(1), store: XenStore(),
                                 grants: GrantTables(), host: host)
        } throws: { ($0 as? BackendError)?.description.contains("/nonexistent/disk.img") == true }
    }
}
