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
/// both rings and binds the event channel.
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
///
/// Threads: everything is served on XenbusBackend's control loop (``XenbusBackend/run()``, or
/// ``XenbusBackend/poll()`` from a caller's loop); ``receive(_:checksum:)`` may be called from
/// any thread and wakes that loop.
public final class NetDevice: XenbusDevice, @unchecked Sendable {  // the control loop owns the mutable state; others touch atomics, locks and the pipe
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
    @exclusivity(unchecked) private var slots: [(id: UInt16, extra: Bool)] = []
    @exclusivity(unchecked) private var fragments: [(ref: UInt32, offset: Int, length: Int)] = []
    @exclusivity(unchecked) private var parsed = ParsedPacket()
    @exclusivity(unchecked) private var held = false
    @exclusivity(unchecked) private var bucket: TokenBucket?
    @exclusivity(unchecked) private var rxRequests: [RxRequest] = []
    /// What the last pass found: 0 when work is left, the rate limit's wait, or `UInt64.max`.
    @exclusivity(unchecked) private var next = UInt64.max

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
    public final class Connection {
        let tx: MappedBackRing<TxRequest, TxResponse>
        let rx: MappedBackRing<RxRequest, RxResponse>
        let port: EventPort
        let link: FrontendLink
        let frontendSG: Bool
        let blankIPv4: Bool
        let blankIPv6: Bool
        init(tx: MappedBackRing<TxRequest, TxResponse>, rx: MappedBackRing<RxRequest, RxResponse>, port: EventPort,
             link: FrontendLink, frontendSG: Bool, blankIPv4: Bool, blankIPv6: Bool) {
            self.tx = tx
            self.rx = rx
            self.port = port
            self.link = link
            self.frontendSG = frontendSG
            self.blankIPv4 = blankIPv4
            self.blankIPv6 = blankIPv6
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
        self.handle = handle
        self.configuration = configuration
        mac = configuration.mac ?? .generated(domain: frontend.rawValue, handle: handle)
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
         ("feature-ctrl-ring", "0")]
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
        let tx: MappedBackRing<TxRequest, TxResponse> = try link.mapRing("tx-ring-ref")
        let rx: MappedBackRing<RxRequest, RxResponse> = try link.mapRing("rx-ring-ref")
        let port = try link.bindEvent("event-channel")
        held = false
        accepting.store(true, ordering: .releasing)
        return Connection(tx: tx, rx: rx, port: port, link: link, frontendSG: link.flag("feature-sg"),
                          blankIPv4: !link.flag("feature-no-csum-offload"), blankIPv6: link.flag("feature-ipv6-csum-offload"))
    }

    /// One pass: the transmit ring, the host side's descriptor, then the receive queue.
    public func serve(_ c: Connection) throws(BackendError) {
        attachment = attachmentBox.withLock { $0 }
        next = .max
        var notify = false
        do {
            next = min(next, try serveTransmit(c, notify: &notify))
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
        if notify {
            pending.notifications += 1
            try? c.link.host.send(c.port)
        }
        flushStatistics()
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
        let dropped = queue.removeAll()
        if dropped > 0 {
            stats.withLock { $0.rxDropped += dropped }
            io?.errors.add(dropped, ordering: .relaxed)
        }
        held = false
        try? c.link.host.close(c.port)
    }

    private func flushStatistics() {
        let add = pending
        pending = Statistics()
        if let io {
            let frames = add.txPackets + add.rxPackets
            let errors = add.txErrors + add.txDropped + add.rxErrors + add.rxDropped
            if frames > 0 { io.requests.add(frames, ordering: .relaxed) }
            if add.txBytes > 0 { io.netTransmitBytes.add(add.txBytes, ordering: .relaxed) }
            if add.rxBytes > 0 { io.netReceiveBytes.add(add.rxBytes, ordering: .relaxed) }
            if errors > 0 { io.errors.add(errors, ordering: .relaxed) }
        }
        stats.withLock { s in
            s.txPackets += add.txPackets; s.txBytes += add.txBytes; s.txErrors += add.txErrors
            s.txDropped += add.txDropped; s.txRateDelays += add.txRateDelays
            s.rxPackets += add.rxPackets; s.rxBytes += add.rxBytes; s.rxDropped += add.rxDropped
            s.rxErrors += add.rxErrors; s.notifications += add.notifications
        }
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
    private func serveReceive(_ c: Connection, notify: inout Bool) throws(RingError) -> Bool {
        var served = 0
        defer { if served > 0 && c.rx.ring.pushResponsesAndCheckNotify() { notify = true } }
        let grants = c.link.grants, frontend = c.link.domain, host = c.link.host
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
            rxRequests.removeAll(keepingCapacity: true)
            for _ in 0..<needed {
                guard let request = try c.rx.ring.consumeRequest() else { break }
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
                try c.rx.ring.produceResponse { slot in
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
        defer { if c.tx.ring.pushResponsesAndCheckNotify() { notify = true } }
        while true {
            if served == Self.batch { return 0 }
            if !held {
                if try c.tx.ring.unconsumedRequests() == 0 {
                    if c.tx.ring.pushResponsesAndCheckNotify() { notify = true }
                    if try c.tx.ring.finalCheckForRequests() { continue }
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
            let status = transmitParsed(c)
            for slot in slots {
                try c.tx.ring.produceResponse { response in
                    response.set(\.id, to: slot.extra ? 0 : slot.id)
                    response.set(\.status, to: slot.extra ? Int16(VIREO_NETIF_RSP_NULL) : status)
                }
            }
            served += 1
        }
    }

    private func next(_ c: Connection, _ what: String) throws -> TxRequest {
        guard let request = try c.tx.ring.consumeRequest() else {
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
    private func transmitParsed(_ c: Connection) -> Int16 {
        let grants = c.link.grants, frontend = c.link.domain, host = c.link.host
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
