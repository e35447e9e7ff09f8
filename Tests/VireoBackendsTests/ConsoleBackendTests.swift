import Foundation
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls

/// A clock the test moves by hand.
final class ManualClock: Sendable {
    private let nanoseconds = Atomic<UInt64>(1_000_000_000)
    func now() -> UInt64 { nanoseconds.load(ordering: .acquiring) }
    func advance(seconds: Double) { nanoseconds.add(UInt64(seconds * 1e9), ordering: .releasing) }
}

/// What the backend wrote to its sink.
final class Collected: Sendable {
    private let bytes = Mutex<[UInt8]>([])
    private let lines = Mutex<[String]>([])
    func append(_ b: [UInt8]) { bytes.withLock { $0 += b } }
    func log(_ line: String) { lines.withLock { $0.append(line) } }
    var all: [UInt8] { bytes.withLock { $0 } }
    var text: String { String(decoding: all, as: UTF8.self) }
    var logged: [String] { lines.withLock { $0 } }
}

/// The real ConsoleBackend over a SimulatedGuest set up as DomainBuilder sets up a domain: the
/// console page granted to the host domain under GNTTAB_RESERVED_CONSOLE, the guest's console
/// port allocated unbound for the host. The guest's side writes real ring bytes and notifies.
final class ConsoleRig {
    let hub = EventChannels()
    let grants = GrantTables()
    let guest: SimulatedGuest
    let host: HostEventDomain
    let page: GuestFrame
    let port: EventPort
    let clock = ManualClock()
    let collected = Collected()
    var backend: ConsoleBackend!
    private var dispatcher: HostEventDispatcher?
    private var threads: [Thread] = []

    init() throws {
        guest = try SimulatedGuest(id: DomainID(3), ramPages: 64, hub: hub, grantTables: grants)
        host = try HostEventDomain(hub: hub)
        page = try guest.allocatePage()
        let table = GuestGrantTable(frames: [try guest.grantTable.frameRegion(0)], reserved: 0)
        table.write(GrantRef(UInt32(VIREO_GNTTAB_RESERVED_CONSOLE)), to: host.id, frame: page, readOnly: false)
        port = try guest.allocUnbound(remote: host.id)
    }

    var output: ByteRing { ByteRing.consoleOutput(try! guest.page(page)) }
    var input: ByteRing { ByteRing.consoleInput(try! guest.page(page)) }

    /// Creates the backend and starts it (and the host's event dispatcher) on their threads.
    func start(rate: ConsoleBackend.RateLimit = .standard, logPath: String? = nil) throws {
        let collected = self.collected, clock = self.clock
        backend = try ConsoleBackend(frontend: guest.id, port: port, grants: grants, host: host, logPath: logPath, rateLimit: rate,
                                     sink: { collected.append($0) }, log: { collected.log($0) }, clock: { clock.now() })
        let backend = self.backend!
        dispatcher = HostEventDispatcher(host, name: "test-dom0-events")
        threads = [Thread { backend.run() }]
        for t in threads { t.start() }
    }

    /// The guest prints: bytes into `out`, then a notification.
    func guestWrite(_ bytes: [UInt8]) throws {
        let n = try bytes.withUnsafeBytes { try output.write($0) }
        #expect(n == bytes.count)
        try guest.notify(port)
    }

    func waitUntil(_ what: String, _ condition: () -> Bool) throws {
        let deadline = ContinuousClock.now.advanced(by: .seconds(10))
        while !condition() {
            guard ContinuousClock.now < deadline else { throw BackendError("timed out waiting for \(what)") }
            usleep(1000)
        }
    }

    func shutdown() {
        backend?.stop()
        dispatcher?.stop()
        while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
    }

    deinit { shutdown() }
}

@Suite struct ConsoleBackendTests {
    @Test func outputReachesTheSinkAndTheLogAndInputReachesTheGuest() throws {
        let rig = try ConsoleRig()
        // Written before the backend starts: read once at start, without a notification.
        _ = try Array("early line\n".utf8).withUnsafeBytes { try rig.output.write($0) }
        let log = NSTemporaryDirectory() + "vireo-console-\(UUID().uuidString).log"
        defer { try? FileManager.default.removeItem(atPath: log) }
        try rig.start(logPath: log)
        try rig.waitUntil("the early line") { rig.collected.text == "early line\n" }
        // More than the ring holds, in pieces, each notified.
        var expected = Array("early line\n".utf8)
        for round in 0..<6 {
            let piece = (0..<1500).map { UInt8(truncatingIfNeeded: 32 + ($0 + round) % 90) }
            try rig.waitUntil("room in the ring") { (try? rig.output.space()) ?? 0 >= piece.count }
            try rig.guestWrite(piece)
            expected += piece
        }
        try rig.waitUntil("all output") { rig.collected.all.count == expected.count }
        #expect(rig.collected.all == expected)
        #expect(rig.backend.statistics.bytesOut == expected.count)
        #expect(rig.backend.statistics.bytesDropped == 0)
        // Input: into the `in` ring, and the guest is notified.
        _ = rig.guest.takePendingEvents()
        #expect(rig.backend.send(input: Array("ls\n".utf8)) == 3)
        var received = [UInt8](repeating: 0, count: 16)
        let n = try received.withUnsafeMutableBytes { try rig.input.read(into: $0) }
        #expect(Array(received[0..<n]) == Array("ls\n".utf8))
        #expect(rig.guest.waitForEvents(timeout: .seconds(5)).contains(rig.port))
        rig.shutdown()
        #expect(try Array(Data(contentsOf: URL(fileURLWithPath: log))) == expected, "the log holds the same bytes")
        #expect(!rig.backend.isConnected)
    }

    @Test func aFloodBeyondTheRateIsDroppedCountedAndReportedOnce() throws {
        let rig = try ConsoleRig()
        try rig.start(rate: .init(bytesPerSecond: 1000, burst: 100))
        // The clock stands still: only the burst passes, however much the guest writes.
        var written = 0
        for _ in 0..<10 {
            try rig.waitUntil("room in the ring") { (try? rig.output.space()) ?? 0 >= 2000 }
            try rig.guestWrite([UInt8](repeating: UInt8(ascii: "x"), count: 2000))
            written += 2000
        }
        try rig.waitUntil("the flood consumed") {
            let s = rig.backend.statistics
            return s.bytesOut + s.bytesDropped == written
        }
        #expect(rig.collected.all == [UInt8](repeating: UInt8(ascii: "x"), count: 100))
        #expect(rig.backend.statistics.bytesDropped == written - 100)
        #expect(rig.backend.statistics.markers == 0, "no tokens left for the marker yet")
        // A second later the bucket has refilled: one marker, then the new output.
        rig.clock.advance(seconds: 1)
        try rig.guestWrite(Array("after\n".utf8))
        try rig.waitUntil("the line after the flood") { rig.collected.text.hasSuffix("after\n") }
        #expect(rig.collected.text == String(repeating: "x", count: 100) + "[console: \(written - 100) bytes dropped]\nafter\n")
        #expect(rig.backend.statistics.markers == 1)
        #expect(rig.backend.lastFailure == nil && rig.backend.isConnected)
    }

    @Test func dropsStillPendingAreReportedWhenTheBackendStops() throws {
        let rig = try ConsoleRig()
        try rig.start(rate: .init(bytesPerSecond: 1, burst: 10))
        try rig.guestWrite([UInt8](repeating: UInt8(ascii: "y"), count: 50))
        try rig.waitUntil("the output consumed") { rig.backend.statistics.bytesDropped == 40 }
        rig.shutdown()
        #expect(rig.collected.text == "yyyyyyyyyy[console: 40 bytes dropped]\n")
    }

    @Test func outOfRangeIndicesStopTheBackendForThatDomainOnly() throws {
        let rig = try ConsoleRig()
        try rig.start()
        try rig.guestWrite(Array("before\n".utf8))
        try rig.waitUntil("the first line") { rig.collected.text == "before\n" }
        // The guest moves `out`'s producer more than a ring past the consumer.
        let region = try rig.guest.page(rig.page)
        region.storeRelease32(region.loadAcquire32(at: 3080) &+ 5000, at: 3084)
        try rig.guest.notify(rig.port)
        try rig.waitUntil("the backend to stop") { !rig.backend.isConnected }
        #expect(rig.backend.lastFailure?.contains("indices out of range") == true, "\(rig.backend.lastFailure ?? "-")")
        #expect(rig.collected.logged.count == 1 && rig.collected.logged[0].contains("console of domain 3 stopped"))
        #expect(rig.collected.text == "before\n", "nothing read from a broken ring")
        #expect(rig.backend.send(input: [1, 2, 3]) == 0, "a stopped backend takes no input")
        // The host side carries on: the guest's notifications now go nowhere.
        try rig.guest.notify(rig.port)
        rig.shutdown()
    }

    @Test func badInputRingIndicesStopTheBackend() throws {
        let rig = try ConsoleRig()
        try rig.start()
        let region = try rig.guest.page(rig.page)
        region.storeRelease32(0xFFFF_0000, at: 3072)  // `in` consumer far past the producer
        #expect(rig.backend.send(input: Array("x".utf8)) == 0)
        #expect(rig.backend.lastFailure?.contains("input ring") == true)
        #expect(!rig.backend.isConnected)
        rig.shutdown()
    }

    @Test func setupErrorsNameWhatFailed() throws {
        let rig = try ConsoleRig()
        #expect(throws: BackendError.self) {
            _ = try ConsoleBackend(frontend: rig.guest.id, port: rig.port, grants: rig.grants, host: rig.host,
                                   logPath: "/nonexistent/dir/console.log", sink: { _ in })
        }
        do {
            _ = try ConsoleBackend(frontend: DomainID(9), port: rig.port, grants: rig.grants, host: rig.host, sink: { _ in })
            Issue.record("a domain without a grant table was accepted")
        } catch {
            #expect(error.description.contains("domain 9"))
        }
        do {
            _ = try ConsoleBackend(frontend: rig.guest.id, port: EventPort(77), grants: rig.grants, host: rig.host, sink: { _ in })
            Issue.record("an unbound port was accepted")
        } catch {
            #expect(error.description.contains("port 77"))
        }
    }
}
