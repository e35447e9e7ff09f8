import GuestKit
import Testing

/// GuestKit's packet layer. Checksums are verified here with the test's own arithmetic
/// (`onesComplement`), not with the code under test.
@Suite struct PacketsTests {
    static let myMAC = MACAddress(octets: [0x00, 0x16, 0x3e, 0x12, 0x34, 0x56])!
    static let peerMAC: [UInt8] = [0x02, 0x00, 0x00, 0xaa, 0xbb, 0xcc]
    static let myIP = IPv4Address(10, 0, 0, 2)
    static let peerIP: [UInt8] = [10, 0, 0, 1]

    /// RFC 1071, written independently: 16-bit big-endian words summed in 32 bits, folded.
    static func onesComplement(_ bytes: ArraySlice<UInt8>) -> UInt16 {
        var sum: UInt32 = 0
        var words = Array(bytes)
        if words.count % 2 == 1 { words.append(0) }
        for i in stride(from: 0, to: words.count, by: 2) { sum += UInt32(words[i]) << 8 + UInt32(words[i + 1]) }
        while sum > 0xffff { sum = (sum >> 16) + (sum & 0xffff) }
        return UInt16(sum)
    }

    static func be16(_ v: Int) -> [UInt8] { [UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }

    /// An Ethernet + IPv4 frame to us from the peer, header checksum filled in.
    static func ipFrame(protocolNumber: UInt8, payload: [UInt8], to ip: [UInt8] = [10, 0, 0, 2]) -> [UInt8] {
        var header: [UInt8] = [0x45, 0] + be16(20 + payload.count) + [0x12, 0x34, 0x40, 0, 64, protocolNumber, 0, 0]
        header += peerIP + ip
        let sum = ~onesComplement(header[...])
        header[10] = UInt8(sum >> 8)
        header[11] = UInt8(sum & 0xff)
        return myMAC.octets + peerMAC + [0x08, 0x00] + header + payload
    }

    static func udpFrame(payload: [UInt8], sourcePort: Int = 40000, port: Int = 7) -> [UInt8] {
        var frame = ipFrame(protocolNumber: 17, payload: be16(sourcePort) + be16(port) + be16(8 + payload.count) + [0, 0] + payload)
        let sum = udpSum(frame)
        let checksum = sum == 0xffff ? 0xffff : ~sum  // so the frame verifies
        frame[40] = UInt8(checksum >> 8)
        frame[41] = UInt8(checksum & 0xff)
        return frame
    }

    /// The sum over the pseudo-header and the whole UDP datagram (checksum field included).
    static func udpSum(_ frame: [UInt8]) -> UInt16 {
        let udpLength = Int(frame[38]) << 8 | Int(frame[39])
        let pseudo = Array(frame[26..<34]) + [0, 17] + be16(udpLength)
        return onesComplement((pseudo + Array(frame[34..<(34 + udpLength)]))[...])
    }

    static func udpChecksumIsValid(_ frame: [UInt8]) -> Bool {
        frame[40] | frame[41] != 0 && udpSum(frame) == 0xffff
    }

    static func ipHeaderIsValid(_ frame: [UInt8]) -> Bool {
        onesComplement(frame[14..<(14 + Int(frame[14] & 15) * 4)]) == 0xffff
    }

    // MARK: Addresses

    @Test func addressesParseAndPrint() {
        #expect(MACAddress(text: Array("00:16:3E:12:34:56".utf8)) == Self.myMAC)
        #expect(Self.myMAC.text == Array("00:16:3e:12:34:56".utf8))
        for bad in ["00:16:3e:12:34", "00:16:3e:12:34:56:78", "0:16:3e:12:34:56", "00:16:3e:12:34:5g", "00:16:3e:12:34:", ""] {
            #expect(MACAddress(text: Array(bad.utf8)) == nil, "\(bad)")
        }
        #expect(IPv4Address(text: Array("10.0.0.2".utf8)) == Self.myIP)
        #expect(IPv4Address(text: Array("192.168.100.254".utf8))?.text == Array("192.168.100.254".utf8))
        for bad in ["10.0.0", "10.0.0.256", "10..0.2", "10.0.0.2.", "a.b.c.d", "1000.0.0.1"] {
            #expect(IPv4Address(text: Array(bad.utf8)) == nil, "\(bad)")
        }
    }

    // MARK: ARP

    @Test func anARPRequestForOurAddressGetsTheReplyBytes() throws {
        let request: [UInt8] = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff] + Self.peerMAC + [0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01] + Self.peerMAC + Self.peerIP + [0, 0, 0, 0, 0, 0] + [10, 0, 0, 2]
            + [UInt8](repeating: 0, count: 18)  // padded to 60 bytes, as on the wire
        let reply = try #require(Packets.arpReply(to: request, mac: Self.myMAC, ip: Self.myIP))
        let expected: [UInt8] = Self.peerMAC + Self.myMAC.octets + [0x08, 0x06,
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x02] + Self.myMAC.octets + [10, 0, 0, 2] + Self.peerMAC + Self.peerIP
        #expect(reply == expected)
        #expect(Packets.echoReply(to: request, mac: Self.myMAC, ip: Self.myIP)?.kind == .arp)
        // For another address, or a reply rather than a request: nothing.
        var other = request
        other[41] = 3
        #expect(Packets.arpReply(to: other, mac: Self.myMAC, ip: Self.myIP) == nil)
        var answer = request
        answer[21] = 2
        #expect(Packets.arpReply(to: answer, mac: Self.myMAC, ip: Self.myIP) == nil)
    }

    // MARK: ICMP

    @Test func anEchoRequestGetsAnEchoReplyWithRightChecksums() throws {
        var icmp: [UInt8] = [8, 0, 0, 0, 0x12, 0x34, 0x00, 0x01] + Array("ping payload, 32 bytes long....".utf8)
        let sum = ~Self.onesComplement(icmp[...])
        icmp[2] = UInt8(sum >> 8)
        icmp[3] = UInt8(sum & 0xff)
        let request = Self.ipFrame(protocolNumber: 1, payload: icmp)
        let reply = try #require(Packets.icmpEchoReply(to: request, mac: Self.myMAC, ip: Self.myIP))
        #expect(reply.count == request.count)
        #expect(Array(reply[0..<6]) == Self.peerMAC && Array(reply[6..<12]) == Self.myMAC.octets)
        #expect(Array(reply[26..<30]) == [10, 0, 0, 2] && Array(reply[30..<34]) == Self.peerIP)
        #expect(Self.ipHeaderIsValid(reply))
        #expect(reply[34] == 0 && reply[35] == 0, "type 0, code 0")
        #expect(Array(reply[38...]) == Array(request[38...]), "identifier, sequence and data echoed")
        #expect(Self.onesComplement(reply[34...]) == 0xffff, "ICMP checksum")

        // A corrupted ICMP checksum, a corrupted IP checksum, another destination: ignored.
        var badICMP = request
        badICMP[36] ^= 1
        #expect(Packets.icmpEchoReply(to: badICMP, mac: Self.myMAC, ip: Self.myIP) == nil)
        var badIP = request
        badIP[24] ^= 1
        #expect(Packets.icmpEchoReply(to: badIP, mac: Self.myMAC, ip: Self.myIP) == nil)
        let elsewhere = Self.ipFrame(protocolNumber: 1, payload: icmp, to: [10, 0, 0, 3])
        #expect(Packets.echoReply(to: elsewhere, mac: Self.myMAC, ip: Self.myIP) == nil)
    }

    // MARK: UDP

    @Test func aUDPDatagramIsEchoedWithACorrectChecksum() throws {
        let request = Self.udpFrame(payload: Array("hello, echo".utf8), sourcePort: 40000, port: 7)
        #expect(Self.udpChecksumIsValid(request), "the test's own frame")
        let reply = try #require(Packets.udpEchoReply(to: request, mac: Self.myMAC, ip: Self.myIP))
        #expect(Array(reply[34..<36]) == [0, 7] && Array(reply[36..<38]) == Self.be16(40000))
        #expect(Array(reply[42...]) == Array("hello, echo".utf8))
        #expect(Self.ipHeaderIsValid(reply))
        #expect(Self.udpChecksumIsValid(reply))
        // A port filter; a checksum of 0 (none, legal in IPv4) is accepted; a wrong one is not,
        // unless the frame came with NETRXF_csum_blank.
        #expect(Packets.udpEchoReply(to: request, mac: Self.myMAC, ip: Self.myIP, port: 9) == nil)
        #expect(Packets.udpEchoReply(to: request, mac: Self.myMAC, ip: Self.myIP, port: 7) != nil)
        var noSum = request
        noSum[40] = 0
        noSum[41] = 0
        #expect(Packets.udpEchoReply(to: noSum, mac: Self.myMAC, ip: Self.myIP).map(Self.udpChecksumIsValid) == true)
        var wrong = request
        wrong[41] ^= 0x5a
        #expect(Packets.udpEchoReply(to: wrong, mac: Self.myMAC, ip: Self.myIP) == nil)
        #expect(Packets.udpEchoReply(to: wrong, mac: Self.myMAC, ip: Self.myIP, checksumBlank: true) != nil)
        #expect(Packets.echoReply(to: request, mac: Self.myMAC, ip: Self.myIP)?.kind == .udp)
        // An odd-length payload pads its last byte with zero in the sum.
        let odd = Self.udpFrame(payload: [1, 2, 3])
        #expect(Packets.udpEchoReply(to: odd, mac: Self.myMAC, ip: Self.myIP).map(Self.udpChecksumIsValid) == true)
    }

    @Test func blankChecksumsAreCompleted() throws {
        // UDP as Linux sends it with offload: the pseudo-header sum in the checksum field.
        var udp = Self.udpFrame(payload: Array("offloaded".utf8))
        #expect(Packets.prepareChecksumOffload(&udp))
        #expect(!Self.udpChecksumIsValid(udp))
        #expect(Packets.completeChecksum(&udp))
        #expect(Self.udpChecksumIsValid(udp))
        // TCP: a 20-byte header and data, the checksum field left as garbage.
        let tcpHeader: [UInt8] = Self.be16(5555) + Self.be16(80) + [0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0xde, 0xad, 0, 0]
        var tcp = Self.ipFrame(protocolNumber: 6, payload: tcpHeader + Array("GET / HTTP/1.0\r\n\r".utf8))
        #expect(Packets.completeChecksum(&tcp))
        let length = tcp.count - 34
        let pseudo = Array(tcp[26..<34]) + [0, 6] + Self.be16(length)
        #expect(Self.onesComplement((pseudo + Array(tcp[34...]))[...]) == 0xffff)
        // Not TCP or UDP: unchanged.
        var icmp = Self.ipFrame(protocolNumber: 1, payload: [8, 0, 0, 0, 0, 0, 0, 0])
        let before = icmp
        #expect(!Packets.completeChecksum(&icmp) && icmp == before)
    }

    // MARK: Hostile input

    @Test func shortAndMalformedFramesAreIgnored() {
        var icmp: [UInt8] = [8, 0, 0, 0, 0, 1, 0, 1, 9, 9, 9, 9]
        let s = ~Self.onesComplement(icmp[...])
        icmp[2] = UInt8(s >> 8)
        icmp[3] = UInt8(s & 0xff)
        let arp: [UInt8] = Self.myMAC.octets + Self.peerMAC + [0x08, 0x06, 0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01]
            + Self.peerMAC + Self.peerIP + [0, 0, 0, 0, 0, 0] + [10, 0, 0, 2]
        let samples = [Self.udpFrame(payload: [1, 2, 3, 4]), Self.ipFrame(protocolNumber: 1, payload: icmp), arp]
        // Every truncation of good frames: only the whole frame is answered.
        for frame in samples {
            for n in 0..<frame.count {
                var cut = Array(frame[0..<n])
                #expect(Packets.echoReply(to: cut, mac: Self.myMAC, ip: Self.myIP) == nil, "\(n) bytes")
                _ = Packets.completeChecksum(&cut)
            }
            #expect(Packets.echoReply(to: frame, mac: Self.myMAC, ip: Self.myIP) != nil)
        }
        // Lying lengths: an IP total length past the frame, a header length under 20 or past
        // the frame, a UDP length past the IP payload or under 8, a fragment.
        let udp = Self.udpFrame(payload: [1, 2, 3, 4])
        func patched(_ at: Int, _ value: UInt8, fixIP: Bool = true) -> [UInt8] {
            var f = udp
            f[at] = value
            if fixIP {
                f[24] = 0
                f[25] = 0
                let sum = ~Self.onesComplement(f[14..<34])
                f[24] = UInt8(sum >> 8)
                f[25] = UInt8(sum & 0xff)
            }
            return f
        }
        for frame in [patched(17, 200), patched(14, 0x44), patched(14, 0x4f), patched(14, 0x65), patched(39, 200),
                      patched(39, 4), patched(20, 0x20), patched(21, 1)] {
            #expect(Packets.echoReply(to: frame, mac: Self.myMAC, ip: Self.myIP) == nil)
            var copy = frame
            _ = Packets.completeChecksum(&copy)
        }
        // Pseudo-random bytes of every length up to 200: nothing traps.
        var seed: UInt32 = 12345
        for n in 0..<200 {
            var frame: [UInt8] = []
            for _ in 0..<n {
                seed = seed &* 1_103_515_245 &+ 12345
                frame.append(UInt8(truncatingIfNeeded: seed >> 16))
            }
            // Mostly broadcast IPv4 or ARP, so the parsers past the Ethernet header run.
            if n >= 6 { for i in 0..<6 { frame[i] = 0xff } }
            if n > 14 {
                frame[12] = 0x08
                frame[13] = n % 3 == 0 ? 0x06 : 0x00
            }
            if n > 15 && n % 3 != 0 { frame[14] = 0x45 }
            _ = Packets.echoReply(to: frame, mac: MACAddress.broadcast, ip: Self.myIP)
            _ = Packets.completeChecksum(&frame)
            _ = Packets.prepareChecksumOffload(&frame)
        }
    }
}

@Suite struct PacketRequestTests {
    let mine = MACAddress(octets: [0x00, 0x16, 0x3e, 0, 0, 1])!
    let theirs = MACAddress(octets: [0x00, 0x16, 0x3e, 0, 0, 2])!
    let me = IPv4Address(10, 0, 0, 3), peer = IPv4Address(10, 0, 0, 2)

    /// The asking side against the answering side: an echo host answers our requests, and we
    /// recognise its answers (and nothing else).
    @Test func requestsAreAnsweredByTheEchoHostAndTheAnswersRecognised() throws {
        let ask = Packets.arpRequest(from: mine, ip: me, asking: peer)
        #expect(Array(ask[0..<6]) == [0xff, 0xff, 0xff, 0xff, 0xff, 0xff])
        let arpAnswer = try #require(Packets.arpReply(to: ask, mac: theirs, ip: peer))
        #expect(Packets.arpReplySender(arpAnswer, target: peer, ip: me) == theirs)
        #expect(Packets.arpReplySender(arpAnswer, target: IPv4Address(10, 0, 0, 9), ip: me) == nil)
        #expect(Packets.arpReplySender(ask, target: peer, ip: me) == nil, "a request is not a reply")

        let ping = Packets.icmpEchoRequest(from: mine, ip: me, to: theirs, peer, identifier: 0x5656, sequence: 7)
        #expect(Packets.internetChecksum(ping, from: 14, count: 20) == 0)
        let pong = try #require(Packets.icmpEchoReply(to: ping, mac: theirs, ip: peer))
        #expect(Packets.icmpEchoReplySequence(pong, from: peer, to: me, identifier: 0x5656) == 7)
        #expect(Packets.icmpEchoReplySequence(pong, from: peer, to: me, identifier: 1) == nil)
        #expect(Packets.icmpEchoReplySequence(ping, from: me, to: peer, identifier: 0x5656) == nil, "a request is not a reply")
        var broken = pong
        broken[broken.count - 1] ^= 0xff
        #expect(Packets.icmpEchoReplySequence(broken, from: peer, to: me, identifier: 0x5656) == nil)
    }
}
