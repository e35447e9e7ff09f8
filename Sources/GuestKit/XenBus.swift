#if canImport(VireoCore)
import VireoCore
#endif
import VireoABI
import VireoHypercalls

/// XenBus device states (`vireo/io/xenbus.h`), written by each end in its `state` node.
public enum XenbusState: UInt32, Sendable {
    case unknown = 0
    case initialising = 1
    case initWait = 2
    case initialised = 3
    case connected = 4
    case closing = 5
    case closed = 6
    case reconfiguring = 7
    case reconfigured = 8
}

/// The frontend half of a XenBus device handshake: the frontend's node (`device/vbd/768`) has
/// `backend` and `backend-id`; the frontend writes its own `state` and waits on the backend's
/// through a watch, running the guest's loop meanwhile.
public struct XenbusFrontend<Platform: GuestPlatform> {
    public let store: XenStoreClient<Platform>
    /// The frontend's node, e.g. "device/vbd/768" (relative to the domain's home) or absolute.
    public let node: String
    /// The backend's node, read from `node/backend`.
    public let backend: String
    /// The backend's domain, read from `node/backend-id`.
    public let backendDomain: DomainID

    public init(store: XenStoreClient<Platform>, node: String) throws(GuestError) {
        self.store = store
        self.node = node
        let path = try store.read(node + "/backend")
        backend = String(decoding: XenStoreClient<Platform>.trimmed(path), as: UTF8.self)
        guard let id = Bytes.decimal(XenStoreClient<Platform>.trimmed(try store.read(node + "/backend-id"))),
              id < UInt64(VIREO_DOMID_FIRST_RESERVED) else { throw GuestError.EINVAL }
        backendDomain = DomainID(UInt16(id))
    }

    /// Writes the frontend's state.
    public func switchState(_ state: XenbusState, transaction: UInt32 = 0) throws(GuestError) {
        try store.write(node + "/state", Bytes.decimal(UInt64(state.rawValue)), transaction: transaction)
    }

    /// The backend's state now (`unknown` when it has none yet).
    public func backendState() throws(GuestError) -> XenbusState {
        let raw: [UInt8]
        do {
            raw = try store.read(backend + "/state")
        } catch {
            if error == .ENOENT { return .unknown }
            throw error
        }
        guard let value = Bytes.decimal(XenStoreClient<Platform>.trimmed(raw)), value <= 8,
              let state = XenbusState(rawValue: UInt32(value)) else { return .unknown }
        return state
    }

    /// Waits (watching `backend/state`) until the backend reaches one of `states`; returns it.
    public func waitForBackend(_ states: [XenbusState]) throws(GuestError) -> XenbusState {
        let token = "gk-" + node
        try store.watch(backend + "/state", token: token)
        defer { try? store.unwatch(backend + "/state", token: token) }
        while true {
            let state = try backendState()
            if states.contains(state) { return state }
            _ = try store.waitForWatchEvent()
        }
    }
}

/// A frontend's end of a device with one ring page and one event channel, after the handshake.
public struct FrontendChannel<Request: BitwiseCopyable, Response: BitwiseCopyable> {
    /// The shared ring, initialised by the frontend.
    public var ring: FrontRing<Request, Response>
    /// The ring page's grant (the backend maps it).
    public let ringRef: GrantRef
    /// The frontend's port; the backend bound it.
    public let port: EventPort
}

extension XenbusFrontend {
    /// Xen's frontend handshake for a device with one ring and one event channel: waits for
    /// the backend's InitWait, grants a fresh ring page, offers an unbound port, writes
    /// `ring-ref`, `event-channel` and the `extra` nodes, goes Initialised, waits for the
    /// backend's Connected and goes Connected. Events on the port wake the guest's loop.
    /// - Throws: EIO when the backend closes instead, ENOSPC when no grant is free.
    public func connect<Request, Response>(guest: Guest<Platform>, grants: inout GuestGrants<Platform>,
                                           extra: [(key: String, value: [UInt8])] = []) throws(GuestError)
        -> FrontendChannel<Request, Response>
    {
        guard try waitForBackend([.initWait, .connected, .closing, .closed]) == .initWait else { throw GuestError.EIO }
        let page = guest.platform.allocatePage()
        let ring: FrontRing<Request, Response>
        do { ring = try FrontRing(initializing: guest.platform.memory(at: page, count: guestPageSize)) } catch {
            throw GuestError.EINVAL
        }
        guard let ref = grants.grantAccess(to: backendDomain, frame: GuestFrame(page >> guestPageShift), readOnly: false) else {
            throw GuestError.ENOSPC
        }
        let port = try guest.allocUnbound(remote: backendDomain)
        guest.setHandler(for: port) { _ in }
        try store.write(node + "/ring-ref", Bytes.decimal(UInt64(ref.rawValue)))
        try store.write(node + "/event-channel", Bytes.decimal(UInt64(port.rawValue)))
        for item in extra { try store.write(node + "/" + item.key, item.value) }
        try switchState(.initialised)
        guard try waitForBackend([.connected, .closing, .closed]) == .connected else { throw GuestError.EIO }
        try switchState(.connected)
        return FrontendChannel(ring: ring, ringRef: ref, port: port)
    }
}

extension FrontendChannel {
    /// Queues `request` and notifies the backend when it asked for an event.
    /// - Throws: EBUSY when the ring is full, EIO when the ring was disconnected.
    public mutating func send<Platform>(_ request: Request, in guest: Guest<Platform>) throws(GuestError) {
        guard ring.freeRequests > 0 else { throw GuestError.EBUSY }
        do { try ring.produceRequest(request) } catch { throw GuestError.EIO }
        if ring.pushRequestsAndCheckNotify() { try guest.send(port) }
    }

    /// The next response, running the guest's loop (and sleeping in it) until one comes. The
    /// final check re-arms the response event before each sleep, so none is missed.
    /// - Throws: EIO when the backend broke the ring protocol.
    public mutating func receive<Platform>(in guest: Guest<Platform>) throws(GuestError) -> Response {
        while true {
            do {
                if let response = try ring.consumeResponse() { return response }
                if try ring.finalCheckForResponses() { continue }
            } catch {
                throw GuestError.EIO
            }
            guest.runOnce()
        }
    }
}
