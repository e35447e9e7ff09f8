#if canImport(VireoCore)
import VireoCore
#endif
import VireoABI
import VireoHypercalls

/// One piece of a packet to transmit, in a page of the guest's own RAM.
public struct NetFragment: Sendable {
    public var frame: GuestFrame
    public var offset: Int
    public var length: Int
    public init(frame: GuestFrame, offset: Int, length: Int) {
        self.frame = frame
        self.offset = offset
        self.length = length
    }
}

/// A received packet, copied out of the receive pages.
public struct NetPacket: Sendable {
    public var bytes: [UInt8]
    /// NETRXF_data_validated: the backend vouches that the data is intact.
    public var dataValidated: Bool
    /// NETRXF_csum_blank: the TCP/UDP checksum was never filled in (do not verify it; complete
    /// it with ``Packets/completeChecksum(_:)`` before forwarding the packet).
    public var checksumBlank: Bool
    public var length: Int { bytes.count }
}

/// The frontend of a paravirtual network interface (netfront, `vireo/io/netif.h`).
///
/// ``connect()`` does Xen's vif handshake: it waits for the backend's InitWait, reads `mac`,
/// allocates and grants the one-page TX and RX rings, offers one unbound event channel for both,
/// writes `tx-ring-ref`, `rx-ring-ref`, `event-channel`, `request-rx-copy`, `feature-rx-notify`,
/// `feature-sg` and `feature-no-csum-offload` in one transaction, fills the RX ring, goes
/// Initialised then Connected (as Linux's and mini-os's netfronts go Connected once their rings
/// are published: a netback may wait for that before it connects) and waits for the backend's
/// Connected.
///
/// Transmit grants each fragment's page read-only until the response for its slot arrives,
/// then revokes it (a revocation the backend still blocks is counted in ``leakedGrants`` and the
/// page is never reused). At most ``transmitSlots`` slots are in flight. Receive keeps
/// ``receiveBuffers`` whole pages posted, each granted writable for one packet slot only, and
/// hands each packet to the caller.
///
/// With `staticGrants` (and a backend offering `feature-ctrl-ring`) the frontend instead grants
/// its own pages once, for the connection: each transmit slot's copy buffer read-only and each
/// receive page writable, and asks the backend over the control ring to keep them all mapped
/// (Xen's static grants, ADD_GREF_MAPPING; ``staticGrantsHeld``), which spares it a pin and
/// unpin per copy. The backend can then write a receive page while the frontend reads it, as
/// with any mapping it holds: the frontend still copies each packet out once before looking at
/// it. Packets sent from the caller's own pages (``send(fragments:checksumBlank:)``) are granted
/// per packet as before. Every response is validated: ids out of range or not in
/// flight, lengths past the page, broken fragment chains and oversized packets are dropped
/// and counted, never trusted.
public final class NetFrontend<Platform: GuestPlatform> {
    public typealias TxRequest = vireo_netif_tx_request
    public typealias TxResponse = vireo_netif_tx_response
    public typealias RxRequest = vireo_netif_rx_request
    public typealias RxResponse = vireo_netif_rx_response

    public let guest: Guest<Platform>
    public let store: XenStoreClient<Platform>
    public let bus: XenbusFrontend<Platform>
    public var grants: GuestGrants<Platform>
    /// Transmit slots in flight at most (each a fragment awaiting its response).
    public let transmitSlots: Int
    /// Receive pages kept posted.
    public let receiveBuffers: Int

    /// The MAC address the toolstack gave the vif (`mac`), once connected.
    public private(set) var mac = MACAddress.broadcast
    /// The MTU (`mtu`, default 1500).
    public private(set) var mtu = 1500
    /// The backend accepts packets spanning several slots (`feature-sg`).
    public private(set) var backendScatterGather = false
    /// The backend refuses blank checksums (`feature-no-csum-offload`): they are completed here.
    public private(set) var backendNoChecksumOffload = false
    public private(set) var port = EventPort(0)

    // Counters.
    public private(set) var packetsSent = 0
    public private(set) var packetsReceived = 0
    /// Transmit slots the backend answered with ERROR or DROPPED.
    public private(set) var transmitErrors = 0
    /// Received packets dropped: error statuses, bad lengths, wrong ids, oversized chains.
    public private(set) var receiveErrors = 0
    /// Responses for no request of ours (ids out of range or not in flight).
    public private(set) var badResponses = 0
    /// Grants a backend still held when their slot completed (never expected).
    public private(set) var leakedGrants = 0

    var txRing: FrontRing<TxRequest, TxResponse>?
    var rxRing: FrontRing<RxRequest, RxResponse>?
    var txRingRef = GrantRef(0), rxRingRef = GrantRef(0)

    /// Whether ``connect()`` asks for static grants (see the type's documentation).
    public let staticGrants: Bool
    /// The backend answered ADD_GREF_MAPPING with success: it holds every copy buffer and
    /// receive page mapped. False without `staticGrants`, or when it refused (the pages stay
    /// granted for the connection and are pinned per copy).
    public private(set) var staticGrantsHeld = false
    /// Pages granted once for the connection (`staticGrants` and a backend with a control ring).
    var grantedForConnection = false
    typealias ControlRequest = vireo_xen_netif_ctrl_request
    typealias ControlResponse = vireo_xen_netif_ctrl_response
    var controlRing: FrontRing<ControlRequest, ControlResponse>?
    var controlRingRef = GrantRef(0)
    var controlPort = EventPort(0)

    struct TxSlot {
        var inFlight = false
        var ref = GrantRef(0)
        var packet: UInt64 = 0
        /// The copy buffer of this id (0 until first used, or after its grant leaked).
        var page: UInt64 = 0
        /// The copy buffer's grant for the connection (static grants), or nil. A slot whose
        /// `ref` is this one keeps it after the response; any other `ref` is revoked then.
        var bufferRef: GrantRef?
        /// Whether the slot's grant is one of its own, revoked once the slot is answered.
        var ownsRef: Bool { ref != bufferRef }
    }
    var txSlots: [TxSlot] = []
    var freeTxIDs: [UInt16] = []
    var nextPacket: UInt64 = 1

    struct RxBuffer {
        var page: UInt64
        var ref = GrantRef(0)
        var posted = false
    }
    var rxBuffers: [RxBuffer] = []
    var freeRxBuffers: [Int] = []
    /// The buffer posted at each RX ring index (index & mask), -1 for none. Responses are
    /// matched by ring index, as netif.h says (an extra slot has no id); the id is checked.
    var postedAt: [Int] = []

    /// The packet being assembled from RX slots.
    var partial: [UInt8] = []
    var partialSlots = 0
    var partialFlags: UInt16 = 0
    var partialBad = false
    var inPacket = false
    var extrasLeft = false
    var moreData = false

    /// The most data slots one packet may use either way: XEN_NETIF_NR_SLOTS_MIN, what every
    /// backend accepts on transmit, and what this frontend assembles on receive.
    public static var maxSlotsPerPacket: Int { Int(VIREO_XEN_NETIF_NR_SLOTS_MIN) }
    /// The largest packet: 16-bit sizes on the transmit ring.
    public static var maxPacketSize: Int { Int(VIREO_XEN_NETIF_MAX_TX_SIZE) }

    /// Opens vif `handle` from the frontend node `device/vif/<handle>`.
    public init(guest: Guest<Platform>, store: XenStoreClient<Platform>, grants: GuestGrants<Platform>,
                handle: UInt32 = 0, transmitSlots: Int = 64, receiveBuffers: Int = 64, staticGrants: Bool = false) throws(GuestError) {
        guard transmitSlots >= 1, transmitSlots <= Int(VIREO_ABI_NETIF_TX_RING_SIZE),
              receiveBuffers >= 1, receiveBuffers <= Int(VIREO_ABI_NETIF_RX_RING_SIZE) else { throw GuestError.EINVAL }
        self.guest = guest
        self.store = store
        self.grants = grants
        self.transmitSlots = transmitSlots
        self.receiveBuffers = receiveBuffers
        self.staticGrants = staticGrants
        let digits = String(decoding: Bytes.decimal(UInt64(handle)), as: UTF8.self)
        bus = try XenbusFrontend(store: store, node: "device/vif/" + digits)
    }

    public var isConnected: Bool { txRing != nil }

    // MARK: Handshake

    /// Xen's handshake, up to Connected.
    public func connect() throws(GuestError) {
        guard !isConnected else { throw GuestError.EBUSY }
        let state = try bus.waitForBackend([.initWait, .connected, .closing, .closed])
        guard state == .initWait else { throw GuestError.EIO }
        // Vireo's backends, like Linux's, only copy into frontend pages.
        guard let copy = try? store.read(bus.backend + "/feature-rx-copy"),
              Bytes.equal(XenStoreClient<Platform>.trimmed(copy), "1") else { throw GuestError.ENOSYS }
        guard let address = MACAddress(text: XenStoreClient<Platform>.trimmed(try store.read(bus.node + "/mac"))) else {
            throw GuestError.EINVAL
        }
        mac = address
        if let raw = try? store.read(bus.node + "/mtu"), let value = Bytes.decimal(XenStoreClient<Platform>.trimmed(raw)),
           value >= 68, value <= UInt64(Self.maxPacketSize) {
            mtu = Int(value)
        }
        backendScatterGather = flag(bus.backend + "/feature-sg")
        backendNoChecksumOffload = flag(bus.backend + "/feature-no-csum-offload")

        let txPage = guest.platform.allocatePage(), rxPage = guest.platform.allocatePage()
        do {
            txRing = try FrontRing<TxRequest, TxResponse>(initializing: guest.platform.memory(at: txPage, count: guestPageSize))
            rxRing = try FrontRing<RxRequest, RxResponse>(initializing: guest.platform.memory(at: rxPage, count: guestPageSize))
        } catch {
            throw GuestError.EINVAL
        }
        guard let txRef = grants.grantAccess(to: bus.backendDomain, frame: GuestFrame(txPage >> guestPageShift), readOnly: false),
              let rxRef = grants.grantAccess(to: bus.backendDomain, frame: GuestFrame(rxPage >> guestPageShift), readOnly: false)
        else { throw GuestError.ENOSPC }
        txRingRef = txRef
        rxRingRef = rxRef
        port = try guest.allocUnbound(remote: bus.backendDomain)
        // The loop's scan clears the port; the frontend looks at its rings after each pass.
        guest.setHandler(for: port) { _ in }

        txSlots = Array(repeating: TxSlot(), count: transmitSlots)
        freeTxIDs = Array((0..<UInt16(transmitSlots)).reversed())
        rxBuffers = []
        for _ in 0..<receiveBuffers { rxBuffers.append(RxBuffer(page: guest.platform.allocatePage())) }
        freeRxBuffers = Array((0..<receiveBuffers).reversed())
        postedAt = Array(repeating: -1, count: rxRing!.size)
        staticGrantsHeld = false
        grantedForConnection = false
        if staticGrants && flag(bus.backend + "/feature-ctrl-ring") {
            try setUpStaticGrants()
        }

        let node = bus.node
        try store.transaction { tx throws(GuestError) in
            try store.write(node + "/tx-ring-ref", Bytes.decimal(UInt64(txRef.rawValue)), transaction: tx)
            try store.write(node + "/rx-ring-ref", Bytes.decimal(UInt64(rxRef.rawValue)), transaction: tx)
            try store.write(node + "/event-channel", Bytes.decimal(UInt64(port.rawValue)), transaction: tx)
            try store.write(node + "/request-rx-copy", Bytes.of("1"), transaction: tx)
            try store.write(node + "/feature-rx-notify", Bytes.of("1"), transaction: tx)
            // Receive assembles packets of up to maxSlotsPerPacket slots.
            try store.write(node + "/feature-sg", Bytes.of("1"), transaction: tx)
            // Blank checksums are handed to the caller as such (NetPacket.checksumBlank).
            try store.write(node + "/feature-no-csum-offload", Bytes.of("0"), transaction: tx)
            if controlRing != nil {
                try store.write(node + "/ctrl-ring-ref", Bytes.decimal(UInt64(controlRingRef.rawValue)), transaction: tx)
                try store.write(node + "/event-channel-ctrl", Bytes.decimal(UInt64(controlPort.rawValue)), transaction: tx)
            }
            try bus.switchState(.initialised, transaction: tx)
        }
        try refill()
        try bus.switchState(.connected)
        guard try bus.waitForBackend([.connected, .closing, .closed]) == .connected else { throw GuestError.EIO }
        if controlRing != nil { staticGrantsHeld = try addStaticGrants() }
    }

    // MARK: Static grants

    /// The control ring and its port, and every copy buffer and receive page granted once.
    func setUpStaticGrants() throws(GuestError) {
        let page = guest.platform.allocatePage()
        do {
            controlRing = try FrontRing<ControlRequest, ControlResponse>(initializing: guest.platform.memory(at: page, count: guestPageSize))
        } catch {
            throw GuestError.EINVAL
        }
        guard let ref = grants.grantAccess(to: bus.backendDomain, frame: GuestFrame(page >> guestPageShift), readOnly: false) else {
            throw GuestError.ENOSPC
        }
        controlRingRef = ref
        controlPort = try guest.allocUnbound(remote: bus.backendDomain)
        guest.setHandler(for: controlPort) { _ in }
        for i in 0..<txSlots.count {
            txSlots[i].page = guest.platform.allocatePage()
            guard let buffer = grants.grantAccess(to: bus.backendDomain, frame: GuestFrame(txSlots[i].page >> guestPageShift),
                                                  readOnly: true) else { throw GuestError.ENOSPC }
            txSlots[i].bufferRef = buffer
        }
        for i in 0..<rxBuffers.count {
            guard let buffer = grants.grantAccess(to: bus.backendDomain, frame: GuestFrame(rxBuffers[i].page >> guestPageShift),
                                                  readOnly: false) else { throw GuestError.ENOSPC }
            rxBuffers[i].ref = buffer
        }
        grantedForConnection = true
    }

    /// ADD_GREF_MAPPING for every copy buffer (read-only) and receive page (writable), listed in
    /// a page granted for the request; waits for the answer. Whether the backend holds them.
    func addStaticGrants() throws(GuestError) -> Bool {
        let listPage = guest.platform.allocatePage()
        let list = guest.platform.memory(at: listPage, count: guestPageSize)
        var count = 0
        for slot in txSlots {
            guard let ref = slot.bufferRef else { continue }
            var entry = vireo_xen_netif_gref()
            entry.ref = ref.rawValue
            entry.flags = UInt16(VIREO_XEN_NETIF_CTRLF_GREF_readonly)
            list.store(entry, at: count * MemoryLayout<vireo_xen_netif_gref>.stride)
            count += 1
        }
        for buffer in rxBuffers {
            var entry = vireo_xen_netif_gref()
            entry.ref = buffer.ref.rawValue
            list.store(entry, at: count * MemoryLayout<vireo_xen_netif_gref>.stride)
            count += 1
        }
        guard let listRef = grants.grantAccess(to: bus.backendDomain, frame: GuestFrame(listPage >> guestPageShift), readOnly: false)
        else { return false }
        var request = ControlRequest()
        request.id = 1
        request.type = UInt16(VIREO_XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING)
        request.data = (0, listRef.rawValue, UInt32(count))
        do throws(RingError) { try controlRing!.produceRequest(request) } catch { throw GuestError.EIO }
        if controlRing!.pushRequestsAndCheckNotify() { try guest.send(controlPort) }
        var answer: ControlResponse?
        while answer == nil {
            let waiting: Bool
            do throws(RingError) {
                answer = try controlRing!.consumeResponse()
                waiting = answer == nil ? try !controlRing!.finalCheckForResponses() : false
            } catch {
                throw GuestError.EIO
            }
            if waiting { guest.runOnce() }
        }
        guard let response = answer else { throw GuestError.EIO }
        // The backend maps the list only while it answers.
        if !grants.endAccess(listRef) { leakedGrants += 1 }
        return response.id == request.id && response.status == UInt32(VIREO_XEN_NETIF_CTRL_STATUS_SUCCESS)
    }

    func flag(_ path: String) -> Bool {
        guard let raw = try? store.read(path) else { return false }
        return Bytes.equal(XenStoreClient<Platform>.trimmed(raw), "1")
    }

    // MARK: Transmit

    /// Transmit slots free now (after collecting responses).
    public func freeTransmitSlots() throws(GuestError) -> Int {
        try collectTransmitted()
        return freeTxIDs.count < txRing!.freeRequests ? freeTxIDs.count : txRing!.freeRequests
    }

    /// Sends `packet` (an Ethernet frame, 14 to 65535 bytes), copied into pages of the
    /// frontend's own: one slot up to a page, several (NETTXF_more_data) beyond, which needs the
    /// backend's feature-sg. `checksumBlank`: the TCP/UDP checksum is not computed
    /// (NETTXF_csum_blank | NETTXF_data_validated); when the backend refuses that, it is
    /// computed here. Waits in the guest's loop while the slots are all in flight. Returns the
    /// packet's token (``isSent(_:)``).
    @discardableResult
    public func send(_ packet: [UInt8], checksumBlank: Bool = false) throws(GuestError) -> UInt64 {
        guard isConnected else { throw GuestError.EINVAL }
        guard packet.count >= Packets.ethernetHeaderSize, packet.count <= Self.maxPacketSize else { throw GuestError.EINVAL }
        var bytes = packet
        var blank = checksumBlank
        if blank && backendNoChecksumOffload {
            Packets.completeChecksum(&bytes)
            blank = false
        }
        let slots = (bytes.count + guestPageSize - 1) / guestPageSize
        guard slots == 1 || backendScatterGather else { throw GuestError.E2BIG }
        try waitForTransmitSlots(slots)
        var ids: [UInt16] = []
        var fragments: [NetFragment] = []
        var offset = 0
        for _ in 0..<slots {
            let id = freeTxIDs.removeLast()
            ids.append(id)
            if txSlots[Int(id)].page == 0 { txSlots[Int(id)].page = guest.platform.allocatePage() }
            let page = txSlots[Int(id)].page
            let length = bytes.count - offset < guestPageSize ? bytes.count - offset : guestPageSize
            bytes.withUnsafeBytes { source in
                guest.platform.memory(at: page, count: guestPageSize)
                    .copyBytes(from: UnsafeRawBufferPointer(rebasing: source[offset..<(offset + length)]), to: 0)
            }
            fragments.append(NetFragment(frame: GuestFrame(page >> guestPageShift), offset: 0, length: length))
            offset += length
        }
        return try post(fragments, ids: ids, checksumBlank: blank)
    }

    /// Sends a packet whose bytes are `fragments` of the caller's own pages, without copying:
    /// each is granted read-only until its response; the caller keeps the pages unchanged until
    /// ``isSent(_:)`` says so. Each fragment lies within its page; several need feature-sg.
    @discardableResult
    public func send(fragments: [NetFragment], checksumBlank: Bool = false) throws(GuestError) -> UInt64 {
        guard isConnected else { throw GuestError.EINVAL }
        guard !fragments.isEmpty, fragments.count <= Self.maxSlotsPerPacket, fragments.count <= transmitSlots else {
            throw GuestError.EINVAL
        }
        var total = 0
        for fragment in fragments {
            guard fragment.offset >= 0, fragment.length > 0, fragment.offset + fragment.length <= guestPageSize else {
                throw GuestError.EINVAL
            }
            total += fragment.length
        }
        guard total >= Packets.ethernetHeaderSize, total <= Self.maxPacketSize else { throw GuestError.EINVAL }
        guard fragments.count == 1 || backendScatterGather else { throw GuestError.E2BIG }
        guard !checksumBlank || !backendNoChecksumOffload else { throw GuestError.ENOSYS }
        try waitForTransmitSlots(fragments.count)
        var ids: [UInt16] = []
        for _ in fragments { ids.append(freeTxIDs.removeLast()) }
        return try post(fragments, ids: ids, checksumBlank: checksumBlank)
    }

    /// Whether every slot of packet `token` has been answered (its pages are the caller's again).
    public func isSent(_ token: UInt64) throws(GuestError) -> Bool {
        try collectTransmitted()
        guard token != 0, token < nextPacket else { return false }
        for slot in txSlots where slot.inFlight && slot.packet == token { return false }
        return true
    }

    /// Transmit slots in flight.
    public var transmitsInFlight: Int { transmitSlots - freeTxIDs.count }

    func waitForTransmitSlots(_ count: Int) throws(GuestError) {
        guard count <= transmitSlots else { throw GuestError.E2BIG }
        while try freeTransmitSlots() < count { try waitForEvents() }
    }

    /// Grants and queues one packet's slots (ids already taken), publishes them, notifies.
    func post(_ fragments: [NetFragment], ids: [UInt16], checksumBlank: Bool) throws(GuestError) -> UInt64 {
        var refs: [GrantRef] = []
        for (i, fragment) in fragments.enumerated() {
            // The slot's own copy buffer, granted for the connection (static grants): sent under that grant.
            let slot = txSlots[Int(ids[i])]
            if let buffer = slot.bufferRef, fragment.frame == GuestFrame(slot.page >> guestPageShift) {
                refs.append(buffer)
                continue
            }
            guard let ref = grants.grantAccess(to: bus.backendDomain, frame: fragment.frame, readOnly: true) else {
                for (j, r) in refs.enumerated() where r != txSlots[Int(ids[j])].bufferRef && !grants.endAccess(r) { leakedGrants += 1 }
                freeTxIDs += ids.reversed()
                throw GuestError.ENOSPC
            }
            refs.append(ref)
        }
        let packet = nextPacket
        nextPacket &+= 1
        var total = 0
        for fragment in fragments { total += fragment.length }
        for (i, fragment) in fragments.enumerated() {
            var request = TxRequest()
            request.gref = refs[i].rawValue
            request.offset = UInt16(fragment.offset)
            request.id = ids[i]
            request.size = UInt16(i == 0 ? total : fragment.length)
            var flags: UInt32 = 0
            if i == 0 && checksumBlank { flags |= VIREO_NETTXF_csum_blank | VIREO_NETTXF_data_validated }
            if i + 1 < fragments.count { flags |= VIREO_NETTXF_more_data }
            request.flags = UInt16(flags)
            txSlots[Int(ids[i])].inFlight = true
            txSlots[Int(ids[i])].ref = refs[i]
            txSlots[Int(ids[i])].packet = packet
            do { try txRing!.produceRequest(request) } catch { throw GuestError.EIO }
        }
        packetsSent += 1
        if txRing!.pushRequestsAndCheckNotify() { try guest.send(port) }
        return packet
    }

    /// Takes every published transmit response: revokes the slot's grant, frees its id.
    func collectTransmitted() throws(GuestError) {
        guard txRing != nil else { return }
        while true {
            let response: TxResponse?
            do { response = try txRing!.consumeResponse() } catch { throw GuestError.EIO }
            guard let response else { return }
            // The answer to an extra-info slot: this frontend sends none, so it names nothing.
            if response.status == Int16(VIREO_NETIF_RSP_NULL) { continue }
            let id = Int(response.id)
            guard id < txSlots.count, txSlots[id].inFlight else {
                badResponses += 1
                continue
            }
            if txSlots[id].ownsRef && !grants.endAccess(txSlots[id].ref) {
                // The backend still holds the page: it stays granted and is never reused.
                leakedGrants += 1
                txSlots[id].page = 0
            }
            txSlots[id].inFlight = false
            if response.status != Int16(VIREO_NETIF_RSP_OKAY) { transmitErrors += 1 }
            freeTxIDs.append(UInt16(id))
        }
    }

    // MARK: Receive

    /// Posts every free receive page (granted writable to the backend) and notifies it.
    public func refill() throws(GuestError) {
        guard rxRing != nil else { return }
        var posted = false
        while !freeRxBuffers.isEmpty && rxRing!.freeRequests > 0 {
            let index = freeRxBuffers[freeRxBuffers.count - 1]
            let granted = grantedForConnection ? rxBuffers[index].ref
                : grants.grantAccess(to: bus.backendDomain, frame: GuestFrame(rxBuffers[index].page >> guestPageShift), readOnly: false)
            guard let ref = granted else { break }
            freeRxBuffers.removeLast()
            rxBuffers[index].ref = ref
            rxBuffers[index].posted = true
            var request = RxRequest()
            request.id = UInt16(index)
            request.gref = ref.rawValue
            let slot = Int(rxRing!.requestsProduced & UInt32(rxRing!.size - 1))
            postedAt[slot] = index
            do { try rxRing!.produceRequest(request) } catch { throw GuestError.EIO }
            posted = true
        }
        if posted && rxRing!.pushRequestsAndCheckNotify() { try guest.send(port) }
    }

    /// Receive pages posted to the backend now.
    public var receiveBuffersPosted: Int { receiveBuffers - freeRxBuffers.count }

    /// Takes every published receive response, hands each complete packet to `deliver`, and
    /// re-posts the pages. Returns how many packets were delivered.
    @discardableResult
    public func receive(_ deliver: (NetPacket) -> Void) throws(GuestError) -> Int {
        guard rxRing != nil else { throw GuestError.EINVAL }
        var delivered = 0
        while true {
            let index = rxRing!.responsesConsumed
            let response: RxResponse?
            do { response = try rxRing!.consumeResponse() } catch { throw GuestError.EIO }
            guard let response else { break }
            let slot = Int(index & UInt32(rxRing!.size - 1))
            // rsp_prod never passes what was published, so every consumed slot was posted.
            let buffer = postedAt[slot]
            postedAt[slot] = -1
            guard buffer >= 0 else {
                badResponses += 1
                continue
            }
            if let packet = take(response, buffer: buffer) {
                delivered += 1
                deliver(packet)
            }
        }
        try refill()
        return delivered
    }

    /// One receive slot: its page is revoked first, so the backend cannot change the bytes
    /// being read (unless it is granted for the connection: static grants); then the slot adds
    /// to the packet being assembled. Returns a finished packet.
    func take(_ response: RxResponse, buffer: Int) -> NetPacket? {
        let page = rxBuffers[buffer].page
        var pageUsable = true
        if !grantedForConnection && !grants.endAccess(rxBuffers[buffer].ref) {
            leakedGrants += 1
            pageUsable = false
            rxBuffers[buffer].page = guest.platform.allocatePage()
        }
        rxBuffers[buffer].posted = false
        freeRxBuffers.append(buffer)

        if !inPacket {
            inPacket = true
            partial = []
            partialSlots = 0
            partialBad = false
            partialFlags = response.flags
            extrasLeft = response.flags & UInt16(VIREO_NETRXF_extra_info) != 0
            moreData = false
            takeData(response, buffer: buffer, page: page, usable: pageUsable)
        } else if extrasLeft {
            // An extra-info slot (its page untouched): the 8 bytes are a netif_extra_info,
            // whose flags byte is the id's high byte. Their content is not used.
            extrasLeft = UInt8(truncatingIfNeeded: response.id >> 8) & UInt8(VIREO_XEN_NETIF_EXTRA_FLAG_MORE) != 0
            partialSlots += 1
            if partialSlots > Self.maxSlotsPerPacket * 2 { partialBad = true }
        } else {
            takeData(response, buffer: buffer, page: page, usable: pageUsable)
        }
        guard !extrasLeft && !moreData else { return nil }
        inPacket = false
        let bytes = partial
        partial = []
        if partialBad || bytes.count < Packets.ethernetHeaderSize {
            receiveErrors += 1
            return nil
        }
        packetsReceived += 1
        return NetPacket(bytes: bytes, dataValidated: partialFlags & UInt16(VIREO_NETRXF_data_validated) != 0,
                         checksumBlank: partialFlags & UInt16(VIREO_NETRXF_csum_blank) != 0)
    }

    func takeData(_ response: RxResponse, buffer: Int, page: UInt64, usable: Bool) {
        moreData = response.flags & UInt16(VIREO_NETRXF_more_data) != 0
        partialSlots += 1
        let offset = Int(response.offset), length = Int(response.status)
        guard !partialBad else { return }
        guard usable, response.id == UInt16(buffer), length >= 0, offset + length <= guestPageSize,
              partialSlots <= Self.maxSlotsPerPacket, partial.count + length <= Self.maxPacketSize else {
            partialBad = true
            partial = []
            return
        }
        guard length > 0 else { return }
        let region = guest.platform.memory(at: page, count: guestPageSize)
        let start = partial.count
        partial.append(contentsOf: repeatElement(0, count: length))
        partial.withUnsafeMutableBytes { target in
            region.copyBytes(from: offset, into: UnsafeMutableRawBufferPointer(rebasing: target[start..<(start + length)]))
        }
    }

    // MARK: The loop

    /// Collects transmit responses and delivers received packets (``receive(_:)``).
    @discardableResult
    public func poll(_ deliver: (NetPacket) -> Void) throws(GuestError) -> Int {
        try collectTransmitted()
        return try receive(deliver)
    }

    /// Sleeps in the guest's loop unless a response is already waiting on either ring (each
    /// ring's rsp_event is set first, so the backend's next response notifies).
    public func waitForEvents() throws(GuestError) {
        guard txRing != nil, rxRing != nil else { throw GuestError.EINVAL }
        let tx: Bool, rx: Bool
        do {
            tx = try txRing!.finalCheckForResponses()
            rx = try rxRing!.finalCheckForResponses()
        } catch {
            throw GuestError.EIO
        }
        if !tx && !rx { guest.runOnce() }
    }

    /// Closes the device: Closing, wait for the backend to follow, Closed; every grant (the
    /// rings, posted pages, slots in flight) is revoked once the backend has let it go.
    public func disconnect() throws(GuestError) {
        try bus.switchState(.closing)
        _ = try bus.waitForBackend([.closing, .closed])
        try bus.switchState(.closed)
        _ = try bus.waitForBackend([.closed])
        guard txRing != nil else { return }
        for i in 0..<txSlots.count {
            if txSlots[i].inFlight && txSlots[i].ownsRef && !grants.endAccess(txSlots[i].ref) { leakedGrants += 1 }
            if let buffer = txSlots[i].bufferRef, !grants.endAccess(buffer) { leakedGrants += 1 }
            txSlots[i].bufferRef = nil
            if txSlots[i].inFlight { freeTxIDs.append(UInt16(i)) }
            txSlots[i].inFlight = false
        }
        for i in 0..<rxBuffers.count where rxBuffers[i].posted || grantedForConnection {
            if !grants.endAccess(rxBuffers[i].ref) { leakedGrants += 1 }
            rxBuffers[i].posted = false
        }
        if !grants.endAccess(txRingRef) { leakedGrants += 1 }
        if !grants.endAccess(rxRingRef) { leakedGrants += 1 }
        txRing = nil
        rxRing = nil
        guest.removeHandler(for: port)
        try? guest.close(port)
        if controlRing != nil {
            if !grants.endAccess(controlRingRef) { leakedGrants += 1 }
            controlRing = nil
            guest.removeHandler(for: controlPort)
            try? guest.close(controlPort)
        }
        grantedForConnection = false
        staticGrantsHeld = false
    }
}
