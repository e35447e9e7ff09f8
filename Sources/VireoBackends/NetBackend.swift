import Glibc
import Synchronization
import VireoABI
import VireoCore
import VireoHypercalls
import VireoStore

/// netback: the host side of one paravirtual network interface (vif) of one frontend domain,
/// speaking Xen's netif protocol (`vireo/io/netif.h`; Docs/network.md): a ``XenbusDevice``
/// that ``XenbusBackend`` publishes and connects (``NetBackend``).
///
/// Nodes (Xen's): the backend directory `/local/domain/0/backend/vif/<domid>/<handle>` gets
/// handle, mac and the features besides XenbusBackend's own; the frontend directory
/// `/local/domain/<domid>/device/vif/<handle>` handle and mac. On connect it reads
/// tx-ring-ref, rx-ring-ref, event-channel, request-rx-copy and the frontend's features, maps
/// both rings and binds the event channel; and, when the frontend offers one, the control ring
/// (ctrl-ring-ref, event-channel-ctrl), whose static grants (``StaticGrants``) it serves.
///
/// Transmit: each packet's slots (first request, extra info slots, fragments) are copied out of
/// the ring once and validated as a whole before any byte moves; then its pages are pinned,
/// its first bytes copied into a host buffer and checked there, and the frame goes either
/// straight into the posted pages of the vif the switch routes it to (one copy, guest to guest:
/// ``deliverHeld(header:length:checksum:scratch:copy:)``) or, whole in the host buffer, to
/// the ``NetworkAttachment``. Every slot
/// gets its response (OKAY, ERROR for an invalid packet, DROPPED when the host side refused it,
/// NULL for an extra slot). A chain that breaks the ring rules (runs past the producer, crosses
/// its page, bad extra type) or a producer index out of range disconnects this vif (Closing).
///
/// Receive: frames from other vifs of the switch arrive straight in the posted pages when they
/// can; the rest wait in a bounded ``FrameQueue`` (a frame that does not fit is dropped and
/// counted) and are copied into the pages the frontend posted, one page per slot, offset 0,
/// response i in the slot of request i.
///
/// Threads: everything is served on XenbusBackend's control loop (``XenbusBackend/run()``, or
/// ``XenbusBackend/poll()`` from a caller's loop); ``receive(_:checksum:)`` may be called from
/// any thread and wakes that loop; other vifs' loops deliver into the receive ring holding its
/// inbox lock (``holdInbox()``).
public final class NetDevice: XenbusDevice, @unchecked Sendable {  // the control loop owns the mutable state; others touch atomics, locks and the pipe
    public typealias TxRequest = vireo_netif_tx_request
    public typealias TxResponse = vireo_netif_tx_response
    public typealias RxRequest = vireo_netif_rx_request
    public typealias RxResponse = vireo_netif_rx_response
    public typealias ControlRequest = vireo_xen_netif_ctrl_request
    public typealias ControlResponse = vireo_xen_netif_ctrl_response

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
        /// Most grants the frontend may keep mapped through the control ring (static grants,
        /// what GET_GREF_MAPPING_SIZE answers): by default both rings' worth of slots. 0 refuses
        /// them (NOT_SUPPORTED).
        public var staticGrants: Int
        /// Monotonic nanoseconds (tests pass their own).
        public var clock: @Sendable () -> UInt64

        public init(mac: EthernetAddress? = nil, queueFrames: Int = 256, queueBytes: Int = 1 << 20,
                    rateBytesPerSecond: UInt64? = nil, rateBurstBytes: UInt64? = nil,
                    staticGrants: Int = NetDevice.defaultStaticGrants,
                    clock: @escaping @Sendable () -> UInt64 = ConsoleBackend.monotonicNanoseconds) {
            self.mac = mac
            self.queueFrames = queueFrames
            self.queueBytes = queueBytes
            self.rateBytesPerSecond = rateBytesPerSecond
            self.rateBurstBytes = rateBurstBytes
            self.staticGrants = staticGrants
            self.clock = clock
        }
    }

    /// Counters, for tests, diagnostics and metrics (connections and protocol errors are
    /// ``XenbusBackend/connections`` and ``XenbusBackend/protocolErrors``).
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

        mutating func add(_ o: Statistics) {
            txPackets += o.txPackets; txBytes += o.txBytes; txErrors += o.txErrors
            txDropped += o.txDropped; txRateDelays += o.txRateDelays
            rxPackets += o.rxPackets; rxBytes += o.rxBytes; rxDropped += o.rxDropped
            rxErrors += o.rxErrors; notifications += o.notifications
        }
    }

    /// The receive ring's state shared between this vif's loop and the loops of the vifs
    /// that deliver to it directly: the connection while Connected, whether responses wait
    /// to be pushed, and what the others delivered since it was last counted.
    struct Receiving {
        var connection: Connection? {
            didSet { borrowed = connection.map { Unmanaged.passUnretained($0) } }
        }
        /// `connection`, used per frame without reference counting (`connection` keeps it alive).
        var borrowed: Unmanaged<Connection>?
        var unpushed = false
        /// Frames delivered straight since the last push (pushed every ``NetDevice/pushInterval``).
        var unpushedFrames = 0
        var counts = Statistics()
    }

    /// Scratch for one loop's grant work, allocated once: a packet's or a frame's grant
    /// references and mapped pages, and a frame's receive requests.
    struct PageScratch {
        let refs: UnsafeMutableBufferPointer<GrantRef>
        let pages: UnsafeMutableBufferPointer<SharedRegion>
        let requests: UnsafeMutableBufferPointer<RxRequest>

        init(capacity: Int, filler: SharedRegion) {
            refs = .allocate(capacity: capacity)
            refs.initialize(repeating: GrantRef(0))
            pages = .allocate(capacity: capacity)
            pages.initialize(repeating: filler)
            requests = .allocate(capacity: capacity)
            requests.initialize(repeating: RxRequest())
        }

        func deallocate() {
            refs.deallocate()
            pages.deallocate()
            requests.deallocate()
        }
    }

    public let kind = "vif"
    public let handle: UInt32
    public let mac: EthernetAddress
    public let configuration: Configuration

    /// The backend's control loop, woken when a frame arrives for an empty queue; set once by
    /// ``XenbusBackend/init(frontend:handle:configuration:store:grants:host:)`` before any thread runs.
    var waker: WakePipe?
    /// Frames are taken for the guest only while Connected.
    private let accepting = Atomic<Bool>(false)
    let queue: FrameQueue
    private let queueRegion: SharedRegion
    private let attachmentBox = Mutex<(any NetworkAttachment)?>(nil)
    @exclusivity(unchecked) private var attachment: (any NetworkAttachment)?

    private let stats = Mutex(Statistics())
    @exclusivity(unchecked) private var pending = Statistics()  // this pass's counts, added to `stats` at its end
    public var statistics: Statistics { stats.withLock { $0 } }
    /// The domain's I/O counters (the toolstack's metrics), when given; added to once per pass.
    let io: IOCounters?

    // The service state (here, `attachment`, `pending`, the connection's rings) is touched
    // only by the control loop's thread, so it skips Swift's dynamic exclusivity checks
    // (@exclusivity(unchecked)): on the per-frame path they cost as much as the ring work.
    // Transmit scratch: one packet at a time, allocated once.
    private static let frameBytes = 65536
    private let txBuffer: UnsafeMutableRawPointer
    private let txRegion: SharedRegion
    @exclusivity(unchecked) private var slots: FixedList<(id: UInt16, extra: Bool)>
    @exclusivity(unchecked) private var fragments: FixedList<(ref: UInt32, offset: Int, length: Int)>
    @exclusivity(unchecked) private var parsed = ParsedPacket()
    @exclusivity(unchecked) private var held = false
    @exclusivity(unchecked) private var bucket: TokenBucket?
    /// This loop's page scratch: a packet's transmit pages, and a frame's receive requests and
    /// pages (for its own receive ring, and for another vif's when it delivers there directly).
    private let txScratch: PageScratch
    private let rxScratch: PageScratch
    @exclusivity(unchecked) private var switchPort: NetworkSwitch.Port?
    @exclusivity(unchecked) private var routing = Routing()

    /// One pass's switching: the last route the switch gave (the frame's destination and source
    /// addresses and the vif they lead to, or nil: the frame takes ``NetworkSwitch/forward``),
    /// reused for the pass's following frames with the same addresses, so the switch's table
    /// is locked and learned from once per pass and address pair, not per frame; and the
    /// frames routed, counted to the switch when the pass ends.
    private struct Routing {
        /// The frame's first 12 bytes (destination, then source) as two words; `valid` says
        /// they hold a route.
        var addresses: (UInt64, UInt32) = (0, 0)
        var valid = false
        /// The vif, held for the pass; `target` is the same, used per frame without reference
        /// counting (the strong reference here keeps it alive).
        var device: NetDevice?
        var target: Unmanaged<NetDevice>?
        /// Whether this loop holds `device`'s inbox lock (``NetDevice/holdInbox()``).
        var held = false
        var frames = 0, delivered = 0, dropped = 0
    }
    /// The receive ring's state that other vifs' loops share (``deliverHeld(header:length:checksum:scratch:copy:)``),
    /// touched only with `inboxLock` held. A pthread mutex, not a `Mutex`: a sending vif's loop
    /// takes it once for its pass's consecutive frames to this vif, not once per frame.
    @exclusivity(unchecked) private var inbox = Receiving()
    private let inboxLock: UnsafeMutablePointer<pthread_mutex_t>
    /// What the last pass found: 0 when work is left, the rate limit's wait, or `UInt64.max`.
    @exclusivity(unchecked) private var next = UInt64.max

    /// The packet whose slots are in `slots`/`fragments`.
    private struct ParsedPacket {
        var size = 0
        var flags: UInt16 = 0
        /// Why the packet gets ERROR (nil: valid). A static string, so that resetting it per
        /// packet costs no reference counting.
        var invalid: StaticString?
        var controlOnly = false
    }

    /// Static grants a vif holds by default: a transmit and a receive ring's worth of slots.
    public static let defaultStaticGrants = Int(VIREO_ABI_NETIF_TX_RING_SIZE + VIREO_ABI_NETIF_RX_RING_SIZE)
    /// Entries in one ADD_/DEL_GREF_MAPPING table: a page of xen_netif_gref.
    static let grefTableEntries = 4096 / MemoryLayout<vireo_xen_netif_gref>.size
    /// Data slots a packet may use (Xen's XEN_NETIF_NR_SLOTS_MIN, what every backend accepts).
    public static let maxSlots = Int(VIREO_XEN_NETIF_NR_SLOTS_MIN)
    /// Receive pages a frame may use (a frame is at most 65535 bytes).
    static let maxFramePages = (Int(VIREO_XEN_NETIF_MAX_TX_SIZE) + 4095) / 4096
    /// Bytes of a transmitted frame copied first, on which it is checked and switched: every
    /// header ``ChecksumFill`` reads (at most 58 bytes) and the Ethernet addresses.
    static let headerBytes = 128
    /// Bytes copied first from a frame with no blank checksum: only its Ethernet addresses are
    /// read (to switch it), and a cache line's worth moves as cheaply as twelve bytes.
    static let routeBytes = 64
    /// Packets served per ring per pass, so neither direction starves the other.
    static let batch = 256
    /// Responses are pushed (and the frontend notified if it asked) every this many packets
    /// within a pass, as Linux's netback pushes per copy batch (COPY_BATCH_SIZE, 64), not
    /// once at the pass's end: a frontend on another core takes its frames, reposts its pages
    /// and refills its transmit ring while the pass goes on, instead of the two taking turns
    /// with a ring's worth each (see Docs/network.md, "The threaded shape").
    static let pushInterval = 64
    private static let knownTxFlags = UInt16(VIREO_NETTXF_csum_blank | VIREO_NETTXF_data_validated
                                                 | VIREO_NETTXF_more_data | VIREO_NETTXF_extra_info)

    /// The connection to the frontend while Connected.
    public final class Connection: @unchecked Sendable {  // one loop at a time drives each ring: tx the vif's own, rx under the inbox lock
        let tx: MappedBackRing<TxRequest, TxResponse>
        let rx: MappedBackRing<RxRequest, RxResponse>
        let port: EventPort
        let link: FrontendLink
        /// The frontend's grant table, looked up once: its pages are pinned for each packet's
        /// and frame's copies. Once the domain dies the table refuses pins, so a connection
        /// outliving its domain touches nothing (and never a new domain's table under a reused ID).
        let table: GrantTable
        let frontendSG: Bool
        let blankIPv4: Bool
        let blankIPv6: Bool
        /// The control ring and its port, when the frontend set one up (ctrl-ring-ref).
        let control: (ring: MappedBackRing<ControlRequest, ControlResponse>, port: EventPort)?
        /// The grants the frontend keeps mapped (changed with the inbox lock held).
        let statics: StaticGrants
        init(tx: MappedBackRing<TxRequest, TxResponse>, rx: MappedBackRing<RxRequest, RxResponse>, port: EventPort,
             link: FrontendLink, table: GrantTable, frontendSG: Bool, blankIPv4: Bool, blankIPv6: Bool,
             control: (ring: MappedBackRing<ControlRequest, ControlResponse>, port: EventPort)?, statics: StaticGrants) {
            self.tx = tx
            self.rx = rx
            self.port = port
            self.link = link
            self.table = table
            self.frontendSG = frontendSG
            self.blankIPv4 = blankIPv4
            self.blankIPv6 = blankIPv6
            self.control = control
            self.statics = statics
        }

        /// `body` with the pages of `refs` in `pages`: the held pages when every one is a
        /// static grant (no pin), otherwise each pinned for `body` alone
        /// (``GrantTable/withMappedPages(_:by:writable:pages:_:)``).
        @inline(__always)
        func withPages<R>(_ refs: UnsafeBufferPointer<GrantRef>, writable: Bool, pages: UnsafeMutableBufferPointer<SharedRegion>,
                          _ body: (UnsafeMutableBufferPointer<SharedRegion>) -> R) throws(GrantStatus) -> R {
            if statics.count > 0 && statics.fill(refs, writable: writable, into: pages) {
                return body(UnsafeMutableBufferPointer(rebasing: pages[0..<refs.count]))
            }
            return try table.withMappedPages(refs, by: link.host.id, writable: writable, pages: pages, body)
        }
    }

    /// vif `handle` (0 = the first, Linux's eth0) of domain `frontend` (for its generated MAC).
    public init(frontend: DomainID, handle: UInt32 = 0, configuration: Configuration = Configuration(),
                counters io: IOCounters? = nil) throws(BackendError) {
        self.io = io
        guard configuration.queueFrames > 0, configuration.queueBytes >= Self.frameBytes else {
            throw BackendError("vif: the receive queue needs at least 1 frame and 64 KiB")
        }
        if let rate = configuration.rateBytesPerSecond, rate == 0 { throw BackendError("vif: rate 0 (give bytes per second > 0)") }
        guard configuration.staticGrants >= 0, configuration.staticGrants <= 1 << 16 else {
            throw BackendError("vif: staticGrants \(configuration.staticGrants) (give 0 to 65536)")
        }
        self.handle = handle
        self.configuration = configuration
        mac = configuration.mac ?? .generated(domain: frontend.rawValue, handle: handle)
        queue = FrameQueue(maxFrames: configuration.queueFrames, capacityBytes: configuration.queueBytes)
        queueRegion = queue.region
        txBuffer = UnsafeMutableRawPointer.allocate(byteCount: Self.frameBytes, alignment: 4096)
        txBuffer.initializeMemory(as: UInt8.self, repeating: 0, count: Self.frameBytes)
        txRegion = .unsafe(txBuffer, count: Self.frameBytes)
        slots = FixedList(capacity: RingLayout.slotCount(request: TxRequest.self, response: TxResponse.self, pages: 1),
                          filler: (0, false))
        fragments = FixedList(capacity: Self.maxSlots, filler: (0, 0, 0))
        inboxLock = .allocate(capacity: 1)
        inboxLock.initialize(to: pthread_mutex_t())
        pthread_mutex_init(inboxLock, nil)
        txScratch = PageScratch(capacity: Self.maxSlots, filler: txRegion)
        rxScratch = PageScratch(capacity: Self.maxFramePages, filler: txRegion)
        if let rate = configuration.rateBytesPerSecond {
            bucket = TokenBucket(bytesPerSecond: rate, burstBytes: configuration.rateBurstBytes, now: configuration.clock())
        }
    }

    deinit {
        pthread_mutex_destroy(inboxLock)
        inboxLock.deallocate()
        slots.deallocate()
        fragments.deallocate()
        txScratch.deallocate()
        rxScratch.deallocate()
        txBuffer.deallocate()
    }

    /// Connects the host side: where the guest's frames go (and, for a TAP, where the guest's
    /// come from). A later call replaces it.
    public func attach(_ attachment: any NetworkAttachment) {
        attachmentBox.withLock { $0 = attachment }
        waker?.kick()
    }

    // MARK: XenbusDevice

    /// The backend's keys beyond XenbusBackend's own, as Linux's netback publishes them (see
    /// Docs/network.md for each).
    public var backendNodes: [(key: String, value: String)] {
        [("handle", "\(handle)"), ("mac", mac.description), ("type", "vif"),
         ("feature-sg", "1"), ("feature-gso-tcpv4", "0"), ("feature-gso-tcpv6", "0"),
         ("feature-no-csum-offload", "0"), ("feature-ipv6-csum-offload", "1"),
         ("feature-rx-copy", "1"), ("feature-rx-flip", "0"),
         ("feature-split-event-channels", "0"), ("feature-multicast-control", "0"),
         ("feature-ctrl-ring", "1")]
    }

    public var frontendNodes: [(key: String, value: String)] {
        [("handle", "\(handle)"), ("mac", mac.description)]
    }

    public func connect(_ link: FrontendLink) throws(BackendError) -> Connection {
        let node = link.path
        if (try? link.number("multi-queue-num-queues")).map({ $0 > 1 }) ?? false {
            throw BackendError("\(node)/multi-queue-num-queues: more than 1 (multi-queue-max-queues is not offered)")
        }
        guard (try? link.number("tx-ring-ref")) != nil else {
            throw BackendError("\(node)/tx-ring-ref: missing or not a grant reference")
        }
        guard (try? link.number("rx-ring-ref")) != nil else {
            throw BackendError("\(node)/rx-ring-ref: missing or not a grant reference")
        }
        guard (try? link.number("event-channel")) != nil else {
            if link.read("event-channel-tx") != nil || link.read("event-channel-rx") != nil {
                throw BackendError("\(node)/event-channel-tx,-rx: split event channels are not offered (feature-split-event-channels=0)")
            }
            throw BackendError("\(node)/event-channel: missing or not a port")
        }
        guard link.flag("request-rx-copy") else {
            throw BackendError("\(node)/request-rx-copy: must be 1 (only receive-copy is served; feature-rx-flip=0)")
        }
        guard link.flag("feature-rx-notify") else {
            throw BackendError("\(node)/feature-rx-notify: must be 1 (the backend sleeps until told of new receive requests)")
        }
        guard let table = link.grants.table(for: link.domain) else {
            throw BackendError("domain \(link.domain.rawValue) has no grant table")
        }
        let tx: MappedBackRing<TxRequest, TxResponse> = try link.mapRing("tx-ring-ref")
        let rx: MappedBackRing<RxRequest, RxResponse> = try link.mapRing("rx-ring-ref")
        var control: (ring: MappedBackRing<ControlRequest, ControlResponse>, port: EventPort)?
        if link.read("ctrl-ring-ref") != nil {
            guard (try? link.number("event-channel-ctrl")) != nil else {
                throw BackendError("\(node)/event-channel-ctrl: missing or not a port (ctrl-ring-ref needs one)")
            }
            control = (try link.mapRing("ctrl-ring-ref"), try link.bindEvent("event-channel-ctrl"))
        }
        let port: EventPort
        do { port = try link.bindEvent("event-channel") } catch {
            if let control { try? link.host.close(control.port) }
            throw error
        }
        held = false
        let connection = Connection(tx: tx, rx: rx, port: port, link: link, table: table, frontendSG: link.flag("feature-sg"),
                                    blankIPv4: !link.flag("feature-no-csum-offload"), blankIPv6: link.flag("feature-ipv6-csum-offload"),
                                    control: control, statics: StaticGrants(capacity: configuration.staticGrants,
                                                                 references: table.maxFrames * GrantTableLayout.entriesPerFrame,
                                                                 filler: txRegion))
        withInbox { $0.connection = connection }
        accepting.store(true, ordering: .releasing)
        return connection
    }

    /// One pass: the transmit ring, the host side's descriptor, then the receive queue.
    public func serve(_ c: Connection) throws(BackendError) {
        attachment = attachmentBox.withLock { $0 }
        switchPort = attachment as? NetworkSwitch.Port
        next = .max
        var notify = false
        do {
            if let control = c.control {
                try control.ring.serve(notifying: control.port, from: c.link.host) { request, slot in
                    let (status, data) = self.control(request, c)
                    slot.set(\.id, to: request.id)
                    slot.set(\.type, to: request.type)
                    slot.set(\.status, to: status)
                    slot.set(\.data, to: status == UInt32(VIREO_XEN_NETIF_CTRL_STATUS_SUCCESS) ? data : 0)
                }
            }
            do {
                // Another vif's inbox is held only within the transmit pass: never while this
                // loop takes its own (below), so two vifs sending to each other cannot deadlock.
                defer { endRouting() }
                next = min(next, try serveTransmit(c, notify: &notify))
            }
            if let attachment, attachment.pollDescriptor != nil {
                attachment.pump(limit: Self.batch) { bytes, checksum in
                    enqueue(bytes, checksum: checksum, kick: false)
                }
            }
            if try serveReceive(c, notify: &notify) { next = 0 }
        } catch {
            flushStatistics()
            throw BackendError("\(error)")
        }
        // Counted before the event: a frontend woken by it finds its frames in the statistics.
        if notify { pending.notifications += 1 }
        flushStatistics()
        if notify { try? c.link.host.send(c.port) }
    }

    /// At once when the last pass left work, after the rate limit's wait when it holds a
    /// packet; and when the host side's descriptor (a TAP) is readable while the queue has room.
    public func nextPass(_ c: Connection) -> NextPass {
        var readable: Int32 = -1
        if !queue.isFull, let fd = attachment?.pollDescriptor { readable = fd }
        return NextPass(nanoseconds: next, readable: readable)
    }

    public func disconnect(_ c: Connection) {
        accepting.store(false, ordering: .releasing)
        // From here no other vif's loop touches the receive ring; what they delivered is counted.
        let delivered = withInbox { r in
            let counts = r.counts
            r = Receiving()
            return counts
        }
        record(delivered)
        endRouting()
        let dropped = queue.removeAll()
        if dropped > 0 {
            stats.withLock { $0.rxDropped += dropped }
            io?.errors.add(dropped, ordering: .relaxed)
        }
        held = false
        // Static grants end with the connection: the guest may end its access to them again.
        withInbox { _ in c.statics.removeAll() }
        try? c.link.host.close(c.port)
        if let control = c.control { try? c.link.host.close(control.port) }
    }

    // MARK: Control ring

    /// Answers one control request: (status, data). Static grants are served; hashing is not
    /// offered (multi-queue-max-queues is not published), so its requests get NOT_SUPPORTED,
    /// as does any other type.
    private func control(_ request: ControlRequest, _ c: Connection) -> (UInt32, UInt32) {
        let notSupported = UInt32(VIREO_XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED)
        let invalid = UInt32(VIREO_XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER)
        let success = UInt32(VIREO_XEN_NETIF_CTRL_STATUS_SUCCESS)
        let (queueIndex, tableRef, entries) = request.data
        switch Int32(request.type) {
        case VIREO_XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE:
            guard c.statics.capacity > 0 else { return (notSupported, 0) }
            guard queueIndex == 0 else { return (invalid, 0) }  // one queue
            return (success, UInt32(c.statics.capacity))
        case VIREO_XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING, VIREO_XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING:
            guard c.statics.capacity > 0 else { return (notSupported, 0) }
            let adding = Int32(request.type) == VIREO_XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING
            guard queueIndex == 0, Int(entries) <= Self.grefTableEntries else { return (invalid, 0) }
            if entries == 0 { return (success, 0) }
            // The list's page, mapped writable for this request only (DEL writes each status).
            guard let list = try? StaticGrants.Held(c.table, GrantRef(tableRef), by: c.link.host.id, readOnly: false) else {
                return (invalid, 0)
            }
            // Each entry copied out once, then validated.
            var table = [vireo_xen_netif_gref](repeating: vireo_xen_netif_gref(), count: Int(entries))
            table.withUnsafeMutableBytes { list.page.copyBytes(from: 0, into: $0) }
            return adding ? addStatics(table, c) : (success, removeStatics(table, list.page, c))
        default:
            return (notSupported, 0)
        }
    }

    /// ADD_GREF_MAPPING: every entry mapped and held, or none (INVALID_PARAMETER: an unknown
    /// flag, a grant listed twice or held already, more than the capacity, or a grant that
    /// cannot be mapped as asked).
    private func addStatics(_ table: [vireo_xen_netif_gref], _ c: Connection) -> (UInt32, UInt32) {
        let invalid = (UInt32(VIREO_XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER), UInt32(0))
        var seen = Set<UInt32>()
        for entry in table {
            guard entry.flags & ~UInt16(VIREO_XEN_NETIF_CTRLF_GREF_readonly) == 0, seen.insert(entry.ref).inserted,
                  !c.statics.contains(GrantRef(entry.ref)) else { return invalid }
        }
        guard c.statics.count + table.count <= c.statics.capacity else { return invalid }
        var grants: [StaticGrants.Held] = []
        grants.reserveCapacity(table.count)
        for entry in table {
            let readOnly = entry.flags & UInt16(VIREO_XEN_NETIF_CTRLF_GREF_readonly) != 0
            // A failure drops `grants`, which unmaps every one mapped so far.
            guard let grant = try? StaticGrants.Held(c.table, GrantRef(entry.ref), by: c.link.host.id, readOnly: readOnly) else {
                return invalid
            }
            grants.append(grant)
        }
        guard withInbox({ _ in c.statics.add(grants) }) else { return invalid }
        return (UInt32(VIREO_XEN_NETIF_CTRL_STATUS_SUCCESS), 0)
    }

    /// DEL_GREF_MAPPING: each held entry unmapped (status SUCCESS), any other INVALID_PARAMETER,
    /// each status written back into the list's page; how many were unmapped.
    private func removeStatics(_ table: [vireo_xen_netif_gref], _ page: SharedRegion, _ c: Connection) -> UInt32 {
        var removed: UInt32 = 0
        let statusOffset = MemoryLayout<vireo_xen_netif_gref>.offset(of: \.status)!
        withInbox { _ in
            for (i, entry) in table.enumerated() {
                let done = c.statics.remove(GrantRef(entry.ref))
                if done { removed += 1 }
                let status = UInt16(done ? VIREO_XEN_NETIF_CTRL_STATUS_SUCCESS : VIREO_XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER)
                page.store(status, at: i * MemoryLayout<vireo_xen_netif_gref>.stride + statusOffset)
            }
        }
        return removed
    }

    private func flushStatistics() {
        let add = pending
        pending = Statistics()
        record(add)
    }

    /// Adds `add` to the device's statistics and to the domain's traffic counters (``io``).
    private func record(_ add: Statistics) {
        if let io {
            let frames = add.txPackets + add.rxPackets
            let errors = add.txErrors + add.txDropped + add.rxErrors + add.rxDropped
            if frames > 0 { io.requests.add(frames, ordering: .relaxed) }
            if add.txBytes > 0 { io.netTransmitBytes.add(add.txBytes, ordering: .relaxed) }
            if add.rxBytes > 0 { io.netReceiveBytes.add(add.rxBytes, ordering: .relaxed) }
            if errors > 0 { io.errors.add(errors, ordering: .relaxed) }
        }
        stats.withLock { $0.add(add) }
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
            io?.errors.add(1, ordering: .relaxed)
            return false
        }
        switch queue.push(frame, checksum: checksum) {
        case .queued(let wasEmpty):
            if kick && wasEmpty { waker?.kick() }
            return true
        case .full:
            stats.withLock { $0.rxDropped += 1 }
            io?.errors.add(1, ordering: .relaxed)
            return false
        }
    }

    /// Moves queued frames into the frontend's posted pages. True when frames are left that
    /// the next pass can serve without waiting (the batch ran out, not the posted pages).
    /// Holds the inbox lock: other vifs' loops deliver into the same ring.
    private func serveReceive(_ c: Connection, notify: inout Bool) throws(RingError) -> Bool {
        try withInbox { (r: inout Receiving) throws(RingError) -> Bool in
            var served = 0
            defer {
                if served > 0 || r.unpushed {
                    r.unpushed = false
                    r.unpushedFrames = 0
                    if c.rx.ring.pushResponsesAndCheckNotify() { notify = true }
                }
            }
            let scratch = rxScratch
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
                var available = try c.rx.ring.unconsumedRequests()
                if available < needed {
                    // Ask for an event once the frontend posts more (req_event past what is there),
                    // then look again: the frontend may have posted in between.
                    c.rx.region.storeRelease32(c.rx.ring.requestsConsumed &+ UInt32(available) &+ 1, at: RingLayout.requestEventOffset)
                    Barrier.full()
                    available = try c.rx.ring.unconsumedRequests()
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
                let taken = try Self.take(needed, from: c, into: scratch)
                var copied = taken == needed
                if copied {
                    let source = queueRegion, start = frame.start
                    copied = (try? c.withPages(UnsafeBufferPointer(rebasing: scratch.refs[0..<taken]),
                                               writable: true, pages: scratch.pages) { (pages) -> Void in
                        for i in 0..<taken {
                            pages[i].copyBytes(from: source, offset: start + i * 4096, to: 0, count: min(4096, length - i * 4096))
                        }
                    }) != nil
                }
                try Self.respond(c, scratch, count: taken, length: length, flags: flags, copied: copied)
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
    }

    /// Copies up to `count` receive requests out of the ring (each once) into `scratch`; how many.
    private static func take(_ count: Int, from c: Connection, into scratch: PageScratch) throws(RingError) -> Int {
        var taken = 0
        while taken < count, let request = try c.rx.ring.consumeRequest() {
            scratch.requests[taken] = request
            scratch.refs[taken] = GrantRef(request.gref)
            taken += 1
        }
        return taken
    }

    /// Answers the `count` receive requests in `scratch` that carry one frame of `length`
    /// bytes: `{id, offset 0, flags, status = bytes}`, more_data on all but the last, `flags`
    /// on the first; ERROR on every slot when the frame could not be copied.
    private static func respond(_ c: Connection, _ scratch: PageScratch, count: Int, length: Int, flags: UInt16,
                                copied: Bool) throws(RingError) {
        for i in 0..<count {
            let chunk = min(4096, length - i * 4096)
            var slotFlags: UInt16 = i == 0 ? flags : 0
            if i + 1 < count { slotFlags |= UInt16(VIREO_NETRXF_more_data) }
            let id = scratch.requests[i].id
            try c.rx.ring.produceResponse { slot in
                slot.set(\.id, to: id)
                slot.set(\.offset, to: 0)
                slot.set(\.flags, to: copied ? slotFlags : 0)
                slot.set(\.status, to: copied ? Int16(chunk) : Int16(VIREO_NETIF_RSP_ERROR))
            }
        }
    }

    /// `body` on the inbox, with its lock held.
    @inline(__always)
    private func withInbox<R, E: Error>(_ body: (inout Receiving) throws(E) -> R) throws(E) -> R {
        pthread_mutex_lock(inboxLock)
        defer { pthread_mutex_unlock(inboxLock) }
        return try body(&inbox)
    }

    /// Takes the inbox lock for a run of ``deliverHeld(header:length:checksum:scratch:copy:)``
    /// calls; ``releaseInbox()`` ends the run. The holder takes no other vif's inbox lock
    /// meanwhile and never waits for one, so two vifs sending to each other cannot deadlock.
    func holdInbox() { pthread_mutex_lock(inboxLock) }

    /// Pushes the responses delivered during the run, counts them, drops the lock, then
    /// notifies the frontend if it asked.
    func releaseInbox() {
        var counts = inbox.counts
        inbox.counts = Statistics()
        var notify: (HostEventDomain, EventPort)?
        if inbox.unpushed, let c = inbox.connection {
            inbox.unpushed = false
            if c.rx.ring.pushResponsesAndCheckNotify() { notify = (c.link.host, c.port) }
        }
        inbox.unpushedFrames = 0
        pthread_mutex_unlock(inboxLock)
        if notify != nil { counts.notifications += 1 }
        if counts != Statistics() { record(counts) }
        if let (host, port) = notify { try? host.send(port) }
    }

    /// What ``deliverHeld(header:length:checksum:scratch:copy:)`` did with a frame.
    enum Delivery { case delivered, fallback }

    /// Puts a frame that another vif is transmitting straight into the pages this vif's
    /// frontend posted, with one copy from the sender's granted pages (as GNTTABOP_copy
    /// between two foreign grants would): called on the sending vif's loop, which holds the
    /// sender's pages pinned and has copied the frame's first bytes (`header`, at most
    /// ``headerBytes``) once into its own buffer. The caller holds the inbox lock
    /// (``holdInbox()``), so this vif's own loop and other senders wait: the receive requests
    /// are copied out once, the pages pinned writable, `copy` writes the frame into them
    /// (`pages[i]` is page i of the frame), and the responses are written as
    /// ``serveReceive(_:notify:)`` writes them; ``releaseInbox()`` pushes them and notifies.
    ///
    /// `.fallback` (nothing consumed, nothing copied) when the frame must take the queue: the
    /// vif is not connected, frames are queued already (they go first), too few requests
    /// are posted (the queue's path asks for an event), the frame needs several pages and the
    /// frontend takes one, or its blank checksum must be computed over the whole frame.
    func deliverHeld(header: UnsafeRawBufferPointer, length: Int, checksum: FrameChecksum, scratch: PageScratch,
                     copy: (UnsafeMutableBufferPointer<SharedRegion>) -> Void) -> Delivery {
        let needed = (length + 4095) / 4096
        guard needed <= scratch.refs.count, let connection = inbox.borrowed, queue.isEmpty else { return .fallback }
        return connection._withUnsafeGuaranteedRef { c in
            guard needed == 1 || c.frontendSG else { return .fallback }
            var flags: UInt16 = 0
            switch checksum {
            case .blank:
                let ipv6 = ChecksumFill.isIPv6(header, frameLength: length)
                guard ipv6.map({ $0 ? c.blankIPv6 : c.blankIPv4 }) ?? false else { return .fallback }
                flags = UInt16(VIREO_NETRXF_csum_blank | VIREO_NETRXF_data_validated)
            case .validated:
                flags = UInt16(VIREO_NETRXF_data_validated)
            default:
                break
            }
            do throws(RingError) {
                // `req_prod` is read again only when the requests known from the last read run out.
                if c.rx.ring.knownRequests < needed {
                    guard try c.rx.ring.unconsumedRequests() >= needed else { return .fallback }
                }
                let taken = try Self.take(needed, from: c, into: scratch)
                var copied = taken == needed
                if copied {
                    copied = (try? c.withPages(UnsafeBufferPointer(rebasing: scratch.refs[0..<taken]),
                                               writable: true, pages: scratch.pages, copy)) != nil
                }
                try Self.respond(c, scratch, count: taken, length: length, flags: flags, copied: copied)
                inbox.unpushed = true
                if copied {
                    inbox.counts.rxPackets += 1
                    inbox.counts.rxBytes += length
                } else {
                    inbox.counts.rxErrors += 1
                }
                inbox.unpushedFrames += 1
                if inbox.unpushedFrames == Self.pushInterval {
                    // A long run: push what it delivered so far and notify if the frontend
                    // asked (rsp_event), not only at the run's end. The send marks the
                    // frontend's port pending and wakes its vCPU; it takes no inbox.
                    inbox.unpushed = false
                    inbox.unpushedFrames = 0
                    if c.rx.ring.pushResponsesAndCheckNotify() {
                        inbox.counts.notifications += 1
                        try? c.link.host.send(c.port)
                    }
                }
                return .delivered
            } catch {
                // A producer index out of range: the ring is disconnected for good; this
                // vif's own loop fails the connection on its next pass.
                waker?.kick()
                return .fallback
            }
        }
    }

    /// Releases the inbox this loop holds (the end of its transmit pass, or a route to
    /// another vif), which pushes what it delivered there.
    private func releaseHeldInbox() {
        guard routing.held else { return }
        routing.held = false
        routing.device?.releaseInbox()
    }

    /// The end of a transmit pass's switching: the inbox released, the routed frames counted
    /// to the switch, the route forgotten.
    private func endRouting() {
        releaseHeldInbox()
        if routing.frames > 0 {
            switchPort?.routed(frames: routing.frames, delivered: routing.delivered, dropped: routing.dropped)
        }
        routing = Routing()
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
        // Requests known to be published: `req_prod` is read again only when they run out (a
        // packet's later slots read it themselves if the frontend is still adding them).
        var known = 0
        defer { if c.tx.ring.pushResponsesAndCheckNotify() { notify = true } }
        while true {
            if served == Self.batch { return 0 }
            var direct: Int16?
            if !held {
                if known == 0 {
                    known = try c.tx.ring.unconsumedRequests()
                    if known == 0 {
                        if c.tx.ring.pushResponsesAndCheckNotify() { notify = true }
                        if try c.tx.ring.finalCheckForRequests() { continue }
                        return .max
                    }
                }
                slots.removeAll()
                let first = try next(c, "a packet")
                if bucket == nil { direct = transmitDirect(c, first) }
                if direct != nil {
                    slots.append((first.id, false))
                } else {
                    try parsePacket(c, first: first)
                }
                known = max(0, known - slots.count)
            }
            if direct == nil, parsed.invalid == nil && !parsed.controlOnly, var bucket {
                let wait = bucket.take(UInt64(parsed.size), now: configuration.clock())
                self.bucket = bucket
                if wait > 0 {
                    if !held { pending.txRateDelays += 1 }
                    held = true
                    return wait
                }
            }
            held = false
            let status = direct ?? transmitParsed(c)
            for i in 0..<slots.count {
                let slot = slots[i]
                try c.tx.ring.produceResponse { response in
                    response.set(\.id, to: slot.extra ? 0 : slot.id)
                    response.set(\.status, to: slot.extra ? Int16(VIREO_NETIF_RSP_NULL) : status)
                }
            }
            served += 1
            if served % Self.pushInterval == 0, c.tx.ring.pushResponsesAndCheckNotify() {
                pending.notifications += 1
                try? c.link.host.send(c.port)
            }
        }
    }

    private func next(_ c: Connection, _ what: String) throws -> TxRequest {
        // Each slot taken here is appended to `slots`; a packet cannot take more than the ring.
        guard !slots.isFull else { throw ProtocolError(description: "\(what) runs past the ring's size") }
        guard let request = try c.tx.ring.consumeRequest() else {
            throw ProtocolError(description: "\(what) runs past the producer index (an unfinished packet)")
        }
        return request
    }

    /// Copies the rest of the packet that starts with `first` (its first slot, copied out of
    /// the ring already) out of the ring (each slot once) into `slots`, `fragments` and
    /// `parsed`, validating the copies. A packet that is merely invalid is marked so (it gets
    /// ERROR); one that breaks the ring rules throws ``ProtocolError``.
    private func parsePacket(_ c: Connection, first: TxRequest) throws {
        fragments.removeAll()
        parsed = ParsedPacket()
        slots.append((first.id, false))
        fragments.append((first.gref, Int(first.offset), 0))  // its length is known once the rest is counted
        parsed.size = Int(first.size)
        parsed.flags = first.flags
        if first.flags & ~Self.knownTxFlags != 0 { parsed.invalid = "unknown flags" }
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
                parsed.invalid = parsed.invalid ?? "fragments add up to more than the packet's size"
            } else {
                remaining -= Int(fragment.size)
            }
            if dataSlots > Self.maxSlots {
                parsed.invalid = parsed.invalid ?? "more data slots than XEN_NETIF_NR_SLOTS_MIN"
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
            parsed.invalid = parsed.invalid ?? "a size under 14 bytes (an Ethernet header)"
        }
    }

    /// The commonest packet the short way, without parsing it into `slots` and `fragments`:
    /// one slot (no fragments, no extra info, no blank checksum), switched to another vif that
    /// takes it into its posted pages at once. Its page is the held one when the frontend keeps
    /// it mapped (a static grant), else pinned for the copy as any other. Its first bytes are
    /// copied into the host buffer once and switched on there, and the rest goes page to page,
    /// as ``transmitMapped(_:)`` does. Returns the packet's status, or nil when it is not of
    /// this shape or cannot go straight (its grant refused, no route to one vif, the receiver
    /// not ready): nothing was delivered, and the packet takes the general path from the same
    /// copy of its slot.
    @inline(__always)
    private func transmitDirect(_ c: Connection, _ request: TxRequest) -> Int16? {
        let size = Int(request.size), offset = Int(request.offset)
        guard request.flags & ~UInt16(VIREO_NETTXF_data_validated) == 0, size >= 14, offset + size <= 4096,
              switchPort != nil else { return nil }
        txScratch.refs[0] = GrantRef(request.gref)
        let sent = try? c.withPages(UnsafeBufferPointer(rebasing: txScratch.refs[0..<1]), writable: false, pages: txScratch.pages) {
            pages in sendDirect(from: pages[0], request, size: size, offset: offset)
        }
        return sent ?? nil
    }

    /// ``transmitDirect(_:_:)`` with the packet's page in hand.
    @inline(__always)
    private func sendDirect(from page: SharedRegion, _ request: TxRequest, size: Int, offset: Int) -> Int16? {
        let buffer = txRegion
        let headerLength = min(size, Self.routeBytes)
        Self.copyHeader(from: page, at: offset, to: buffer, at: 0, count: headerLength)
        let header = UnsafeRawBufferPointer(start: txBuffer, count: headerLength)
        guard let destination = route(header) else { return nil }
        func write(into targets: UnsafeMutableBufferPointer<SharedRegion>) {
            Self.copyHeader(from: buffer, at: 0, to: targets[0], at: 0, count: headerLength)
            targets[0].copyBytes(from: page, offset: offset + headerLength, to: headerLength, count: size - headerLength)
        }
        let checksum: FrameChecksum = request.flags == 0 ? .unknown : .validated
        guard deliverStraight(to: destination, header: header, length: size, checksum: checksum, copy: write) == .delivered else {
            return nil
        }
        routing.frames += 1
        routing.delivered += 1
        pending.txPackets += 1
        pending.txBytes += size
        return Int16(VIREO_NETIF_RSP_OKAY)
    }

    /// A routed frame into `destination`'s posted pages (``deliverHeld(header:length:checksum:scratch:copy:)``),
    /// taking its inbox lock first if this pass does not hold it yet (``endRouting()`` releases it).
    @inline(__always)
    private func deliverStraight(to destination: Unmanaged<NetDevice>, header: UnsafeRawBufferPointer, length: Int,
                                 checksum: FrameChecksum, copy: (UnsafeMutableBufferPointer<SharedRegion>) -> Void) -> Delivery {
        if !routing.held {
            destination._withUnsafeGuaranteedRef { $0.holdInbox() }
            routing.held = true
        }
        return destination._withUnsafeGuaranteedRef {
            $0.deliverHeld(header: header, length: length, checksum: checksum, scratch: rxScratch, copy: copy)
        }
    }

    /// A frame's first bytes from one region to another: a whole ``routeBytes`` line as four
    /// 16-byte moves in line (a call to memmove costs as much as the copy), anything shorter
    /// by ``SharedRegion/copyBytes(from:offset:to:count:)``.
    @inline(__always)
    private static func copyHeader(from source: SharedRegion, at from: Int, to target: SharedRegion, at to: Int, count: Int) {
        guard count == routeBytes else {
            target.copyBytes(from: source, offset: from, to: to, count: count)
            return
        }
        let a = source.load(SIMD16<UInt8>.self, at: from), b = source.load(SIMD16<UInt8>.self, at: from + 16)
        let c = source.load(SIMD16<UInt8>.self, at: from + 32), d = source.load(SIMD16<UInt8>.self, at: from + 48)
        target.store(a, at: to)
        target.store(b, at: to + 16)
        target.store(c, at: to + 32)
        target.store(d, at: to + 48)
    }

    /// Pins the parsed packet's pages and hands the frame over; the status for its slots.
    private func transmitParsed(_ c: Connection) -> Int16 {
        if parsed.invalid != nil {
            pending.txErrors += 1
            return Int16(VIREO_NETIF_RSP_ERROR)
        }
        if parsed.controlOnly { return Int16(VIREO_NETIF_RSP_OKAY) }
        let count = fragments.count
        for i in 0..<count { txScratch.refs[i] = GrantRef(fragments[i].ref) }
        do {
            return try c.withPages(UnsafeBufferPointer(rebasing: txScratch.refs[0..<count]),
                                   writable: false, pages: txScratch.pages) { pages in
                transmitMapped(pages)
            }
        } catch {
            pending.txErrors += 1  // a fragment's grant could not be pinned
            return Int16(VIREO_NETIF_RSP_ERROR)
        }
    }

    /// The frame in the pinned `pages` (fragment i in page i): its first bytes are copied once
    /// into the host buffer and checked there; then, for a frame the switch routes to one other
    /// vif, the rest goes from these pages straight into that vif's posted pages (one copy);
    /// otherwise it is copied after the header in the host buffer and the attachment takes the
    /// whole frame. Every byte of the guest's is read once.
    private func transmitMapped(_ pages: UnsafeMutableBufferPointer<SharedRegion>) -> Int16 {
        let size = parsed.size
        let blank = parsed.flags & UInt16(VIREO_NETTXF_csum_blank) != 0
        let headerLength = min(size, blank ? Self.headerBytes : Self.routeBytes)
        let buffer = txRegion
        gather(pages, from: 0, to: headerLength) { page, offset, at, count in
            buffer.copyBytes(from: page, offset: offset, to: at, count: count)
        }
        let header = UnsafeRawBufferPointer(start: txBuffer, count: headerLength)
        var checksum = FrameChecksum.unknown
        if blank {
            // A blank checksum only makes sense on a TCP/UDP segment someone can complete.
            guard ChecksumFill.locate(header, frameLength: size) != nil else {
                pending.txErrors += 1
                return Int16(VIREO_NETIF_RSP_ERROR)
            }
            checksum = .blank
        } else if parsed.flags & UInt16(VIREO_NETTXF_data_validated) != 0 {
            checksum = .validated
        }
        guard attachment != nil else {
            pending.txDropped += 1
            return Int16(VIREO_NETIF_RSP_DROPPED)
        }
        let frame = UnsafeMutableRawBufferPointer(start: txBuffer, count: size)
        let taken: Bool
        if let destination = route(header) {
            // The frame into the receiver's pinned pages (page i holds frame bytes from i * 4096):
            // the header from the checked copy, the rest straight from the sender's pages.
            func write(into targets: UnsafeMutableBufferPointer<SharedRegion>) {
                targets[0].copyBytes(from: buffer, offset: 0, to: 0, count: headerLength)
                gather(pages, from: headerLength, to: size) { page, offset, at, count in
                    var offset = offset, at = at, left = count
                    while left > 0 {
                        let within = at & 4095, n = min(left, 4096 - within)
                        targets[at >> 12].copyBytes(from: page, offset: offset, to: within, count: n)
                        offset += n
                        at += n
                        left -= n
                    }
                }
            }
            if deliverStraight(to: destination, header: header, length: size, checksum: checksum, copy: write) == .delivered {
                taken = true
            } else {
                gather(pages, from: headerLength, to: size) { page, offset, at, count in
                    buffer.copyBytes(from: page, offset: offset, to: at, count: count)
                }
                taken = destination._withUnsafeGuaranteedRef { $0.receive(UnsafeRawBufferPointer(frame), checksum: checksum) }
            }
            routing.frames += 1
            if taken { routing.delivered += 1 } else { routing.dropped += 1 }
        } else {
            gather(pages, from: headerLength, to: size) { page, offset, at, count in
                buffer.copyBytes(from: page, offset: offset, to: at, count: count)
            }
            taken = attachment?.transmit(frame, checksum: checksum) ?? false
        }
        guard taken else {
            pending.txDropped += 1
            return Int16(VIREO_NETIF_RSP_DROPPED)
        }
        pending.txPackets += 1
        pending.txBytes += parsed.size
        return Int16(VIREO_NETIF_RSP_OKAY)
    }

    /// The vif the switch routes a frame with these first bytes to (see ``Routing``).
    @inline(__always)
    private func route(_ header: UnsafeRawBufferPointer) -> Unmanaged<NetDevice>? {
        guard switchPort != nil else { return nil }
        // Both addresses as two loads (a header holds at least 14 bytes), compared as a pair.
        let addresses = (header.loadUnaligned(fromByteOffset: 0, as: UInt64.self),
                         header.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        if routing.valid && addresses == routing.addresses { return routing.target }
        let device = switchPort?.route(header)
        if device !== routing.device { releaseHeldInbox() }
        routing.addresses = addresses
        routing.valid = true
        routing.device = device
        routing.target = device.map { Unmanaged.passUnretained($0) }
        return routing.target
    }

    /// Hands `sink` the packet's bytes [start, end) piece by piece: (page, offset in the page,
    /// offset in the frame, count), in frame order (the first slot's bytes, then each fragment's).
    @inline(__always)
    private func gather(_ pages: UnsafeMutableBufferPointer<SharedRegion>, from start: Int, to end: Int,
                        _ sink: (SharedRegion, Int, Int, Int) -> Void) {
        var at = 0
        for i in 0..<fragments.count {
            let fragment = fragments[i]
            let low = max(start, at), high = min(end, at + fragment.length)
            if low < high { sink(pages[i], fragment.offset + (low - at), low, high - low) }
            at += fragment.length
            if at >= end { return }
        }
    }
}

/// A list of at most `capacity` elements in memory allocated once: per-packet scratch that
/// allocates nothing. Appending to a full list is a programming error (callers check ``isFull``).
struct FixedList<Element: BitwiseCopyable> {
    private let storage: UnsafeMutableBufferPointer<Element>
    private(set) var count = 0

    init(capacity: Int, filler: Element) {
        storage = .allocate(capacity: capacity)
        storage.initialize(repeating: filler)
    }

    var isFull: Bool { count == storage.count }

    mutating func append(_ element: Element) {
        precondition(count < storage.count, "a fixed list appended past its capacity")
        storage[count] = element
        count += 1
    }

    mutating func removeAll() { count = 0 }

    subscript(index: Int) -> Element {
        get {
            precondition(index < count, "a fixed list read past its count")
            return storage[index]
        }
        nonmutating set {
            precondition(index < count, "a fixed list written past its count")
            storage[index] = newValue
        }
    }

    func deallocate() { storage.deallocate() }
}

/// netback: ``NetDevice`` hosted by ``XenbusBackend``.
public typealias NetBackend = XenbusBackend<NetDevice>

extension XenbusBackend where Device == NetDevice {
    public typealias Configuration = NetDevice.Configuration

    /// A vif `handle` (0 = the first, Linux's eth0) of domain `frontend`: see ``NetDevice``.
    public convenience init(frontend: DomainID, handle: UInt32 = 0, configuration: NetDevice.Configuration = .init(),
                            counters: IOCounters? = nil, store: XenStore, grants: GrantTables, host: HostEventDomain) throws(BackendError) {
        let vif = try NetDevice(frontend: frontend, handle: handle, configuration: configuration, counters: counters)
        try self.init(vif, frontend: frontend, handle: handle, store: store, grants: grants, host: host)
        vif.waker = wake
    }

    public var mac: EthernetAddress { device.mac }
    public var configuration: NetDevice.Configuration { device.configuration }

    /// Connects the host side (``NetDevice/attach(_:)``). Call before ``run()``; a later call replaces it.
    public func attach(_ attachment: any NetworkAttachment) { device.attach(attachment) }

    /// A frame for the guest (``NetDevice/receive(_:checksum:)``). Any thread.
    @discardableResult
    public func receive(_ frame: UnsafeRawBufferPointer, checksum: FrameChecksum = .unknown) -> Bool {
        device.receive(frame, checksum: checksum)
    }
}
