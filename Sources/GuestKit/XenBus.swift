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
