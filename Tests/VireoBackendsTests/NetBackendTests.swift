import Foundation
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls
import VireoStore

private let connected = "\(XenbusBackendState.connected)"
private let closing = "\(XenbusBackendState.closing)"

/// Two connected vifs (domains 1 and 2) on one switch, receive pages posted on both.
private func pair(_ a: NetBackend.Configuration = .init(), _ b: NetBackend.Configuration = .init(),
                  extraB: [(String, String)] = []) throws -> (NetRig, NetworkSwitch, NetFront, NetFront) {
    let rig = try NetRig()
    let fabric = NetworkSwitch(name: "test")
    let one = try rig.vif(1, configuration: a), two = try rig.vif(2, configuration: b)
    fabric.connect(one.backend)
    fabric.connect(two.backend)
    try one.connect()
    try two.connect(extra: extraB)
    #expect(one.backendState == connected && two.backendState == connected)
    try one.postReceive(32)
    try two.postReceive(32)
    return (rig, fabric, one, two)
}

@Suite struct NetBackendTests {
    @Test func theBackendPublishesXenKeysWithPermissionsAndWalksTheStates() throws {
        let rig = try NetRig()
        let vif = try rig.vif(3)
        let back = vif.backend.backendPath, front = vif.backend.frontendPath
        #expect(back == "/local/domain/0/backend/vif/3/0")
        #expect(front == "/local/domain/3/device/vif/0")
        let mac = "02:16:3e:00:03:00"
        #expect(vif.backend.mac.description == mac)
        for (key, value) in [("frontend", front), ("frontend-id", "3"), ("online", "1"), ("handle", "0"), ("mac", mac),
                             ("feature-sg", "1"), ("feature-rx-copy", "1"), ("feature-rx-flip", "0"),
                             ("feature-no-csum-offload", "0"), ("feature-ipv6-csum-offload", "1"),
                             ("feature-gso-tcpv4", "0"), ("feature-split-event-channels", "0"), ("state", "2")] {
            #expect(vif.read(back + "/" + key) == value, "\(key)")
        }
        for (key, value) in [("backend", back), ("backend-id", "0"), ("handle", "0"), ("mac", mac), ("state", "1")] {
            #expect(vif.read(front + "/" + key) == value, "\(key)")
        }
        // The frontend reads the backend's directory but may not write it; it owns its own.
        #expect(vif.write(back + "/mac", "00:00:00:00:00:01")?.type == .error)
        #expect(vif.write(back + "/state", "4")?.type == .error)
        #expect(vif.write(front + "/tx-ring-ref", "8")?.type == .write)
        let perms = rig.store.request(XenStoreMessage(.getPermissions, back + "/mac"), from: vif.session)
        #expect(perms.map { String(decoding: $0.payload, as: UTF8.self) } == "n0\0r3\0")
        // Another guest sees neither directory.
        let other = try rig.vif(4)
        #expect(other.read(back + "/mac") == nil)
        #expect(other.read(front + "/mac") == nil)

        try vif.connect()
        #expect(vif.backendState == connected)
        #expect(vif.backend.connections == 1)
        vif.setState(XenbusBackendState.closing)
        vif.backend.poll()
        #expect(vif.backendState == closing)
        vif.setState(XenbusBackendState.closed)
        vif.backend.poll()
        #expect(vif.backendState == "\(XenbusBackendState.closed)")
        #expect(vif.guest.endAccess(vif.txRef) && vif.guest.endAccess(vif.rxRef), "both ring grants are unmapped after Closed")
        // The frontend starts again (a reloaded driver): InitWait, then a new connection.
        vif.setState(XenbusBackendState.initialising)
        vif.backend.poll()
        #expect(vif.backendState == "\(XenbusBackendState.initWait)")
        try vif.connect()
        #expect(vif.backendState == connected)
        #expect(vif.backend.connections == 2)
        vif.backend.finish()
        #expect(vif.guest.endAccess(vif.txRef), "finish() unmaps the rings")
    }

    @Test func aFrameCrossesTheSwitchFromOneGuestToAnother() throws {
        let (rig, fabric, one, two) = try pair()
        let frame = ethernetFrame(to: two.mac, from: one.mac, payload: 100)
        try one.send(frame, id: 7)
        rig.pump()
        #expect(try one.takeTransmitted().map(\.status) == [rspOkay])
        #expect(one.txResponses.first?.id == 7)
        let got = try two.takeReceived()
        #expect(got.count == 1)
        #expect(got.first?.bytes == frame)
        #expect(got.first?.statuses == [Int16(frame.count)])
        #expect(got.first?.offsets == [0])
        #expect(got.first?.flags == 0, "nothing vouched for")
        #expect(one.backend.statistics.txPackets == 1 && one.backend.statistics.txBytes == frame.count)
        #expect(two.backend.statistics.rxPackets == 1 && two.backend.statistics.rxBytes == frame.count)
        // Each domain's counters (vireod's metrics) saw the same frame, from its side.
        let ioOne = try #require(rig.counters[1]), ioTwo = try #require(rig.counters[2])
        #expect(ioOne.requests.load(ordering: .relaxed) == 1 && ioOne.netTransmitBytes.load(ordering: .relaxed) == frame.count)
        #expect(ioTwo.requests.load(ordering: .relaxed) == 1 && ioTwo.netReceiveBytes.load(ordering: .relaxed) == frame.count)
        #expect(ioOne.netReceiveBytes.load(ordering: .relaxed) == 0 && ioOne.errors.load(ordering: .relaxed) == 0)
        // The switch learned one's address: the reply is not flooded.
        let flooded = fabric.statistics.flooded
        try two.send(ethernetFrame(to: one.mac, from: two.mac, payload: 60), id: 1)
        rig.pump()
        #expect(try one.takeReceived().count == 1)
        #expect(fabric.statistics.flooded == flooded)
        #expect(fabric.learnedAddresses == 2)
        // A vif's own address stays on its port: one spoofing two's address does not take it over.
        try one.send(ethernetFrame(to: .broadcast, from: two.mac, payload: 60), id: 2)
        try one.send(ethernetFrame(to: two.mac, from: one.mac, payload: 61), id: 3)
        rig.pump()
        #expect(try two.takeReceived().map(\.bytes.count) == [74, 75])
    }

    @Test func anRxPacketLandsInThePostedPageAndBigOnesSpanSlots() throws {
        let rig = try NetRig()
        let vif = try rig.vif(1)
        try vif.connect()
        let frame = ethernetFrame(to: vif.mac, from: .broadcast, payload: 1000, seed: 3)
        frame.withUnsafeBytes { _ = vif.backend.receive($0, checksum: .validated) }
        vif.backend.poll()
        #expect(try vif.takeReceived().isEmpty, "no page posted yet: the frame waits")
        try vif.postReceive(1)
        vif.backend.poll()
        let got = try vif.takeReceived()
        #expect(got.count == 1)
        #expect(got.last?.bytes == frame)
        #expect(got.last?.flags == UInt16(VIREO_NETRXF_data_validated))
        // A 9000-byte frame to a feature-sg frontend: three pages, more_data on all but the last.
        let jumbo = ethernetFrame(to: vif.mac, from: .broadcast, payload: 8986, seed: 9)
        jumbo.withUnsafeBytes { _ = vif.backend.receive($0) }
        try vif.postReceive(2)
        vif.backend.poll()
        #expect(try vif.takeReceived().isEmpty, "two free pages are not enough: it waits for a third")
        try vif.postReceive(1)
        vif.backend.poll()
        let big = try vif.takeReceived()
        #expect(big.count == 1)
        #expect(big.first?.statuses == [4096, 4096, 808])
        #expect(big.first?.bytes == jumbo)
    }

    @Test func aFrontendWithoutScatterGatherGetsNoMultiPageFrames() throws {
        let rig = try NetRig()
        let vif = try rig.vif(1)
        try vif.connect(omit: ["feature-sg"])
        try vif.postReceive(8)
        let jumbo = ethernetFrame(to: vif.mac, from: .broadcast, payload: 5000)
        jumbo.withUnsafeBytes { _ = vif.backend.receive($0) }
        let small = ethernetFrame(to: vif.mac, from: .broadcast, payload: 50)
        small.withUnsafeBytes { _ = vif.backend.receive($0) }
        vif.backend.poll()
        let got = try vif.takeReceived()
        #expect(got.map(\.bytes) == [small])
        #expect(vif.backend.statistics.rxDropped == 1)
    }

    @Test func multiFragmentPacketsArriveWhole() throws {
        let (rig, _, one, two) = try pair()
        let frame = ethernetFrame(to: two.mac, from: one.mac, payload: 2986, seed: 5)  // 3000 bytes
        try one.send(frame, id: 10, fragments: [1000, 1500, 500], offset: 100)
        // Eighteen slots: the most a packet may use.
        let wide = ethernetFrame(to: two.mac, from: one.mac, payload: 18 * 100 - 14, seed: 6)
        try one.send(wide, id: 20, fragments: Array(repeating: 100, count: 18), offset: 3996)
        rig.pump()
        let statuses = try one.takeTransmitted()
        #expect(statuses.count == 21 && statuses.allSatisfy { $0.status == rspOkay })
        #expect(Set(statuses.map(\.id)) == Set([10, 11, 12] + (20..<38).map { UInt16($0) }))
        #expect(try two.takeReceived().map(\.bytes) == [frame, wide])
    }

    @Test func aFullReceiveQueueDropsAndCounts() throws {
        let (rig, _, one, two) = try pair(.init(), .init(queueFrames: 4))
        // Two has no pages left once these 32 are used: fill them, then overflow its queue.
        for i in 0..<32 {
            try one.send(ethernetFrame(to: two.mac, from: one.mac, payload: 40, seed: UInt8(i)), id: UInt16(i))
            rig.pump()
            try one.takeTransmitted()
        }
        #expect(try two.takeReceived().count == 32)
        for i in 40..<50 {
            try one.send(ethernetFrame(to: two.mac, from: one.mac, payload: 40, seed: UInt8(i)), id: UInt16(i))
        }
        one.backend.poll()
        let statuses = try one.takeTransmitted().map(\.status)
        #expect(statuses == Array(repeating: rspOkay, count: 4) + Array(repeating: rspDropped, count: 6))
        #expect(two.backend.statistics.rxDropped == 6)
        #expect(one.backend.statistics.txDropped == 6)
        try two.postReceive(8)
        rig.pump()
        #expect(try two.takeReceived().count == 4, "the queued four arrive once pages are posted")
    }

    @Test func blankChecksumsAreFilledForFrontendsThatRefuseThemAndPassedToOthers() throws {
        let (rig, _, one, two) = try pair(.init(), .init(), extraB: [("feature-no-csum-offload", "1")])
        let three = try rig.vif(3)
        let fabric = NetworkSwitch(name: "second")
        fabric.connect(one.backend)  // one now transmits into the second switch
        fabric.connect(three.backend)
        try three.connect()
        try three.postReceive(4)
        _ = two
        let frame = ipv4Frame(to: three.mac, from: one.mac, payload: 33, checksumField: 0xBEEF)
        #expect(!ChecksumFill.verify(frame.withUnsafeBytes { $0 }))
        try one.send(frame, id: 1, flags: VIREO_NETTXF_csum_blank | VIREO_NETTXF_data_validated)
        rig.pump()
        let passed = try #require(try three.takeReceived().first)
        #expect(passed.flags == UInt16(VIREO_NETRXF_csum_blank | VIREO_NETRXF_data_validated))
        #expect(passed.bytes == frame, "left blank for a frontend that accepts blank checksums")

        // Back on the first switch: two refuses blank checksums, so the backend computes it.
        let first = NetworkSwitch(name: "third")
        first.connect(one.backend)
        first.connect(two.backend)
        let tcp = ipv4Frame(to: two.mac, from: one.mac, payload: 101, tcp: true, checksumField: 0x0F0F)
        try one.send(tcp, id: 2, flags: VIREO_NETTXF_csum_blank | VIREO_NETTXF_data_validated)
        rig.pump()
        let filled = try #require(try two.takeReceived().first)
        #expect(filled.flags == UInt16(VIREO_NETRXF_data_validated))
        #expect(filled.bytes.withUnsafeBytes { ChecksumFill.verify($0) })
        #expect(Array(filled.bytes[0..<50]) == Array(tcp[0..<50]) && Array(filled.bytes[52...]) == Array(tcp[52...]),
                "only the checksum field changed")
        // A blank checksum on something that is not TCP/UDP cannot be completed: ERROR.
        try one.send(ethernetFrame(to: two.mac, from: one.mac, payload: 60), id: 3, flags: VIREO_NETTXF_csum_blank)
        rig.pump()
        #expect(try one.takeTransmitted().map(\.status) == [rspOkay, rspOkay, rspError])
    }

    @Test func checksumFillMatchesKnownValues() {
        // A UDP datagram over IPv4 whose checksum is known (computed independently): 10.0.0.1 ->
        // 10.0.0.2, ports 12345 -> 53, payload "hi".
        var frame = ipv4Frame(to: .broadcast, from: .broadcast, payload: 0, checksumField: 0)
        frame += Array("hi".utf8)
        frame[17] = 20 + 8 + 2  // IPv4 total length
        frame[39] = 8 + 2       // UDP length
        let ok = frame.withUnsafeMutableBytes { ChecksumFill.fill($0) }
        #expect(ok)
        #expect(frame[40] == 0x53 && frame[41] == 0x00)
        #expect(frame.withUnsafeBytes { ChecksumFill.verify($0) })
    }

    @Test func hostileTransmitsGetErrorsAndTheVifCarriesOn() throws {
        let (rig, _, one, two) = try pair()
        let good = ethernetFrame(to: two.mac, from: one.mac, payload: 50)
        let page = try one.grantedPage(good)
        // Size 0; size under an Ethernet header; unknown flags; a bad grant.
        try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: 0, id: 1, size: 0))
        try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: 0, id: 2, size: 13))
        try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: 1 << 9, id: 3, size: good.count))
        try one.tx.produceRequest(NetFront.request(gref: GrantRef(1777), offset: 0, flags: 0, id: 4, size: good.count))
        // Fragments that add up to more than the first slot's size.
        try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: VIREO_NETTXF_more_data, id: 5, size: 64))
        try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: 0, id: 6, size: 100))
        // Nineteen slots: one more than a packet may use.
        for i in 0..<19 {
            try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: i < 18 ? VIREO_NETTXF_more_data : 0,
                                                       id: UInt16(10 + i), size: i == 0 ? 19 * 10 : 10))
        }
        // A GSO extra (not offered): ERROR for the packet, NULL for the extra slot.
        try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: VIREO_NETTXF_extra_info, id: 40, size: good.count))
        var gso = vireo_netif_extra_info()
        gso.type = UInt8(VIREO_XEN_NETIF_EXTRA_TYPE_GSO)
        gso.u.gso.size = 1448
        gso.u.gso.type = UInt8(VIREO_XEN_NETIF_GSO_TYPE_TCPV4)
        try one.tx.produceRequest(withUnsafeBytes(of: gso) { bytes in
            var r = TxRequest()
            withUnsafeMutableBytes(of: &r) { $0.copyMemory(from: bytes) }
            return r
        })
        // Then a good packet.
        try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: 0, id: 50, size: good.count))
        try one.push()
        rig.pump()
        let got = try one.takeTransmitted()
        let byID = Dictionary(got.filter { $0.status != rspNull }.map { ($0.id, $0.status) }, uniquingKeysWith: { a, _ in a })
        for id: UInt16 in [1, 2, 3, 4, 5, 6, 40] { #expect(byID[id] == rspError, "request \(id)") }
        for id in 10..<29 { #expect(byID[UInt16(id)] == rspError, "slot \(id)") }
        #expect(byID[50] == rspOkay)
        #expect(got.filter { $0.status == rspNull }.count == 1, "the extra slot answered NULL")
        #expect(got.count == 1 + 1 + 1 + 1 + 2 + 19 + 2 + 1, "every slot answered")
        #expect(one.backendState == connected)
        #expect(one.backend.statistics.txErrors == 7)
        #expect(rig.counters[1]?.errors.load(ordering: .relaxed) ?? 0 >= 7, "error responses are the domain's I/O errors")
        #expect(try two.takeReceived().map(\.bytes) == [good])
    }

    /// Each of these breaks the ring rules: the vif goes to Closing with a reason, and another
    /// vif on the same backend domain and switch keeps working.
    @Test(arguments: ["crosses", "endless", "overflow", "extra-type", "too-many-extras", "first-crosses", "rx-overflow"])
    func protocolBreakersAreDisconnected(_ attack: String) throws {
        let (rig, fabric, one, two) = try pair()
        let three = try rig.vif(3)
        fabric.connect(three.backend)
        try three.connect()
        try three.postReceive(4)
        let page = try one.grantedPage(Array(repeating: 0xAB, count: 4096))
        switch attack {
        case "crosses":  // a fragment past its page's end
            try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: VIREO_NETTXF_more_data, id: 1, size: 200))
            try one.tx.produceRequest(NetFront.request(gref: page, offset: 4000, flags: 0, id: 2, size: 100))
        case "first-crosses":
            try one.tx.produceRequest(NetFront.request(gref: page, offset: 4000, flags: 0, id: 1, size: 1500))
        case "endless":  // a whole ring of more_data, never ending
            for i in 0..<256 {
                try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: VIREO_NETTXF_more_data, id: UInt16(i), size: 60))
            }
        case "extra-type":
            try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: VIREO_NETTXF_extra_info, id: 1, size: 60))
            try one.tx.produceRequest(NetFront.request(gref: GrantRef(9), offset: 0, flags: 0, id: 0, size: 0))  // type 9
        case "too-many-extras":
            try one.tx.produceRequest(NetFront.request(gref: page, offset: 0, flags: VIREO_NETTXF_extra_info, id: 1, size: 60))
            for _ in 0..<10 {  // type HASH, flags MORE, forever
                try one.tx.produceRequest(NetFront.request(gref: GrantRef(0x0104), offset: 0, flags: 0, id: 0, size: 0))
            }
        case "rx-overflow":  // the receive ring's req_prod far ahead, found when a frame arrives
            try one.guest.page(one.rxFrame).storeRelease32(5000, at: RingLayout.requestProducerOffset)
            ethernetFrame(to: one.mac, from: two.mac, payload: 30).withUnsafeBytes { _ = one.backend.receive($0) }
        default:  // "overflow": req_prod far more than a ring ahead
            try one.guest.page(one.txFrame).storeRelease32(1000, at: RingLayout.requestProducerOffset)
            try one.guest.notify(one.port)
        }
        if !attack.contains("overflow") { try one.push() }
        rig.pump()
        #expect(one.backendState == closing, "\(attack)")
        #expect(one.backend.lastFailure != nil)
        #expect(one.backend.protocolErrors == 1)
        // The others carry on.
        try two.send(ethernetFrame(to: three.mac, from: two.mac, payload: 70), id: 1)
        rig.pump()
        #expect(try two.takeTransmitted().map(\.status) == [rspOkay])
        #expect(try three.takeReceived().count == 1)
        // The broken frontend can start over.
        one.setState(XenbusBackendState.closed)
        rig.pump()
        one.setState(XenbusBackendState.initialising)
        rig.pump()
        try one.connect()
        #expect(one.backendState == connected)
        try one.postReceive(2)
        try two.send(ethernetFrame(to: one.mac, from: two.mac, payload: 70), id: 2)
        rig.pump()
        #expect(try one.takeReceived().count == 1)
    }

    @Test func aSecondVifOfOneGuestHasItsOwnDirectoriesAndAddress() throws {
        let rig = try NetRig()
        let guest = try SimulatedGuest(id: DomainID(7), ramPages: 64, hub: rig.hub, grantTables: rig.grants)
        try rig.store.introduceDomain(guest.id)
        let second = try NetBackend(frontend: guest.id, handle: 1, store: rig.store, grants: rig.grants, host: rig.host)
        try second.create()
        #expect(second.backendPath == "/local/domain/0/backend/vif/7/1")
        #expect(second.frontendPath == "/local/domain/7/device/vif/1")
        #expect(second.mac.description == "02:16:3e:00:07:01")
        let given = try NetBackend(frontend: guest.id, handle: 2, configuration: .init(mac: EthernetAddress(parsing: "00:16:3e:12:34:56")),
                                   store: rig.store, grants: rig.grants, host: rig.host)
        try given.create()
        let session = rig.store.connect(domain: guest.id)
        let reply = rig.store.request(XenStoreMessage(.read, given.frontendPath + "/mac"), from: session)
        #expect(reply.map { String(decoding: $0.payload, as: UTF8.self) } == "00:16:3e:12:34:56")
    }

    /// One page granted as both rings: the frontend only confuses itself; the backend bounds
    /// every index it reads and keeps to the page, and the other vifs carry on.
    @Test func oneRingPageForBothRingsHarmsNoOneElse() throws {
        let (rig, fabric, one, two) = try pair()
        let odd = try rig.vif(5)
        fabric.connect(odd.backend)
        try odd.connect(oneRingPage: true)
        for i in 0..<50 {
            try odd.send(ethernetFrame(to: .broadcast, from: odd.mac, payload: 40 + i), id: UInt16(i))
            ethernetFrame(to: odd.mac, from: one.mac, payload: 30).withUnsafeBytes { _ = odd.backend.receive($0) }
            rig.pump()
        }
        try one.send(ethernetFrame(to: two.mac, from: one.mac, payload: 30), id: 1)
        rig.pump()
        var got = try two.takeReceived()
        try two.postReceive(128)
        rig.pump()
        got += try two.takeReceived()
        #expect(got.contains { $0.bytes.count == 44 })
        #expect(one.backendState == connected && two.backendState == connected)
    }

    @Test func badHandshakesAreRefusedByName() throws {
        let rig = try NetRig()
        let cases: [(extra: [(String, String)], omit: Set<String>, expect: String)] = [
            ([("request-rx-copy", "0")], [], "request-rx-copy"),
            ([], ["feature-rx-notify"], "feature-rx-notify"),
            ([("event-channel-tx", "5"), ("event-channel-rx", "6")], ["event-channel"], "split event channels"),
            ([("multi-queue-num-queues", "4")], [], "multi-queue-num-queues"),
            ([("tx-ring-ref", "4000")], [], "tx-ring-ref"),
            ([("rx-ring-ref", "banana")], [], "rx-ring-ref"),
        ]
        for (i, c) in cases.enumerated() {
            let vif = try rig.vif(UInt16(10 + i))
            try vif.connect(extra: c.extra, omit: c.omit)
            #expect(vif.backendState == closing, "\(c.expect)")
            #expect(vif.backend.lastFailure?.contains(c.expect) == true, "\(vif.backend.lastFailure ?? "-")")
        }
    }

    @Test func hostileReceiveRequestsGetErrorsAndStormsAreAbsorbed() throws {
        let (rig, _, one, two) = try pair()
        // Two's posted pages are used up by frames with a bad grant in between.
        _ = try two.takeReceived()
        let three = try rig.vif(3)
        try three.connect()
        try three.postReceive(1, badGrant: true)
        try three.postReceive(1)
        for seed in [UInt8(1), 2] {
            ethernetFrame(to: three.mac, from: one.mac, payload: 30, seed: seed).withUnsafeBytes { _ = three.backend.receive($0) }
        }
        three.backend.poll()
        let got = try three.takeReceived()
        #expect(got.map(\.statuses) == [[rspError], [44]])
        #expect(three.backend.statistics.rxErrors == 1)
        // An event storm: thousands of notifications change nothing.
        for _ in 0..<5000 { try one.guest.notify(one.port) }
        rig.pump()
        try one.send(ethernetFrame(to: two.mac, from: one.mac, payload: 30), id: 1)
        rig.pump()
        #expect(try two.takeReceived().count == 1)
        #expect(one.backendState == connected)
    }

    @Test func theRateLimitHoldsPacketsBackUntilCreditAccrues() throws {
        let now = Atomic<UInt64>(1_000_000_000)
        let clock: @Sendable () -> UInt64 = { now.load(ordering: .sequentiallyConsistent) }
        // 100 kB/s with the smallest bucket Xen allows (128 KiB).
        let limited = NetBackend.Configuration(rateBytesPerSecond: 100_000, clock: clock)
        let (rig, _, one, two) = try pair(limited, .init(queueFrames: 512, queueBytes: 4 << 20))
        try two.postReceive(200)
        // 120 frames of 1514 bytes = 181,680 bytes: the bucket passes 86 of them at once.
        for i in 0..<120 {
            try one.send(ethernetFrame(to: two.mac, from: one.mac, payload: 1500, seed: UInt8(truncatingIfNeeded: i)), id: UInt16(i))
        }
        rig.pump()
        #expect(try one.takeTransmitted().count == 131_072 / 1514)
        #expect(one.backend.statistics.txRateDelays == 1)
        // Half a second earns 50,000 bytes: 33 more frames (with the remainder carried).
        now.add(500_000_000, ordering: .sequentiallyConsistent)
        rig.pump()
        let more = try one.takeTransmitted().count
        let sent = 131_072 / 1514 + more
        #expect(sent == (131_072 + 50_000) / 1514)
        // What went out never exceeds the bucket plus the rate times the time.
        #expect(one.backend.statistics.txBytes <= 131_072 + 50_000)
        now.add(1_000_000_000, ordering: .sequentiallyConsistent)
        rig.pump()
        try one.takeTransmitted()
        #expect(one.txResponses.count == 120)
        #expect(try two.takeReceived().count == 120)
    }

    @Test func teardownDropsQueuedFramesAndEndsMappings() throws {
        let (rig, _, one, two) = try pair()
        _ = rig
        // Frames for a vif that is not connected are dropped at once.
        let lonely = try rig.vif(9)
        let frame = ethernetFrame(to: lonely.mac, from: one.mac, payload: 20)
        #expect(frame.withUnsafeBytes { lonely.backend.receive($0) } == false)
        #expect(lonely.backend.statistics.rxDropped == 1)
        // Queued frames die with the connection.
        let full = try rig.vif(8)
        try full.connect()
        for _ in 0..<3 { frame.withUnsafeBytes { _ = full.backend.receive($0) } }
        full.backend.finish()
        #expect(full.backend.statistics.rxDropped == 3)
        #expect(full.guest.endAccess(full.txRef) && full.guest.endAccess(full.rxRef))
        // The guest dies under a connected vif: the next pass fails cleanly.
        two.guest.destroy()
        rig.pump()
        #expect(one.backendState == connected)
    }

    @Test func runThreadsServeWithRealEvents() throws {
        let rig = try NetRig()
        let fabric = NetworkSwitch(name: "threads")
        let one = try rig.vif(1), two = try rig.vif(2)
        fabric.connect(one.backend)
        fabric.connect(two.backend)
        let stopLoops = rig.runLoops([one, two], name: "test-net-events")
        defer { stopLoops() }
        for vif in [one, two] {
            let txFrame = try vif.guest.allocatePage(), rxFrame = try vif.guest.allocatePage()
            vif.txFrame = txFrame
            vif.rxFrame = rxFrame
        }
        // The handshake, without poll(): the run() threads follow the store.
        for vif in [one, two] {
            vif.tx = try vif.guest.frontRing(on: vif.txFrame)
            vif.rx = try vif.guest.frontRing(on: vif.rxFrame)
            vif.txRef = try vif.guest.grantAccess(to: rig.host.id, frame: vif.txFrame, readOnly: false)
            vif.rxRef = try vif.guest.grantAccess(to: rig.host.id, frame: vif.rxFrame, readOnly: false)
            vif.port = try vif.guest.allocUnbound(remote: rig.host.id)
            let node = vif.backend.frontendPath
            for (key, value) in [("tx-ring-ref", "\(vif.txRef.rawValue)"), ("rx-ring-ref", "\(vif.rxRef.rawValue)"),
                                 ("event-channel", "\(vif.port.rawValue)"), ("request-rx-copy", "1"),
                                 ("feature-rx-notify", "1"), ("state", "4")] {
                vif.write(node + "/" + key, value)
            }
        }
        let deadline = ContinuousClock.now.advanced(by: .seconds(10))
        while one.backendState != connected || two.backendState != connected {
            guard ContinuousClock.now < deadline else { Issue.record("never connected"); return }
            usleep(1000)
        }
        try two.postReceive(64)
        var frames: [[UInt8]] = []
        for i in 0..<200 {
            let frame = ethernetFrame(to: two.mac, from: one.mac, payload: 64 + i, seed: UInt8(truncatingIfNeeded: i))
            frames.append(frame)
        }
        var received: [[UInt8]] = []
        var next = 0
        while received.count < frames.count {
            while next < frames.count, one.tx.freeRequests > 0, next - received.count < 48 {
                try one.send(frames[next], id: UInt16(next))
                next += 1
            }
            try one.takeTransmitted()
            let got = try two.takeReceived()
            received += got.map(\.bytes)
            if !got.isEmpty { try two.postReceive(got.count) }
            if got.isEmpty {
                if try two.rx.finalCheckForResponses() { continue }
                _ = two.guest.waitForEvents(timeout: .milliseconds(50))
            }
            guard ContinuousClock.now < deadline else { Issue.record("only \(received.count) frames arrived"); return }
        }
        #expect(received == frames, "in order, intact")
        #expect(two.guest.upcallCount > 0, "the receiver was woken by events")
    }

    @Test func switchTablesAreBoundedAndAddressesParse() throws {
        #expect(EthernetAddress(parsing: "00:16:3E:0a:0b:ff")?.description == "00:16:3e:0a:0b:ff")
        for bad in ["", "00:16:3e:0a:0b", "00:16:3e:0a:0b:ff:00", "0:16:3e:0a:0b:ff", "zz:16:3e:0a:0b:ff"] {
            #expect(EthernetAddress(parsing: bad) == nil, "\(bad)")
        }
        #expect(EthernetAddress.generated(domain: 0x1234, handle: 2).description == "02:16:3e:12:34:02")
        let fabric = NetworkSwitch(name: "bounded", tableLimit: 8, portAddressLimit: 4)
        let a = Capture(), b = Capture()
        let portA = fabric.connect { a.transmit($0, checksum: $1) }, portB = fabric.connect { b.transmit($0, checksum: $1) }
        // A spray of 100 source addresses from port A: only 4 are learned.
        for i in 0..<100 {
            var frame = ethernetFrame(to: .broadcast, from: EthernetAddress(2, 0, 0, 0, 0, UInt8(i)), payload: 10)
            _ = frame.withUnsafeMutableBytes { portA.transmit($0, checksum: .unknown) }
        }
        #expect(fabric.learnedAddresses == 4)
        #expect(fabric.statistics.learnRefused == 96)
        // Port B still gets its own address learned and unicast to it is not flooded.
        var fromB = ethernetFrame(to: .broadcast, from: EthernetAddress(2, 0, 0, 0, 1, 1), payload: 10)
        _ = fromB.withUnsafeMutableBytes { portB.transmit($0, checksum: .unknown) }
        #expect(fabric.learnedAddresses == 5)
        let before = b.frames.withLock { $0.count }
        var toB = ethernetFrame(to: EthernetAddress(2, 0, 0, 0, 1, 1), from: EthernetAddress(2, 0, 0, 0, 0, 1), payload: 10)
        _ = toB.withUnsafeMutableBytes { portA.transmit($0, checksum: .unknown) }
        #expect(b.frames.withLock { $0.count } == before + 1)
        // A frame to an address on its own port goes nowhere.
        let aCount = a.frames.withLock { $0.count }
        var hairpin = ethernetFrame(to: EthernetAddress(2, 0, 0, 0, 0, 2), from: EthernetAddress(2, 0, 0, 0, 0, 1), payload: 10)
        #expect(hairpin.withUnsafeMutableBytes { portA.transmit($0, checksum: .unknown) } == false)
        #expect(a.frames.withLock { $0.count } == aCount && b.frames.withLock { $0.count } == before + 1)
    }
}

@Suite struct NetworkSpecTests {
    @Test func netValuesParseAsXlWritesThem() throws {
        #expect(try NetworkSpec(parsing: "tap:vif1") == NetworkSpec(hostSide: .tap("vif1")))
        let full = try NetworkSpec(parsing: "switch:lan,mac=00:16:3e:aa:bb:cc,rate=10Mb/s")
        #expect(full.hostSide == .networkSwitch("lan"))
        #expect(full.mac?.description == "00:16:3e:aa:bb:cc")
        #expect(full.rateBytesPerSecond == 1_250_000)
        #expect(try NetworkSpec(parsing: "tap:t0,rate=2MB/s").rateBytesPerSecond == 2_000_000)
        #expect(try NetworkSpec(parsing: "tap:t0,rate=512B/s").rateBytesPerSecond == 512)
    }

    @Test(arguments: [
        ("bogus", "--net 'bogus'"), ("tap:", "--net tap"), ("tap:a-name-longer-than-15", "--net tap"),
        ("switch:", "--net switch"), ("tap:t0,mac=zz:00:00:00:00:00", "--net mac"),
        ("tap:t0,mac=01:00:5e:00:00:01", "--net mac"), ("tap:t0,rate=fast", "--net rate"),
        ("tap:t0,rate=0Mb/s", "--net rate"), ("tap:t0,color=red", "--net 'color'"), ("tap:t0,mac", "--net 'mac'"),
    ])
    func badNetValuesNameTheirField(_ text: String, _ field: String) {
        do {
            _ = try NetworkSpec(parsing: text)
            Issue.record("'\(text)' was accepted")
        } catch {
            #expect(error.description.hasPrefix(field), "\(error.description)")
        }
    }
}
