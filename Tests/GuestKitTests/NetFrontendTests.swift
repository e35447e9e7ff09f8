import Foundation
import GuestKit
import Synchronization
import Testing
import VireoABI
import VireoCore
import VireoHypercalls
import VireoHypervisor
import VireoStore

/// GuestKit's NetFrontend, every hypercall through the real dispatcher and the store over the
/// guest's ring. The peer is `SimulatedNetback` below: the test itself playing dom0 on the
/// shared rings, mapping the real ring grants and moving packet bytes with grant copies through
/// the real GrantTables. Vireo's real netback is being written in parallel (VireoBackends); the
/// frontend-against-the-real-backend test is added when the two meet.
@Suite(.serialized) struct NetFrontendTests {
    typealias TxRequest = vireo_netif_tx_request
    typealias TxResponse = vireo_netif_tx_response
    typealias RxRequest = vireo_netif_rx_request
    typealias RxResponse = vireo_netif_rx_response

    static let front = "/local/domain/7/device/vif/0"
    static let back = "/local/domain/0/backend/vif/7/0"
    static let macText = "00:16:3e:12:34:56"

    final class Mapped {
        let mapping: GrantMapping
        init(_ mapping: consuming GrantMapping) { self.mapping = mapping }
    }

    /// dom0's side of one vif, driven by the test: the XenStore nodes a toolstack and a netback
    /// write, the rings mapped through the real grant table, payloads moved by grant copy.
    final class SimulatedNetback {
        let machine: TestMachine
        var tx: BackRing<TxRequest, TxResponse>!
        var rx: BackRing<RxRequest, RxResponse>!
        var txMapping: Mapped?
        var rxMapping: Mapped?
        var port = EventPort(0)
        var statesSeen: [String] = []
        let buffer: UnsafeMutableRawPointer
        let local: SharedRegion

        init(sg: Bool = true, noCsumOffload: Bool = false, rxCopy: Bool = true, mac: String = NetFrontendTests.macText) throws {
            machine = try TestMachine(memory: 8 << 20)
            buffer = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 4096)
            local = SharedRegion.unsafe(buffer, count: 65536)
            let frontPerms = "n7\u{0}r0", backPerms = "n0\u{0}r7"
            for (key, value) in [("backend", back), ("backend-id", "0"), ("mac", mac), ("handle", "0"), ("state", "1")] {
                try machine.toolstackWrite(front + "/" + key, value)
            }
            try machine.toolstackSetPermissions(front, frontPerms)
            for key in ["backend", "backend-id", "mac", "handle", "state"] {
                try machine.toolstackSetPermissions(front + "/" + key, frontPerms)
            }
            var backKeys = [("frontend", front), ("frontend-id", "7"), ("handle", "0"), ("mac", mac),
                            ("feature-sg", sg ? "1" : "0"), ("feature-rx-flip", "0"), ("state", "2")]
            if rxCopy { backKeys.append(("feature-rx-copy", "1")) }
            if noCsumOffload { backKeys.append(("feature-no-csum-offload", "1")) }
            for (key, value) in backKeys { try machine.toolstackWrite(back + "/" + key, value) }
            try machine.toolstackSetPermissions(back, backPerms)
            for (key, _) in backKeys { try machine.toolstackSetPermissions(back + "/" + key, backPerms) }
        }

        deinit { buffer.deallocate() }

        func frontNumber(_ key: String) -> UInt32? { machine.toolstackRead(front + "/" + key).flatMap { UInt32($0) } }

        /// The backend's side of the handshake, as a task of the guest's loop: once the frontend
        /// is Initialised or Connected, map both rings, bind the port, go Connected.
        func connectWhenReady(_ guest: Guest<DomainPlatform>) {
            guest.addTask { [self] in
                let state = machine.toolstackRead(front + "/state") ?? "?"
                if statesSeen.last != state { statesSeen.append(state) }
                guard state == "3" || state == "4" else { return false }
                do {
                    try attach()
                    try machine.toolstackWrite(back + "/state", "4")
                } catch {
                    Issue.record("the simulated backend could not attach: \(error)")
                }
                return true
            }
        }

        func attach() throws {
            let table = machine.domain.grantTable, dom0 = machine.host.id
            let txRef = GrantRef(try #require(frontNumber("tx-ring-ref")))
            let rxRef = GrantRef(try #require(frontNumber("rx-ring-ref")))
            let t = Mapped(try table.map(txRef, by: dom0, readOnly: false))
            let r = Mapped(try table.map(rxRef, by: dom0, readOnly: false))
            tx = try BackRing(attaching: try t.mapping.sharedRegion())
            rx = try BackRing(attaching: try r.mapping.sharedRegion())
            txMapping = t
            rxMapping = r
            port = try machine.host.bindInterdomain(remoteDomain: machine.domain.id,
                                                    remotePort: EventPort(try #require(frontNumber("event-channel"))))
        }

        func notify() throws { try machine.host.send(port) }

        /// Every transmit request published now.
        func takeTransmits() throws -> [TxRequest] {
            var requests: [TxRequest] = []
            while let request = try tx.consumeRequest() { requests.append(request) }
            return requests
        }

        /// The bytes of one transmit slot, by grant copy (as a netback reads them).
        func copyOut(_ request: TxRequest, length: Int) -> [UInt8]? {
            let status = machine.grants.copy(GrantCopySegment(
                source: .grant(machine.domain.id, GrantRef(request.gref), offset: Int(request.offset)),
                dest: .local(local, offset: 0), length: length), by: machine.host.id)
            guard status == .okay else { return nil }
            return (0..<length).map { local.load(UInt8.self, at: $0) }
        }

        func answerTransmit(id: UInt16, status: Int16 = Int16(VIREO_NETIF_RSP_OKAY)) throws {
            try tx.produceResponse { slot in
                slot.set(\.id, to: id)
                slot.set(\.status, to: status)
            }
        }

        func pushTransmits() throws {
            _ = tx.pushResponsesAndCheckNotify()
            try notify()
        }

        /// Posted receive requests, consumed now.
        func takeReceiveRequests(_ count: Int) throws -> [RxRequest] {
            var requests: [RxRequest] = []
            while requests.count < count, let request = try rx.consumeRequest() { requests.append(request) }
            return requests
        }

        /// Copies `bytes` into the page of `request` at `offset` and answers it.
        func fill(_ request: RxRequest, with bytes: [UInt8], offset: Int = 0, flags: UInt32 = 0) throws {
            for (i, byte) in bytes.enumerated() { local.store(byte, at: i) }
            let status = machine.grants.copy(GrantCopySegment(
                source: .local(local, offset: 0), dest: .grant(machine.domain.id, GrantRef(request.gref), offset: offset),
                length: bytes.count), by: machine.host.id)
            #expect(status == .okay)
            try answerReceive(id: request.id, offset: UInt16(offset), flags: UInt16(flags), status: Int16(bytes.count))
        }

        func answerReceive(id: UInt16, offset: UInt16 = 0, flags: UInt16 = 0, status: Int16) throws {
            try rx.produceResponse { slot in
                slot.set(\.id, to: id)
                slot.set(\.offset, to: offset)
                slot.set(\.flags, to: flags)
                slot.set(\.status, to: status)
            }
        }

        /// Delivers one packet over as many posted pages as it needs (NETRXF_more_data).
        func deliver(_ packet: [UInt8], flags: UInt32 = 0) throws {
            let slots = (packet.count + 4095) / 4096
            let requests = try takeReceiveRequests(slots)
            try #require(requests.count == slots)
            for (i, request) in requests.enumerated() {
                let part = Array(packet[(i * 4096)..<min(packet.count, (i + 1) * 4096)])
                try fill(request, with: part, flags: (i == 0 ? flags : 0) | (i + 1 < slots ? VIREO_NETRXF_more_data : 0))
            }
            pushReceives()
            try notify()
        }

        func pushReceives() { _ = rx.pushResponsesAndCheckNotify() }
    }

    /// A connected frontend over a simulated backend.
    static func connected(_ backend: SimulatedNetback, transmitSlots: Int = 64,
                          receiveBuffers: Int = 64) throws -> NetFrontend<DomainPlatform> {
        let guest = Guest(platform: backend.machine.platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        let net = try NetFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest),
                                  transmitSlots: transmitSlots, receiveBuffers: receiveBuffers)
        backend.connectWhenReady(guest)
        try net.connect()
        return net
    }

    static func frame(_ count: Int, seed: UInt8 = 1) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ Int(seed)) }
    }

    // MARK: Handshake

    @Test func theHandshakeWritesXensKeysAndConnects() throws {
        let backend = try SimulatedNetback()
        let net = try Self.connected(backend, receiveBuffers: 32)
        let read = { (key: String) in backend.machine.toolstackRead(Self.front + "/" + key) }
        #expect(read("request-rx-copy") == "1")
        #expect(read("feature-rx-notify") == "1")
        #expect(read("feature-sg") == "1")
        #expect(read("feature-no-csum-offload") == "0")
        #expect(read("state") == "4")
        #expect(backend.statesSeen.last == "4" || backend.statesSeen.contains("3"))
        #expect(net.mac.text == Array(Self.macText.utf8))
        #expect(net.backendScatterGather && !net.backendNoChecksumOffload)
        #expect(net.isConnected)
        // Both ring grants are writable grants to dom0 (attach mapped them), the port is bound.
        #expect(backend.txMapping != nil && backend.rxMapping != nil)
        #expect(try #require(backend.frontNumber("tx-ring-ref")) >= 8)
        // The RX ring holds the 32 posted pages, each a writable grant of its own.
        let posted = try backend.takeReceiveRequests(64)
        #expect(posted.count == 32 && net.receiveBuffersPosted == 32)
        #expect(Set(posted.map(\.id)).count == 32 && Set(posted.map(\.gref)).count == 32)
        let table = backend.machine.domain.grantTable
        let mapping = try table.map(GrantRef(posted[5].gref), by: backend.machine.host.id, readOnly: false)
        #expect(table.unmap(mapping.handle) == .okay)
        try backend.machine.toolstackWrite(Self.back + "/state", "5")
        try backend.machine.toolstackWrite(Self.back + "/state", "6")
        try net.disconnect()
        #expect(read("state") == "6")
    }

    @Test func aBackendWithoutRxCopyOrAMacIsRefused() throws {
        let noCopy = try SimulatedNetback(rxCopy: false)
        let guest = Guest(platform: noCopy.machine.platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        let net = try NetFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest))
        #expect(throws: GuestError.ENOSYS) { try net.connect() }

        let badMac = try SimulatedNetback(mac: "00:16:3e:zz:00:01")
        let guest2 = Guest(platform: badMac.machine.platform)
        try guest2.mapSharedInfo()
        let net2 = try NetFrontend(guest: guest2, store: try XenStoreClient(guest: guest2), grants: try GuestGrants(guest: guest2))
        #expect(throws: GuestError.EINVAL) { try net2.connect() }
        #expect(throws: GuestError.EINVAL) {
            _ = try NetFrontend(guest: guest2, store: try XenStoreClient(guest: guest2), grants: try GuestGrants(guest: guest2),
                                transmitSlots: 0)
        }
    }

    // MARK: Transmit

    @Test func transmitSendsOneSlotAndRevokesTheGrantAfterTheResponse() throws {
        let backend = try SimulatedNetback()
        let net = try Self.connected(backend)
        let grantsBefore = net.grants.freeCount
        let packet = Self.frame(60)
        let token = try net.send(packet)
        let requests = try backend.takeTransmits()
        try #require(requests.count == 1)
        let request = requests[0]
        #expect(request.size == 60 && request.offset == 0 && request.flags == 0)
        #expect(backend.copyOut(request, length: 60) == packet)
        // Read-only: the backend cannot map it writable.
        let table = backend.machine.domain.grantTable
        #expect(throws: GrantStatus.self) { _ = try table.map(GrantRef(request.gref), by: backend.machine.host.id, readOnly: false) }
        #expect(try !net.isSent(token))
        #expect(net.transmitsInFlight == 1 && net.grants.freeCount == grantsBefore - 1)
        try backend.answerTransmit(id: request.id)
        try backend.pushTransmits()
        #expect(try net.isSent(token))
        #expect(net.transmitsInFlight == 0 && net.grants.freeCount == grantsBefore)
        // Revoked: the reference no longer reaches the page.
        #expect(throws: GrantStatus.self) { _ = try table.map(GrantRef(request.gref), by: backend.machine.host.id, readOnly: true) }
        #expect(backend.copyOut(request, length: 60) == nil)
        #expect(net.packetsSent == 1 && net.transmitErrors == 0 && net.leakedGrants == 0)

        // A blank checksum is flagged csum_blank | data_validated on the first slot.
        try net.send(Self.frame(80), checksumBlank: true)
        let blank = try backend.takeTransmits()
        #expect(blank.count == 1 && UInt32(blank[0].flags) == VIREO_NETTXF_csum_blank | VIREO_NETTXF_data_validated)
        // An ERROR answer is counted.
        try backend.answerTransmit(id: blank[0].id, status: Int16(VIREO_NETIF_RSP_ERROR))
        try backend.pushTransmits()
        #expect(try net.freeTransmitSlots() == 64)
        #expect(net.transmitErrors == 1)
    }

    @Test func transmitSplitsAPacketAcrossPagesWithMoreData() throws {
        let backend = try SimulatedNetback()
        let net = try Self.connected(backend)
        // Copied: 5000 bytes take two slots.
        let big = Self.frame(5000, seed: 9)
        try net.send(big)
        let slots = try backend.takeTransmits()
        try #require(slots.count == 2)
        #expect(slots[0].size == 5000 && UInt32(slots[0].flags) == VIREO_NETTXF_more_data)
        #expect(slots[1].size == 904 && slots[1].flags == 0 && slots[0].id != slots[1].id)
        let bytes = (backend.copyOut(slots[0], length: 4096) ?? []) + (backend.copyOut(slots[1], length: 904) ?? [])
        #expect(bytes == big)

        // Zero-copy: a frame that starts near the end of one page and runs into the next.
        let platform = backend.machine.platform
        let first = platform.allocatePage(), second = platform.allocatePage()
        let wire = Self.frame(200, seed: 3)
        try backend.machine.domain.memory.write(Array(wire[0..<96]), at: GuestPhysicalAddress(first + 4000))
        try backend.machine.domain.memory.write(Array(wire[96...]), at: GuestPhysicalAddress(second))
        let token = try net.send(fragments: [NetFragment(frame: GuestFrame(first >> 12), offset: 4000, length: 96),
                                             NetFragment(frame: GuestFrame(second >> 12), offset: 0, length: 104)])
        let pieces = try backend.takeTransmits()
        try #require(pieces.count == 2)
        #expect(pieces[0].offset == 4000 && pieces[0].size == 200 && pieces[1].offset == 0 && pieces[1].size == 104)
        #expect((backend.copyOut(pieces[0], length: 96) ?? []) + (backend.copyOut(pieces[1], length: 104) ?? []) == wire)
        for slot in slots + pieces { try backend.answerTransmit(id: slot.id) }
        try backend.pushTransmits()
        #expect(try net.isSent(token))
        #expect(net.transmitsInFlight == 0 && net.leakedGrants == 0)
        // A fragment past its page, or too short a packet, is refused before anything is granted.
        #expect(throws: GuestError.EINVAL) { try net.send(fragments: [NetFragment(frame: GuestFrame(first >> 12), offset: 4000, length: 200)]) }
        #expect(throws: GuestError.EINVAL) { try net.send(Self.frame(10)) }
    }

    @Test func withoutScatterGatherOrCsumOffloadTheFrontendAdapts() throws {
        let backend = try SimulatedNetback(sg: false, noCsumOffload: true)
        let net = try Self.connected(backend)
        #expect(!net.backendScatterGather && net.backendNoChecksumOffload)
        #expect(throws: GuestError.E2BIG) { try net.send(Self.frame(5000)) }
        // The backend refuses blank checksums: the frontend fills the UDP checksum in itself.
        var udp = PacketsTests.udpFrame(payload: Array("offload".utf8))
        Packets.prepareChecksumOffload(&udp)
        try net.send(udp, checksumBlank: true)
        let sent = try backend.takeTransmits()
        try #require(sent.count == 1)
        #expect(sent[0].flags == 0)
        let bytes = try #require(backend.copyOut(sent[0], length: Int(sent[0].size)))
        #expect(PacketsTests.udpChecksumIsValid(bytes))
    }

    @Test func inFlightTransmitsAreBoundedAndTheSenderWaits() throws {
        let backend = try SimulatedNetback()
        let net = try Self.connected(backend, transmitSlots: 4)
        for i in 0..<4 { try net.send(Self.frame(64, seed: UInt8(i))) }
        #expect(net.transmitsInFlight == 4)
        // The fifth send waits in the loop; the backend answers from a task of that loop.
        var seenWhenAnswering = -1
        net.guest.addTask {
            guard let requests = try? backend.takeTransmits() else { return false }
            seenWhenAnswering = requests.count
            for request in requests { try? backend.answerTransmit(id: request.id) }
            try? backend.pushTransmits()
            return true
        }
        try net.send(Self.frame(64, seed: 9))
        #expect(seenWhenAnswering == 4, "no more than the bound was ever in flight")
        #expect(net.transmitsInFlight == 1)
        #expect(throws: GuestError.E2BIG) { try net.send(Self.frame(4096 * 4 + 1)) }
    }

    // MARK: Receive

    @Test func receiveDeliversPacketsAndRefillsTheRing() throws {
        let backend = try SimulatedNetback()
        let net = try Self.connected(backend, receiveBuffers: 16)
        let packet = Self.frame(98, seed: 5)
        try backend.deliver(packet, flags: VIREO_NETRXF_data_validated)
        var got: [NetPacket] = []
        #expect(try net.receive { got.append($0) } == 1)
        try #require(got.count == 1)
        #expect(got[0].bytes == packet && got[0].dataValidated && !got[0].checksumBlank)
        // The page went back: 16 posted, 15 left unconsumed in the ring plus the new one.
        #expect(net.receiveBuffersPosted == 16)
        #expect(try backend.rx.unconsumedRequests() == 16)

        // Several slots, and a csum_blank flag on the first.
        let jumbo = Self.frame(9000, seed: 11)
        try backend.deliver(jumbo, flags: VIREO_NETRXF_csum_blank | VIREO_NETRXF_data_validated)
        got = []
        try net.receive { got.append($0) }
        #expect(got.count == 1 && got.first?.bytes == jumbo && got.first?.checksumBlank == true)

        // An extra-info slot after the first (its page untouched) is skipped.
        let requests = try backend.takeReceiveRequests(2)
        let small = Self.frame(70, seed: 2)
        try backend.fill(requests[0], with: small, flags: VIREO_NETRXF_extra_info)
        // netif_extra_info{type GSO, flags 0, ...} read as a response: id = type | flags << 8.
        try backend.answerReceive(id: UInt16(VIREO_XEN_NETIF_EXTRA_TYPE_GSO), offset: 1460, flags: 1, status: 0)
        backend.pushReceives()
        try backend.notify()
        got = []
        try net.receive { got.append($0) }
        #expect(got.count == 1 && got.first?.bytes == small)
        #expect(net.packetsReceived == 3 && net.receiveErrors == 0 && net.leakedGrants == 0)

        // A packet delivered while the guest sleeps wakes it (the ring asked for an event).
        net.guest.addTask {
            try? backend.deliver(Self.frame(60, seed: 8))
            return true
        }
        var woke = 0
        while woke == 0 {
            try net.waitForEvents()
            woke = try net.receive { _ in }
        }
        #expect(woke == 1 && net.packetsReceived == 4)
    }

    /// netecho's loop (poll, answer, send after the pass) over the simulated netback: an ARP
    /// request, a ping and a UDP datagram in, three correct replies out.
    @Test func anEchoLoopAnswersARPPingAndUDP() throws {
        let backend = try SimulatedNetback()
        let net = try Self.connected(backend)
        let ip = IPv4Address(10, 0, 0, 2)
        let peer: [UInt8] = [0x02, 0, 0, 0xaa, 0xbb, 0xcc]
        let arp: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff] + peer + [0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1] + peer
            + [10, 0, 0, 1] + [0, 0, 0, 0, 0, 0] + [10, 0, 0, 2]
        var icmp: [UInt8] = [8, 0, 0, 0, 0, 7, 0, 1] + Array("abcdefgh".utf8)
        let sum = ~PacketsTests.onesComplement(icmp[...])
        icmp[2] = UInt8(sum >> 8)
        icmp[3] = UInt8(sum & 0xff)
        let ping = PacketsTests.ipFrame(protocolNumber: 1, payload: icmp)
        let udp = PacketsTests.udpFrame(payload: Array("echo me".utf8))
        for packet in [arp, ping, udp] { try backend.deliver(packet) }
        var replies: [[UInt8]] = []
        try net.poll { packet in
            if let (reply, _) = Packets.echoReply(to: packet.bytes, mac: net.mac, ip: ip, checksumBlank: packet.checksumBlank) {
                replies.append(reply)
            }
        }
        for reply in replies { try net.send(reply) }
        let sent = try backend.takeTransmits()
        try #require(sent.count == 3)
        let out = sent.compactMap { backend.copyOut($0, length: Int($0.size)) }
        #expect(out.count == 3)
        #expect(Array(out[0][12..<14]) == [0x08, 0x06] && out[0][21] == 2, "an ARP reply")
        #expect(out[1][34] == 0 && PacketsTests.onesComplement(out[1][34...]) == 0xffff, "an echo reply")
        #expect(PacketsTests.udpChecksumIsValid(out[2]) && Array(out[2][42...]) == Array("echo me".utf8), "the datagram back")
        for request in sent { try backend.answerTransmit(id: request.id) }
        try backend.pushTransmits()
        #expect(try net.freeTransmitSlots() == 64 && net.packetsReceived == 3 && net.packetsSent == 3)
    }

    /// The simulated netback on a thread of its own, echoing every transmitted packet back on
    /// the receive ring, with real event suppression both ways: it notifies only when the
    /// frontend's rsp_event asks, and sleeps until the frontend's notification (a handler of
    /// the host's port, run by whichever thread dispatches the host's events). A lost wakeup on
    /// either side stalls the exchange (SCHEDOP_block fails the run after its timeout).
    final class EchoThread: @unchecked Sendable {
        let sim: SimulatedNetback
        let stopping = Atomic<Bool>(false)
        let wake = DispatchSemaphore(value: 0)
        var thread: Thread?
        var protocolErrors = 0
        var notificationsSent = 0

        init(_ sim: SimulatedNetback) {
            self.sim = sim
            let wake = self.wake
            sim.machine.host.setHandler(for: sim.port) { _ in wake.signal() }
        }

        func start() {
            let thread = Thread { [self] in run() }
            self.thread = thread
            thread.start()
        }

        func stop() {
            stopping.store(true, ordering: .releasing)
            wake.signal()
            while thread?.isFinished == false { usleep(1000) }
        }

        /// One TX packet (a chain of slots), answered slot by slot; nil when none is waiting.
        func takePacket() throws -> [UInt8]? {
            guard let first = try sim.tx.consumeRequest() else { return nil }
            var slots = [first]
            while UInt32(slots[slots.count - 1].flags) & VIREO_NETTXF_more_data != 0 {
                guard let next = try sim.tx.consumeRequest() else { protocolErrors += 1; break }
                slots.append(next)
            }
            // netif.h: the first slot's size is the packet's; its own bytes are that less the rest.
            var later = 0
            for slot in slots.dropFirst() { later += Int(slot.size) }
            var packet: [UInt8] = []
            for (i, slot) in slots.enumerated() {
                let length = i == 0 ? Int(first.size) - later : Int(slot.size)
                if length >= 0, let bytes = sim.copyOut(slot, length: length) { packet += bytes } else { protocolErrors += 1 }
                try sim.answerTransmit(id: slot.id)
            }
            return packet
        }

        func run() {
            var queue: [[UInt8]] = []
            do {
                while !stopping.load(ordering: .acquiring) {
                    var worked = false
                    while queue.count < 8, let packet = try takePacket() {
                        queue.append(packet)
                        worked = true
                    }
                    while let packet = queue.first, try sim.rx.unconsumedRequests() >= (packet.count + 4095) / 4096 {
                        let requests = try sim.takeReceiveRequests((packet.count + 4095) / 4096)
                        for (i, request) in requests.enumerated() {
                            let part = Array(packet[(i * 4096)..<min(packet.count, (i + 1) * 4096)])
                            try sim.fill(request, with: part, flags: i + 1 < requests.count ? VIREO_NETRXF_more_data : 0)
                        }
                        queue.removeFirst()
                        worked = true
                    }
                    let notifyTx = sim.tx.pushResponsesAndCheckNotify()
                    let notifyRx = sim.rx.pushResponsesAndCheckNotify()
                    if notifyTx || notifyRx {
                        try sim.notify()
                        notificationsSent += 1
                    }
                    if worked { continue }
                    // Before sleeping: ask for a notification on the next request, look again.
                    let more = try sim.tx.finalCheckForRequests() || (!queue.isEmpty && sim.rx.finalCheckForRequests())
                    if !more { _ = wake.wait(timeout: .now() + .milliseconds(200)) }
                }
            } catch {
                protocolErrors += 1
            }
        }
    }

    @Test func aThreadedEchoBackendReturnsEveryPacketInOrder() throws {
        let sim = try SimulatedNetback()
        let net = try Self.connected(sim, transmitSlots: 16, receiveBuffers: 16)
        let echo = EchoThread(sim)
        echo.start()
        defer { echo.stop() }
        let sizes = (0..<600).map { i in i % 50 == 7 ? 3000 + i * 7 : 60 + (i * 37) % 1455 }
        var received: [NetPacket] = []
        for (i, size) in sizes.enumerated() {
            try net.send(Self.frame(size, seed: UInt8(truncatingIfNeeded: i)))
            try net.poll { received.append($0) }
        }
        while received.count < sizes.count {
            if try net.poll({ received.append($0) }) == 0 { try net.waitForEvents() }
        }
        echo.stop()
        #expect(echo.protocolErrors == 0)
        #expect(received.count == sizes.count)
        for (i, packet) in received.enumerated() where packet.bytes != Self.frame(sizes[i], seed: UInt8(truncatingIfNeeded: i)) {
            Issue.record("packet \(i) (\(sizes[i]) bytes) came back as \(packet.bytes.count) different bytes")
            break
        }
        #expect(try net.freeTransmitSlots() == 16)
        #expect(net.receiveErrors == 0 && net.transmitErrors == 0 && net.badResponses == 0 && net.leakedGrants == 0)
        #expect(echo.notificationsSent < sizes.count * 2, "event suppression: not one notification per response")
    }

    // MARK: A hostile backend

    @Test func badTransmitResponsesAreDropped() throws {
        let backend = try SimulatedNetback()
        let net = try Self.connected(backend, transmitSlots: 8)
        for i in 0..<5 { try net.send(Self.frame(60, seed: UInt8(i))) }
        let requests = try backend.takeTransmits()
        try #require(requests.count == 5)
        // Five answers: an id past the table, the first request's twice, the next two. The
        // last two requests go unanswered (the bad answers used their slots).
        try backend.answerTransmit(id: 999)
        try backend.answerTransmit(id: requests[0].id)
        try backend.answerTransmit(id: requests[0].id)
        try backend.answerTransmit(id: requests[1].id)
        try backend.answerTransmit(id: requests[2].id)
        try backend.pushTransmits()
        #expect(try net.freeTransmitSlots() == 6)
        #expect(net.badResponses == 2, "999 and the duplicate")
        #expect(net.transmitsInFlight == 2 && net.leakedGrants == 0)
        // A response producer past the requests disconnects the ring: an error, not a crash.
        let region = try #require(try backend.txMapping?.mapping.sharedRegion())
        region.storeRelease32(region.loadAcquire32(at: RingLayout.responseProducerOffset) &+ 5,
                              at: RingLayout.responseProducerOffset)
        #expect(throws: GuestError.EIO) { _ = try net.freeTransmitSlots() }
    }

    @Test func revocationRefusesWhileTheBackendStillMapsTheGrant() throws {
        let backend = try SimulatedNetback()
        let net = try Self.connected(backend)
        let table = backend.machine.domain.grantTable, dom0 = backend.machine.host.id
        let first = Self.frame(60, seed: 1)
        try net.send(first)
        let request = try #require(try backend.takeTransmits().first)
        let held = try table.map(GrantRef(request.gref), by: dom0, readOnly: true)
        try backend.answerTransmit(id: request.id)
        try backend.pushTransmits()
        #expect(try net.freeTransmitSlots() == 64)
        #expect(net.leakedGrants == 1, "the grant stays: the backend still maps it")
        #expect(net.grants.isInUse(GrantRef(request.gref)))
        // The next packet (on the same id) goes into a fresh page, not the one still mapped.
        try net.send(Self.frame(60, seed: 99))
        let next = try #require(try backend.takeTransmits().first)
        #expect(next.id == request.id && next.gref != request.gref)
        var seen = [UInt8](repeating: 0, count: 60)
        try seen.withUnsafeMutableBytes { try held.read(at: 0, into: $0) }
        #expect(seen == first)
        #expect(table.unmap(held.handle) == .okay)

        // Receive: a page the backend still maps when it answers is dropped and replaced.
        let posted = try #require(try backend.takeReceiveRequests(1).first)
        let pin = try table.map(GrantRef(posted.gref), by: dom0, readOnly: false)
        try backend.fill(posted, with: Self.frame(60))
        backend.pushReceives()
        var got = 0
        try net.receive { _ in got += 1 }
        #expect(got == 0 && net.receiveErrors == 1 && net.leakedGrants == 2)
        // Whatever is posted now is another page: writing through every posted grant leaves
        // the pinned page alone.
        for r in try backend.takeReceiveRequests(64) {
            let m = try table.map(GrantRef(r.gref), by: dom0, readOnly: false)
            try m.store(UInt8(0xAB), at: 0)
            _ = table.unmap(m.handle)
        }
        #expect(try pin.load(UInt8.self, at: 0) == Self.frame(60)[0])
        #expect(table.unmap(pin.handle) == .okay)
    }

    @Test func badReceiveResponsesAreDropped() throws {
        let backend = try SimulatedNetback()
        let net = try Self.connected(backend, receiveBuffers: 32)
        let rq = try backend.takeReceiveRequests(8)
        // Past the page; a negative status; a wrong id; a zero-length lone slot.
        try backend.answerReceive(id: rq[0].id, offset: 4000, status: 200)
        try backend.answerReceive(id: rq[1].id, status: Int16(VIREO_NETIF_RSP_ERROR))
        try backend.answerReceive(id: rq[2].id &+ 1, status: 60)
        try backend.answerReceive(id: rq[3].id, status: 0)
        // A chain whose middle slot is bad drops the whole packet.
        try backend.fill(rq[4], with: Self.frame(100), flags: VIREO_NETRXF_more_data)
        try backend.answerReceive(id: rq[5].id, offset: 100, flags: UInt16(VIREO_NETRXF_more_data), status: 4000)
        try backend.fill(rq[6], with: Self.frame(50))
        // Then a good packet.
        try backend.fill(rq[7], with: Self.frame(64, seed: 4))
        backend.pushReceives()
        var got: [NetPacket] = []
        try net.receive { got.append($0) }
        #expect(got.count == 1 && got.first?.bytes == Self.frame(64, seed: 4))
        #expect(net.receiveErrors == 5)
        #expect(net.receiveBuffersPosted == 32, "every page went back")

        // A chain longer than 18 slots is dropped, whatever it carries.
        let chain = try backend.takeReceiveRequests(20)
        for (i, r) in chain.enumerated() {
            try backend.fill(r, with: Self.frame(100), flags: i < 19 ? VIREO_NETRXF_more_data : 0)
        }
        backend.pushReceives()
        got = []
        try net.receive { got.append($0) }
        #expect(got.isEmpty && net.receiveErrors == 6)

        // rsp_prod beyond what was posted disconnects the ring: an error, not a crash.
        let region = try #require(try backend.rxMapping?.mapping.sharedRegion())
        region.storeRelease32(region.loadAcquire32(at: RingLayout.responseProducerOffset) &+ 1000,
                              at: RingLayout.responseProducerOffset)
        #expect(throws: GuestError.EIO) { try net.receive { _ in } }
        #expect(net.leakedGrants == 0)
    }
}
