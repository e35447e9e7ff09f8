import Foundation
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoStore

/// A device with no ring: it connects when the frontend's `token` is a number, serves on a
/// ``ServiceWorker`` of its own that gives up when told to, and counts what XenbusBackend
/// asks of it. These tests exercise the control loop's parts every backend shares: poll()
/// driving, the worker's failure report, a frontend that goes away, a loop that sleeps.
private final class Probe: XenbusDevice, @unchecked Sendable {  // counters are atomics
    let kind = "probe"
    let backendNodes: [(key: String, value: String)] = []
    let frontendNodes: [(key: String, value: String)] = []
    let serves = Atomic<Int>(0)
    let disconnects = Atomic<Int>(0)
    let workerPasses = Atomic<Int>(0)
    let giveUp = Atomic<Bool>(false)

    struct Statistics: Sendable, Equatable { var serves: Int; var disconnects: Int }
    var statistics: Statistics {
        Statistics(serves: serves.load(ordering: .relaxed), disconnects: disconnects.load(ordering: .relaxed))
    }

    final class Connection {
        let worker: ServiceWorker
        init(worker: ServiceWorker) { self.worker = worker }
    }

    func connect(_ frontend: FrontendLink) throws(BackendError) -> Connection {
        _ = try frontend.number("token")
        let worker = try ServiceWorker(name: "probe-worker")
        worker.start(for: frontend) { [self] () throws(BackendError) in
            workerPasses.add(1, ordering: .relaxed)
            if giveUp.load(ordering: .acquiring) { throw BackendError("the worker gave up") }
        }
        return Connection(worker: worker)
    }

    func serve(_ connection: Connection) throws(BackendError) { serves.add(1, ordering: .relaxed) }

    func disconnect(_ connection: Connection) {
        connection.worker.stop()
        disconnects.add(1, ordering: .relaxed)
    }
}

private final class ProbeRig {
    let hub = EventChannels()
    let grants = GrantTables()
    let store = XenStore()
    let guest: SimulatedGuest
    let host: HostEventDomain
    let probe = Probe()
    let backend: XenbusBackend<Probe>
    let guestStore: XenStoreConnection

    init() throws {
        guest = try SimulatedGuest(id: DomainID(1), ramPages: 16, hub: hub, grantTables: grants)
        host = try HostEventDomain(hub: hub)
        try store.introduceDomain(guest.id)
        backend = try XenbusBackend(probe, frontend: guest.id, handle: 0, store: store, grants: grants, host: host)
        try backend.create()
        guestStore = store.connect(domain: guest.id)
    }

    func write(_ key: String, _ value: String) {
        let path = backend.frontendPath + "/" + key
        _ = store.request(XenStoreMessage(type: .write, payload: Array(path.utf8) + [0] + Array(value.utf8)), from: guestStore)
    }

    func setState(_ state: UInt32) { write("state", "\(state)") }

    /// The frontend's keys, then its state.
    func offer(token: String, state: UInt32 = XenbusBackendState.initialised) {
        write("token", token)
        setState(state)
    }

    /// Polls until the backend reaches `state` (a worker's report arrives from its thread).
    func poll(until state: UInt32) throws {
        let deadline = ContinuousClock.now.advanced(by: .seconds(10))
        while backend.state != state {
            backend.poll()
            guard ContinuousClock.now < deadline else {
                throw BackendError("backend never reached \(state): \(backend.lastFailure ?? "-")")
            }
            usleep(1000)
        }
    }
}

@Suite struct XenbusBackendLoopTests {
    @Test func pollDrivesTheWholeWalkWithoutThreads() throws {
        let rig = try ProbeRig()
        #expect(rig.backend.state == XenbusBackendState.initWait)
        rig.offer(token: "7")
        rig.backend.poll()  // the watch fired when the frontend wrote its state: read at once
        #expect(rig.backend.state == XenbusBackendState.connected && rig.backend.connections == 1)
        rig.backend.poll()
        #expect(rig.backend.statistics.serves >= 1, "a connected device is served on each pass")
        rig.setState(XenbusBackendState.closing)
        rig.backend.poll()
        #expect(rig.backend.state == XenbusBackendState.closing && rig.probe.statistics.disconnects == 1)
        rig.setState(XenbusBackendState.closed)
        rig.backend.poll()
        #expect(rig.backend.state == XenbusBackendState.closed)
        // The frontend comes back.
        rig.setState(XenbusBackendState.initialising)
        rig.backend.poll()
        #expect(rig.backend.state == XenbusBackendState.initWait)
        rig.setState(XenbusBackendState.connected)  // Linux frontends may skip Initialised
        rig.backend.poll()
        #expect(rig.backend.state == XenbusBackendState.connected && rig.backend.connections == 2)
        rig.backend.finish()
        #expect(rig.probe.statistics.disconnects == 2, "finish() lets the connection go")
        #expect(rig.backend.protocolErrors == 0 && rig.backend.lastFailure == nil)
    }

    @Test func aConnectFailureNamesTheKey() throws {
        let rig = try ProbeRig()
        rig.offer(token: "seven")
        rig.backend.poll()
        #expect(rig.backend.state == XenbusBackendState.closing)
        #expect(rig.backend.lastFailure?.contains(rig.backend.frontendPath + "/token") == true, "\(rig.backend.lastFailure ?? "-")")
        #expect(rig.backend.connections == 0 && rig.backend.protocolErrors == 0)
        rig.backend.finish()
    }

    @Test func aWorkerThatFailsDropsItsConnectionThroughTheControlLoop() throws {
        let rig = try ProbeRig()
        rig.offer(token: "1")
        try rig.poll(until: XenbusBackendState.connected)
        rig.probe.giveUp.store(true, ordering: .releasing)
        try rig.poll(until: XenbusBackendState.closing)  // the worker's next pass (at most 100 ms)
        #expect(rig.backend.lastFailure == rig.backend.frontendPath + ": the worker gave up")
        #expect(rig.backend.protocolErrors == 1 && rig.probe.statistics.disconnects == 1)
        // Through Closed and back: a new connection and a new worker.
        rig.probe.giveUp.store(false, ordering: .releasing)
        rig.setState(XenbusBackendState.closed)
        try rig.poll(until: XenbusBackendState.closed)
        rig.setState(XenbusBackendState.initialising)
        try rig.poll(until: XenbusBackendState.initWait)
        rig.setState(XenbusBackendState.initialised)
        try rig.poll(until: XenbusBackendState.connected)
        let passes = rig.probe.workerPasses.load(ordering: .relaxed)
        let deadline = ContinuousClock.now.advanced(by: .seconds(10))
        while rig.probe.workerPasses.load(ordering: .relaxed) == passes && ContinuousClock.now < deadline { usleep(1000) }
        #expect(rig.probe.workerPasses.load(ordering: .relaxed) > passes, "the new connection's worker runs")
        rig.backend.finish()
        #expect(rig.backend.connections == 2 && rig.probe.statistics.disconnects == 2)
    }

    @Test func aFrontendWhoseDomainIsReleasedIsLetGo() throws {
        let rig = try ProbeRig()
        rig.offer(token: "1", state: XenbusBackendState.connected)
        rig.backend.poll()
        #expect(rig.backend.state == XenbusBackendState.connected)
        try rig.store.releaseDomain(rig.guest.id)  // its home, the frontend's directory included, goes
        rig.backend.poll()
        #expect(rig.backend.state == XenbusBackendState.closed)
        #expect(rig.probe.statistics.disconnects == 1)
        rig.backend.finish()
        #expect(rig.probe.statistics.disconnects == 1)
    }

    /// The control loop sleeps between wake-ups: requests' replies do not wake it (they come on
    /// another XenStore session than the watch), so an idle connected device is served about
    /// every 100 ms, not in a spin.
    @Test func anIdleLoopSleeps() throws {
        let rig = try ProbeRig()
        let backend = rig.backend
        let thread = Thread { backend.run() }
        thread.start()
        defer {
            backend.stop()
            while !thread.isFinished { usleep(1000) }
        }
        rig.offer(token: "1")
        let deadline = ContinuousClock.now.advanced(by: .seconds(10))
        while backend.state != XenbusBackendState.connected && ContinuousClock.now < deadline { usleep(1000) }
        #expect(backend.state == XenbusBackendState.connected)
        let before = rig.probe.serves.load(ordering: .relaxed)
        usleep(500_000)
        let passes = rig.probe.serves.load(ordering: .relaxed) - before
        #expect(passes <= 20, "\(passes) passes in half a second of quiet")
    }
}
