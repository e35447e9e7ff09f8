import Foundation
import GuestKit
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls
import VireoHypervisor
import VireoStore

/// GuestKit's NetFrontend, every hypercall through the real dispatcher and the store over the
/// guest's ring, against the real NetBackend: the host side is a capture that keeps what the
/// guest sends, and frames for the guest go in through `NetBackend.receive`.
@Suite(.serialized) struct NetFrontendBackendTests {
    final class Capture: NetworkAttachment, @unchecked Sendable {
        let frames = Mutex<[(bytes: [UInt8], checksum: FrameChecksum)]>([])
        func transmit(_ frame: UnsafeMutableRawBufferPointer, checksum: FrameChecksum) -> Bool {
            frames.withLock { $0.append((Array(frame), checksum)) }
            return true
        }
        func take() -> [(bytes: [UInt8], checksum: FrameChecksum)] { frames.withLock { f in defer { f = [] }; return f } }
    }

    final class Rig {
        let machine: TestMachine
        let backend: NetBackend
        let capture = Capture()
        let server: Thread

        init() throws {
            machine = try TestMachine(memory: 8 << 20)
            backend = try NetBackend(frontend: machine.domain.id, handle: 0, store: machine.store, grants: machine.grants,
                                     host: machine.host)
            backend.attach(capture)
            try backend.create()
            let backend = self.backend
            server = Thread { backend.run() }
            server.start()
        }

        deinit {
            backend.stop()
            while !server.isFinished { usleep(1000) }
        }
    }

    static let hostMAC = MACAddress(octets: [0x02, 0, 0, 0, 0, 0x01])!
    static let hostIP = IPv4Address(10, 0, 0, 1), guestIP = IPv4Address(10, 0, 0, 2)

    /// Polls the frontend (sleeping in the guest's loop between passes) until `count` packets
    /// arrived or ten seconds passed.
    static func collect(_ net: NetFrontend<DomainPlatform>, count: Int) throws -> [NetPacket] {
        var packets: [NetPacket] = []
        let deadline = Date().addingTimeInterval(10)
        while packets.count < count && Date() < deadline {
            if try net.poll({ packets.append($0) }) == 0 && packets.count < count { try net.waitForEvents() }
        }
        return packets
    }

    static func waitForCapture(_ capture: Capture, count: Int, net: NetFrontend<DomainPlatform>) throws -> [(bytes: [UInt8], checksum: FrameChecksum)] {
        var frames: [(bytes: [UInt8], checksum: FrameChecksum)] = []
        let deadline = Date().addingTimeInterval(10)
        while frames.count < count && Date() < deadline {
            frames += capture.take()
            _ = try net.freeTransmitSlots()
            if frames.count < count { usleep(1000) }
        }
        return frames
    }

    /// Both ways of granting: per packet (as Linux's netfront), and the frontend's own pages
    /// granted once and held by the backend through the control ring (static grants).
    @Test(arguments: [false, true])
    func arpAndEchoRepliesGoOutThroughTheRealBackendAndFramesComeIn(staticGrants: Bool) throws {
        let rig = try Rig()
        let guest = Guest(platform: rig.machine.platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        let net = try NetFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest), staticGrants: staticGrants)
        try net.connect()
        #expect(rig.backend.state == XenbusBackendState.connected)
        #expect(net.staticGrantsHeld == staticGrants, "the backend holds the pages only when asked")
        #expect(net.mac == MACAddress(octets: [0x02, 0x16, 0x3e, 0x00, 0x07, 0x00]), "the MAC netback generated for domain 7")

        // The host asks who has 10.0.0.2: the frame reaches the guest, its answer the host side.
        let ask = Packets.arpRequest(from: Self.hostMAC, ip: Self.hostIP, asking: Self.guestIP)
        #expect(ask.withUnsafeBytes { rig.backend.receive($0) })
        let asked = try Self.collect(net, count: 1)
        #expect(asked.count == 1 && asked.first?.bytes == ask)
        let reply = try #require(Packets.echoReply(to: ask, mac: net.mac, ip: Self.guestIP)?.reply)
        _ = try net.send(reply)
        let answers = try Self.waitForCapture(rig.capture, count: 1, net: net)
        #expect(answers.map(\.bytes) == [reply])
        #expect(Packets.arpReplySender(reply, target: Self.guestIP, ip: Self.hostIP) == net.mac)

        // 100 pings in: each answered; the receive ring is refilled as it goes (64 buffers posted).
        var expected: [[UInt8]] = []
        for sequence in 0..<100 {
            let ping = Packets.icmpEchoRequest(from: Self.hostMAC, ip: Self.hostIP, to: net.mac, Self.guestIP,
                                               identifier: 9, sequence: UInt16(sequence), payload: 56)
            var delivered = false
            let deadline = Date().addingTimeInterval(10)
            while !delivered && Date() < deadline {
                delivered = ping.withUnsafeBytes { rig.backend.receive($0) }
                if !delivered { usleep(1000) }
            }
            #expect(delivered)
            for packet in try Self.collect(net, count: 1) {
                let answer = try #require(Packets.echoReply(to: packet.bytes, mac: net.mac, ip: Self.guestIP)?.reply)
                _ = try net.send(answer)
                expected.append(answer)
            }
        }
        let pongs = try Self.waitForCapture(rig.capture, count: 100, net: net)
        #expect(pongs.map(\.bytes) == expected)
        #expect(pongs.enumerated().allSatisfy { Packets.icmpEchoReplySequence($1.bytes, from: Self.guestIP, to: Self.hostIP, identifier: 9) == UInt16($0) })

        // A frame larger than a page leaves as a NETTXF_more_data chain and arrives whole.
        var big = [UInt8](repeating: 0, count: 6000)
        for i in 0..<6 { big[i] = Self.hostMAC.octets[i]; big[6 + i] = net.mac.octets[i] }
        big[12] = 0x88; big[13] = 0xb5  // a local experimental EtherType
        for i in 14..<big.count { big[i] = UInt8(truncatingIfNeeded: i &* 13) }
        _ = try net.send(big)
        let chained = try Self.waitForCapture(rig.capture, count: 1, net: net)
        #expect(chained.first?.bytes == big, "a 6000-byte frame over two pages")

        try net.disconnect()
        #expect(rig.backend.state == XenbusBackendState.closed)
        #expect(net.leakedGrants == 0, "every grant ended, the held ones included once the backend closed")
    }
}
