import Foundation
import Synchronization
import Testing
import VireoABI
import VireoCore
import VireoHypercalls
@testable import VireoStore

/// A simulated guest's xenstore client: it writes real requests into the `req` ring of a page
/// of its own memory, notifies its event channel, and reads replies from `rsp`, as a guest's
/// xenbus driver does. The host side is served by `host.poll()` on the test's thread.
final class GuestStoreClient: @unchecked Sendable {
    let hub = EventChannels()
    let grants = GrantTables()
    let host: HostEventDomain
    let guest: SimulatedGuest
    let store: XenStore
    let rings: XenStoreGuestRings
    let frame: GuestFrame
    let page: SharedRegion
    let port: EventPort
    var requests: ByteRing { .xenstoreRequests(page) }
    var responses: ByteRing { .xenstoreResponses(page) }
    private var decoder = XenStoreDecoder()
    private var nextRequest: UInt32 = 1
    var events: [XenStoreMessage] = []
    /// Whether this client runs the host's handlers itself (false when a dispatcher thread does).
    var pollsHost = true

    init(id: DomainID = DomainID(3), quotas: XenStoreQuotas = XenStoreQuotas()) throws {
        host = try HostEventDomain(hub: hub)
        guest = try SimulatedGuest(id: id, ramPages: 64, hub: hub, grantTables: grants)
        frame = try guest.allocatePage()
        page = try guest.page(frame)
        port = try guest.allocUnbound(remote: .zero)
        store = XenStore(quotas: quotas)
        let guest = self.guest
        rings = XenStoreGuestRings(store: store, host: host) { _, frame in try guest.memory.region(frame: frame) }
    }

    func introduce() throws { try store.introduceDomain(guest.id, frame: frame, port: port) }

    var transport: XenStoreRingTransport? { rings.transport(for: guest.id) }

    /// Writes raw bytes into `req`, letting the host consume as it goes.
    func sendRaw(_ bytes: [UInt8]) throws {
        var done = 0
        while done < bytes.count {
            let n = try bytes.withUnsafeBytes { try requests.write(UnsafeRawBufferPointer(rebasing: $0[done...])) }
            done += n
            try guest.notify(port)
            if pollsHost { host.poll() } else if n == 0 { _ = guest.waitForEvents(timeout: .milliseconds(10)) }
        }
    }

    func send(_ m: XenStoreMessage) throws {
        var m = m
        m.requestID = nextRequest
        nextRequest += 1
        try sendRaw(m.encoded)
    }

    /// Reads whatever is in `rsp` into the decoder and tells the host.
    func pump() throws {
        if pollsHost { host.poll() } else { _ = guest.waitForEvents(timeout: .milliseconds(10)) }
        var buffer = [UInt8](repeating: 0, count: 1024)
        let n = try buffer.withUnsafeMutableBytes { try responses.read(into: $0) }
        if n > 0 {
            decoder.append(Array(buffer[0..<n]))
            try guest.notify(port)
            if pollsHost { host.poll() }
        }
    }

    func receive() throws -> XenStoreMessage? {
        for _ in 0..<1000 {
            if let m = try decoder.next() { return m }
            try pump()
        }
        return nil
    }

    func request(_ m: XenStoreMessage) throws -> XenStoreMessage? {
        try send(m)
        while let r = try receive() {
            if r.type == .watchEvent { events.append(r) } else { return r }
        }
        return nil
    }

    func request(_ type: XenStoreMessageType, _ strings: String...) throws -> XenStoreMessage? {
        var payload: [UInt8] = []
        for s in strings { payload += Array(s.utf8); payload.append(0) }
        return try request(XenStoreMessage(type: type, payload: payload))
    }

    var error: UInt32 { page.loadAcquire32(at: 2072) }
}

@Suite struct RingTransportTests {
    @Test func aRequestMakesARealRoundTripThroughTheGuestsPage() throws {
        let g = try GuestStoreClient()
        try g.introduce()
        #expect(g.page.loadAcquire32(at: 2064) == 3, "the store announces reconnection and error reporting")
        let before = g.guest.upcallCount
        let reply = try #require(try g.request(XenStoreMessage(type: .write, payload: Array("data/x\0hello".utf8))))
        #expect(reply.type == .write && reply.text == "OK" && reply.requestID == 1)
        #expect(g.guest.upcallCount > before, "the store notified the guest")
        #expect(try g.request(.read, "data/x")?.text == "hello")
        #expect(try g.request(.read, "/local/domain/3/data/x")?.text == "hello")
        #expect(try g.request(.read, "/local/domain")?.error == .EACCES, "a guest cannot read dom0's nodes")
        #expect(try g.request(.getDomainPath, "3")?.text == "/local/domain/3")
        let dom0 = TestClient(g.store)
        #expect(dom0.read("/local/domain/3/data/x") == "hello")
        #expect(dom0.send(.getPermissions, "/local/domain/3/data/x").strings == ["n3"])
    }

    @Test func watchEventsReachTheGuestThroughTheRing() throws {
        let g = try GuestStoreClient()
        try g.introduce()
        #expect(try g.request(.watch, "device", "tok")?.text == "OK")
        let first = try #require(try g.receive())
        #expect(first.type == .watchEvent && first.strings == ["device", "tok"])
        TestClient(g.store).write("/local/domain/3/device/vif/0/state", "1")
        let event = try #require(try g.receive())
        #expect(event.strings == ["device/vif/0/state", "tok"])
    }

    @Test func longMessagesCrossTheRingInPieces() throws {
        let g = try GuestStoreClient()
        try g.introduce()
        let value = String(repeating: "v", count: 2000)
        #expect(try g.request(XenStoreMessage(type: .write, payload: Array("big\0\(value)".utf8)))?.text == "OK")
        #expect(try g.request(.read, "big")?.text == value)
    }

    @Test func introduceOverTheWireAttachesTheRing() throws {
        let g = try GuestStoreClient()
        let dom0 = TestClient(g.store)
        #expect(isOK(dom0.send(.introduce, "3", String(g.frame.rawValue), String(g.port.rawValue))))
        #expect(g.transport != nil)
        #expect(try g.request(.write, "a", "")?.type == .write)
        #expect(isOK(dom0.send(.release, "3")))
        #expect(g.transport == nil)
        #expect(g.store.statistics.connections == 1, "only dom0's connection is left")
    }

    @Test func outstandingRepliesAreBoundedAndTheGuestStillGetsThemAll() throws {
        let quota = 20
        let g = try GuestStoreClient(quotas: XenStoreQuotas(outstandingRequests: quota))
        try g.introduce()
        TestClient(g.store).write("/local/domain/3/big", String(repeating: "x", count: 500))
        let count = 40
        for _ in 0..<count { try g.send(XenStoreMessage(.read, "big")) }
        let transport = try #require(g.transport)
        #expect(transport.connection.pendingReplies <= quota, "the store stopped taking requests at the quota")
        var replies = 0
        while let r = try g.receive() {
            #expect(r.type == .read && r.payload.count == 500)
            replies += 1
            if replies == count { break }
        }
        #expect(replies == count)
    }

    /// The host's dispatcher on its own thread, a guest sending requests on the test's thread,
    /// and dom0 firing the guest's watch from a third: every reply arrives, in order, and
    /// events interleave between replies only.
    @Test func concurrentDispatchRequestsAndWatchEvents() throws {
        let g = try GuestStoreClient()
        g.pollsHost = false
        try g.introduce()
        let stop = Atomic<Bool>(false)
        let host = g.host
        let dispatcher = Thread { while !stop.load(ordering: .relaxed) { host.dispatch(timeout: .milliseconds(5)) } }
        dispatcher.start()
        defer {
            // Wait for the dispatcher before the guest's page goes away: it may be servicing
            // the ring still (a crash in CI once: the page read after the test had freed it).
            stop.store(true, ordering: .relaxed)
            while !dispatcher.isFinished { usleep(1000) }
        }
        #expect(try g.request(.watch, "hot", "t")?.text == "OK")
        let store = g.store
        let writer = Thread {
            let dom0 = TestClient(store)
            for i in 0..<300 { dom0.write("/local/domain/3/hot/k", "\(i)") }
        }
        writer.start()
        for i in 0..<300 {
            let reply = try #require(try g.request(XenStoreMessage(type: .write, payload: Array("mine/\(i % 7)\0\(i)".utf8))))
            #expect(reply.type == .write && reply.requestID == UInt32(i + 2))
        }
        while writer.isExecuting { usleep(1000) }
        // Drain what is left; every event is well-formed.
        while g.events.count < 2, let m = try g.receive() { g.events.append(m) }
        #expect(g.events.allSatisfy { $0.type == .watchEvent && $0.strings.last == "t" })
        #expect(g.store.check().isEmpty)
    }

    @Test func hostileIndicesStopTheConnectionAndReconnectionRecoversIt() throws {
        let g = try GuestStoreClient()
        try g.introduce()
        // req_prod more than a ring ahead of req_cons.
        g.page.storeRelease32(g.page.loadAcquire32(at: 2048) &+ 5000, at: 2052)
        try g.guest.notify(g.port)
        g.host.poll()
        #expect(g.error == UInt32(VIREO_XENSTORE_ERROR_RINGIDX))
        // Reconnect: the store empties the rings and says CONNECTED.
        g.page.storeRelease32(UInt32(VIREO_XENSTORE_RECONNECT), at: 2068)
        try g.guest.notify(g.port)
        g.host.poll()
        #expect(g.page.loadAcquire32(at: 2068) == UInt32(VIREO_XENSTORE_CONNECTED))
        #expect(g.error == 0)
        #expect(try g.request(.write, "after", "")?.type == .write)
    }

    @Test func anOverlongPayloadIsAProtocolError() throws {
        let g = try GuestStoreClient()
        try g.introduce()
        #expect(try g.request(.watch, "x", "t")?.text == "OK")
        var header = XenStoreMessage(.read, "x").encoded
        header[12] = 0x88; header[13] = 0x13  // len 5000
        try g.sendRaw(Array(header[0..<16]))
        #expect(g.error == UInt32(VIREO_XENSTORE_ERROR_PROTO))
        // The store and other connections carry on.
        let dom0 = TestClient(g.store)
        #expect(isOK(dom0.write("/still", "ok")))
        g.page.storeRelease32(UInt32(VIREO_XENSTORE_RECONNECT), at: 2068)
        try g.guest.notify(g.port)
        g.host.poll()
        #expect(g.page.loadAcquire32(at: 2068) == UInt32(VIREO_XENSTORE_CONNECTED))
        #expect(g.store.statistics.watches == 0, "reconnection drops the guest's watches")
    }
}
