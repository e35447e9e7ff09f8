import Foundation
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls

/// The switched path between two vifs (Docs/network.md, "Transmit"): a frame for one other vif
/// goes from the sender's granted pages straight into the receiver's posted pages during the
/// sender's pass, and takes the receive queue whenever it cannot.
@Suite struct NetDirectPathTests {
    /// Each test's rig (its vifs hold it unowned).
    let rig: NetRig
    init() throws { rig = try NetRig() }

    /// Two connected vifs on one switch; `posted` receive pages for the second.
    private func pair(posted: Int, extraB: [(String, String)] = []) throws -> (NetworkSwitch, NetFront, NetFront) {
        let fabric = NetworkSwitch(name: "direct")
        let one = try rig.vif(1), two = try rig.vif(2)
        fabric.connect(one.backend)
        fabric.connect(two.backend)
        try one.connect()
        try two.connect(extra: extraB)
        if posted > 0 { try two.postReceive(posted) }
        two.backend.poll()  // the receiver has seen its requests: nothing is left for its own pass
        return (fabric, one, two)
    }

    @Test func aSwitchedFrameLandsInThePostedPagesDuringTheSendersPass() throws {
        let (fabric, one, two) = try pair(posted: 4)
        // 6000 bytes in three fragments at odd offsets: two receive pages, split mid-fragment.
        let frame = ethernetFrame(to: two.mac, from: one.mac, payload: 5986, seed: 5)
        try one.send(frame, id: 10, fragments: [1000, 3000, 2000], offset: 96)
        one.backend.poll()  // only the sender's loop runs
        #expect(try one.takeTransmitted().map(\.status) == [rspOkay, rspOkay, rspOkay])
        let got = try two.takeReceived()
        #expect(got.count == 1)
        #expect(got.first?.bytes == frame)
        #expect(got.first?.statuses == [4096, 1904])
        #expect(got.first?.offsets == [0, 0])
        #expect(two.backend.statistics.rxPackets == 1 && two.backend.statistics.rxBytes == frame.count)
        #expect(one.backend.statistics.txPackets == 1)
        #expect(fabric.statistics.frames == 1 && fabric.statistics.delivered == 1 && fabric.statistics.flooded == 0)
        // The grants were pinned for the copy only: none but the ring pages is in use.
        for front in [one, two] {
            var inUse: Set<UInt32> = []
            for ref in UInt32(0)..<64 where front.guest.isInUse(GrantRef(ref)) { inUse.insert(ref) }
            #expect(inUse == [front.txRef.rawValue, front.rxRef.rawValue])
        }
    }

    @Test func aHeaderSpreadOverTinyFragmentsIsGatheredWhole() throws {
        let (_, one, two) = try pair(posted: 4)
        // The first 128 bytes (checked and switched on) come from four slots; the frame spans two pages.
        let frame = ipv4Frame(to: two.mac, from: one.mac, payload: 5000, checksumField: 0x7777)
        let sizes = [6, 8, 50, 30, 4000, frame.count - 4094]
        try one.send(frame, id: 20, fragments: sizes, flags: VIREO_NETTXF_csum_blank, offset: 4)
        one.backend.poll()
        #expect(try one.takeTransmitted().map(\.status) == Array(repeating: rspOkay, count: sizes.count))
        let got = try #require(try two.takeReceived().first)
        #expect(got.bytes == frame)
        #expect(got.flags == UInt16(VIREO_NETRXF_csum_blank | VIREO_NETRXF_data_validated | VIREO_NETRXF_more_data))
        #expect(got.statuses == [4096, Int16(frame.count - 4096)])
    }

    @Test func onePassFollowsEachChangeOfAddressesAndCopiesEveryHeaderWhole() throws {
        // The route is reused while a pass's frames carry the same twelve address bytes: frames
        // changing receiver, and one from another source right after a frame to the same
        // receiver, must each be switched afresh. The frames also cover the first bytes copied (64 without a blank checksum):
        // a 60-byte frame shorter than that, and a 1500-byte one whose first 64 come from three slots.
        let fabric = NetworkSwitch(name: "three")
        let one = try rig.vif(1), two = try rig.vif(2), three = try rig.vif(3)
        for front in [one, two, three] { fabric.connect(front.backend) }
        for front in [one, two, three] { try front.connect() }
        try two.postReceive(8)
        try three.postReceive(8)
        two.backend.poll()
        three.backend.poll()
        let stranger = EthernetAddress(0x02, 0x00, 0x00, 0x00, 0x00, 0x99)
        var toTwo: [[UInt8]] = [], toThree: [[UInt8]] = []
        for (i, target) in [two, three, three, two, two, three].enumerated() {
            let source = i == 2 ? stranger : one.mac
            let frame = ethernetFrame(to: target.mac, from: source, payload: i == 0 ? 46 : 1486, seed: UInt8(i))
            if i == 1 {
                try one.send(frame, id: UInt16(i), fragments: [10, 40, frame.count - 50], offset: 100)
            } else {
                try one.send(frame, id: UInt16(i))
            }
            if target === two { toTwo.append(frame) } else { toThree.append(frame) }
        }
        one.backend.poll()  // one pass of the sender's loop moves all six
        #expect(try one.takeTransmitted().map(\.status) == Array(repeating: rspOkay, count: 8))
        #expect(try two.takeReceived().map(\.bytes) == toTwo)
        #expect(try three.takeReceived().map(\.bytes) == toThree)
        #expect(fabric.statistics.delivered == 6 && fabric.statistics.flooded == 0)
        // The stranger's address was learned on one's port in that pass: a frame to it goes there only.
        try one.postReceive(1)
        one.backend.poll()
        let reply = ethernetFrame(to: stranger, from: two.mac, payload: 100, seed: 9)
        try two.send(reply, id: 1)
        two.backend.poll()
        #expect(try one.takeReceived().map(\.bytes) == [reply])
        #expect(try three.takeReceived().isEmpty)
        #expect(fabric.statistics.flooded == 0)
    }

    @Test func framesThatCannotGoStraightTakeTheQueueInOrder() throws {
        let (_, one, two) = try pair(posted: 0)
        // No page posted: the first frame waits in two's queue...
        let first = ethernetFrame(to: two.mac, from: one.mac, payload: 50, seed: 1)
        try one.send(first, id: 1)
        one.backend.poll()
        #expect(try one.takeTransmitted().map(\.status) == [rspOkay])
        #expect(try two.takeReceived().isEmpty)
        // ...and once pages are posted, a second frame does not overtake it.
        try two.postReceive(2)
        let second = ethernetFrame(to: two.mac, from: one.mac, payload: 51, seed: 2)
        try one.send(second, id: 2)
        one.backend.poll()
        #expect(try two.takeReceived().isEmpty, "queued behind the first, for two's own pass")
        two.backend.poll()
        #expect(try two.takeReceived().map(\.bytes) == [first, second])
        // With the queue empty again the next goes straight through.
        try two.postReceive(1)
        two.backend.poll()
        let third = ethernetFrame(to: two.mac, from: one.mac, payload: 52, seed: 3)
        try one.send(third, id: 3)
        one.backend.poll()
        #expect(try two.takeReceived().map(\.bytes) == [third])
        #expect(two.backend.statistics.rxPackets == 3)
    }

    @Test func aReceiverThatRefusesBlankChecksumsGetsThemComputedThroughTheQueue() throws {
        let (_, one, two) = try pair(posted: 2, extraB: [("feature-no-csum-offload", "1")])
        let udp = ipv4Frame(to: two.mac, from: one.mac, payload: 200, checksumField: 0x5555)
        try one.send(udp, id: 1, flags: VIREO_NETTXF_csum_blank | VIREO_NETTXF_data_validated)
        one.backend.poll()
        two.backend.poll()
        let got = try #require(try two.takeReceived().first)
        #expect(got.flags == UInt16(VIREO_NETRXF_data_validated))
        #expect(got.bytes.withUnsafeBytes { ChecksumFill.verify($0) })
        // A blank checksum the headers do not support is refused from the header copy alone.
        try one.send(ethernetFrame(to: two.mac, from: one.mac, payload: 300), id: 2, flags: VIREO_NETTXF_csum_blank)
        one.backend.poll()
        #expect(try one.takeTransmitted().map(\.status) == [rspOkay, rspError])
    }

    @Test func aBadGrantOnEitherSideCostsOnlyThatFrame() throws {
        let (_, one, two) = try pair(posted: 0)
        // The sender's grant is bad: ERROR to the sender, and the receiver's pages stay posted.
        try two.postReceive(1)
        two.backend.poll()
        let bad = NetFront.request(gref: GrantRef(1999), offset: 0, flags: 0, id: 1, size: 60)
        try one.tx.produceRequest(bad)
        try one.push()
        one.backend.poll()
        #expect(try one.takeTransmitted().map(\.status) == [rspError])
        #expect(try two.takeReceived().isEmpty)
        let good = ethernetFrame(to: two.mac, from: one.mac, payload: 46)
        try one.send(good, id: 2)
        one.backend.poll()
        #expect(try two.takeReceived().map(\.bytes) == [good], "the page posted before the bad frame took the next")
        // The receiver's posted grant is bad: the sender's frame was taken (OKAY), the slot says ERROR.
        try two.postReceive(1, badGrant: true)
        two.backend.poll()
        try one.send(good, id: 3)
        one.backend.poll()
        #expect(try one.takeTransmitted().map(\.status) == [rspOkay, rspOkay])
        #expect(try two.takeReceived().map(\.statuses) == [[rspError]])
        #expect(two.backend.statistics.rxErrors == 1 && one.backend.statistics.txErrors == 1)
    }

    @Test func aReceiverThatDisconnectsTakesNoMoreFrames() throws {
        let (_, one, two) = try pair(posted: 4)
        two.setState(XenbusBackendState.closing)
        two.backend.poll()
        try one.send(ethernetFrame(to: two.mac, from: one.mac, payload: 60), id: 1)
        one.backend.poll()
        #expect(try one.takeTransmitted().map(\.status) == [rspDropped])
        #expect(two.backend.statistics.rxDropped == 1)
    }

    @Test func twoVifsSendingToEachOtherOnTheirOwnThreadsLoseNothing() throws {
        // Each loop holds the other's inbox while it transmits: both at once must not deadlock.
        let (_, one, two) = try pair(posted: 0)
        try one.postReceive(64)
        try two.postReceive(64)
        let stopLoops = rig.runLoops([one, two], name: "test-direct-events")
        defer { stopLoops() }
        let count = 400
        let frames = [(one, two), (two, one)].map { from, to in
            (0..<count).map { ethernetFrame(to: to.mac, from: from.mac, payload: 46 + $0 % 1400, seed: UInt8(truncatingIfNeeded: $0)) }
        }
        var sent = [0, 0], received: [[[UInt8]]] = [[], []]
        let deadline = ContinuousClock.now.advanced(by: .seconds(20))
        while received[0].count < count || received[1].count < count {
            var idle = true
            for (i, (from, to)) in [(one, two), (two, one)].enumerated() {
                while sent[i] < count, from.tx.freeRequests > 0, sent[i] - received[i].count < 48 {
                    try from.send(frames[i][sent[i]], id: UInt16(sent[i] % 256))
                    sent[i] += 1
                }
                try from.takeTransmitted()
                let got = try to.takeReceived()
                received[i] += got.map(\.bytes)
                if !got.isEmpty {
                    idle = false
                    try to.postReceive(got.count)
                }
            }
            if idle {
                if try one.rx.finalCheckForResponses() || two.rx.finalCheckForResponses() { continue }
                _ = two.guest.waitForEvents(timeout: .milliseconds(5))
            }
            guard ContinuousClock.now < deadline else {
                Issue.record("only \(received[0].count) and \(received[1].count) frames arrived")
                return
            }
        }
        #expect(received[0] == frames[0] && received[1] == frames[1], "in order, intact, both ways")
        #expect(one.txResponses.allSatisfy { $0.status == rspOkay } && two.txResponses.allSatisfy { $0.status == rspOkay })
    }
}
