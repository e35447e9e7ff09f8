import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls

/// Runs a piece of work on one thread at a time, again as often as it was asked for while
/// running: a kick during a run makes the running thread go round once more instead of
/// waiting for it. Lets the store's wake-up (which may come from the very thread that is
/// servicing the ring) and event handlers both kick without a lock or a deadlock.
final class Kicker: Sendable {
    private let requests = Atomic<Int>(0)
    private let body = Mutex<(@Sendable () -> Void)?>(nil)

    func set(_ work: @escaping @Sendable () -> Void) { body.withLock { $0 = work } }

    func kick() {
        guard requests.add(1, ordering: .sequentiallyConsistent).oldValue == 0 else { return }
        var seen = 1
        while true {
            body.withLock { $0 }?()
            // Kicks that came while running are still counted: go round once more for them.
            let left = requests.subtract(seen, ordering: .sequentiallyConsistent).newValue
            if left == 0 { return }
            seen = left
        }
    }
}

/// The store's end of one guest's `xenstore_domain_interface`: requests come from the page's
/// `req` ring when the guest notifies the event channel; replies and watch events go into `rsp`
/// as space allows, each index update followed by a notification.
///
/// The page is guest memory: every index is read once and checked (ByteRing); a guest that
/// breaks the protocol (indices more than a ring apart, a payload over 4096 bytes) has its
/// connection stopped with `error` set, and may recover by reconnecting (`connection` =
/// RECONNECT), which drops its partial input, queued output, watches and transactions.
public final class XenStoreRingTransport: Sendable {
    public let store: XenStore
    public let domain: DomainID
    public let connection: XenStoreConnection
    /// The host's port bound to the guest's store event channel.
    public let port: EventPort
    private let host: HostEventDomain
    private let page: SharedRegion
    private let requests: ByteRing
    private let responses: ByteRing
    private let kicker: Kicker
    private let state = Mutex(RingState())
    private let closed = Atomic<Bool>(false)

    struct RingState {
        var decoder = XenStoreDecoder()
        var broken = false
    }

    static let featuresOffset = 2064
    static let connectionOffset = 2068
    static let errorOffset = 2072
    static let requestConsumerOffset = 2048
    static let requestProducerOffset = 2052
    static let responseConsumerOffset = 2056
    static let responseProducerOffset = 2060

    /// Serves `page` (the host's view of the guest's store page) for `domain`, binding the
    /// host's end of the guest's unbound port `guestPort`. The binding starts pending, so the
    /// host domain's next dispatch looks at the rings once.
    public init(store: XenStore, host: HostEventDomain, domain: DomainID, page: SharedRegion, guestPort: EventPort) throws(XenError) {
        guard page.count >= MemoryLayout<vireo_xenstore_domain_interface>.size else { throw .EINVAL }
        let kicker = Kicker()
        self.store = store
        self.domain = domain
        self.host = host
        self.page = page
        self.requests = ByteRing.xenstoreRequests(page)
        self.responses = ByteRing.xenstoreResponses(page)
        self.kicker = kicker
        self.connection = store.connect(domain: domain, privileged: false) { kicker.kick() }
        page.storeRelease32(UInt32(VIREO_XENSTORE_SERVER_FEATURE_RECONNECTION | VIREO_XENSTORE_SERVER_FEATURE_ERROR),
                            at: Self.featuresOffset)
        do {
            self.port = try host.bindInterdomain(remoteDomain: domain, remotePort: guestPort) { _ in kicker.kick() }
        } catch {
            store.disconnect(connection)
            throw error
        }
        kicker.set { [weak self] in self?.service() }
    }

    /// Looks at both rings now (what an event on the port does).
    public func kick() { kicker.kick() }

    /// Stops serving: unbinds the port and ends the store connection. Idempotent.
    public func close() {
        guard !closed.exchange(true, ordering: .sequentiallyConsistent) else { return }
        kicker.set {}
        try? host.close(port)
        store.disconnect(connection)
    }

    deinit { close() }

    /// The guest broke the protocol: stop serving the connection until it reconnects.
    private func fail(_ s: inout RingState, _ code: Int32) {
        s.broken = true
        page.storeRelease32(UInt32(code), at: Self.errorOffset)
    }

    private func service() {
        guard !closed.load(ordering: .sequentiallyConsistent), !connection.isClosed else { return }
        var notify = false
        state.withLock { s in
            if page.loadAcquire32(at: Self.connectionOffset) == UInt32(VIREO_XENSTORE_RECONNECT) {
                reconnect(&s)
                notify = true
                return
            }
            guard !s.broken else { return }
            var progress = true
            while progress && !s.broken {
                progress = false
                if takeRequests(&s) { progress = true; notify = true }
                guard !s.broken else { break }
                var ringError = false
                let written = connection.drain { bytes in
                    do { return try responses.write(bytes) } catch {
                        ringError = true
                        return 0
                    }
                }
                if written > 0 { progress = true; notify = true }
                if ringError { fail(&s, VIREO_XENSTORE_ERROR_RINGIDX) }
            }
            if s.broken { notify = true }
        }
        if notify { try? host.send(port) }
    }

    /// Handles buffered requests and reads more from `req`, while the guest reads its replies
    /// (at most the outstanding-request quota of them wait unread; the rest wait in the ring).
    /// Returns whether any request bytes were consumed or handled.
    private func takeRequests(_ s: inout RingState) -> Bool {
        let quota = store.quotas.outstandingRequests
        var progress = false
        var chunk = [UInt8](repeating: 0, count: Int(VIREO_XENSTORE_RING_SIZE))
        while true {
            while connection.pendingReplies < quota {
                let message: XenStoreMessage?
                do { message = try s.decoder.next() } catch {
                    fail(&s, VIREO_XENSTORE_ERROR_PROTO)
                    return progress
                }
                guard let message else { break }
                store.process(message, from: connection)
                progress = true
            }
            guard connection.pendingReplies < quota else { return progress }
            let n: Int
            do {
                n = try chunk.withUnsafeMutableBytes { buffer throws(ByteRingError) in try requests.read(into: buffer) }
            } catch {
                fail(&s, VIREO_XENSTORE_ERROR_RINGIDX)
                return progress
            }
            guard n > 0 else { return progress }
            progress = true
            s.decoder.append(Array(chunk[0..<n]))
        }
    }

    /// The guest asked to start over: drop partial input, queued output, watches and
    /// transactions, empty both rings, then say CONNECTED.
    private func reconnect(_ s: inout RingState) {
        s.decoder.reset()
        s.broken = false
        store.reset(connection)
        page.storeRelease32(page.loadAcquire32(at: Self.requestProducerOffset), at: Self.requestConsumerOffset)
        page.storeRelease32(page.loadAcquire32(at: Self.responseConsumerOffset), at: Self.responseProducerOffset)
        page.storeRelease32(UInt32(VIREO_XENSTORE_ERROR_NONE), at: Self.errorOffset)
        Barrier.full()
        page.storeRelease32(UInt32(VIREO_XENSTORE_CONNECTED), at: Self.connectionOffset)
    }
}

/// Attaches a ring transport to every domain the store introduces and detaches it at release:
/// the store's domain hooks for a host that owns guest memory. `page` maps a domain's store
/// frame to the host's view of it.
public final class XenStoreGuestRings: Sendable {
    public let store: XenStore
    public let host: HostEventDomain
    private let transports = Mutex<[DomainID: XenStoreRingTransport]>([:])

    public init(store: XenStore, host: HostEventDomain,
                page: @escaping @Sendable (DomainID, GuestFrame) throws -> SharedRegion) {
        self.store = store
        self.host = host
        store.setDomainHooks(XenStoreDomainHooks(
            introduce: { [weak self] id, frame, port in
                guard let self else { return }
                let transport = try XenStoreRingTransport(store: store, host: host, domain: id, page: try page(id, frame), guestPort: port)
                self.transports.withLock { $0[id] = transport }
            },
            release: { [weak self] id in
                self?.transports.withLock { $0.removeValue(forKey: id) }?.close()
            }))
    }

    /// The transport serving `domain`, if it is introduced.
    public func transport(for domain: DomainID) -> XenStoreRingTransport? {
        transports.withLock { $0[domain] }
    }

    deinit {
        store.setDomainHooks(nil)
        for t in transports.withLock({ $0.values }) { t.close() }
    }
}
