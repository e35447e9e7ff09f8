import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls

private let success = UInt32(VIREO_XEN_NETIF_CTRL_STATUS_SUCCESS)
private let notSupported = UInt32(VIREO_XEN_NETIF_CTRL_STATUS_NOT_SUPPORTED)
private let invalid = UInt32(VIREO_XEN_NETIF_CTRL_STATUS_INVALID_PARAMETER)
private let readOnly = UInt16(VIREO_XEN_NETIF_CTRLF_GREF_readonly)
private let add = VIREO_XEN_NETIF_CTRL_TYPE_ADD_GREF_MAPPING
private let del = VIREO_XEN_NETIF_CTRL_TYPE_DEL_GREF_MAPPING
private let connected = "\(XenbusBackendState.connected)"

/// Two vifs on one switch whose frontends set up control rings; receive pages posted on both.
private func pairWithControl(_ a: NetBackend.Configuration = .init(), _ b: NetBackend.Configuration = .init())
    throws -> (NetRig, NetFront, NetFront) {
    let rig = try NetRig()
    let fabric = NetworkSwitch(name: "static")
    let one = try rig.vif(1, configuration: a), two = try rig.vif(2, configuration: b)
    fabric.connect(one.backend)
    fabric.connect(two.backend)
    try one.connect(extra: try one.controlKeys())
    try two.connect(extra: try two.controlKeys())
    #expect(one.backendState == connected && two.backendState == connected)
    try one.postReceive(8)
    try two.postReceive(8)
    return (rig, one, two)
}

/// Xen's static grants (netif.h "Static Grants"): the control ring's GET_/ADD_/DEL_GREF_MAPPING.
@Suite struct NetStaticGrantsTests {
    @Test func theBackendOffersAControlRingAndAnswersItsSize() throws {
        let (rig, one, _) = try pairWithControl()
        defer { withExtendedLifetime(rig) {} }
        #expect(one.read(one.backend.backendPath + "/feature-ctrl-ring") == "1")
        let size = try one.controlRequest(VIREO_XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE, (0, 0, 0))
        #expect(size.status == success && size.data == UInt32(NetDevice.defaultStaticGrants))
        #expect(try one.controlRequest(VIREO_XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE, (1, 0, 0)).status == invalid,
                "queue 1 of a single-queue vif")
        // Hashing is not offered (no multi-queue), nor is any unknown type; data is 0 then.
        for type in [VIREO_XEN_NETIF_CTRL_TYPE_SET_HASH_ALGORITHM, VIREO_XEN_NETIF_CTRL_TYPE_GET_HASH_FLAGS,
                     VIREO_XEN_NETIF_CTRL_TYPE_SET_HASH_MAPPING, VIREO_XEN_NETIF_CTRL_TYPE_INVALID, 99] {
            let response = try one.controlRequest(type, (1, 2, 3))
            #expect(response.status == notSupported && response.data == 0, "type \(type)")
        }
    }

    @Test func heldGrantsCarryFramesAndStayInUseUntilDeleted() throws {
        let (rig, one, two) = try pairWithControl()
        // The receiver keeps its posted pages mapped, writable; the sender a page it sends from, read-only.
        let posted = two.posted.values.map(\.ref)
        let rxList = try two.grefTable(posted.map { ($0, 0) })
        #expect(try two.controlRequest(add, (0, rxList.ref.rawValue, UInt32(posted.count))).status == success)
        let frame = ethernetFrame(to: two.mac, from: one.mac, payload: 1400)
        let source = try one.grantedPage(frame)
        let txList = try one.grefTable([(source, readOnly)])
        #expect(try one.controlRequest(add, (0, txList.ref.rawValue, 1)).status == success)
        for ref in posted { #expect(two.guest.isInUse(ref), "a held receive page is in use for the guest") }
        #expect(one.guest.isInUse(source) && !one.guest.endAccess(source), "the guest cannot end access to a held grant")
        // ADD leaves the list's statuses alone.
        #expect(rxList.page.load(UInt16.self, at: 6) == 0xBEEF)

        for id: UInt16 in 0..<3 {
            try one.tx.produceRequest(NetFront.request(gref: source, offset: 0, flags: 0, id: id, size: frame.count))
        }
        try one.push()
        rig.pump()
        #expect(try one.takeTransmitted().map(\.status) == [rspOkay, rspOkay, rspOkay])
        #expect(try two.takeReceived().map(\.bytes) == [frame, frame, frame])
        #expect(one.guest.isInUse(source), "still held after the copies")

        // DEL: each entry's status written back; one not held gets INVALID_PARAMETER.
        let stranger = try one.grantedPage([1, 2, 3])
        let delList = try one.grefTable([(source, readOnly), (stranger, 0)])
        let deleted = try one.controlRequest(del, (0, delList.ref.rawValue, 2))
        #expect(deleted.status == success && deleted.data == 1)
        #expect(delList.page.load(UInt16.self, at: 6) == UInt16(success))
        #expect(delList.page.load(UInt16.self, at: 8 + 6) == UInt16(invalid))
        #expect(!one.guest.isInUse(source) && one.guest.endAccess(source), "unmapped by DEL")
        // Sending from an ended grant now fails per copy, as without static grants.
        try one.tx.produceRequest(NetFront.request(gref: source, offset: 0, flags: 0, id: 9, size: frame.count))
        try one.push()
        rig.pump()
        #expect(try one.takeTransmitted().map(\.status) == [rspError])
    }

    /// Frames from held pages switched to another vif: the one-slot ones go the short way
    /// (transmitDirect), the rest the general way; every one arrives whole, or is refused as
    /// without static grants.
    @Test func heldFramesOfEveryShapeArriveWhole() throws {
        let (rig, one, two) = try pairWithControl()
        let posted = two.posted.values.map(\.ref)
        let rxList = try two.grefTable(posted.map { ($0, 0) })
        #expect(try two.controlRequest(add, (0, rxList.ref.rawValue, UInt32(posted.count))).status == success)
        // Pages the sender holds: a short frame, one at an offset, a validated one, one of two slots.
        let short = ethernetFrame(to: two.mac, from: one.mac, payload: 20)
        let long = ethernetFrame(to: two.mac, from: one.mac, payload: 3000, seed: 9)
        let refs = [try one.grantedPage(short), try one.grantedPage(long, at: 100), try one.grantedPage(short, at: 4000 - short.count),
                    try one.grantedPage(Array(long[0..<1000])), try one.grantedPage(Array(long[1000...]))]
        let txList = try one.grefTable(refs.map { ($0, readOnly) })
        #expect(try one.controlRequest(add, (0, txList.ref.rawValue, UInt32(refs.count))).status == success)
        let validated = VIREO_NETTXF_data_validated
        try one.tx.produceRequest(NetFront.request(gref: refs[0], offset: 0, flags: 0, id: 0, size: short.count))
        try one.tx.produceRequest(NetFront.request(gref: refs[1], offset: 100, flags: validated, id: 1, size: long.count))
        try one.tx.produceRequest(NetFront.request(gref: refs[2], offset: 4000 - short.count, flags: 0, id: 2, size: short.count))
        try one.tx.produceRequest(NetFront.request(gref: refs[3], offset: 0, flags: VIREO_NETTXF_more_data, id: 3, size: long.count))
        try one.tx.produceRequest(NetFront.request(gref: refs[4], offset: 0, flags: 0, id: 4, size: long.count - 1000))
        // Too short for an Ethernet header: ERROR, as on the general path.
        try one.tx.produceRequest(NetFront.request(gref: refs[0], offset: 0, flags: 0, id: 5, size: 13))
        try one.push()
        rig.pump()
        #expect(try one.takeTransmitted().map(\.status) == [rspOkay, rspOkay, rspOkay, rspOkay, rspOkay, rspError])
        let got = try two.takeReceived()
        #expect(got.map(\.bytes) == [short, long, short, long])
        #expect(got.map(\.flags) == [0, UInt16(VIREO_NETRXF_data_validated), 0, 0])
        // With no page posted the last frame waits in the receiver's queue, and arrives once one is.
        let left = two.posted.count
        for id in 0...left { try one.tx.produceRequest(NetFront.request(gref: refs[0], offset: 0, flags: 0, id: UInt16(6 + id), size: short.count)) }
        try one.push()
        rig.pump()
        #expect(try one.takeTransmitted().map(\.status) == Array(repeating: rspOkay, count: left + 1))
        #expect(try two.takeReceived().count == left && two.posted.isEmpty)
        try two.postReceive(1)
        rig.pump()
        #expect(try two.takeReceived().map(\.bytes) == [short])
        // A held slot that crosses its page breaks the ring rules: the sender's vif disconnects.
        try one.tx.produceRequest(NetFront.request(gref: refs[1], offset: 4000, flags: 0, id: 99, size: 200))
        try one.push()
        rig.pump()
        #expect(one.backendState == "\(XenbusBackendState.closing)")
        #expect(two.backendState == connected)
    }

    @Test func aHeldGrantIsNotPinnedAgainForEachCopy() throws {
        let rig = try NetRig()
        let vif = try rig.vif(3)
        try vif.connect(extra: try vif.controlKeys())
        let frame = ethernetFrame(to: .broadcast, from: vif.mac, payload: 200)
        let source = try vif.grantedPage(frame)
        let table = try #require(rig.grants.table(for: vif.guest.id))
        // The host side sees the frame while its page is in use: it records the pins then.
        let probe = PinProbe(table: table, ref: source)
        vif.backend.attach(probe)
        try vif.tx.produceRequest(NetFront.request(gref: source, offset: 0, flags: 0, id: 0, size: frame.count))
        try vif.push()
        rig.pump()
        let list = try vif.grefTable([(source, readOnly)])
        #expect(try vif.controlRequest(add, (0, list.ref.rawValue, 1)).status == success)
        try vif.tx.produceRequest(NetFront.request(gref: source, offset: 0, flags: 0, id: 1, size: frame.count))
        try vif.push()
        rig.pump()
        #expect(try vif.takeTransmitted().map(\.status) == [rspOkay, rspOkay])
        // Per copy: one reader pin for the copy. Held: the mapping's pin alone, none added.
        #expect(probe.readers.withLock { $0 } == [1, 1])
        #expect(table.pins(source).readers == 1, "the mapping's pin stays")
        #expect(try vif.controlRequest(del, (0, list.ref.rawValue, 1)).data == 1)
        #expect(table.pins(source).readers == 0)
    }

    @Test func badRequestsAreRefusedWholeAndHoldNothing() throws {
        let (rig, one, _) = try pairWithControl(NetBackend.Configuration(staticGrants: 3))
        defer { withExtendedLifetime(rig) {} }
        let a = try one.grantedPage([1]), b = try one.grantedPage([2]), c = try one.grantedPage([3])
        let readOnlyGrant = a  // granted read-only by grantedPage
        let cases: [(entries: [(GrantRef, UInt16)], data: (UInt32, UInt32) -> (UInt32, UInt32, UInt32), why: String)] = [
            ([(a, readOnly)], { ref, n in (1, ref, n) }, "queue 1"),
            ([(a, readOnly)], { ref, _ in (0, ref, 513) }, "more entries than a page holds"),
            ([(a, readOnly)], { _, n in (0, 1999, n) }, "the list's grant does not exist"),
            ([(a, 0x2)], { ref, n in (0, ref, n) }, "an unknown flag"),
            ([(a, readOnly), (a, readOnly)], { ref, n in (0, ref, n) }, "a grant listed twice"),
            ([(b, readOnly), (GrantRef(1999), readOnly)], { ref, n in (0, ref, n) }, "a grant that does not exist"),
            ([(b, readOnly), (readOnlyGrant, 0)], { ref, n in (0, ref, n) }, "a read-only grant asked writable"),
            ([(a, readOnly), (b, readOnly), (c, readOnly), (GrantRef(1), readOnly)], { ref, n in (0, ref, n) }, "past the capacity"),
        ]
        for test in cases {
            let list = try one.grefTable(test.entries)
            let response = try one.controlRequest(add, test.data(list.ref.rawValue, UInt32(test.entries.count)))
            #expect(response.status == invalid, "\(test.why)")
            for ref in [a, b, c] { #expect(!one.guest.isInUse(ref), "\(test.why): nothing held") }
        }
        // Held ones count toward the capacity; adding one held again is refused.
        let first = try one.grefTable([(a, readOnly), (b, readOnly)])
        #expect(try one.controlRequest(add, (0, first.ref.rawValue, 2)).status == success)
        let again = try one.grefTable([(c, readOnly), (a, readOnly)])
        #expect(try one.controlRequest(add, (0, again.ref.rawValue, 2)).status == invalid)
        #expect(!one.guest.isInUse(c))
        #expect(try one.controlRequest(add, (0, again.ref.rawValue, 0)).status == success, "an empty list adds nothing")
        // A vif configured without static grants says so.
        let (plainRig, plain, _) = try pairWithControl(NetBackend.Configuration(staticGrants: 0))
        defer { withExtendedLifetime(plainRig) {} }
        #expect(try plain.controlRequest(VIREO_XEN_NETIF_CTRL_TYPE_GET_GREF_MAPPING_SIZE, (0, 0, 0)).status == notSupported)
        #expect(try plain.controlRequest(add, (0, 0, 1)).status == notSupported)
    }

    @Test func deletingSomeKeepsTheRestHeldAndInUse() throws {
        let (rig, one, two) = try pairWithControl()
        let frame = ethernetFrame(to: two.mac, from: one.mac, payload: 100)
        let refs = try (0..<5).map { _ in try one.grantedPage(frame) }
        let list = try one.grefTable(refs.map { ($0, readOnly) })
        #expect(try one.controlRequest(add, (0, list.ref.rawValue, 5)).status == success)
        // The first and the middle one go (each leaves a hole the last held one moves into).
        let gone = try one.grefTable([(refs[0], readOnly), (refs[2], readOnly)])
        #expect(try one.controlRequest(del, (0, gone.ref.rawValue, 2)).data == 2)
        #expect(refs.map { one.guest.isInUse($0) } == [false, true, false, true, true])
        // Every one still sends its frame, held or pinned per copy.
        for (id, ref) in refs.enumerated() {
            try one.tx.produceRequest(NetFront.request(gref: ref, offset: 0, flags: 0, id: UInt16(id), size: frame.count))
        }
        try one.push()
        rig.pump()
        #expect(try one.takeTransmitted().map(\.status) == Array(repeating: rspOkay, count: 5))
        #expect(try two.takeReceived().map(\.bytes) == Array(repeating: frame, count: 5))
        #expect(refs.map { one.guest.isInUse($0) } == [false, true, false, true, true])
        // Added again after DEL: held again.
        #expect(try one.controlRequest(add, (0, gone.ref.rawValue, 2)).status == success)
        #expect(refs.allSatisfy { one.guest.isInUse($0) })
    }

    @Test func theConnectionsEndReleasesEveryHeldGrant() throws {
        let (rig, one, two) = try pairWithControl()
        let posted = two.posted.values.map(\.ref)
        let list = try two.grefTable(posted.map { ($0, 0) })
        #expect(try two.controlRequest(add, (0, list.ref.rawValue, UInt32(posted.count))).status == success)
        two.setState(XenbusBackendState.closing)
        two.backend.poll()
        two.setState(XenbusBackendState.closed)
        two.backend.poll()
        for ref in posted { #expect(!two.guest.isInUse(ref) && two.guest.endAccess(ref), "released with the connection") }
        // The sender's frames to the gone vif are dropped, and the sender carries on.
        try one.send(ethernetFrame(to: two.mac, from: one.mac, payload: 60), id: 1)
        rig.pump()
        #expect(try one.takeTransmitted().count == 1)
        #expect(one.backendState == connected)
    }

    @Test func aControlRingNeedsItsOwnPort() throws {
        let rig = try NetRig()
        let vif = try rig.vif(5)
        try vif.connect(extra: try vif.controlKeys(), omit: [])
        #expect(vif.backendState == connected)
        let lonely = try rig.vif(6)
        try lonely.connect(extra: [try lonely.controlKeys()[0]])
        #expect(lonely.backendState == "\(XenbusBackendState.closing)")
        #expect(lonely.backend.lastFailure?.contains("event-channel-ctrl") == true, "\(lonely.backend.lastFailure ?? "-")")
    }
}

/// A host side that records, for each frame it is handed, the pins held on one grant then.
private final class PinProbe: NetworkAttachment, @unchecked Sendable {
    let table: GrantTable
    let ref: GrantRef
    let readers = Mutex<[UInt32]>([])
    init(table: GrantTable, ref: GrantRef) {
        self.table = table
        self.ref = ref
    }
    func transmit(_ frame: UnsafeMutableRawBufferPointer, checksum: FrameChecksum) -> Bool {
        let pins = table.pins(ref).readers
        readers.withLock { $0.append(pins) }
        return true
    }
}
