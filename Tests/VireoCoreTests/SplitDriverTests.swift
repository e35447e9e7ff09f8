import Foundation
import Synchronization
import Testing
import VireoABI
import VireoHypercalls
@testable import VireoCore

typealias BlkRequest = vireo_blkif_request
typealias BlkResponse = vireo_blkif_response

/// A block backend over a memory "disk", built from the core alone: it maps the frontend's ring
/// grant, binds the frontend's event channel from the host domain, serves requests with grant
/// copy, and answers through the ring. It validates every request field it uses, copying the
/// request out of the ring once. (The real blkback, over files, builds on the same pieces.)
final class MemoryDiskBackend: @unchecked Sendable {  // driven by one thread at a time
    let disk: SharedRegion
    private let diskBytes: UnsafeMutableRawPointer
    let grants: GrantTables
    let host: HostEventDomain
    let frontend: DomainID
    var served = 0
    var errors = 0
    var notifications = 0

    init(sectors: Int, grants: GrantTables, host: HostEventDomain, frontend: DomainID) {
        diskBytes = UnsafeMutableRawPointer.allocate(byteCount: sectors * 512, alignment: 4096)
        diskBytes.initializeMemory(as: UInt8.self, repeating: 0, count: sectors * 512)
        disk = .unsafe(diskBytes, count: sectors * 512)
        self.grants = grants
        self.host = host
        self.frontend = frontend
    }

    deinit { diskBytes.deallocate() }

    /// Serves until `stop` is set and the ring is idle.
    func serve(ringRef: GrantRef, remotePort: EventPort, stop: borrowing Atomic<Bool>) throws {
        guard let table = grants.table(for: frontend) else { throw GrantStatus.badDomain }
        let ringMapping = try table.map(ringRef, by: host.id, readOnly: false)
        var back = try BackRing<BlkRequest, BlkResponse>(attaching: try ringMapping.sharedRegion())
        let port = try host.bindInterdomain(remoteDomain: frontend, remotePort: remotePort)
        defer { try? host.close(port) }
        while true {
            while let request = try back.consumeRequest() {
                let status = handle(request)
                if status != Int16(VIREO_BLKIF_RSP_OKAY) { errors += 1 }
                try back.produceResponse { slot in
                    slot.set(\.id, to: request.id)
                    slot.set(\.operation, to: request.operation)
                    slot.set(\.status, to: status)
                }
                served += 1
            }
            if back.pushResponsesAndCheckNotify() {
                notifications += 1
                try host.send(port)
            }
            if try back.finalCheckForRequests() { continue }
            if stop.load(ordering: .acquiring) { return }
            _ = host.dispatch(timeout: .milliseconds(5))
        }
    }

    /// One request: every field is checked before any byte moves.
    func handle(_ request: BlkRequest) -> Int16 {
        let error = Int16(VIREO_BLKIF_RSP_ERROR)
        let write: Bool
        switch Int32(request.operation) {
        case VIREO_BLKIF_OP_READ: write = false
        case VIREO_BLKIF_OP_WRITE: write = true
        default: return Int16(VIREO_BLKIF_RSP_EOPNOTSUPP)
        }
        let count = Int(request.nr_segments)
        guard count >= 1, count <= Int(VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST) else { return error }
        var sector = request.sector_number
        for segment in (0..<count).map(request.segment) {
            guard segment.first_sect <= segment.last_sect, segment.last_sect < 8 else { return error }
            let sectors = UInt64(segment.last_sect - segment.first_sect) + 1
            let (end, overflow) = sector.addingReportingOverflow(sectors)
            guard !overflow, end <= UInt64(disk.count / 512) else { return error }
            let pageOffset = Int(segment.first_sect) * 512
            let diskOffset = Int(sector) * 512
            let grant = GrantCopyEndpoint.grant(frontend, GrantRef(segment.gref), offset: pageOffset)
            let local = GrantCopyEndpoint.local(disk, offset: diskOffset)
            let status = grants.copy(
                GrantCopySegment(source: write ? grant : local, dest: write ? local : grant, length: Int(sectors) * 512),
                by: host.id)
            guard status == .okay else { return error }
            sector = end
        }
        return Int16(VIREO_BLKIF_RSP_OKAY)
    }
}

/// A frontend and a backend connected the Xen way, through real grants, a real ring and real
/// event channels, on two threads: the simulated guest is the frontend, the host domain serves.
@Suite struct SplitDriverTests {
    struct Connection {
        let hub = EventChannels()
        let grants = GrantTables()
        let guest: SimulatedGuest
        let host: HostEventDomain
        let backend: MemoryDiskBackend
        var front: FrontRing<BlkRequest, BlkResponse>
        let ringRef: GrantRef
        let port: EventPort

        init(sectors: Int = 2048) throws {
            guest = try SimulatedGuest(id: DomainID(1), ramPages: 512, hub: hub, grantTables: grants)
            host = try HostEventDomain(hub: hub)
            backend = MemoryDiskBackend(sectors: sectors, grants: grants, host: host, frontend: guest.id)
            // What a frontend publishes in XenStore: ring-ref and event-channel.
            let ringFrame = try guest.allocatePage()
            front = try guest.frontRing(on: ringFrame)
            ringRef = try guest.grantAccess(to: host.id, frame: ringFrame, readOnly: false)
            port = try guest.allocUnbound(remote: host.id)
        }
    }

    static func request(_ op: Int32, id: UInt64, sector: UInt64, grants: [(GrantRef, UInt8, UInt8)]) -> BlkRequest {
        var r = BlkRequest()
        r.operation = UInt8(op)
        r.nr_segments = UInt8(grants.count)
        r.id = id
        r.sector_number = sector
        for (i, g) in grants.enumerated() {
            r.setSegment(i, gref: g.0.rawValue, firstSector: g.1, lastSector: g.2)
        }
        return r
    }

    /// Pushes `requests` through the ring (waiting for room when it is full) and collects every
    /// response, sleeping on the event channel in between.
    static func run(_ c: inout Connection, _ requests: [BlkRequest]) throws -> [UInt64: Int16] {
        var responses: [UInt64: Int16] = [:]
        var next = 0
        let deadline = ContinuousClock.now.advanced(by: .seconds(30))
        while responses.count < requests.count {
            while next < requests.count, c.front.freeRequests > 0 {
                try c.front.produceRequest(requests[next])
                next += 1
            }
            if c.front.pushRequestsAndCheckNotify() { try c.guest.notify(c.port) }
            while let r = try c.front.consumeResponse() { responses[r.id] = r.status }
            if responses.count == requests.count { break }
            if try c.front.finalCheckForResponses() { continue }
            _ = c.guest.waitForEvents(timeout: .milliseconds(20))
            guard ContinuousClock.now < deadline else { throw GrantStatus.generalError }
        }
        return responses
    }

    @Test func blockRequestsRoundTripThroughGrantsRingAndEvents() throws {
        var c = try Connection()
        let stop = Atomic<Bool>(false)
        let backend = c.backend, ringRef = c.ringRef, port = c.port
        let failure = Mutex<String?>(nil)
        let server = Thread {
            do { try backend.serve(ringRef: ringRef, remotePort: port, stop: stop) } catch {
                failure.withLock { $0 = "\(error)" }
            }
        }
        server.start()

        // 64 pages of patterns, written as 64 requests through a 32-slot ring (many in flight).
        var writes: [BlkRequest] = [], reads: [BlkRequest] = []
        var readPages: [(GuestFrame, GrantRef)] = []
        var allRefs: [GrantRef] = []
        for i in 0..<64 {
            let page = try c.guest.allocatePage()
            try c.guest.page(page).withUnsafeMutableBytes(offset: 0, count: 4096) { bytes in
                for j in 0..<4096 { bytes[j] = UInt8(truncatingIfNeeded: i &* 31 &+ j) }
            }
            let ref = try c.guest.grantAccess(to: .zero, frame: page, readOnly: true)
            writes.append(Self.request(VIREO_BLKIF_OP_WRITE, id: UInt64(i), sector: UInt64(i * 8), grants: [(ref, 0, 7)]))
            let target = try c.guest.allocatePage()
            let targetRef = try c.guest.grantAccess(to: .zero, frame: target, readOnly: false)
            reads.append(Self.request(VIREO_BLKIF_OP_READ, id: UInt64(1000 + i), sector: UInt64(i * 8), grants: [(targetRef, 0, 7)]))
            readPages.append((target, targetRef))
            allRefs += [ref, targetRef]
        }
        let written = try Self.run(&c, writes)
        #expect(written.count == 64 && written.values.allSatisfy { $0 == Int16(VIREO_BLKIF_RSP_OKAY) })
        // The backend's disk holds the patterns (checked from the host side).
        for i in [0, 17, 63] {
            #expect(c.backend.disk.load(UInt8.self, at: i * 4096 + 5) == UInt8(truncatingIfNeeded: i &* 31 &+ 5))
        }
        let read = try Self.run(&c, reads)
        #expect(read.count == 64 && read.values.allSatisfy { $0 == Int16(VIREO_BLKIF_RSP_OKAY) })
        for (i, (page, _)) in readPages.enumerated() {
            let bytes = try c.guest.memory.bytes(at: page.address!, count: 4096)
            #expect(bytes == (0..<4096).map { UInt8(truncatingIfNeeded: i &* 31 &+ $0) }, "page \(i) read back")
        }
        stop.store(true, ordering: .releasing)
        c.host.interrupt()
        while !server.isFinished { usleep(1000) }
        #expect(failure.withLock { $0 } == nil)
        #expect(c.backend.served == 128)
        #expect(c.backend.notifications < 128, "event suppression: fewer notifications than responses")
        // Every data grant is free again (copies hold no pin); the ring grant is mapped until the
        // backend's mapping went away with serve().
        for ref in allRefs { #expect(c.guest.endAccess(ref)) }
        #expect(c.guest.endAccess(c.ringRef))
    }

    /// A hostile frontend's bad requests get error responses; the backend carries on.
    @Test func badRequestsGetErrorsAndTheBackendCarriesOn() throws {
        var c = try Connection(sectors: 64)
        let stop = Atomic<Bool>(false)
        let backend = c.backend, ringRef = c.ringRef, port = c.port
        let server = Thread { try? backend.serve(ringRef: ringRef, remotePort: port, stop: stop) }
        server.start()
        let page = try c.guest.allocatePage()
        let ref = try c.guest.grantAccess(to: .zero, frame: page, readOnly: false)
        let readOnlyRef = try c.guest.grantAccess(to: .zero, frame: page, readOnly: true)
        var tooMany = Self.request(VIREO_BLKIF_OP_READ, id: 1, sector: 0, grants: [(ref, 0, 7)])
        tooMany.nr_segments = 200
        let requests = [
            tooMany,
            Self.request(VIREO_BLKIF_OP_READ, id: 2, sector: 60, grants: [(ref, 0, 7)]),          // past the disk's end
            Self.request(VIREO_BLKIF_OP_READ, id: 3, sector: UInt64.max - 2, grants: [(ref, 0, 7)]),  // overflows
            Self.request(VIREO_BLKIF_OP_READ, id: 4, sector: 0, grants: [(ref, 5, 2)]),           // first > last
            Self.request(VIREO_BLKIF_OP_READ, id: 5, sector: 0, grants: [(GrantRef(99_999), 0, 7)]),  // bad gref
            Self.request(VIREO_BLKIF_OP_READ, id: 6, sector: 0, grants: [(readOnlyRef, 0, 7)]),   // read into r/o
            Self.request(42, id: 7, sector: 0, grants: [(ref, 0, 7)]),                             // unknown op
            Self.request(VIREO_BLKIF_OP_READ, id: 8, sector: 0, grants: [(ref, 0, 7)]),           // fine
        ]
        let responses = try Self.run(&c, requests)
        let error = Int16(VIREO_BLKIF_RSP_ERROR)
        #expect(responses == [1: error, 2: error, 3: error, 4: error, 5: error, 6: error,
                              7: Int16(VIREO_BLKIF_RSP_EOPNOTSUPP), 8: Int16(VIREO_BLKIF_RSP_OKAY)])
        stop.store(true, ordering: .releasing)
        c.host.interrupt()
        while !server.isFinished { usleep(1000) }
    }

    /// The frontend's domain dies while the backend has its ring mapped: the mapping ends, the
    /// event channel goes quiet, and a new domain with the same ID starts clean.
    @Test func frontendDeathEndsTheConnection() throws {
        let c = try Connection()
        let table = try #require(c.grants.table(for: c.guest.id))
        let mapping = try table.map(c.ringRef, by: .zero, readOnly: false)
        let backendPort = try c.host.bindInterdomain(remoteDomain: c.guest.id, remotePort: c.port)
        c.guest.destroy()
        let valid = mapping.isValid
        #expect(!valid)
        #expect(throws: GrantStatus.badDomain) { _ = try table.map(c.ringRef, by: .zero, readOnly: false) }
        let status = try c.hub.status(caller: .zero, domain: .zero, port: backendPort)
        #expect(status.binding == .unbound(remote: c.guest.id), "the backend's port waits for a new peer")
        let reborn = try SimulatedGuest(id: c.guest.id, ramPages: 64, hub: c.hub, grantTables: c.grants)
        #expect(reborn.takePendingEvents().isEmpty)
        #expect(c.grants.table(for: reborn.id) === reborn.grantTable)
    }
}
