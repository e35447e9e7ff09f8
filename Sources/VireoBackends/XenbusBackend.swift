import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoStore

/// A setup error of a backend, naming what is wrong.
public struct BackendError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// XenBus states (`vireo/io/xenbus.h`) as the numbers a backend writes.
public enum XenbusBackendState {
    public static let unknown: UInt32 = 0
    public static let initialising: UInt32 = 1
    public static let initWait: UInt32 = 2
    public static let initialised: UInt32 = 3
    public static let connected: UInt32 = 4
    public static let closing: UInt32 = 5
    public static let closed: UInt32 = 6
}

/// What every backend a host runs offers the host: publish its XenStore nodes, serve until
/// stopped, stop. ``EmbeddedHost`` runs each on a thread of its own for the domain's life.
public protocol BackendService: AnyObject, Sendable {
    /// A short name for the backend's thread and messages ("vbd-51712", "vrng-0").
    var name: String { get }
    /// Writes the backend's nodes and enters InitWait; before the frontend starts looking.
    func create() throws(BackendError)
    /// Serves the device on the caller's thread until ``stop()``.
    func run()
    /// Makes ``run()`` return soon.
    func stop()
}

/// One kind of split device: what it adds to the XenBus handshake that ``XenbusBackend``
/// does for every device. A device says which nodes it publishes, how it connects to an
/// Initialised frontend (reading the frontend's keys, mapping its ring grants, binding its
/// event channels through a ``FrontendLink``), how it serves a connection, and how it lets go.
/// Two parts are optional: ``nextPass(_:)`` (a device with timers or a descriptor of its own)
/// and ``statistics`` (its counters).
public protocol XenbusDevice: AnyObject {
    associatedtype Connection
    associatedtype Statistics: Sendable = Void
    /// The device class in XenStore paths ("vbd", "vif", "console", or a new one's).
    var kind: String { get }
    /// Nodes the backend publishes beyond `frontend`, `frontend-id`, `online` and `state`:
    /// the features and sizes the frontend reads.
    var backendNodes: [(key: String, value: String)] { get }
    /// Nodes the toolstack writes in the frontend's directory beyond `backend`, `backend-id`
    /// and `state` (`virtual-device`, `mac`, ...).
    var frontendNodes: [(key: String, value: String)] { get }
    /// Connects to a frontend that reached Initialised. A thrown error names the key that was
    /// wrong; the device then goes to Closing with the error as its ``XenbusBackend/lastFailure``.
    /// Whatever it set up before throwing it undoes itself.
    func connect(_ frontend: FrontendLink) throws(BackendError) -> Connection
    /// Serves whatever is pending; called on every pass of the control loop while connected
    /// (events, watches, and at least every 100 ms). A thrown error drops the connection (the
    /// device goes to Closing): for a frontend that broke the protocol, never for one bad request.
    func serve(_ connection: Connection) throws(BackendError)
    /// When the loop should pass again without a wake-up, asked after each ``serve(_:)``;
    /// by default only when woken (an event, a watch, ``FrontendLink/wake()``).
    func nextPass(_ connection: Connection) -> NextPass
    /// Lets a connection go: stops its ``ServiceWorker``s, unbinds its channels; its mappings
    /// end with it.
    func disconnect(_ connection: Connection)
    /// The device's counters, read from any thread (the handshake's own, connections and
    /// protocol errors, are ``XenbusBackend``'s).
    var statistics: Statistics { get }
}

extension XenbusDevice {
    public func nextPass(_ connection: Connection) -> NextPass { .whenWoken }
}

extension XenbusDevice where Statistics == Void {
    public var statistics: Void { () }
}

/// When a backend's control loop should run its next pass besides being woken.
public struct NextPass: Sendable, Equatable {
    /// Nanoseconds until the pass (0: at once, work is left; `UInt64.max`: only when woken).
    /// The loop passes at least every 100 ms regardless.
    public var nanoseconds: UInt64
    /// A descriptor whose readability also wakes the loop (a TAP's), or -1.
    public var readable: Int32

    public init(nanoseconds: UInt64, readable: Int32 = -1) {
        self.nanoseconds = nanoseconds
        self.readable = readable
    }

    public static let whenWoken = NextPass(nanoseconds: .max)
    public static let now = NextPass(nanoseconds: 0)
}

/// The backend half of a XenBus device, the same for every device: creates the toolstack's
/// nodes (`/local/domain/<backend>/backend/<kind>/<domid>/<handle>`, readable by the frontend,
/// and `/local/domain/<domid>/device/<kind>/<handle>`, owned by the frontend), watches the
/// frontend's `state` and walks InitWait → Connected → Closing → Closed with it, serving the
/// ``XenbusDevice`` while connected. It offers the device again to a frontend that comes back
/// to Initialising after Closed, treats a frontend whose `state` node is gone (its domain was
/// released) as Closed, and disconnects when stopped.
///
/// Two XenStore sessions: requests go through one whose replies wake nobody; the frontend's
/// state watch lives on the other, whose events wake the loop and mark the state for reading.
/// (One session for both made every reply wake the loop, which then read the state again: it
/// never slept.) The state is read when the watch fired and, as a safety net, once a second.
///
/// Threads: ``run()`` is the control loop (XenStore, state, connection, and ``XenbusDevice/serve(_:)``);
/// a device may serve on a ``BackendWorkerPool`` too (``ServiceWorker``s: blkback's rings take turns there).
/// Callers with a loop of their own (tests, benchmarks) call ``poll()`` instead of ``run()``,
/// then ``finish()``.
public final class XenbusBackend<Device: XenbusDevice>: BackendService, @unchecked Sendable {
    // run()/poll() own the mutable state; stop() and the accessors touch only atomics, mutexes, the pipe.
    public let device: Device
    public let frontend: DomainID
    public let handle: UInt32
    public let backendPath: String
    public let frontendPath: String
    public var name: String { "\(device.kind)-\(handle)" }

    let store: XenStore
    let grants: GrantTables
    let host: HostEventDomain
    let wake: WakePipe
    let reports: FailureReports
    private let stopping = Atomic<Bool>(false)
    private let published = Atomic<UInt32>(0)
    private let failure = Mutex<String?>(nil)
    private let connectionCount = Atomic<Int>(0)
    private let protocolErrorCount = Atomic<Int>(0)
    private let frontendChanged = WatchFlag()
    private var session: XenStoreConnection?
    private var watcher: XenStoreConnection?
    private var connection: Device.Connection?
    private var generation = 0
    private var stateReadAt: UInt64 = 0

    /// The state the backend last published.
    public var state: UInt32 { published.load(ordering: .acquiring) }
    /// Why the last connection failed or was dropped, if it was (naming the key or the ring).
    public var lastFailure: String? { failure.withLock { $0 } }
    /// Connections made so far.
    public var connections: Int { connectionCount.load(ordering: .relaxed) }
    /// Connections dropped because the frontend broke the protocol.
    public var protocolErrors: Int { protocolErrorCount.load(ordering: .relaxed) }
    /// The device's counters (``XenbusDevice/statistics``).
    public var statistics: Device.Statistics { device.statistics }

    /// The state is read again after this long without a watch event.
    static var stateReadInterval: UInt64 { 1_000_000_000 }

    /// Serves `device` as device `handle` of domain `frontend`, from the host domain `host`.
    public init(_ device: Device, frontend: DomainID, handle: UInt32, store: XenStore, grants: GrantTables,
                host: HostEventDomain) throws(BackendError) {
        self.device = device
        self.frontend = frontend
        self.handle = handle
        self.store = store
        self.grants = grants
        self.host = host
        wake = try WakePipe(for: "\(device.kind) backend")
        reports = FailureReports(wake)
        backendPath = "/local/domain/\(host.id.rawValue)/backend/\(device.kind)/\(frontend.rawValue)/\(handle)"
        frontendPath = "/local/domain/\(frontend.rawValue)/device/\(device.kind)/\(handle)"
    }

    // MARK: XenStore

    func storeRequest(_ type: XenStoreMessageType, _ payload: [UInt8]) throws(BackendError) -> [UInt8] {
        guard let session else { throw BackendError("no XenStore session") }
        let reply = store.request(XenStoreMessage(type: type, payload: payload), from: session)
        guard let reply, reply.type == type else {
            let text = reply.map { String(decoding: $0.payload.prefix { $0 != 0 }, as: UTF8.self) } ?? "no reply"
            throw BackendError("XenStore \(type) \(String(decoding: payload.prefix { $0 != 0 }, as: UTF8.self)): \(text)")
        }
        return reply.payload
    }

    private func write(_ path: String, _ value: String, permissions: [String]) throws(BackendError) {
        _ = try storeRequest(.write, Array(path.utf8) + [0] + Array(value.utf8))
        var payload = Array(path.utf8) + [0]
        for p in permissions { payload += Array(p.utf8) + [0] }
        _ = try storeRequest(.setPermissions, payload)
    }

    /// A node's value, or nil when it is missing or unreadable.
    func read(_ path: String) -> String? {
        guard let bytes = try? storeRequest(.read, Array(path.utf8) + [0]) else { return nil }
        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    private func publish(state: UInt32) throws(BackendError) {
        _ = try storeRequest(.write, Array((backendPath + "/state").utf8) + [0] + Array("\(state)".utf8))
        published.store(state, ordering: .releasing)
    }

    /// Writes the toolstack's nodes and the device's, each with its permissions (the backend
    /// directory the host's and readable by the frontend; the frontend directory the
    /// frontend's and readable by the host), watches the frontend's state and enters InitWait.
    /// Call once, before the frontend starts looking (before the guest boots).
    public func create() throws(BackendError) {
        let wake = self.wake, changed = frontendChanged
        session = store.connect(domain: host.id)
        let watcher = store.connect(domain: host.id, wake: {
            changed.raised.store(true, ordering: .releasing)
            wake.kick()
        })
        self.watcher = watcher
        let front = frontend.rawValue, back = host.id.rawValue
        let backendPermissions = ["n\(back)", "r\(front)"], frontendPermissions = ["n\(front)", "r\(back)"]
        try write(backendPath, "", permissions: backendPermissions)
        let common = [("frontend", frontendPath), ("frontend-id", "\(front)"), ("online", "1"),
                      ("state", "\(XenbusBackendState.initialising)")]
        for (key, value) in common + device.backendNodes.map({ ($0.key, $0.value) }) {
            try write(backendPath + "/" + key, value, permissions: backendPermissions)
        }
        try write(frontendPath, "", permissions: frontendPermissions)
        let toolstack = [("backend", backendPath), ("backend-id", "\(back)"), ("state", "\(XenbusBackendState.initialising)")]
        for (key, value) in toolstack + device.frontendNodes.map({ ($0.key, $0.value) }) {
            try write(frontendPath + "/" + key, value, permissions: frontendPermissions)
        }
        let watch = XenStoreMessage(type: .watch, payload: Array((frontendPath + "/state").utf8) + [0] + Array("\(name)-front".utf8) + [0])
        guard store.request(watch, from: watcher)?.type == .watch else {
            throw BackendError("XenStore watch \(frontendPath)/state refused")
        }
        try publish(state: XenbusBackendState.initWait)
    }

    // MARK: Running

    /// Makes ``run()`` return soon.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        wake.kick()
    }

    /// Follows the frontend's state and serves the device while connected, until ``stop()``;
    /// then ``finish()``. Runs on the caller's thread.
    public func run() {
        while !stopping.load(ordering: .acquiring) {
            let next = poll()
            if stopping.load(ordering: .acquiring) { break }
            if next.nanoseconds == 0 { continue }
            let milliseconds = next.nanoseconds >= 100_000_000 ? 100 : Int32((next.nanoseconds + 999_999) / 1_000_000)
            wake.wait(milliseconds: milliseconds, alsoReadable: next.readable)
        }
        finish()
    }

    /// One pass of the control loop (``run()`` is this in a loop), for callers with a loop of
    /// their own: reads the frontend's state if its watch fired (or a second has passed) and
    /// follows it, acts on a failure a ``ServiceWorker`` reported, and serves the device while
    /// connected. Returns when the device wants the next pass.
    @discardableResult
    public func poll() -> NextPass {
        var clock = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &clock)
        let now = UInt64(clock.tv_sec) &* 1_000_000_000 &+ UInt64(clock.tv_nsec)
        if frontendChanged.raised.exchange(false, ordering: .acquiringAndReleasing) || now &- stateReadAt >= Self.stateReadInterval {
            stateReadAt = now
            _ = watcher?.takeMessages()  // the events only say "look again"; the queue stays empty
            followFrontend()
        }
        if let report = reports.take(), report.generation == generation, connection != nil {
            fail(report.text)
        }
        guard let connection else { return .whenWoken }
        do { try device.serve(connection) } catch {
            fail("\(frontendPath): \(error)")
            return .whenWoken
        }
        return device.nextPass(connection)
    }

    /// Ends the connection and the XenStore sessions (what ``run()`` does when it returns),
    /// for callers that drive ``poll()`` themselves.
    public func finish() {
        disconnect()
        if let session { store.disconnect(session) }
        if let watcher { store.disconnect(watcher) }
        session = nil
        watcher = nil
    }

    /// Reacts to the frontend's state (level-triggered: whatever the state is now).
    private func followFrontend() {
        guard session != nil else { return }
        guard let text = read(frontendPath + "/state") else {
            // The frontend's directory is gone (its domain was released): as Xen's backends
            // do for XenbusStateUnknown, let the device go.
            if state != XenbusBackendState.closed {
                disconnect()
                try? publish(state: XenbusBackendState.closed)
            }
            return
        }
        let front = text.utf8.count <= 2 ? UInt32(text) ?? 0 : 0
        let mine = state
        switch front {
        case XenbusBackendState.initialised, XenbusBackendState.connected:
            if connection == nil && mine == XenbusBackendState.initWait { connect() }
        case XenbusBackendState.closing:
            if mine != XenbusBackendState.closing && mine != XenbusBackendState.closed {
                disconnect()
                try? publish(state: XenbusBackendState.closing)
            }
        case XenbusBackendState.closed:
            if mine != XenbusBackendState.closed {
                disconnect()
                try? publish(state: XenbusBackendState.closed)
            }
        case XenbusBackendState.initialising:
            // A frontend starting again after Closed: offer the device anew.
            if mine == XenbusBackendState.closed { try? publish(state: XenbusBackendState.initWait) }
        default: break
        }
    }

    private func fail(_ text: String) {
        failure.withLock { $0 = text }
        if connection != nil { protocolErrorCount.add(1, ordering: .relaxed) }
        disconnect()
        try? publish(state: XenbusBackendState.closing)
    }

    private func connect() {
        generation += 1
        do {
            connection = try device.connect(FrontendLink(self, generation: generation))
        } catch {
            return fail(error.description)
        }
        connectionCount.add(1, ordering: .relaxed)
        failure.withLock { $0 = nil }
        do { try publish(state: XenbusBackendState.connected) } catch { fail("\(error)") }
    }

    private func disconnect() {
        guard let connection else { return }
        device.disconnect(connection)
        self.connection = nil
    }
}

/// Set by the watch session's wake-up: the frontend's state is to be read again.
private final class WatchFlag: Sendable {
    let raised = Atomic<Bool>(true)
}

/// Failures ``ServiceWorker``s report to their backend's control loop, which drops the
/// connection they were made for (and ignores a report about an earlier connection).
final class FailureReports: Sendable {
    private let pending = Mutex<(generation: Int, text: String)?>(nil)
    private let wake: WakePipe

    init(_ wake: WakePipe) { self.wake = wake }

    func report(_ text: String, generation: Int) {
        // The first report about the newest connection wins; one about an older connection
        // (not yet taken) gives way.
        pending.withLock { if $0 == nil || $0!.generation < generation { $0 = (generation, text) } }
        wake.kick()
    }

    func take() -> (generation: Int, text: String)? {
        pending.withLock { value in
            defer { value = nil }
            return value
        }
    }
}

/// A connecting device's view of its frontend: the frontend's keys, its grants and its event
/// channels, each failure naming the key it came from.
public struct FrontendLink {
    /// The frontend's domain.
    public let domain: DomainID
    /// The frontend's directory, `/local/domain/<domid>/device/<kind>/<handle>`.
    public let path: String
    /// The host domain the backend runs in (it binds, sends and maps as this domain).
    public let host: HostEventDomain
    public let grants: GrantTables
    private let readNode: (String) -> String?
    private let waker: WakePipe
    let reports: FailureReports
    let generation: Int

    init<Device>(_ backend: XenbusBackend<Device>, generation: Int) {
        domain = backend.frontend
        path = backend.frontendPath
        host = backend.host
        grants = backend.grants
        readNode = { [unowned backend] in backend.read($0) }
        waker = backend.wake
        reports = backend.reports
        self.generation = generation
    }

    /// The frontend's `key` (a path below its directory: `queue-1/ring-ref`), or nil when it has none.
    /// Read on the control loop's thread only (while connecting).
    public func read(_ key: String) -> String? { readNode(path + "/" + key) }

    /// A frontend feature flag: "1" is on; missing, "0" or anything else is off.
    public func flag(_ key: String) -> Bool { read(key) == "1" }

    /// Wakes the backend's control loop for a pass (any thread): a device whose host side
    /// has work for the frontend (a frame for a vif) calls it.
    public func wake() { waker.kick() }

    /// The frontend's `key` as a decimal number no larger than `limit`.
    public func number(_ key: String, limit: UInt64 = UInt64(UInt32.max)) throws(BackendError) -> UInt64 {
        guard let text = read(key) else { throw BackendError("\(path)/\(key): missing") }
        guard !text.isEmpty, text.utf8.count <= 19, text.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }),
              let value = UInt64(text), value <= limit else {
            throw BackendError("\(path)/\(key): '\(text.prefix(32))' is not a number up to \(limit)")
        }
        return value
    }

    /// Maps the one-page ring whose grant reference is the frontend's `key`, writable, and
    /// attaches a back ring to it.
    public func mapRing<Request, Response>(_ key: String, as: (Request, Response).Type = (Request, Response).self)
        throws(BackendError) -> MappedBackRing<Request, Response>
    {
        let ref = GrantRef(UInt32(try number(key)))
        guard let table = grants.table(for: domain) else { throw BackendError("domain \(domain.rawValue) has no grant table") }
        let mapping: GrantMapping
        do { mapping = try table.map(ref, by: host.id, readOnly: false) } catch {
            throw BackendError("\(path)/\(key) \(ref.rawValue): cannot map: \(error)")
        }
        do { return try MappedBackRing(mapping) } catch {
            throw BackendError("\(path)/\(key) \(ref.rawValue): not a ring: \(error)")
        }
    }

    /// Copies `bytes` into the page the frontend granted as `ref`, from byte `offset` on, by
    /// grant copy (the grant must be writable and the bytes must fit the page).
    public func copy(_ bytes: UnsafeRawBufferPointer, toGrant ref: GrantRef, offset: Int = 0) -> GrantStatus {
        guard let base = bytes.baseAddress else { return .okay }
        let local = SharedRegion.unsafe(UnsafeMutableRawPointer(mutating: base), count: bytes.count)
        return grants.copy(GrantCopySegment(source: .local(local, offset: 0), dest: .grant(domain, ref, offset: offset),
                                            length: bytes.count), by: host.id)
    }

    /// Copies from the page the frontend granted as `ref`, from byte `offset` on, into `buffer`.
    public func copy(fromGrant ref: GrantRef, offset: Int = 0, into buffer: UnsafeMutableRawBufferPointer) -> GrantStatus {
        guard let base = buffer.baseAddress else { return .okay }
        return grants.copy(GrantCopySegment(source: .grant(domain, ref, offset: offset),
                                            dest: .local(.unsafe(base, count: buffer.count), offset: 0),
                                            length: buffer.count), by: host.id)
    }

    /// Binds the event channel the frontend offers in `key` (an unbound port of its own); its
    /// events wake the backend's control loop, or `worker` when one is given.
    public func bindEvent(_ key: String, waking worker: ServiceWorker? = nil) throws(BackendError) -> EventPort {
        let remote = EventPort(UInt32(try number(key)))
        let waker = self.waker
        let handler: @Sendable (EventPort) -> Void
        if let worker { handler = { _ in worker.wake() } } else { handler = { _ in waker.kick() } }
        do {
            // Delivered immediately: the handler is a wake-up, made on the frontend's own thread
            // (its EVTCHNOP_send) rather than relayed through the dispatcher thread.
            let port = try host.bindInterdomain(remoteDomain: domain, remotePort: remote, delivery: .immediate, handler: handler)
            worker?.wakes(on: port, of: host)
            return port
        } catch {
            throw BackendError("\(path)/\(key) \(remote.rawValue): cannot bind: \(error)")
        }
    }
}

/// A back ring over a frontend's granted page, keeping the mapping alive as long as the ring.
/// One thread serves it at a time (the control loop, or the ``ServiceWorker`` it belongs to),
/// so `ring` skips Swift's dynamic exclusivity checks: on a per-request path they cost as much
/// as the ring work.
public final class MappedBackRing<Request: BitwiseCopyable, Response: BitwiseCopyable>: @unchecked Sendable {
    private let mapping: GrantMapping
    @exclusivity(unchecked) public var ring: BackRing<Request, Response>
    /// The ring's page (for a backend that sets `req_event` itself, as netback's receive side does).
    public let region: SharedRegion

    init(_ mapping: consuming GrantMapping) throws(RingError) {
        let region: SharedRegion
        do { region = try mapping.sharedRegion() } catch { throw RingError.disconnected }
        ring = try BackRing(attaching: region)
        self.region = region
        self.mapping = mapping
    }

    /// Serves every pending request the Xen way: each is copied out once and handed to
    /// `handle`, which answers it through the slot writer (every byte it does not set is zero);
    /// responses are pushed in batches, the frontend is notified on `port` when it asked to
    /// be, and the final check closes the race with a request that came without an event.
    /// Throws, the ring disconnected, when the frontend breaks the ring protocol.
    public func serve(notifying port: EventPort, from host: HostEventDomain,
                      _ handle: (Request, RingSlotWriter<Response>) -> Void) throws(BackendError) {
        do {
            while true {
                while let request = try ring.consumeRequest() {
                    try ring.produceResponse { slot in handle(request, slot) }
                }
                if ring.pushResponsesAndCheckNotify() { try? host.send(port) }
                if try ring.finalCheckForRequests() { continue }
                return
            }
        } catch {
            throw BackendError("ring protocol error: \(error)")
        }
    }
}
