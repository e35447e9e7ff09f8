import Foundation
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls
import VireoStore

typealias TxRequest = vireo_netif_tx_request
typealias TxResponse = vireo_netif_tx_response
typealias RxRequest = vireo_netif_rx_request
typealias RxResponse = vireo_netif_rx_response

let rspOkay = Int16(VIREO_NETIF_RSP_OKAY)
let rspError = Int16(VIREO_NETIF_RSP_ERROR)
let rspDropped = Int16(VIREO_NETIF_RSP_DROPPED)
let rspNull = Int16(VIREO_NETIF_RSP_NULL)

/// One host domain, XenStore, event hub and grant tables, with any number of vifs whose
/// frontends are SimulatedGuests writing raw netif ring entries. Backends are driven by
/// ``NetBackend/poll()`` from the test's thread (deterministic), unless a test starts their
/// `run()` threads itself.
final class NetRig {
    let hub = EventChannels()
    let grants = GrantTables()
    let store = XenStore()
    let host: HostEventDomain
    var vifs: [NetFront] = []
    /// Each guest's I/O counters, given to its vif's backend.
    var counters: [UInt16: IOCounters] = [:]

    init() throws {
        host = try HostEventDomain(hub: hub)
    }

    /// A new guest domain with one vif, its backend created (InitWait), not connected.
    func vif(_ domain: UInt16, configuration: NetBackend.Configuration = .init()) throws -> NetFront {
        let guest = try SimulatedGuest(id: DomainID(domain), ramPages: 1024, hub: hub, grantTables: grants)
        try store.introduceDomain(guest.id)
        let io = IOCounters()
        counters[domain] = io
        let backend = try NetBackend(frontend: guest.id, configuration: configuration, counters: io, store: store, grants: grants, host: host)
        try backend.create()
        let front = NetFront(rig: self, guest: guest, backend: backend)
        vifs.append(front)
        return front
    }

    /// Serves every backend until nothing is left to do (a few passes).
    func pump(passes: Int = 4) {
        for _ in 0..<passes { for v in vifs { v.backend.poll() } }
    }

    /// Runs each of `fronts`' backends in its own `run()` loop on a thread, beside a dispatcher
    /// for the host domain's ports (the deployed shape); the returned closure stops them all
    /// and waits for the threads.
    func runLoops(_ fronts: [NetFront], name: String) -> () -> Void {
        let dispatcher = HostEventDispatcher(host, name: name)
        let backends = fronts.map(\.backend)
        let threads = backends.map { backend in Thread { backend.run() } }
        for t in threads { t.start() }
        return {
            for backend in backends { backend.stop() }
            dispatcher.stop()
            while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
        }
    }
}

/// A frontend played by hand: the guest's half of Xen's vif handshake, and raw tx/rx rings.
final class NetFront {
    unowned let rig: NetRig
    let guest: SimulatedGuest
    let backend: NetBackend
    let session: XenStoreConnection
    var tx: FrontRing<TxRequest, TxResponse>!
    var rx: FrontRing<RxRequest, RxResponse>!
    var txFrame = GuestFrame(0), rxFrame = GuestFrame(0)
    var txRef = GrantRef(0), rxRef = GrantRef(0)
    var port = EventPort(0)
    /// Posted receive pages by request id.
    var posted: [UInt16: (frame: GuestFrame, ref: GrantRef)] = [:]
    var nextRxID: UInt16 = 0
    /// Transmit responses by id (extra slots' NULLs under `nulls`).
    var txResponses: [(id: UInt16, status: Int16)] = []
    /// The control ring and its port, after ``connectControl()``.
    var control: FrontRing<vireo_xen_netif_ctrl_request, vireo_xen_netif_ctrl_response>!
    var controlPort = EventPort(0)
    private var nextControlID: UInt16 = 0

    init(rig: NetRig, guest: SimulatedGuest, backend: NetBackend) {
        self.rig = rig
        self.guest = guest
        self.backend = backend
        session = rig.store.connect(domain: guest.id)
    }

    var mac: EthernetAddress { backend.mac }

    @discardableResult
    func write(_ path: String, _ value: String) -> XenStoreMessage? {
        rig.store.request(XenStoreMessage(type: .write, payload: Array(path.utf8) + [0] + Array(value.utf8)), from: session)
    }

    func read(_ path: String) -> String? {
        guard let reply = rig.store.request(XenStoreMessage(.read, path), from: session), reply.type == .read else { return nil }
        return String(decoding: reply.payload, as: UTF8.self)
    }

    var backendState: String? { read(backend.backendPath + "/state") }

    /// Sets up both rings and the event channel and writes Linux netfront's keys, then
    /// Connected (Linux frontends skip Initialised). `extra` keys are written too (a test's
    /// features or hostile values); `omit` leaves keys out.
    func connect(extra: [(String, String)] = [], omit: Set<String> = [], state: UInt32 = XenbusBackendState.connected,
                 oneRingPage: Bool = false) throws {
        txFrame = try guest.allocatePage()
        rxFrame = try guest.allocatePage()
        tx = try guest.frontRing(on: txFrame)
        rx = try guest.frontRing(on: rxFrame)
        txRef = try guest.grantAccess(to: rig.host.id, frame: txFrame, readOnly: false)
        rxRef = oneRingPage ? txRef : try guest.grantAccess(to: rig.host.id, frame: rxFrame, readOnly: false)
        port = try guest.allocUnbound(remote: rig.host.id)
        let node = backend.frontendPath
        var keys: [(String, String)] = [("tx-ring-ref", "\(txRef.rawValue)"), ("rx-ring-ref", "\(rxRef.rawValue)"),
                                        ("event-channel", "\(port.rawValue)"), ("request-rx-copy", "1"),
                                        ("feature-rx-notify", "1"), ("feature-sg", "1")]
        keys.removeAll { omit.contains($0.0) }
        for (key, value) in keys + extra { #expect(write(node + "/" + key, value)?.type == .write) }
        #expect(write(node + "/state", "\(state)")?.type == .write)
        backend.poll()
    }

    /// Sets up a control ring and its own port; returns the keys that offer them to the
    /// backend (for ``connect(extra:omit:state:oneRingPage:)``).
    func controlKeys() throws -> [(String, String)] {
        let frame = try guest.allocatePage()
        control = try guest.frontRing(on: frame)
        let ref = try guest.grantAccess(to: rig.host.id, frame: frame, readOnly: false)
        controlPort = try guest.allocUnbound(remote: rig.host.id)
        return [("ctrl-ring-ref", "\(ref.rawValue)"), ("event-channel-ctrl", "\(controlPort.rawValue)")]
    }

    /// One control request, answered by a backend pass: the response.
    func controlRequest(_ type: Int32, _ data: (UInt32, UInt32, UInt32)) throws -> vireo_xen_netif_ctrl_response {
        var request = vireo_xen_netif_ctrl_request()
        nextControlID &+= 1
        request.id = nextControlID
        request.type = UInt16(type)
        request.data = data
        try control.produceRequest(request)
        if control.pushRequestsAndCheckNotify() { try guest.notify(controlPort) }
        backend.poll()
        let response = try #require(try control.consumeResponse(), "a control response")
        #expect(response.id == request.id && response.type == request.type)
        return response
    }

    /// A writable page listing `entries` (xen_netif_gref: ref, flags) for ADD_/DEL_GREF_MAPPING.
    func grefTable(_ entries: [(GrantRef, UInt16)]) throws -> (ref: GrantRef, page: SharedRegion) {
        let frame = try guest.allocatePage()
        let page = try guest.page(frame)
        for (i, (ref, flags)) in entries.enumerated() {
            var entry = vireo_xen_netif_gref()
            entry.ref = ref.rawValue
            entry.flags = flags
            entry.status = 0xBEEF
            page.store(entry, at: i * MemoryLayout<vireo_xen_netif_gref>.stride)
        }
        return (try guest.grantAccess(to: rig.host.id, frame: frame, readOnly: false), page)
    }

    func setState(_ state: UInt32) {
        write(backend.frontendPath + "/state", "\(state)")
    }

    // MARK: Receive

    /// Posts `count` empty, writable pages.
    func postReceive(_ count: Int, badGrant: Bool = false) throws {
        for _ in 0..<count {
            let frame = try guest.allocatePage()
            try guest.page(frame).fill(0xEE, at: 0, count: 4096)
            let ref = badGrant ? GrantRef(1999) : try guest.grantAccess(to: rig.host.id, frame: frame, readOnly: false)
            let id = nextRxID
            nextRxID &+= 1
            posted[id] = (frame, ref)
            var request = RxRequest()
            request.id = id
            request.gref = ref.rawValue
            try rx.produceRequest(request)
        }
        if rx.pushRequestsAndCheckNotify() { try guest.notify(port) }
    }

    /// A received packet: its bytes and the first slot's flags.
    struct Received {
        var bytes: [UInt8]
        var flags: UInt16
        var statuses: [Int16]
        var offsets: [UInt16]
    }

    /// Consumes every receive response, reassembling packets over more_data.
    func takeReceived() throws -> [Received] {
        var packets: [Received] = []
        var current: Received?
        while let response = try rx.consumeResponse() {
            let taken = posted.removeValue(forKey: response.id)
            let page = try #require(taken, "a response for a posted id")
            if current == nil { current = Received(bytes: [], flags: response.flags, statuses: [], offsets: []) }
            current!.statuses.append(response.status)
            current!.offsets.append(response.offset)
            if response.status > 0 {
                current!.bytes += try guest.memory.bytes(at: page.frame.address!.advanced(by: UInt64(response.offset))!,
                                                         count: Int(response.status))
            }
            if response.flags & UInt16(VIREO_NETRXF_more_data) == 0 {
                packets.append(current!)
                current = nil
            }
        }
        return packets
    }

    // MARK: Transmit

    /// A page holding `bytes` at `offset`, granted read-only to the host.
    func grantedPage(_ bytes: [UInt8], at offset: Int = 0) throws -> GrantRef {
        let frame = try guest.allocatePage()
        try guest.page(frame).withUnsafeMutableBytes(offset: offset, count: bytes.count) { $0.copyBytes(from: bytes) }
        return try guest.grantAccess(to: rig.host.id, frame: frame, readOnly: true)
    }

    static func request(gref: GrantRef, offset: Int, flags: UInt32, id: UInt16, size: Int) -> TxRequest {
        var r = TxRequest()
        r.gref = gref.rawValue
        r.offset = UInt16(offset)
        r.flags = UInt16(flags)
        r.id = id
        r.size = UInt16(truncatingIfNeeded: size)
        return r
    }

    /// Sends `frame` in fragments of the given sizes (the first request carries the total).
    func send(_ frame: [UInt8], id: UInt16, fragments: [Int]? = nil, flags: UInt32 = 0, offset: Int = 0) throws {
        let sizes = fragments ?? [frame.count]
        var at = 0
        for (i, size) in sizes.enumerated() {
            let ref = try grantedPage(Array(frame[at..<at + size]), at: offset)
            var f: UInt32 = i == 0 ? flags : 0
            if i + 1 < sizes.count { f |= VIREO_NETTXF_more_data }
            try tx.produceRequest(Self.request(gref: ref, offset: offset, flags: f, id: id &+ UInt16(i),
                                               size: i == 0 ? frame.count : size))
            at += size
        }
        try push()
    }

    func push() throws {
        if tx.pushRequestsAndCheckNotify() { try guest.notify(port) }
    }

    /// Collects transmit responses.
    @discardableResult
    func takeTransmitted() throws -> [(id: UInt16, status: Int16)] {
        var got: [(id: UInt16, status: Int16)] = []
        while let r = try tx.consumeResponse() { got.append((r.id, r.status)) }
        txResponses += got
        return got
    }
}

/// An Ethernet frame from `source` to `destination` with an experimental EtherType and a payload.
func ethernetFrame(to destination: EthernetAddress, from source: EthernetAddress, payload: Int, seed: UInt8 = 0,
                   etherType: UInt16 = 0x88B5) -> [UInt8] {
    let d = destination.bytes, s = source.bytes
    return [d.0, d.1, d.2, d.3, d.4, d.5, s.0, s.1, s.2, s.3, s.4, s.5, UInt8(etherType >> 8), UInt8(etherType & 0xff)]
        + (0..<payload).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
}

/// An IPv4 UDP (or TCP) frame whose checksum field holds `checksumField`.
func ipv4Frame(to destination: EthernetAddress, from source: EthernetAddress, payload: Int, tcp: Bool = false,
               checksumField: UInt16 = 0x1234) -> [UInt8] {
    var frame = ethernetFrame(to: destination, from: source, payload: 0, etherType: 0x0800)
    let l4Header = tcp ? 20 : 8
    let total = 20 + l4Header + payload
    frame += [0x45, 0, UInt8(total >> 8), UInt8(total & 0xff), 0, 1, 0x40, 0, 64, tcp ? 6 : 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]
    if tcp {
        frame += [0x30, 0x39, 0x00, 0x50, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0x20, 0x00,
                  UInt8(checksumField >> 8), UInt8(checksumField & 0xff), 0, 0]
    } else {
        let length = 8 + payload
        frame += [0x30, 0x39, 0x00, 0x35, UInt8(length >> 8), UInt8(length & 0xff),
                  UInt8(checksumField >> 8), UInt8(checksumField & 0xff)]
    }
    frame += (0..<payload).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 1) }
    return frame
}

/// A switch port's stand-in for a host side that records what the guest sent.
final class Capture: NetworkAttachment, @unchecked Sendable {
    let frames = Mutex<[([UInt8], FrameChecksum)]>([])
    var accept = true
    func transmit(_ frame: UnsafeMutableRawBufferPointer, checksum: FrameChecksum) -> Bool {
        guard accept else { return false }
        frames.withLock { $0.append((Array(frame), checksum)) }
        return true
    }
}
