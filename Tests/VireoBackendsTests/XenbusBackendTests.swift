import Foundation
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls
import VireoStore

/// A device that answers each request with its value plus one: the least a device can be, so
/// these tests exercise XenbusBackend's part (the keys, the state walk, connect failures,
/// reconnection, the serve loop) and nothing else.
private struct Ask { var id: UInt32; var value: UInt32 }
private struct Answer { var id: UInt32; var value: UInt32 }

private final class PlusOne: XenbusDevice {
    let kind = "plus1"
    let backendNodes = [(key: "feature-plus", value: "1")]
    let frontendNodes = [(key: "flavour", value: "plain")]
    struct Connection {
        let link: FrontendLink
        let ring: MappedBackRing<Ask, Answer>
        let port: EventPort
    }
    func connect(_ frontend: FrontendLink) throws(BackendError) -> Connection {
        Connection(link: frontend, ring: try frontend.mapRing("ring-ref"), port: try frontend.bindEvent("event-channel"))
    }
    func serve(_ connection: Connection) throws(BackendError) {
        try connection.ring.serve(notifying: connection.port, from: connection.link.host) { ask, answer in
            answer.set(\.id, to: ask.id)
            answer.set(\.value, to: ask.value &+ 1)
        }
    }
    func disconnect(_ connection: Connection) { try? connection.link.host.close(connection.port) }
}

private final class Rig {
    let hub = EventChannels()
    let grants = GrantTables()
    let store = XenStore()
    let guest: SimulatedGuest
    let host: HostEventDomain
    let backend: XenbusBackend<PlusOne>
    let guestStore: XenStoreConnection
    private var dispatcher: HostEventDispatcher?
    private let thread: Thread

    init() throws {
        guest = try SimulatedGuest(id: DomainID(1), ramPages: 64, hub: hub, grantTables: grants)
        host = try HostEventDomain(hub: hub)
        try store.introduceDomain(guest.id)
        backend = try XenbusBackend(PlusOne(), frontend: guest.id, handle: 3, store: store, grants: grants, host: host)
        try backend.create()
        guestStore = store.connect(domain: guest.id)
        dispatcher = HostEventDispatcher(host, name: "test-xenbus-events")
        let backend = self.backend
        thread = Thread { backend.run() }
        thread.start()
    }

    func shutdown() {
        backend.stop()
        dispatcher?.stop()
        while !thread.isFinished { usleep(1000) }
    }
    deinit { shutdown() }

    @discardableResult
    func write(_ path: String, _ value: String) -> XenStoreMessageType? {
        store.request(XenStoreMessage(type: .write, payload: Array(path.utf8) + [0] + Array(value.utf8)), from: guestStore)?.type
    }

    func read(_ path: String) -> String? {
        guard let reply = store.request(XenStoreMessage(.read, path), from: guestStore), reply.type == .read else { return nil }
        return String(decoding: reply.payload, as: UTF8.self)
    }

    func wait(for state: UInt32) throws {
        let deadline = ContinuousClock.now.advanced(by: .seconds(10))
        while read(backend.backendPath + "/state") != "\(state)" {
            guard ContinuousClock.now < deadline else {
                throw BackendError("backend never reached \(state): \(backend.lastFailure ?? "-")")
            }
            usleep(1000)
        }
    }

    /// The frontend's half, with the ring-ref it is told to write.
    func offer(ringRef: String? = nil) throws -> (ring: FrontRing<Ask, Answer>, ref: GrantRef, port: EventPort, frame: GuestFrame) {
        let frame = try guest.allocatePage()
        let ring: FrontRing<Ask, Answer> = try guest.frontRing(on: frame)
        let ref = try guest.grantAccess(to: host.id, frame: frame, readOnly: false)
        let port = try guest.allocUnbound(remote: host.id)
        let node = backend.frontendPath
        write(node + "/ring-ref", ringRef ?? "\(ref.rawValue)")
        write(node + "/event-channel", "\(port.rawValue)")
        write(node + "/state", "\(XenbusBackendState.initialised)")
        return (ring, ref, port, frame)
    }
}

@Suite struct XenbusBackendTests {
    @Test func theToolstackNodesCarryXensPermissions() throws {
        let rig = try Rig()
        let back = rig.backend.backendPath, front = rig.backend.frontendPath
        #expect(back == "/local/domain/0/backend/plus1/1/3" && front == "/local/domain/1/device/plus1/3")
        #expect(rig.read(back + "/frontend") == front && rig.read(back + "/frontend-id") == "1")
        #expect(rig.read(back + "/online") == "1" && rig.read(back + "/feature-plus") == "1")
        #expect(rig.read(front + "/backend") == back && rig.read(front + "/backend-id") == "0")
        #expect(rig.read(front + "/flavour") == "plain")
        #expect(rig.read(back + "/state") == "\(XenbusBackendState.initWait)")
        #expect(rig.write(back + "/feature-plus", "0") == .error, "the frontend may not write the backend's nodes")
        #expect(rig.write(back + "/extra", "1") == .error, "nor add to the backend's directory")
        #expect(rig.write(front + "/anything", "1") == .write, "the frontend's directory is its own")
    }

    @Test func aConnectedDeviceServesItsRing() throws {
        let rig = try Rig()
        var (ring, _, port, _) = try rig.offer()
        try rig.wait(for: XenbusBackendState.connected)
        #expect(rig.backend.connections == 1)
        for i: UInt32 in 0..<100 {
            try ring.produceRequest(Ask(id: i, value: i * 10))
            if ring.pushRequestsAndCheckNotify() { try rig.guest.notify(port) }
            var answer: Answer? = nil
            let deadline = ContinuousClock.now.advanced(by: .seconds(10))
            while answer == nil {
                answer = try ring.consumeResponse()
                if answer == nil, try !ring.finalCheckForResponses() { _ = rig.guest.waitForEvents(timeout: .milliseconds(20)) }
                guard ContinuousClock.now < deadline else { throw BackendError("no answer to \(i)") }
            }
            #expect(answer?.id == i && answer?.value == i * 10 + 1)
        }
    }

    @Test func aBadRingRefIsRefusedByNameAndTheFrontendMayComeBack() throws {
        let rig = try Rig()
        let front = rig.backend.frontendPath
        _ = try rig.offer(ringRef: "12x")
        try rig.wait(for: XenbusBackendState.closing)
        #expect(rig.backend.lastFailure?.contains(front + "/ring-ref") == true, "\(rig.backend.lastFailure ?? "-")")
        rig.write(front + "/state", "\(XenbusBackendState.closed)")
        try rig.wait(for: XenbusBackendState.closed)
        // A reference the frontend never granted: refused by name too.
        rig.write(front + "/state", "\(XenbusBackendState.initialising)")
        try rig.wait(for: XenbusBackendState.initWait)
        _ = try rig.offer(ringRef: "4000")
        try rig.wait(for: XenbusBackendState.closing)
        #expect(rig.backend.lastFailure?.contains("ring-ref 4000: cannot map") == true, "\(rig.backend.lastFailure ?? "-")")
        // Back through Closed and Initialising with good keys: connected.
        rig.write(front + "/state", "\(XenbusBackendState.closed)")
        try rig.wait(for: XenbusBackendState.closed)
        rig.write(front + "/state", "\(XenbusBackendState.initialising)")
        try rig.wait(for: XenbusBackendState.initWait)
        _ = try rig.offer()
        try rig.wait(for: XenbusBackendState.connected)
        #expect(rig.backend.lastFailure == nil && rig.backend.connections == 1)
    }

    @Test func aProducerIndexOutOfRangeDropsTheConnectionOnly() throws {
        let rig = try Rig()
        let (_, ref, port, frame) = try rig.offer()
        try rig.wait(for: XenbusBackendState.connected)
        // The frontend claims 1000 requests in a 256-slot ring.
        try rig.guest.page(frame).store(UInt32(1000), at: RingLayout.requestProducerOffset)
        try rig.guest.notify(port)
        try rig.wait(for: XenbusBackendState.closing)
        #expect(rig.backend.lastFailure?.contains("ring protocol error") == true, "\(rig.backend.lastFailure ?? "-")")
        #expect(rig.guest.endAccess(ref), "the ring's mapping ended with the connection")
    }
}
