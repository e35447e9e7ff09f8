import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoStore

/// netback: the host side of one paravirtual network interface (vif) of one frontend domain,
/// speaking Xen's netif protocol (`vireo/io/netif.h`; Docs/network.md).
///
/// Wiring (Xen's): ``create()`` writes the toolstack's nodes, the backend directory
/// `/local/domain/0/backend/vif/<domid>/<handle>` (frontend, frontend-id, online, handle, mac,
/// the features, state) and the frontend directory `/local/domain/<domid>/device/vif/<handle>`
/// (backend, backend-id, handle, mac, state), the latter owned by the frontend. ``run()`` (or
/// ``poll()`` from a caller's own loop) then follows the frontend's state: on Initialised or
/// Connected it reads tx-ring-ref, rx-ring-ref, event-channel, request-rx-copy and the
/// frontend's features, maps both rings, binds the event channel and enters Connected; on
/// Closing/Closed it disconnects; a frontend that starts again is offered the device anew.
///
/// Transmit: each packet's slots (first request, extra info slots, fragments) are copied out of
/// the ring once and validated as a whole before any byte moves; then the fragments are
/// grant-copied into a host buffer and the frame goes to the ``NetworkAttachment``. Every slot
/// gets its response (OKAY, ERROR for an invalid packet, DROPPED when the host side refused it,
/// NULL for an extra slot). A chain that breaks the ring rules (runs past the producer, crosses
/// its page, bad extra type) or a producer index out of range disconnects this vif (Closing).
///
/// Receive: frames from the host side wait in a bounded ``FrameQueue`` (a frame that does not
/// fit is dropped and counted) and are grant-copied into the pages the frontend posted, one
/// page per slot, offset 0, response i in the slot of request i.
public final class NetBackend: @unchecked Sendable {  // run()/poll() own the mutable state; others touch atomics, locks and the pipe
    public typealias TxRequest = vireo_netif_tx_request
    public typealias TxResponse = vireo_netif_tx_response
    public typealias RxRequest = vireo_netif_rx_request
    public typealias RxResponse = vireo_netif_rx_response

    /// What a vif is made with.
    public struct Configuration: Sendable {
        /// The guest's MAC; nil gives ``EthernetAddress/generated(domain:handle:)``.
        public var mac: EthernetAddress?
        /// The receive queue's bounds: frames, and bytes (at least 64 KiB).
        public var queueFrames: Int
        public var queueBytes: Int
        /// Xen's `rate=`: what the guest may transmit, bytes per second; nil: no limit.
        public var rateBytesPerSecond: UInt64?
        /// The token bucket's depth; nil: Xen's (50 ms of the rate, at least 128 KiB).
        public var rateBurstBytes: UInt64?
        /// Monotonic nanoseconds (tests pass their own).
        public var clock: @Sendable () -> UInt64

        public init(mac: EthernetAddress? = nil, queueFrames: Int = 256, queueBytes: Int = 1 << 20,
                    rateBytesPerSecond: UInt64? = nil, rateBurstBytes: UInt64? = nil,
                    clock: @escaping @Sendable () -> UInt64 = ConsoleBackend.monotonicNanoseconds) {
            self.mac = mac
            self.queueFrames = queueFrames
            self.queueBytes = queueBytes
            self.rateBytesPerSecond = rateBytesPerSecond
            self.rateBurstBytes = rateBurstBytes
            self.clock = clock
        }
    }

    /// Counters, for tests, diagnostics and metrics.
    public struct Statistics: Sendable, Equatable {
        /// Frames the guest sent that the host side took, and their bytes.
        public var txPackets = 0
        public var txBytes = 0
        /// Packets answered NETIF_RSP_ERROR (invalid, or a grant that could not be copied).
        public var txErrors = 0
        /// Valid packets the host side refused (NETIF_RSP_DROPPED).
        public var txDropped = 0
        /// Times the rate limit held a packet back.
        public var txRateDelays = 0
        /// Frames put into the guest's pages, and their bytes.
        public var rxPackets = 0
        public var rxBytes = 0
        /// Frames for the guest dropped: queue full, not connected, too large for the frontend.
        public var rxDropped = 0
        /// Frames that could not be copied into the posted pages (bad grant): answered ERROR.
        public var rxErrors = 0
        /// Events sent to the frontend.
        public var notifications = 0
        public var connections = 0
        /// Connections ended because the frontend broke the protocol.
        public var protocolErrors = 0
    }

    public let frontend: DomainID
    public let handle: UInt32
    public let mac: EthernetAddress
    public let backendPath: String
    public let frontendPath: String
    public let configuration: Configuration

    private let store: XenStore
    private let grants: GrantTables
    private let host: HostEventDomain
    private let wake: WakePipe
    private let stopping = Atomic<Bool>(false)
    /// Set by the XenStore session's wake-up (a watch fired): the frontend's state is read again.
    private let storeChanged = StoreFlag()
    private final class StoreFlag: Sendable { let raised = Atomic<Bool>(true) }
    private var stateReadAt: UInt64 = 0
    /// Frames are taken for the guest only while Connected.
    private let accepting = Atomic<Bool>(false)
    let queue: FrameQueue
    private let queueRegion: SharedRegion
    private let attachmentBox = Mutex<(any NetworkAttachment)?>(nil)
    @exclusivity(unchecked) private var attachment: (any NetworkAttachment)?

    private let stats = Mutex(Statistics())
    @exclusivity(unchecked) private var pending = Statistics()  // this pass's counts, added to `stats` at its end
    public var statistics: Statistics { stats.withLock { $0 } }

    /// The state the backend last published.
    public var state: UInt32 { published.load(ordering: .acquiring) }
    private let published = Atomic<UInt32>(0)
    /// Why the last connection failed or was dropped, if it was.
    public var lastFailure: String? { failure.withLock { $0 } }
    private let failure = Mutex<String?>(nil)

    // The service state (here, `attachment`, `pending`, `connection` and the rings) is touched
    // only by the one thread in run()/poll(), so it skips Swift's dynamic exclusivity checks
    // (@exclusivity(unchecked)): on the per-frame path they cost as much as the ring work.
    // Transmit scratch: one packet at a time, allocated once.
    private static let frameBytes = 65536
    private let txBuffer: UnsafeMutableRawPointer
    private let txRegion: SharedRegion
    @exclusivity(unchecked) private var slots: [(id: UInt16, extra: Bool)] = []
    @exclusivity(unchecked) private var fragments: [(ref: UInt32, offset: Int, length: Int)] = []
    @exclusivity(unchecked) private var parsed = ParsedPacket()
    @exclusivity(unchecked) private var held = false
    @exclusivity(unchecked) private var bucket: TokenBucket?
    @exclusivity(unchecked) private var rxRequests: [RxRequest] = []

    /// The packet whose slots are in `slots`/`fragments`.
    private struct ParsedPacket {
        var size = 0
        var flags: UInt16 = 0
        var invalid: String?
        var controlOnly = false
    }

    /// Data slots a packet may use (Xen's XEN_NETIF_NR_SLOTS_MIN, what every backend accepts).
    public static let maxSlots = Int(VIREO_XEN_NETIF_NR_SLOTS_MIN)
    /// Packets served per ring per pass, so neither direction starves the other.
    static let batch = 256
    private static let knownTxFlags = UInt16(VIREO_NETTXF_csum_blank | VIREO_NETTXF_data_validated
                                                 | VIREO_NETTXF_more_data | VIREO_NETTXF_extra_info)

    /// The connection to the frontend while Connected.
    private final class Connection {
        let txMapping: MappingBox
        let rxMapping: MappingBox
        @exclusivity(unchecked) var tx: BackRing<TxRequest, TxResponse>
        @exclusivity(unchecked) var rx: BackRing<RxRequest, RxResponse>
        let rxRegion: SharedRegion
        let port: EventPort
        let frontendSG: Bool
        let blankIPv4: Bool
        let blankIPv6: Bool
        init(txMapping: MappingBox, rxMapping: MappingBox, tx: BackRing<TxRequest, TxResponse>,
             rx: BackRing<RxRequest, RxResponse>, rxRegion: SharedRegion, port: EventPort,
             frontendSG: Bool, blankIPv4: Bool, blankIPv6: Bool) {
            self.txMapping = txMapping
            self.rxMapping = rxMapping
            self.tx = tx
            self.rx = rx
            self.rxRegion = rxRegion
            self.port = port
            self.frontendSG = frontendSG
            self.blankIPv4 = blankIPv4
            self.blankIPv6 = blankIPv6
        }
    }
    private final class MappingBox {
        let mapping: GrantMapping
        init(_ mapping: consuming GrantMapping) { self.mapping = mapping }
    }
    @exclusivity(unchecked) private var connection: Connection?
    private var session: XenStoreConnection?

    /// A vif `handle` (0 = the first, Linux's eth0) of domain `frontend`.
    public init(frontend: DomainID, handle: UInt32 = 0, configuration: Configuration = Configuration(),
                store: XenStore, grants: GrantTables, host: HostEventDomain) throws(BackendError) {
        guard configuration.queueFrames > 0, configuration.queueBytes >= Self.frameBytes else {
            throw BackendError("vif: the receive queue needs at least 1 frame and 64 KiB")
        }
        if let rate = configuration.rateBytesPerSecond, rate == 0 { throw BackendError("vif: rate 0 (give bytes per second > 0)") }
        self.frontend = frontend
        self.handle = handle
        self.configuration = configuration
        mac = configuration.mac ?? .generated(domain: frontend.rawValue, handle: handle)
        self.store = store
        self.grants = grants
        self.host = host
        wake = try WakePipe(for: "network backend")
        backendPath = "/local/domain/\(host.id.rawValue)/backend/vif/\(frontend.rawValue)/\(handle)"
        frontendPath = "/local/domain/\(frontend.rawValue)/device/vif/\(handle)"
        queue = FrameQueue(maxFrames: configuration.queueFrames, capacityBytes: configuration.queueBytes)
        queueRegion = queue.region
        txBuffer = UnsafeMutableRawPointer.allocate(byteCount: Self.frameBytes, alignment: 4096)
        txBuffer.initializeMemory(as: UInt8.self, repeating: 0, count: Self.frameBytes)
        txRegion = .unsafe(txBuffer, count: Self.frameBytes)
        slots.reserveCapacity(RingLayout.slotCount(request: TxRequest.self, response: TxResponse.self, pages: 1))
        fragments.reserveCapacity(Self.maxSlots)
        rxRequests.reserveCapacity(Self.maxSlots)
        if let rate = configuration.rateBytesPerSecond {
            bucket = TokenBucket(bytesPerSecond: rate, burstBytes: configuration.rateBurstBytes, now: configuration.clock())
        }
    }

    deinit { txBuffer.deallocate() }

    /// Connects the host side: where the guest's frames go (and, for a TAP, where the guest's
    /// come from). Call before ``run()``; a later call replaces it.
    public func attach(_ attachment: any NetworkAttachment) {
        attachmentBox.withLock { $0 = attachment }
        wake.kick()
    }

    // MARK: XenStore

    private func storeRequest(_ type: XenStoreMessageType, _ payload: [UInt8]) throws(BackendError) -> [UInt8] {
        guard let session else { throw BackendError("no XenStore session") }
        let reply = store.request(XenStoreMessage(type: type, payload: payload), from: session)
        guard let reply, reply.type == type else {
            let text = reply.map { String(decoding: $0.payload.prefix { $0 != 0 }, as: UTF8.self) } ?? "no reply"
            throw BackendError("XenStore \(type) \(String(decoding: payload.prefix { $0 != 0 }, as: UTF8.self)): \(text)")
        }
        return reply.payload
    }

    private func write(_ path: String, _ value: String) throws(BackendError) {
        _ = try storeRequest(.write, Array(path.utf8) + [0] + Array(value.utf8))
    }

    private func setPermissions(_ path: String, _ permissions: [String]) throws(BackendError) {
        var payload = Array(path.utf8) + [0]
        for p in permissions { payload += Array(p.utf8) + [0] }
        _ = try storeRequest(.setPermissions, payload)
    }

    private func read(_ path: String) -> String? {
        guard let bytes = try? storeRequest(.read, Array(path.utf8) + [0]) else { return nil }
        return String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    private func readNumber(_ path: String) -> UInt64? {
        guard let text = read(path), !text.isEmpty, text.utf8.count <= 19,
              text.utf8.allSatisfy({ $0 >= 48 && $0 <= 57 }) else { return nil }
        return UInt64(text)
    }

    /// A frontend feature flag: "1" is on; missing, "0" or anything else is off.
    private func readFlag(_ key: String) -> Bool { readNumber(frontendPath + "/" + key) == 1 }

    private func publish(state: UInt32) throws(BackendError) {
        try write(backendPath + "/state", "\(state)")
        published.store(state, ordering: .releasing)
    }

    /// The backend's keys, as Linux's netback publishes them (see Docs/network.md for each).
    var backendKeys: [(String, String)] {
        [("frontend", frontendPath), ("frontend-id", "\(frontend.rawValue)"), ("online", "1"),
         ("handle", "\(handle)"), ("mac", mac.description), ("type", "vif"),
         ("feature-sg", "1"), ("feature-gso-tcpv4", "0"), ("feature-gso-tcpv6", "0"),
         ("feature-no-csum-offload", "0"), ("feature-ipv6-csum-offload", "1"),
         ("feature-rx-copy", "1"), ("feature-rx-flip", "0"),
         ("feature-split-event-channels", "0"), ("feature-multicast-control", "0"),
         ("feature-ctrl-ring", "0"), ("state", "\(XenbusBackendState.initialising)")]
    }

    /// Writes the toolstack's nodes and the backend's features, and enters InitWait. Call
    /// once, before the frontend starts looking (before the guest boots).
    public func create() throws(BackendError) {
        let wake = self.wake, storeChanged = self.storeChanged
        session = store.connect(domain: host.id, wake: {
            storeChanged.raised.store(true, ordering: .releasing)
            wake.kick()
        })
        let front = frontend.rawValue, back = host.id.rawValue
        let backendPermissions = ["n\(back)", "r\(front)"], frontendPermissions = ["n\(front)", "r\(back)"]
        _ = try storeRequest(.mkdir, Array(backendPath.utf8) + [0])
        try setPermissions(backendPath, backendPermissions)
        for (key, value) in backendKeys {
            try write(backendPath + "/" + key, value)
            try setPermissions(backendPath + "/" + key, backendPermissions)
        }
        _ = try storeRequest(.mkdir, Array(frontendPath.utf8) + [0])
        try setPermissions(frontendPath, frontendPermissions)
        for (key, value) in [("backend", backendPath), ("backend-id", "\(back)"), ("handle", "\(handle)"),
                             ("mac", mac.description), ("state", "\(XenbusBackendState.initialising)")] {
            try write(frontendPath + "/" + key, value)
            try setPermissions(frontendPath + "/" + key, frontendPermissions)
        }
        _ = try storeRequest(.watch, Array((frontendPath + "/state").utf8) + [0] + Array("vif-front".utf8) + [0])
        try publish(state: XenbusBackendState.initWait)
    }

    // MARK: Running

    /// Makes ``run()`` return soon.
    public func stop() {
        stopping.store(true, ordering: .releasing)
        wake.kick()
    }

    /// Serves the vif until ``stop()``: follows the frontend's state and serves both rings and
    /// the host side while connected. Call ``create()`` first. Runs on the caller's thread.
    public func run() {
        while !stopping.load(ordering: .acquiring) {
            let next = poll()
            if stopping.load(ordering: .acquiring) { break }
            if next == 0 { continue }  // more work than one pass serves
            var watched: Int32 = -1
            if connection != nil, !queue.isFull, let fd = attachment?.pollDescriptor { watched = fd }
            let milliseconds = next >= 100_000_000 ? 100 : Int32((next + 999_999) / 1_000_000)
            wake.wait(milliseconds: milliseconds, alsoReadable: watched)
        }
        finish()
    }

    /// Ends the connection and the XenStore session (what ``run()`` does when it returns), for
    /// callers that drive ``poll()`` themselves.
    public func finish() {
        disconnect()
        if let session { store.disconnect(session) }
        session = nil
    }

    /// One pass, for callers with a loop of their own (``run()`` is this in a loop): follows
    /// the frontend's state, then serves the transmit ring, the host side's descriptor and the
    /// receive queue. Returns the nanoseconds until there is a reason to look again without a
    /// wake-up: 0 when work is left, the rate limit's wait, or `UInt64.max`.
    @discardableResult
    public func poll() -> UInt64 {
        attachment = attachmentBox.withLock { $0 }
        followFrontend()
        guard let connection else { return .max }
        var next = UInt64.max
        var notify = false
        do {
            let tx = try serveTransmit(connection, notify: &notify)
            next = min(next, tx)
            if let attachment, attachment.pollDescriptor != nil {
                attachment.pump(limit: Self.batch) { bytes, checksum in
                    enqueue(bytes, checksum: checksum, kick: false)
                }
            }
            if try serveReceive(connection, notify: &notify) { next = 0 }
        } catch {
            flushStatistics()
            fail("\(frontendPath): \(error)")
            return .max
        }
        if notify {
            pending.notifications += 1
            try? host.send(connection.port)
        }
        flushStatistics()
        return next
    }

    private func flushStatistics() {
        let add = pending
        pending = Statistics()
        stats.withLock { s in
            s.txPackets += add.txPackets; s.txBytes += add.txBytes; s.txErrors += add.txErrors
            s.txDropped += add.txDropped; s.txRateDelays += add.txRateDelays
            s.rxPackets += add.rxPackets; s.rxBytes += add.rxBytes; s.rxDropped += add.rxDropped
            s.rxErrors += add.rxErrors; s.notifications += add.notifications
            s.connections += add.connections; s.protocolErrors += add.protocolErrors
        }
    }

    /// Reacts to the frontend's state: read when the state watch fired, and at least every
    /// 50 ms regardless (level-triggered, so a missed wake-up costs latency, never the state),
    /// not on every pass: a busy vif would otherwise make a store request per batch.
    private func followFrontend() {
        guard session != nil else { return }
        let now = configuration.clock()
        guard storeChanged.raised.exchange(false, ordering: .acquiring) || now &- stateReadAt >= 50_000_000 else { return }
        stateReadAt = now
        let front = readNumber(frontendPath + "/state").map { UInt32(truncatingIfNeeded: $0) } ?? 0
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
        if connection != nil { stats.withLock { $0.protocolErrors += 1 } }
        disconnect()
        try? publish(state: XenbusBackendState.closing)
    }

    private func connect() {
        let node = frontendPath
        if readNumber(node + "/multi-queue-num-queues").map({ $0 > 1 }) ?? false {
            return fail("\(node)/multi-queue-num-queues: more than 1 (multi-queue-max-queues is not offered)")
        }
        guard let txRef = readNumber(node + "/tx-ring-ref"), txRef <= UInt64(UInt32.max) else {
            return fail("\(node)/tx-ring-ref: missing or not a grant reference")
        }
        guard let rxRef = readNumber(node + "/rx-ring-ref"), rxRef <= UInt64(UInt32.max) else {
            return fail("\(node)/rx-ring-ref: missing or not a grant reference")
        }
        guard let channel = readNumber(node + "/event-channel"), channel <= UInt64(UInt32.max) else {
            if read(node + "/event-channel-tx") != nil || read(node + "/event-channel-rx") != nil {
                return fail("\(node)/event-channel-tx,-rx: split event channels are not offered (feature-split-event-channels=0)")
            }
            return fail("\(node)/event-channel: missing or not a port")
        }
        guard readNumber(node + "/request-rx-copy") == 1 else {
            return fail("\(node)/request-rx-copy: must be 1 (only receive-copy is served; feature-rx-flip=0)")
        }
        guard readFlag("feature-rx-notify") else {
            return fail("\(node)/feature-rx-notify: must be 1 (the backend sleeps until told of new receive requests)")
        }
        guard let table = grants.table(for: frontend) else { return fail("domain \(frontend.rawValue) has no grant table") }
        let txBox: MappingBox, rxBox: MappingBox
        do {
            txBox = MappingBox(try table.map(GrantRef(UInt32(txRef)), by: host.id, readOnly: false))
        } catch {
            return fail("\(node)/tx-ring-ref \(txRef): cannot map: \(error)")
        }
        do {
            rxBox = MappingBox(try table.map(GrantRef(UInt32(rxRef)), by: host.id, readOnly: false))
        } catch {
            return fail("\(node)/rx-ring-ref \(rxRef): cannot map: \(error)")
        }
        let tx: BackRing<TxRequest, TxResponse>, rx: BackRing<RxRequest, RxResponse>, rxRegion: SharedRegion
        do {
            tx = try BackRing(attaching: try txBox.mapping.sharedRegion())
            rxRegion = try rxBox.mapping.sharedRegion()
            rx = try BackRing(attaching: rxRegion)
        } catch {
            return fail("\(node): the rings are not netif rings: \(error)")
        }
        let wake = self.wake
        let port: EventPort
        do {
            port = try host.bindInterdomain(remoteDomain: frontend, remotePort: EventPort(UInt32(channel))) { _ in
                wake.kick()
            }
        } catch {
            return fail("\(node)/event-channel \(channel): cannot bind: \(error)")
        }
        connection = Connection(txMapping: txBox, rxMapping: rxBox, tx: tx, rx: rx, rxRegion: rxRegion, port: port,
                                frontendSG: readFlag("feature-sg"), blankIPv4: !readFlag("feature-no-csum-offload"),
                                blankIPv6: readFlag("feature-ipv6-csum-offload"))
        held = false
        stats.withLock { $0.connections += 1 }
        failure.withLock { $0 = nil }
        accepting.store(true, ordering: .releasing)
        do { try publish(state: XenbusBackendState.connected) } catch { fail("\(error)") }
    }

    private func disconnect() {
        accepting.store(false, ordering: .releasing)
        let dropped = queue.removeAll()
        if dropped > 0 { stats.withLock { $0.rxDropped += dropped } }
        held = false
        guard let connection else { return }
        try? host.close(connection.port)
        self.connection = nil  // the mappings end with the boxes
    }

    // MARK: Host side -> guest

    /// A frame for the guest, from the host side (a switch port, a test): copied into the
    /// receive queue. False, and counted as dropped, when the vif is not connected, the frame
    /// is not 14 to 65535 bytes, or the queue is full. Any thread.
    @discardableResult
    public func receive(_ frame: UnsafeRawBufferPointer, checksum: FrameChecksum = .unknown) -> Bool {
        enqueue(frame, checksum: checksum, kick: true)
    }

    @discardableResult
    private func enqueue(_ frame: UnsafeRawBufferPointer, checksum: FrameChecksum, kick: Bool) -> Bool {
        guard accepting.load(ordering: .acquiring), frame.count >= 14, frame.count <= Int(VIREO_XEN_NETIF_MAX_TX_SIZE) else {
            stats.withLock { $0.rxDropped += 1 }
            return false
        }
        switch queue.push(frame, checksum: checksum) {
        case .queued(let wasEmpty):
            if kick && wasEmpty { wake.kick() }
            return true
        case .full:
            stats.withLock { $0.rxDropped += 1 }
            return false
        }
    }

    /// Moves queued frames into the frontend's posted pages. True when frames are left that
    /// the next pass can serve without waiting (the batch ran out, not the posted pages).
    private func serveReceive(_ c: Connection, notify: inout Bool) throws(RingError) -> Bool {
        var served = 0
        defer { if served > 0 && c.rx.pushResponsesAndCheckNotify() { notify = true } }
        while let frame = queue.oldest() {
            if served == Self.batch { return true }
            let length = frame.bytes.count
            let needed = (length + 4095) / 4096
            if needed > 1 && !c.frontendSG {
                // A frame over a page for a frontend that takes one page per packet.
                queue.removeOldest()
                pending.rxDropped += 1
                continue
            }
            var available = try c.rx.unconsumedRequests()
            if available < needed {
                // Ask for an event once the frontend posts more (req_event past what is there),
                // then look again: the frontend may have posted in between.
                c.rxRegion.storeRelease32(c.rx.requestsConsumed &+ UInt32(available) &+ 1, at: RingLayout.requestEventOffset)
                Barrier.full()
                available = try c.rx.unconsumedRequests()
                if available < needed { return false }
            }
            var flags: UInt16 = 0
            switch frame.checksum {
            case .blank:
                let ipv6 = ChecksumFill.isIPv6(UnsafeRawBufferPointer(frame.bytes))
                if ipv6.map({ $0 ? c.blankIPv6 : c.blankIPv4 }) ?? false {
                    flags = UInt16(VIREO_NETRXF_csum_blank | VIREO_NETRXF_data_validated)
                } else if ChecksumFill.fill(frame.bytes) {
                    flags = UInt16(VIREO_NETRXF_data_validated)  // computed here: the frontend refuses blank ones
                }
            case .validated:
                flags = UInt16(VIREO_NETRXF_data_validated)
            default:
                break
            }
            rxRequests.removeAll(keepingCapacity: true)
            for _ in 0..<needed {
                guard let request = try c.rx.consumeRequest() else { break }
                rxRequests.append(request)
            }
            var copied = rxRequests.count == needed
            if copied {
                for (i, request) in rxRequests.enumerated() {
                    let chunk = min(4096, length - i * 4096)
                    let status = grants.copy(GrantCopySegment(source: .local(queueRegion, offset: frame.start + i * 4096),
                                                              dest: .grant(frontend, GrantRef(request.gref), offset: 0),
                                                              length: chunk), by: host.id)
                    if status != .okay { copied = false; break }
                }
            }
            for (i, request) in rxRequests.enumerated() {
                let chunk = min(4096, length - i * 4096)
                var slotFlags: UInt16 = i == 0 ? flags : 0
                if i + 1 < rxRequests.count { slotFlags |= UInt16(VIREO_NETRXF_more_data) }
                try c.rx.produceResponse { slot in
                    slot.set(\.id, to: request.id)
                    slot.set(\.offset, to: 0)
                    slot.set(\.flags, to: copied ? slotFlags : 0)
                    slot.set(\.status, to: copied ? Int16(chunk) : Int16(VIREO_NETIF_RSP_ERROR))
                }
            }
            queue.removeOldest()
            served += 1
            if copied {
                pending.rxPackets += 1
                pending.rxBytes += length
            } else {
                pending.rxErrors += 1
            }
        }
        return false
    }

    // MARK: Guest -> host side

    /// A frontend that broke the ring rules: the vif disconnects.
    struct ProtocolError: Error, CustomStringConvertible {
        let description: String
    }

    /// Serves transmit requests: a batch of packets, with event suppression and the final
    /// check. Returns 0 when the batch ran out with requests left, the rate limit's wait in
    /// nanoseconds when it holds a packet, or `UInt64.max` when the ring is empty.
    private func serveTransmit(_ c: Connection, notify: inout Bool) throws -> UInt64 {
        var served = 0
        defer { if c.tx.pushResponsesAndCheckNotify() { notify = true } }
        while true {
            if served == Self.batch { return 0 }
            if !held {
                if try c.tx.unconsumedRequests() == 0 {
                    if c.tx.pushResponsesAndCheckNotify() { notify = true }
                    if try c.tx.finalCheckForRequests() { continue }
                    return .max
                }
                try parsePacket(c)
            }
            if parsed.invalid == nil && !parsed.controlOnly, var bucket {
                let wait = bucket.take(UInt64(parsed.size), now: configuration.clock())
                self.bucket = bucket
                if wait > 0 {
                    if !held { pending.txRateDelays += 1 }
                    held = true
                    return wait
                }
            }
            held = false
            let status = transmitParsed()
            for slot in slots {
                try c.tx.produceResponse { response in
                    response.set(\.id, to: slot.extra ? 0 : slot.id)
                    response.set(\.status, to: slot.extra ? Int16(VIREO_NETIF_RSP_NULL) : status)
                }
            }
            served += 1
        }
    }

    private func next(_ c: Connection, _ what: String) throws -> TxRequest {
        guard let request = try c.tx.consumeRequest() else {
            throw ProtocolError(description: "\(what) runs past the producer index (an unfinished packet)")
        }
        return request
    }

    /// Copies one packet's slots out of the ring (each once) into `slots`, `fragments` and
    /// `parsed`, validating the copies. A packet that is merely invalid is marked so (it gets
    /// ERROR); one that breaks the ring rules throws ``ProtocolError``.
    private func parsePacket(_ c: Connection) throws {
        slots.removeAll(keepingCapacity: true)
        fragments.removeAll(keepingCapacity: true)
        parsed = ParsedPacket()
        let first = try next(c, "a packet")
        slots.append((first.id, false))
        fragments.append((first.gref, Int(first.offset), 0))  // its length is known once the rest is counted
        parsed.size = Int(first.size)
        parsed.flags = first.flags
        if first.flags & ~Self.knownTxFlags != 0 { parsed.invalid = "unknown flags \(first.flags)" }
        if first.flags & UInt16(VIREO_NETTXF_extra_info) != 0 {
            var more = true
            var extras = 0
            while more {
                let raw = try next(c, "an extra info slot")
                slots.append((0, true))
                extras += 1
                guard extras < Int(VIREO_XEN_NETIF_EXTRA_TYPE_MAX) else {
                    throw ProtocolError(description: "more than \(VIREO_XEN_NETIF_EXTRA_TYPE_MAX - 1) extra info slots")
                }
                let extra = withUnsafeBytes(of: raw) { $0.loadUnaligned(as: vireo_netif_extra_info.self) }
                switch Int32(extra.type) {
                case VIREO_XEN_NETIF_EXTRA_TYPE_GSO:
                    parsed.invalid = "a GSO extra (feature-gso-* is not offered)"
                case VIREO_XEN_NETIF_EXTRA_TYPE_MCAST_ADD, VIREO_XEN_NETIF_EXTRA_TYPE_MCAST_DEL:
                    parsed.controlOnly = true  // no filter is kept (feature-multicast-control=0): acknowledged
                case VIREO_XEN_NETIF_EXTRA_TYPE_HASH:
                    break  // a hint; ignored
                default:
                    throw ProtocolError(description: "extra info type \(extra.type)")
                }
                more = extra.flags & UInt8(VIREO_XEN_NETIF_EXTRA_FLAG_MORE) != 0
            }
        }
        var remaining = Int(first.size)
        var flags = first.flags
        var dataSlots = 1
        while flags & UInt16(VIREO_NETTXF_more_data) != 0 {
            let fragment = try next(c, "a packet's fragments")
            slots.append((fragment.id, false))
            dataSlots += 1
            guard Int(fragment.offset) + Int(fragment.size) <= 4096 else {
                throw ProtocolError(description: "a fragment crosses its page (offset \(fragment.offset), size \(fragment.size))")
            }
            if Int(fragment.size) > remaining {
                parsed.invalid = parsed.invalid ?? "fragments add up to more than the packet's size \(first.size)"
            } else {
                remaining -= Int(fragment.size)
            }
            if dataSlots > Self.maxSlots {
                parsed.invalid = parsed.invalid ?? "more than \(Self.maxSlots) slots"
            } else {
                fragments.append((fragment.gref, Int(fragment.offset), Int(fragment.size)))
            }
            flags = fragment.flags
        }
        if parsed.invalid == nil {
            guard Int(first.offset) + remaining <= 4096 else {
                throw ProtocolError(description: "a packet's first slot crosses its page (offset \(first.offset), \(remaining) bytes)")
            }
        }
        fragments[0].length = remaining
        if !parsed.controlOnly && parsed.size < 14 {
            parsed.invalid = parsed.invalid ?? "size \(first.size) (a frame is at least 14 bytes)"
        }
    }

    /// Copies the parsed packet into the host buffer and hands it over; the status for its slots.
    private func transmitParsed() -> Int16 {
        if parsed.invalid != nil {
            pending.txErrors += 1
            return Int16(VIREO_NETIF_RSP_ERROR)
        }
        if parsed.controlOnly { return Int16(VIREO_NETIF_RSP_OKAY) }
        var at = 0
        for fragment in fragments {
            let status = grants.copy(GrantCopySegment(source: .grant(frontend, GrantRef(fragment.ref), offset: fragment.offset),
                                                      dest: .local(txRegion, offset: at), length: fragment.length), by: host.id)
            guard status == .okay else {
                pending.txErrors += 1
                return Int16(VIREO_NETIF_RSP_ERROR)
            }
            at += fragment.length
        }
        let frame = UnsafeMutableRawBufferPointer(start: txBuffer, count: parsed.size)
        var checksum = FrameChecksum.unknown
        if parsed.flags & UInt16(VIREO_NETTXF_csum_blank) != 0 {
            // A blank checksum only makes sense on a TCP/UDP segment someone can complete.
            guard ChecksumFill.locate(UnsafeRawBufferPointer(frame)) != nil else {
                pending.txErrors += 1
                return Int16(VIREO_NETIF_RSP_ERROR)
            }
            checksum = .blank
        } else if parsed.flags & UInt16(VIREO_NETTXF_data_validated) != 0 {
            checksum = .validated
        }
        guard let attachment, attachment.transmit(frame, checksum: checksum) else {
            pending.txDropped += 1
            return Int16(VIREO_NETIF_RSP_DROPPED)
        }
        pending.txPackets += 1
        pending.txBytes += parsed.size
        return Int16(VIREO_NETIF_RSP_OKAY)
    }
}
