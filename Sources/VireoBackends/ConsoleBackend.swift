import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls

/// The console backend of one domain: Xen's console page (`xencons_interface`), reached the way
/// xenconsoled reaches it. The toolstack granted the page to the host domain under the reserved
/// reference GNTTAB_RESERVED_CONSOLE (0) and allocated the guest's console port for it
/// (HVM_PARAM_CONSOLE_PFN/EVTCHN); ``init(...)`` maps that grant and binds that port.
///
/// ``run()`` drains the `out` ring once at start and again whenever the guest notifies, and
/// hands the bytes to a sink (stdout for `vireo run`) and, when configured, appends them to a
/// per-domain log file. Output passes a token bucket (SECURITY.md 19): bytes beyond the rate are
/// consumed from the ring and dropped, counted, and reported by one
/// `[console: N bytes dropped]` line once output flows again (or when the backend stops).
/// ``send(input:)`` puts bytes into the `in` ring and notifies the guest.
///
/// Ring indices the guest has put more than a ring apart stop the backend for this domain (the
/// port is closed and the page unmapped) with the reason in ``lastFailure`` and on the log
/// closure; the host carries on.
public final class ConsoleBackend: @unchecked Sendable {  // run() owns the output state; the rest is behind locks and atomics
    /// A token bucket: `bytesPerSecond` sustained, up to `burst` bytes at once.
    public struct RateLimit: Sendable, Equatable {
        public var bytesPerSecond: Int
        public var burst: Int
        public init(bytesPerSecond: Int, burst: Int) {
            precondition(bytesPerSecond > 0 && burst > 0, "a console rate limit needs a positive rate and burst")
            self.bytesPerSecond = bytesPerSecond
            self.burst = burst
        }
        /// 256 KiB/s sustained, 1 MiB at once: far above what a person reads, far below what
        /// would let a guest fill the host's disk or terminal.
        public static let standard = RateLimit(bytesPerSecond: 256 << 10, burst: 1 << 20)
    }

    /// Counters, for tests and diagnostics.
    public struct Statistics: Sendable, Equatable {
        /// Guest output bytes passed to the sink (markers not counted).
        public var bytesOut = 0
        /// Guest output bytes consumed and dropped by the rate limit.
        public var bytesDropped = 0
        /// `[console: N bytes dropped]` lines written.
        public var markers = 0
        /// Input bytes put into the `in` ring.
        public var bytesIn = 0
    }

    public let frontend: DomainID
    public let rateLimit: RateLimit

    private let host: HostEventDomain
    private let sink: @Sendable ([UInt8]) -> Void
    private let log: @Sendable (String) -> Void
    private let clock: @Sendable () -> UInt64
    private let logFile: Int32
    private let wake: WakePipe
    private let stopping = Atomic<Bool>(false)

    private final class Connection: @unchecked Sendable {  // used only under `connection`'s lock
        let mapping: GrantMapping
        let output: ByteRing
        let input: ByteRing
        let port: EventPort
        init(mapping: consuming GrantMapping, output: ByteRing, input: ByteRing, port: EventPort) {
            self.mapping = mapping
            self.output = output
            self.input = input
            self.port = port
        }
    }
    private let connection: Mutex<Connection?>
    private let stats = Mutex(Statistics())
    private let failure = Mutex<String?>(nil)

    // Output state, owned by run().
    private var tokens: Double
    private var refilledAt: UInt64
    private var pendingDrops = 0
    private var chunk = [UInt8](repeating: 0, count: Int(VIREO_ABI_XENCONS_OUT_SIZE))

    public var statistics: Statistics { stats.withLock { $0 } }
    /// Why the backend stopped serving the domain, if it did.
    public var lastFailure: String? { failure.withLock { $0 } }
    /// False once the backend has stopped serving the domain (a failure, or ``run()`` ended).
    public var isConnected: Bool { connection.withLock { $0 != nil } }

    /// Maps domain `frontend`'s console page through its reserved grant, binds its console port
    /// `port` (the guest's end, allocated unbound for `host`), and opens `logPath` for appending
    /// when given. `clock` gives monotonic nanoseconds (tests pass their own).
    /// - Throws: ``BackendError`` naming the log file, the grant or the port that failed.
    public init(frontend: DomainID, port: EventPort, grants: GrantTables, host: HostEventDomain,
                logPath: String? = nil, rateLimit: RateLimit = .standard,
                sink: @escaping @Sendable ([UInt8]) -> Void,
                log: @escaping @Sendable (String) -> Void = { _ in },
                clock: @escaping @Sendable () -> UInt64 = ConsoleBackend.monotonicNanoseconds) throws(BackendError) {
        var logFile: Int32 = -1
        if let logPath {
            logFile = open(logPath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guard logFile >= 0 else {
                throw BackendError("console: cannot open the log '\(logPath)': \(String(cString: strerror(errno)))")
            }
        }
        let wake: WakePipe
        do { wake = try WakePipe(for: "console backend") } catch {
            if logFile >= 0 { close(logFile) }
            throw error
        }
        func cleanUp() {
            if logFile >= 0 { close(logFile) }
        }
        let ref = GrantRef(UInt32(VIREO_GNTTAB_RESERVED_CONSOLE))
        guard let table = grants.table(for: frontend) else {
            cleanUp()
            throw BackendError("console: domain \(frontend.rawValue) has no grant table")
        }
        let mapping: GrantMapping
        do {
            mapping = try table.map(ref, by: host.id, readOnly: false)
        } catch {
            cleanUp()
            throw BackendError("console: cannot map grant \(ref.rawValue) of domain \(frontend.rawValue): \(error)")
        }
        let page: SharedRegion
        do {
            page = try mapping.sharedRegion()
        } catch {
            cleanUp()
            throw BackendError("console: grant \(ref.rawValue) of domain \(frontend.rawValue) is not a page: \(error)")
        }
        let bound: EventPort
        do {
            bound = try host.bindInterdomain(remoteDomain: frontend, remotePort: port, delivery: .immediate) { _ in wake.kick() }
        } catch {
            cleanUp()
            throw BackendError("console: cannot bind port \(port.rawValue) of domain \(frontend.rawValue): \(error)")
        }
        self.frontend = frontend
        self.rateLimit = rateLimit
        self.host = host
        self.sink = sink
        self.log = log
        self.clock = clock
        self.logFile = logFile
        self.wake = wake
        connection = Mutex(Connection(mapping: mapping, output: .consoleOutput(page), input: .consoleInput(page), port: bound))
        tokens = Double(rateLimit.burst)
        refilledAt = clock()
    }

    deinit {
        disconnect()
        if logFile >= 0 { close(logFile) }
    }

    /// CLOCK_MONOTONIC in nanoseconds.
    public static func monotonicNanoseconds() -> UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) &* 1_000_000_000 &+ UInt64(now.tv_nsec)
    }

    /// Makes ``run()`` drain the ring one last time and return.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        wake.kick()
    }

    /// Wakes ``run()`` as the guest's notification does (tests with a frozen clock use it after
    /// moving the clock on).
    public func poke() { wake.kick() }

    /// Serves the console until ``stop()``: drains the `out` ring at start, on every
    /// notification and, while drops are pending, every 100 ms (so a dropped-bytes line appears
    /// once the bucket refills);
    /// at the end drains once more, reports any drops still pending, and disconnects.
    ///
    /// Given `input` (a terminal, a pipe), what can be read from it goes into the `in` ring on
    /// the same thread, read when it is
    /// readable and the last read has gone into the ring, retried while the ring is full (on
    /// the guest's notification or every 100 ms), until the end of its input.
    public func run(input: Int32? = nil) {
        var reader = input.map { InputReader(fd: $0) }
        while !stopping.load(ordering: .acquiring) {
            serveOutput()
            reader?.serve(self)
            if stopping.load(ordering: .acquiring) { break }
            // Idle, it sleeps until a notification, input or stop(): a thousand idle consoles
            // cost no wake-ups. It looks again in 100 ms while a drop is yet to be reported
            // (the bucket refills) or input waits for room in the ring.
            let idle = pendingDrops == 0 && reader?.pending.isEmpty != false
            wake.wait(milliseconds: idle ? -1 : 100, alsoReadable: reader?.waitsForInput == true ? reader!.fd : -1)
        }
        serveOutput()
        if pendingDrops > 0 { emitMarker() }
        disconnect()
    }

    /// Puts as much of `bytes` as fits into the `in` ring and notifies the guest; how many
    /// bytes went in (0 once the backend has stopped serving the domain).
    @discardableResult
    public func send(input bytes: [UInt8]) -> Int {
        let result: Result<Int, ByteRingError>? = connection.withLock { connection -> Result<Int, ByteRingError>? in
            guard let connection else { return nil }
            let result = bytes.withUnsafeBytes { raw in Result { () throws(ByteRingError) in try connection.input.write(raw) } }
            if case .success(let count) = result, count > 0 { try? host.send(connection.port) }
            return result
        }
        switch result {
        case .success(let count)?:
            stats.withLock { $0.bytesIn += count }
            return count
        case .failure(let error)?:
            fail("input ring: \(error)")
            return 0
        case nil:
            return 0
        }
    }

    /// What ``run(input:)`` reads from its input descriptor and has not yet put in the ring.
    private struct InputReader {
        let fd: Int32
        var pending: [UInt8] = []
        var ended = false

        /// Whether the loop should wake when `fd` is readable (not while bytes wait for room).
        var waitsForInput: Bool { !ended && pending.isEmpty }

        mutating func serve(_ backend: ConsoleBackend) {
            if pending.isEmpty && !ended {
                var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                if poll(&poller, 1, 0) > 0 {
                    var buffer = [UInt8](repeating: 0, count: 512)
                    let count = Glibc.read(fd, &buffer, buffer.count)
                    if count > 0 {
                        pending = Array(buffer[0..<count])
                    } else if count == 0 || (errno != EINTR && errno != EAGAIN) {
                        ended = true  // end of input, or an error: stop reading
                    }
                }
            }
            guard !pending.isEmpty else { return }
            guard backend.isConnected else {
                pending = []
                ended = true
                return
            }
            pending.removeFirst(backend.send(input: pending))
        }
    }

    // MARK: Output

    private func refill() {
        let now = clock()
        if now > refilledAt {
            let earned = Double(now - refilledAt) * Double(rateLimit.bytesPerSecond) / 1e9
            tokens = min(Double(rateLimit.burst), tokens + earned)
        }
        refilledAt = max(refilledAt, now)
    }

    /// Reads every byte waiting in the `out` ring and passes as many as the bucket allows.
    private func serveOutput() {
        refill()
        if pendingDrops > 0, tokens >= Double(markerText(pendingDrops).utf8.count) { emitMarker() }
        while true {
            let read: Result<Int, ByteRingError>? = connection.withLock { connection -> Result<Int, ByteRingError>? in
                guard let connection else { return nil }
                let result = chunk.withUnsafeMutableBytes { raw in
                    Result { () throws(ByteRingError) in try connection.output.read(into: raw) }
                }
                // Tell the guest there is room again (it may be waiting on a full ring).
                if case .success(let count) = result, count > 0 { try? host.send(connection.port) }
                return result
            }
            guard let read else { return }
            let count: Int
            switch read {
            case .success(let n): count = n
            case .failure(let error): return fail("output ring: \(error)")
            }
            guard count > 0 else { return }
            refill()
            let passed = min(count, Int(tokens))
            tokens -= Double(passed)
            if passed > 0 {
                emit(Array(chunk[0..<passed]))
            }
            let dropped = count - passed
            pendingDrops += dropped
            stats.withLock {
                $0.bytesOut += passed
                $0.bytesDropped += dropped
            }
        }
    }

    private func markerText(_ count: Int) -> String { "[console: \(count) bytes dropped]\n" }

    /// The dropped-bytes line; it costs its own length in tokens when there are enough.
    private func emitMarker() {
        let text = markerText(pendingDrops)
        tokens = max(0, tokens - Double(text.utf8.count))
        pendingDrops = 0
        stats.withLock { $0.markers += 1 }
        emit(Array(text.utf8))
    }

    private func emit(_ bytes: [UInt8]) {
        sink(bytes)
        guard logFile >= 0 else { return }
        bytes.withUnsafeBytes { raw in
            var done = 0
            while done < raw.count {
                let n = Glibc.write(logFile, raw.baseAddress! + done, raw.count - done)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return }
                done += n
            }
        }
    }

    // MARK: Failure

    private func fail(_ reason: String) {
        let text = "console of domain \(frontend.rawValue) stopped: \(reason)"
        failure.withLock { $0 = text }
        disconnect()
        log(text)
    }

    private func disconnect() {
        connection.withLock { connection in
            if let port = connection?.port { try? host.close(port) }
            connection = nil  // the mapping ends with the connection
        }
    }
}
