import Foundation
import Glibc
import VireoABI
import VireoBackends
import VireoBench
import VireoCore
import VireoHypercalls
import VireoStore

/// `vireo bench net`: frames from one simulated frontend (domain 1) through its netback, an
/// in-process switch and a second netback into the posted receive pages of another simulated
/// frontend (domain 2): the real backends, switch, grant copies, rings and event channels, with
/// a ring's worth in flight. The main figures run on one thread, each backend served by its
/// `poll()` in turn, so they are the CPU cost of the path, not of thread wake-ups; the
/// `threaded_*` fields then run each backend's `run()` loop on its own thread, woken by events.
///
/// Two kinds of frontend, alternated phase by phase in each round: one that keeps its ring
/// pages mapped in the backend through Xen's static grants (ADD_GREF_MAPPING on the control
/// ring), so no page is pinned per frame (`value`, `ratio`, `pps_64`, `cpu_*`), and one that
/// grants each page per copy as Linux's netfront does (the `per_copy_*` fields). The threaded
/// phase measures both too: `threaded_*` per copy, `threaded_static_*` with static grants.
/// Baseline: memcpy of the same bytes (one copy per frame, between page-sized buffers as
/// many as the ring's pages) in the same run. `value` is Gbit/s at 1500-byte frames, `ratio`
/// that against memcpy; 64-byte frames per second are extra fields, and so are the CPU time
/// per frame of the path and of the baseline (this thread's clock, over every round) and their
/// ratio, which a busy host disturbs less than the wall-clock figures.
public struct NetBenchmark: Benchmark {
    public let name = "net"
    public let summary = "netback frames guest -> switch -> guest: Gbit/s at 1500 B and frames/s at 64 B, beside memcpy of the same bytes"

    public init() {}

    /// One kind of frontend's figures over every round.
    private struct Phases {
        var large: [Measure.Rate] = [], small: [Measure.Rate] = []
        // The same phases in this thread's CPU time: on a shared host a phase that loses the
        // core for a while loses wall-clock time, not CPU time.
        var largeCPU = ThreadCPU(), smallCPU = ThreadCPU()

        /// One phase of `seconds` running `batch` (which returns the frames it moved), counted
        /// with the 1500-byte (`large`) or the 64-byte figures.
        mutating func measure(large: Bool, seconds: Double, _ batch: () throws -> UInt64) rethrows {
            if large {
                self.large.append(try Measure.rate(seconds: seconds) { try largeCPU.count(batch) })
            } else {
                small.append(try Measure.rate(seconds: seconds) { try smallCPU.count(batch) })
            }
        }

        /// The figures every kind of frontend reports, named `prefix` + gbit_1500, ratio (over
        /// `baseline` Gbit/s), pps_64 and cpu_ns_per_frame_1500 and _64.
        func fields(_ prefix: String, baseline: Double) -> [(key: String, value: JSONValue)] {
            let gbit = Measure.median(large).perSecond * 1500 * 8 / 1e9
            return [(prefix + "gbit_1500", .number(gbit)),
                    (prefix + "ratio", .number(gbit / baseline)),
                    (prefix + "pps_64", .number(Measure.median(small).perSecond.rounded())),
                    (prefix + "cpu_ns_per_frame_1500", .number(largeCPU.nanosecondsPerFrame)),
                    (prefix + "cpu_ns_per_frame_64", .number(smallCPU.nanosecondsPerFrame))]
        }
    }

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        let rig = try NetBenchRig(benchmark: name)
        defer { rig.finish() }
        let seconds = options.phaseSeconds
        let rounds = options.quick ? 1 : 3
        let batch = options.quick ? 2048 : 32768
        var statics = Phases(), perCopy = Phases(), base = Phases()
        let copier = Copier(pages: NetBenchRig.slots)
        defer { copier.release() }
        /// One phase of `bytes`-byte frames for each kind of frontend: static grants, then per copy.
        func measureBothGrants(_ statics: inout Phases, _ perCopy: inout Phases, bytes: Int) throws {
            try rig.load(frameBytes: bytes)
            try rig.useStaticGrants(true)
            try statics.measure(large: bytes == 1500, seconds: seconds) { UInt64(try rig.drive(batch)) }
            try rig.useStaticGrants(false)
            try perCopy.measure(large: bytes == 1500, seconds: seconds) { UInt64(try rig.drive(batch)) }
        }
        for round in 1...rounds {
            options.log("net: round \(round): 1500-byte and 64-byte frames, static grants, per-copy grants and memcpy")
            for bytes in [1500, 64] {
                try measureBothGrants(&statics, &perCopy, bytes: bytes)
                base.measure(large: bytes == 1500, seconds: seconds) { copier.copy(batch, bytes: bytes) }
            }
        }
        let gbit = { (rate: Measure.Rate, bytes: Int) in rate.perSecond * Double(bytes) * 8 / 1e9 }
        // Last, the deployed shape: each backend on its own thread, woken by events.
        options.log("net: backends on their own threads, woken by events")
        // The CPU time is the whole process's (every thread's: the frontends', both backends',
        // the idle dispatcher's), per frame: what the deployed shape costs the host beside
        // what it delivers.
        rig.startThreads()
        var threaded = Phases(largeCPU: ThreadCPU(clock: CLOCK_PROCESS_CPUTIME_ID), smallCPU: ThreadCPU(clock: CLOCK_PROCESS_CPUTIME_ID))
        var threadedStatics = threaded
        for round in 1...rounds {
            options.log("net: threaded round \(round), per-copy and static grants")
            for bytes in [1500, 64] { try measureBothGrants(&threadedStatics, &threaded, bytes: bytes) }
        }
        let value = gbit(Measure.median(statics.large), 1500), baseline = gbit(Measure.median(base.large), 1500)
        let a = rig.sender.statistics, b = rig.receiver.statistics
        guard a.txErrors == 0, a.txDropped == 0, b.rxErrors == 0, b.rxDropped == 0 else {
            throw BenchmarkError.unavailable(name: name, reason: "frames were lost: sender \(a), receiver \(b)")
        }
        return BenchmarkResult(
            bench: name, value: value, unit: "Gbit/s", baseline: baseline,
            baselineName: "memcpy of the same 1500-byte frames",
            goal: ">= 0.3x memcpy at 1500 B; >= 1 M frames/s at 64 B",
            extra: [
                ("ratio_goal", .number(0.3)),
                ("grants", .string("static (ADD_GREF_MAPPING on the control ring); per_copy_*: a grant pinned per copy")),
                ("pps_64", .number(Measure.median(statics.small).perSecond.rounded())),
                ("pps_64_goal", .number(1e6)),
                ("pps_64_baseline", .number(Measure.median(base.small).perSecond.rounded())),
                ("pps_64_baseline_name", .string("memcpy of the same 64-byte frames")),
                ("pps_1500", .number(Measure.median(statics.large).perSecond.rounded())),
                ("cpu_ns_per_frame_1500", .number(statics.largeCPU.nanosecondsPerFrame)),
                ("cpu_ns_per_frame_1500_baseline", .number(base.largeCPU.nanosecondsPerFrame)),
                ("ratio_cpu", .number(base.largeCPU.nanosecondsPerFrame / statics.largeCPU.nanosecondsPerFrame)),
                ("cpu_ns_per_frame_64", .number(statics.smallCPU.nanosecondsPerFrame)),
                ("cpu_ns_per_frame_64_baseline", .number(base.smallCPU.nanosecondsPerFrame)),
                ("per_copy_ratio_cpu", .number(base.largeCPU.nanosecondsPerFrame / perCopy.largeCPU.nanosecondsPerFrame)),
            ] + perCopy.fields("per_copy_", baseline: baseline)
              + threaded.fields("threaded_", baseline: baseline)
              + threadedStatics.fields("threaded_static_", baseline: baseline) + [
                ("in_flight", .integer(Int64(NetBenchRig.slots))),
                ("frames", .integer(Int64(b.rxPackets))),
            ])
    }
}

/// Frames and the CPU time spent on them (the calling thread's, or with
/// `CLOCK_PROCESS_CPUTIME_ID` every thread's), summed over every call of ``count(_:)``.
private struct ThreadCPU {
    var clock = CLOCK_THREAD_CPUTIME_ID
    var frames: UInt64 = 0
    var nanoseconds: UInt64 = 0

    var nanosecondsPerFrame: Double { frames == 0 ? 0 : Double(nanoseconds) / Double(frames) }

    /// Runs `batch` (which returns the frames it moved) and adds its frames and CPU time.
    mutating func count(_ batch: () throws -> UInt64) rethrows -> UInt64 {
        let start = Self.now(clock)
        let frames = try batch()
        nanoseconds &+= Self.now(clock) &- start
        self.frames &+= frames
        return frames
    }

    private static func now(_ clock: clockid_t) -> UInt64 {
        var t = timespec()
        clock_gettime(clock, &t)
        return UInt64(t.tv_sec) &* 1_000_000_000 &+ UInt64(t.tv_nsec)
    }
}

/// The baseline: one memcpy per frame between page-sized buffers, as many as the ring's pages.
private final class Copier: @unchecked Sendable {
    let source: UnsafeMutableRawPointer
    let dest: UnsafeMutableRawPointer
    let pages: Int
    init(pages: Int) {
        self.pages = pages
        source = .allocate(byteCount: pages * 4096, alignment: 4096)
        dest = .allocate(byteCount: pages * 4096, alignment: 4096)
        source.initializeMemory(as: UInt8.self, repeating: 0x5A, count: pages * 4096)
        dest.initializeMemory(as: UInt8.self, repeating: 0, count: pages * 4096)
    }
    func copy(_ frames: Int, bytes: Int) -> UInt64 {
        for i in 0..<frames {
            let page = (i % pages) * 4096
            memcpy(dest + page, source + page, bytes)
        }
        return UInt64(frames)
    }
    func release() {
        source.deallocate()
        dest.deallocate()
    }
}

/// Two SimulatedGuests with real netif rings, two NetBackends on one NetworkSwitch.
final class NetBenchRig {
    static let slots = Int(VIREO_ABI_NETIF_TX_RING_SIZE)
    let hub = EventChannels()
    let grants = GrantTables()
    let store = XenStore()
    let host: HostEventDomain
    let one: SimulatedGuest, two: SimulatedGuest
    let sender: NetBackend, receiver: NetBackend
    let fabric = NetworkSwitch(name: "bench")
    let benchmark: String
    // The frontends' state, touched only by the driving thread: no dynamic exclusivity checks
    // (@exclusivity(unchecked)), which are Swift's bookkeeping, not a frontend's work.
    @exclusivity(unchecked) private var tx: FrontRing<vireo_netif_tx_request, vireo_netif_tx_response>
    @exclusivity(unchecked) private var rx: FrontRing<vireo_netif_rx_request, vireo_netif_rx_response>
    private var txPages: [GuestFrame] = []
    @exclusivity(unchecked) private var txRefs: [GrantRef] = []
    @exclusivity(unchecked) private var rxRefs: [GrantRef] = []
    @exclusivity(unchecked) private var frameBytes = 0
    private var txPort = EventPort(0), rxPort = EventPort(0)
    /// Each frontend's control ring, and the page listing its ring pages' grants (`count` of
    /// them) for ADD_/DEL_GREF_MAPPING.
    private var controls: [(guest: SimulatedGuest, backend: NetBackend, ring: FrontRing<vireo_xen_netif_ctrl_request, vireo_xen_netif_ctrl_response>,
                            port: EventPort, list: GuestFrame, listRef: GrantRef, count: Int)] = []
    private var dispatcher: HostEventDispatcher?
    private var threads: [Thread] = []

    init(benchmark: String) throws {
        self.benchmark = benchmark
        host = try HostEventDomain(hub: hub)
        one = try SimulatedGuest(id: DomainID(1), ramPages: Self.slots + 64, hub: hub, grantTables: grants)
        two = try SimulatedGuest(id: DomainID(2), ramPages: Self.slots + 64, hub: hub, grantTables: grants)
        try store.introduceDomain(one.id)
        try store.introduceDomain(two.id)
        let queue = NetBackend.Configuration(queueFrames: Self.slots, queueBytes: Self.slots * 4096)
        sender = try NetBackend(frontend: one.id, configuration: queue, store: store, grants: grants, host: host)
        receiver = try NetBackend(frontend: two.id, configuration: queue, store: store, grants: grants, host: host)
        fabric.connect(sender)
        fabric.connect(receiver)
        try sender.create()
        try receiver.create()
        let a = try Self.connect(one, sender, store: store, host: host)
        let b = try Self.connect(two, receiver, store: store, host: host)
        tx = a.tx
        rx = b.rx
        txPort = a.port
        rxPort = b.port
        controls = [(one, sender, a.control, a.controlPort, try one.allocatePage(), GrantRef(0), Self.slots),
                    (two, receiver, b.control, b.controlPort, try two.allocatePage(), GrantRef(0), Self.slots)]
        for i in controls.indices {
            controls[i].listRef = try controls[i].guest.grantAccess(to: host.id, frame: controls[i].list, readOnly: false)
        }
        guard sender.state == XenbusBackendState.connected, receiver.state == XenbusBackendState.connected else {
            throw BenchmarkError.unavailable(name: benchmark, reason: "the vifs did not connect: \(sender.lastFailure ?? receiver.lastFailure ?? "-")")
        }
        for _ in 0..<Self.slots {
            let page = try one.allocatePage()
            txPages.append(page)
            txRefs.append(try one.grantAccess(to: host.id, frame: page, readOnly: true))
            let target = try two.allocatePage()
            rxRefs.append(try two.grantAccess(to: host.id, frame: target, readOnly: false))
        }
        // The grants each frontend would have its backend hold: the sender's transmit pages
        // read-only, the receiver's receive pages writable.
        for (control, refs, readOnly) in [(controls[0], txRefs, true), (controls[1], rxRefs, false)] {
            let list = try control.guest.page(control.list)
            for (n, ref) in refs.enumerated() {
                var entry = vireo_xen_netif_gref()
                entry.ref = ref.rawValue
                entry.flags = readOnly ? UInt16(VIREO_XEN_NETIF_CTRLF_GREF_readonly) : 0
                list.store(entry, at: n * MemoryLayout<vireo_xen_netif_gref>.stride)
            }
        }
        // Every receive page posted; each response reposts its page under the same id.
        for id in 0..<Self.slots { try rx.produceRequest(Self.rxRequest(id: id, ref: rxRefs[id])) }
        _ = rx.pushRequestsAndCheckNotify()
        receiver.poll()
    }

    private static func rxRequest(id: Int, ref: GrantRef) -> vireo_netif_rx_request {
        var request = vireo_netif_rx_request()
        request.id = UInt16(id)
        request.gref = ref.rawValue
        return request
    }

    /// A frontend's handshake: both rings, the event channel, the control ring and its own
    /// port, Linux netfront's keys, Connected.
    private static func connect(_ guest: SimulatedGuest, _ backend: NetBackend, store: XenStore, host: HostEventDomain) throws
        -> (tx: FrontRing<vireo_netif_tx_request, vireo_netif_tx_response>, rx: FrontRing<vireo_netif_rx_request, vireo_netif_rx_response>,
            port: EventPort, control: FrontRing<vireo_xen_netif_ctrl_request, vireo_xen_netif_ctrl_response>, controlPort: EventPort) {
        let txFrame = try guest.allocatePage(), rxFrame = try guest.allocatePage(), controlFrame = try guest.allocatePage()
        let tx: FrontRing<vireo_netif_tx_request, vireo_netif_tx_response> = try guest.frontRing(on: txFrame)
        let rx: FrontRing<vireo_netif_rx_request, vireo_netif_rx_response> = try guest.frontRing(on: rxFrame)
        let control: FrontRing<vireo_xen_netif_ctrl_request, vireo_xen_netif_ctrl_response> = try guest.frontRing(on: controlFrame)
        let txRef = try guest.grantAccess(to: host.id, frame: txFrame, readOnly: false)
        let rxRef = try guest.grantAccess(to: host.id, frame: rxFrame, readOnly: false)
        let controlRef = try guest.grantAccess(to: host.id, frame: controlFrame, readOnly: false)
        let port = try guest.allocUnbound(remote: host.id), controlPort = try guest.allocUnbound(remote: host.id)
        let session = store.connect(domain: guest.id)
        defer { store.disconnect(session) }
        for (key, value) in [("tx-ring-ref", "\(txRef.rawValue)"), ("rx-ring-ref", "\(rxRef.rawValue)"),
                             ("event-channel", "\(port.rawValue)"), ("request-rx-copy", "1"), ("feature-rx-notify", "1"),
                             ("ctrl-ring-ref", "\(controlRef.rawValue)"), ("event-channel-ctrl", "\(controlPort.rawValue)"),
                             ("feature-sg", "1"), ("state", "\(XenbusBackendState.connected)")] {
            let path = backend.frontendPath + "/" + key
            _ = store.request(XenStoreMessage(type: .write, payload: Array(path.utf8) + [0] + Array(value.utf8)), from: session)
        }
        backend.poll()
        return (tx, rx, port, control, controlPort)
    }

    /// Each frontend asks its backend over the control ring to keep every page it puts on its
    /// rings mapped (ADD_GREF_MAPPING: the sender's transmit pages read-only, the receiver's
    /// receive pages writable), or to let them go (DEL_GREF_MAPPING). With the backends on
    /// their own threads, the frontend notifies and waits for the answer.
    func useStaticGrants(_ on: Bool) throws {
        for i in controls.indices {
            let c = controls[i]
            var request = vireo_xen_netif_ctrl_request()
            request.id = on ? 1 : 2
            request.type = UInt16(on ? VIREO_XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING : VIREO_XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING)
            request.data = (0, c.listRef.rawValue, UInt32(c.count))
            try controls[i].ring.produceRequest(request)
            let notify = controls[i].ring.pushRequestsAndCheckNotify()
            var response: vireo_xen_netif_ctrl_response?
            if threads.isEmpty {
                c.backend.poll()
                response = try controls[i].ring.consumeResponse()
            } else {
                if notify { try c.guest.notify(c.port) }
                let deadline = ContinuousClock.now.advanced(by: .seconds(5))
                while response == nil && ContinuousClock.now < deadline {
                    response = try controls[i].ring.consumeResponse()
                    if response == nil, try !controls[i].ring.finalCheckForResponses() {
                        _ = c.guest.waitForEvents(timeout: .milliseconds(5))
                    }
                }
            }
            guard let response, response.id == request.id, response.status == UInt32(VIREO_XEN_NETIF_CTRL_STATUS_SUCCESS) else {
                throw BenchmarkError.unavailable(name: benchmark, reason: "the control ring refused \(on ? "ADD" : "DEL")_GREF_MAPPING: \(String(describing: response))")
            }
        }
    }

    /// Writes a frame of `frameBytes` (to the receiver's MAC) into every transmit page.
    func load(frameBytes: Int) throws {
        self.frameBytes = frameBytes
        let d = receiver.mac.bytes, s = sender.mac.bytes
        let header: [UInt8] = [d.0, d.1, d.2, d.3, d.4, d.5, s.0, s.1, s.2, s.3, s.4, s.5, 0x88, 0xB5]
        for (i, page) in txPages.enumerated() {
            let frame = header + (0..<(frameBytes - 14)).map { UInt8(truncatingIfNeeded: $0 &+ i) }
            try one.page(page).withUnsafeMutableBytes(offset: 0, count: frameBytes) { $0.copyBytes(from: frame) }
        }
    }

    /// From now on each backend runs its own `run()` loop on a thread, woken by events (and a
    /// dispatcher thread for the host domain's ports): the deployed shape. `poll()` is no longer
    /// called from here, and the backends disconnect when ``finish()`` stops them.
    func startThreads() {
        dispatcher = HostEventDispatcher(host, name: "vireo-bench-net-events")
        threads = [sender, receiver].map { backend in Thread { backend.run() } }
        for t in threads { t.start() }
    }

    /// Sends `count` frames from one to two and waits for all of them; returns `count`. With
    /// threads running, the frontends notify as the rings ask and sleep on their events.
    func drive(_ count: Int) throws -> Int {
        let threaded = !threads.isEmpty
        var sent = 0, received = 0, idle = 0
        while received < count {
            // At most a receive queue's worth ahead of the receiver: more would be dropped there.
            while sent < count, tx.freeRequests > 0, sent - received < Self.slots {
                var request = vireo_netif_tx_request()
                let slot = Int(tx.requestsProduced) % Self.slots
                request.gref = txRefs[slot].rawValue
                request.id = UInt16(slot)
                request.size = UInt16(frameBytes)
                try tx.produceRequest(request)
                sent += 1
            }
            if tx.pushRequestsAndCheckNotify() && threaded { try one.notify(txPort) }
            if !threaded {
                sender.poll()
                receiver.poll()
            }
            var got = 0
            while let response = try rx.consumeResponse() {
                guard response.status == Int16(frameBytes) else {
                    throw BenchmarkError.unavailable(name: benchmark, reason: "a receive response with status \(response.status)")
                }
                try rx.produceRequest(Self.rxRequest(id: Int(response.id), ref: rxRefs[Int(response.id)]))
                got += 1
            }
            received += got
            if rx.pushRequestsAndCheckNotify() && threaded { try two.notify(rxPort) }
            while let response = try tx.consumeResponse() {
                guard response.status == Int16(VIREO_NETIF_RSP_OKAY) else {
                    throw BenchmarkError.unavailable(name: benchmark, reason: "a transmit response with status \(response.status)")
                }
            }
            idle = got == 0 ? idle + 1 : 0
            if threaded && got == 0 && received < count {
                // Sleep on the receiver's events (its frames) unless responses arrived meanwhile.
                if try !rx.finalCheckForResponses() { _ = two.waitForEvents(timeout: .milliseconds(5)) }
                _ = one.takePendingEvents()
                continue
            }
            guard idle < 1000 else {
                throw BenchmarkError.unavailable(name: benchmark, reason: "frames stopped arriving: \(sender.statistics) \(receiver.statistics)")
            }
        }
        return count
    }

    func finish() {
        if threads.isEmpty {
            sender.finish()
            receiver.finish()
        } else {
            sender.stop()
            receiver.stop()
            while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
            threads = []
        }
        dispatcher?.stop()
        dispatcher = nil
    }
}
