import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoStore

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
public protocol XenbusDevice: AnyObject {
    associatedtype Connection
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
    func connect(_ frontend: FrontendLink) throws(BackendError) -> Connection
    /// Serves whatever is pending; called on every wake-up while connected (events, watches,
    /// and at least every 100 ms). A thrown error drops the connection (the device goes to
    /// Closing): for a frontend that broke the protocol, never for one bad request.
    func serve(_ connection: Connection) throws(BackendError)
    /// Lets a connection go: unbinds its channels; its mappings end with it.
    func disconnect(_ connection: Connection)
}

/// The backend half of a XenBus device, the same for every device: creates the toolstack's
/// nodes (`/local/domain/<backend>/backend/<kind>/<domid>/<handle>`, readable by the frontend,
/// and `/local/domain/<domid>/device/<kind>/<handle>`, owned by the frontend), watches the
/// frontend's `state` and walks InitWait → Connected → Closing → Closed with it, serving the
/// ``XenbusDevice`` while connected. It offers the device again to a frontend that comes back
/// to Initialising after Closed, and disconnects when stopped.
public final class XenbusBackend<Device: XenbusDevice>: BackendService, @unchecked Sendable {
    // run() owns the mutable state; stop() and the accessors touch only atomics, mutexes, the pipe.
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
    private let stopping = Atomic<Bool>(false)
    private let published = Atomic<UInt32>(0)
    private let failure = Mutex<String?>(nil)
    private let connectionCount = Atomic<Int>(0)
    private var session: XenStoreConnection?
    private var connection: Device.Connection?

    /// The state the backend last published.
    public var state: UInt32 { published.load(ordering: .acquiring) }
    /// Why the last connection failed or was dropped, if it was.
    public var lastFailure: String? { failure.withLock { $0 } }
    /// Connections made so far.
    public var connections: Int { connectionCount.load(ordering: .relaxed) }

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
    public func create() throws(BackendError) {
        let wake = self.wake
        session = store.connect(domain: host.id, wake: { wake.kick() })
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
        _ = try storeRequest(.watch, Array((frontendPath + "/state").utf8) + [0] + Array("\(name)-front".utf8) + [0])
        try publish(state: XenbusBackendState.initWait)
    }

    // MARK: Running

    public func stop() {
        stopping.store(true, ordering: .releasing)
        wake.kick()
    }

    /// Follows the frontend's state and serves the device while connected, until ``stop()``.
    public func run() {
        while !stopping.load(ordering: .acquiring) {
            followFrontend()
            if let connection {
                do { try device.serve(connection) } catch { fail("\(frontendPath): \(error)") }
            }
            if stopping.load(ordering: .acquiring) { break }
            wake.wait(milliseconds: 100)
        }
        disconnect()
        if let session { store.disconnect(session) }
        session = nil
    }

    /// Reacts to the frontend's state (level-triggered: read on every wake).
    private func followFrontend() {
        guard session != nil else { return }
        let text = read(frontendPath + "/state") ?? ""
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
            if mine == XenbusBackendState.closed { try? publish(state: XenbusBackendState.initWait) }
        default: break
        }
    }

    private func fail(_ text: String) {
        failure.withLock { $0 = text }
        disconnect()
        try? publish(state: XenbusBackendState.closing)
    }

    private func connect() {
        do {
            connection = try device.connect(FrontendLink(self))
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
    private let wake: WakePipe

    init<Device>(_ backend: XenbusBackend<Device>) {
        domain = backend.frontend
        path = backend.frontendPath
        host = backend.host
        grants = backend.grants
        readNode = { [unowned backend] in backend.read($0) }
        wake = backend.wake
    }

    /// The frontend's `key`, or nil when it has none.
    public func read(_ key: String) -> String? { readNode(path + "/" + key) }

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
    /// events wake the backend's loop.
    public func bindEvent(_ key: String) throws(BackendError) -> EventPort {
        let remote = EventPort(UInt32(try number(key)))
        let wake = self.wake
        do {
            return try host.bindInterdomain(remoteDomain: domain, remotePort: remote) { _ in wake.kick() }
        } catch {
            throw BackendError("\(path)/\(key) \(remote.rawValue): cannot bind: \(error)")
        }
    }
}

/// A back ring over a frontend's granted page, keeping the mapping alive as long as the ring.
public final class MappedBackRing<Request: BitwiseCopyable, Response: BitwiseCopyable> {
    private let mapping: GrantMapping
    public var ring: BackRing<Request, Response>

    init(_ mapping: consuming GrantMapping) throws(RingError) {
        let region: SharedRegion
        do { region = try mapping.sharedRegion() } catch { throw RingError.disconnected }
        ring = try BackRing(attaching: region)
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
