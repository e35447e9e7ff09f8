import Glibc
import Synchronization
import VireoABI
import VireoBench
import VireoStore

/// `vireo bench store`: XenStore operations per second over the Unix socket (several clients,
/// a read/write mix, each client waiting for each reply as Xen's tools do), beside the same
/// requests through an in-process call into the engine in the same run; the watch event
/// latency (write on one connection to event received on another); and the slowdown once a
/// thousand domains' device trees (and a watch per domain) are in the store.
public struct StoreBenchmark: Benchmark {
    public let name = "store"
    public let summary = "XenStore ops/s over the socket vs in-process calls; watch latency; 1,000-domain slowdown"

    static let clients = 4
    static let keysPerClient = 16
    /// One write in this many operations.
    static let writeEvery = 5
    static let domains = 1000

    public init() {}

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        let seconds = options.phaseSeconds
        let rounds = options.quick ? 1 : 3
        let store = XenStore()
        let path = "/tmp/vireo-bench-store-\(getpid()).sock"
        let server = try XenStoreSocketServer(store: store, path: path)
        server.start()
        defer { server.stop() }
        let dom0 = store.connect()
        for c in 0..<Self.clients {
            for k in 0..<Self.keysPerClient {
                _ = store.request(Self.write(client: c, key: k, value: 0), from: dom0)
            }
        }
        options.log("store: \(Self.clients) socket clients, 1 write in \(Self.writeEvery), \(rounds) rounds of \(seconds) s")

        func measure(_ label: String) throws -> (socket: Measure.Rate, inProcess: Measure.Rate) {
            var socketRates: [Measure.Rate] = [], localRates: [Measure.Rate] = []
            for round in 1...rounds {
                let socket = try Self.socketPhase(path: path, seconds: seconds)
                // The same number of requests, same mix, through the engine directly.
                let local = Self.inProcessPhase(store: store, operations: socket.operations)
                socketRates.append(socket)
                localRates.append(local)
                options.log("store: \(label) round \(round): socket \(formatFigure(socket.perSecond / 1e3)) kops/s, "
                            + "in-process \(formatFigure(local.perSecond / 1e3)) kops/s")
            }
            return (Measure.median(socketRates), Measure.median(localRates))
        }

        let before = try measure("empty store")
        let latency = try Self.watchLatency(path: path, samples: options.quick ? 200 : 5000)
        options.log("store: watch latency median \(formatFigure(latency.median / 1e3)) µs, p99 \(formatFigure(latency.p99 / 1e3)) µs")

        let populateStart = Measure.now()
        let nodes = try Self.populate(store: store, domains: Self.domains)
        let populateSeconds = Double(Measure.now() - populateStart) / 1e9
        options.log("store: \(Self.domains) domains' device trees: \(nodes) nodes in \(formatFigure(populateSeconds)) s")
        let after = try measure("1000 domains")
        let latencyAfter = try Self.watchLatency(path: path, samples: options.quick ? 200 : 5000)

        let value = before.socket.perSecond / 1e3
        let slowdown = after.socket.perSecond > 0 ? before.socket.perSecond / after.socket.perSecond : 0
        return BenchmarkResult(
            bench: name,
            value: value,
            unit: "kops/s",
            baseline: before.inProcess.perSecond / 1e3,
            baselineName: "the same requests through an in-process call into the engine (kops/s)",
            goal: ">= 100 kops/s over the socket; watch latency <= 50 us; 1,000 domains slow it <= 2x",
            extra: [
                ("clients", .integer(Int64(Self.clients))),
                ("write_fraction", .number(1 / Double(Self.writeEvery))),
                ("watch_latency_us", .number(latency.median / 1e3)),
                ("watch_latency_p99_us", .number(latency.p99 / 1e3)),
                ("domains", .integer(Int64(Self.domains))),
                ("nodes_with_domains", .integer(Int64(store.statistics.nodes))),
                ("watches_with_domains", .integer(Int64(store.statistics.watches))),
                ("populate_seconds", .number(populateSeconds)),
                ("value_with_domains", .number(after.socket.perSecond / 1e3)),
                ("baseline_with_domains", .number(after.inProcess.perSecond / 1e3)),
                ("domains_slowdown", .number(slowdown)),
                ("watch_latency_with_domains_us", .number(latencyAfter.median / 1e3)),
                ("rounds", .integer(Int64(rounds))),
                ("phase_seconds", .number(seconds)),
            ])
    }

    static func write(client: Int, key: Int, value: Int) -> XenStoreMessage {
        XenStoreMessage(type: .write, payload: Array("/bench/c\(client)/k\(key)\0\(value)".utf8))
    }

    static func read(client: Int, key: Int) -> XenStoreMessage {
        XenStoreMessage(.read, "/bench/c\(client)/k\(key)")
    }

    /// The requests one client cycles through.
    static func requests(client: Int) -> [XenStoreMessage] {
        (0..<(keysPerClient * writeEvery)).map { i in
            let key = i % keysPerClient
            return i % writeEvery == 0 ? write(client: client, key: key, value: i) : read(client: client, key: key)
        }
    }

    final class Phase: Sendable {
        let go = Atomic<Bool>(false)
        let stop = Atomic<Bool>(false)
        let operations = Atomic<UInt64>(0)
        let failures = Mutex<[String]>([])
    }

    /// Socket clients on their own threads, each sending a request and waiting for its reply.
    static func socketPhase(path: String, seconds: Double) throws -> Measure.Rate {
        let phase = Phase()
        let ready = Atomic<Int>(0)
        var threads: [BenchThread] = []
        for c in 0..<clients {
            threads.append(BenchThread {
                do {
                    let client = try XenStoreSocketClient(path: path)
                    let encoded = requests(client: c).map(\.encoded)
                    ready.add(1, ordering: .sequentiallyConsistent)
                    while !phase.go.load(ordering: .acquiring) { sched_yield() }
                    var count: UInt64 = 0
                    var i = 0
                    while !phase.stop.load(ordering: .relaxed) {
                        try client.sendRaw(encoded[i])
                        guard let reply = try client.receive(), reply.type != .error else {
                            throw XenStoreSocketError(operation: "bench request", errno: EPROTO, path: path)
                        }
                        count += 1
                        i = i + 1 == encoded.count ? 0 : i + 1
                    }
                    phase.operations.add(count, ordering: .sequentiallyConsistent)
                } catch {
                    phase.failures.withLock { $0.append("\(error)") }
                    ready.add(1, ordering: .sequentiallyConsistent)
                }
            })
        }
        while ready.load(ordering: .sequentiallyConsistent) < clients { sched_yield() }
        let start = Measure.now()
        phase.go.store(true, ordering: .releasing)
        usleep(UInt32(seconds * 1e6))
        phase.stop.store(true, ordering: .relaxed)
        for t in threads { t.join() }
        let elapsed = Measure.now() - start
        if let failure = phase.failures.withLock({ $0.first }) {
            throw BenchmarkError.unavailable(name: "store", reason: failure)
        }
        return Measure.Rate(operations: phase.operations.load(ordering: .sequentiallyConsistent), nanoseconds: elapsed)
    }

    /// `operations` requests of the same mix through `XenStore.process`, one connection per
    /// client, output drained (and discarded) after each as a transport would.
    static func inProcessPhase(store: XenStore, operations: UInt64) -> Measure.Rate {
        let connections = (0..<clients).map { _ in store.connect() }
        defer { for c in connections { store.disconnect(c) } }
        let lists = (0..<clients).map { requests(client: $0) }
        var index = [Int](repeating: 0, count: clients)
        let start = Measure.now()
        var done: UInt64 = 0
        while done < operations {
            let c = Int(done % UInt64(clients))
            store.process(lists[c][index[c]], from: connections[c])
            connections[c].drain { $0.count }
            index[c] = index[c] + 1 == lists[c].count ? 0 : index[c] + 1
            done += 1
        }
        return Measure.Rate(operations: operations, nanoseconds: Measure.now() - start)
    }

    /// Time from sending a write on one socket connection to the watch event arriving on
    /// another, blocked in recv on its own thread.
    static func watchLatency(path: String, samples: Int) throws -> (median: Double, p99: Double) {
        let sentAt = Atomic<UInt64>(0)
        let results = Mutex<[UInt64]>([])
        let failure = Mutex<String?>(nil)
        let watcherReady = Atomic<Bool>(false)
        let watcher = BenchThread {
            do {
                let client = try XenStoreSocketClient(path: path)
                guard try client.request(XenStoreMessage(.watch, "/bench/watched", "lat"))?.type == .watch,
                      try client.nextEvent() != nil else {  // the initial firing
                    throw XenStoreSocketError(operation: "watch", errno: EPROTO, path: path)
                }
                watcherReady.store(true, ordering: .sequentiallyConsistent)
                var latencies: [UInt64] = []
                latencies.reserveCapacity(samples)
                while latencies.count < samples {
                    guard try client.nextEvent() != nil else { break }
                    latencies.append(Measure.now() &- sentAt.load(ordering: .sequentiallyConsistent))
                    sentAt.store(0, ordering: .sequentiallyConsistent)
                }
                results.withLock { $0 = latencies }
            } catch {
                failure.withLock { $0 = "\(error)" }
                watcherReady.store(true, ordering: .sequentiallyConsistent)
            }
        }
        while !watcherReady.load(ordering: .sequentiallyConsistent) { sched_yield() }
        if let f = failure.withLock({ $0 }) { watcher.join(); throw BenchmarkError.unavailable(name: "store", reason: f) }
        let writer = try XenStoreSocketClient(path: path)
        for i in 0..<samples {
            sentAt.store(Measure.now(), ordering: .sequentiallyConsistent)
            _ = try writer.request(XenStoreMessage(type: .write, payload: Array("/bench/watched/x\0\(i)".utf8)))
            // One event in flight at a time: wait until the watcher has taken it.
            while sentAt.load(ordering: .sequentiallyConsistent) != 0 { sched_yield() }
        }
        watcher.join()
        var latencies = results.withLock { $0 }.sorted()
        guard !latencies.isEmpty else { throw BenchmarkError.unavailable(name: "store", reason: "no watch events") }
        if latencies.count < 2 { latencies.append(latencies[0]) }
        return (Double(latencies[latencies.count / 2]), Double(latencies[min(latencies.count - 1, latencies.count * 99 / 100)]))
    }

    /// What a toolstack writes for each of `domains` guests with a disk and a network card:
    /// the guest's own tree, the backends' trees under dom0, and a watch per guest on its
    /// devices (as its xenbus driver holds). Returns the number of nodes written.
    static func populate(store: XenStore, domains: Int) throws -> Int {
        let dom0 = store.connect()
        var written = 0
        func put(_ path: String, _ value: String) {
            store.process(XenStoreMessage(type: .write, payload: Array("\(path)\0\(value)".utf8)), from: dom0)
            dom0.drain { $0.count }
            written += 1
        }
        for d in 1...domains {
            let id = DomainID(UInt16(d))
            try store.introduceDomain(id)
            let home = "/local/domain/\(d)"
            put("\(home)/name", "guest-\(d)")
            put("\(home)/domid", "\(d)")
            put("\(home)/memory/target", "262144")
            put("\(home)/control/shutdown", "")
            put("\(home)/data/updated", "0")
            let vbd = "\(home)/device/vbd/768", vbdBack = "/local/domain/0/backend/vbd/\(d)/768"
            for (k, v) in [("backend", vbdBack), ("backend-id", "0"), ("state", "4"), ("ring-ref", "8"),
                           ("event-channel", "3"), ("protocol", "x86_64-abi")] { put("\(vbd)/\(k)", v) }
            for (k, v) in [("frontend", vbd), ("frontend-id", "\(d)"), ("state", "4"), ("params", "/var/lib/vireo/\(d).img"),
                           ("mode", "w"), ("sectors", "2097152"), ("sector-size", "512")] { put("\(vbdBack)/\(k)", v) }
            let vif = "\(home)/device/vif/0", vifBack = "/local/domain/0/backend/vif/\(d)/0"
            for (k, v) in [("backend", vifBack), ("backend-id", "0"), ("state", "4"), ("tx-ring-ref", "9"),
                           ("rx-ring-ref", "10"), ("event-channel", "4"), ("mac", "00:16:3e:00:00:01")] { put("\(vif)/\(k)", v) }
            for (k, v) in [("frontend", vif), ("frontend-id", "\(d)"), ("state", "4"), ("mac", "00:16:3e:00:00:01"),
                           ("bridge", "vireo0")] { put("\(vifBack)/\(k)", v) }
            let guest = store.connect(domain: id)
            store.process(XenStoreMessage(.watch, "device", "xenbus"), from: guest)
            guest.drain { $0.count }
        }
        return written
    }
}
