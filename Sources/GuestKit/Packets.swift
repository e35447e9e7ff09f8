// A small packet layer for guests: Ethernet, ARP, IPv4, ICMP echo and UDP echo over plain byte
// arrays. Pure functions, no allocation beyond the reply they build, nothing Embedded Swift
// lacks (no Dictionary, no String comparison). Every read is bounds-checked against the
// frame's length and the lengths the headers claim: a short or malformed frame gets nil, never
// a trap.

/// A 48-bit Ethernet address.
public struct MACAddress: Equatable, Sendable {
    /// The six octets, most significant first.
    public let octets: [UInt8]

    public init?(octets: [UInt8]) {
        guard octets.count == 6 else { return nil }
        self.octets = octets
    }

    /// From "aa:bb:cc:dd:ee:ff" (the XenStore's `mac` form; '-' also separates); nil otherwise.
    public init?(text: [UInt8]) {
        var octets: [UInt8] = []
        var index = 0
        while index < text.count {
            guard index + 2 <= text.count, let high = Self.hexDigit(text[index]), let low = Self.hexDigit(text[index + 1]) else {
                return nil
            }
            octets.append(high << 4 | low)
            index += 2
            if index < text.count {
                guard text[index] == 58 || text[index] == 45, octets.count < 6 else { return nil }  // ':' '-'
                index += 1
                guard index < text.count else { return nil }
            }
        }
        self.init(octets: octets)
    }

    public static let broadcast = MACAddress(octets: [0xff, 0xff, 0xff, 0xff, 0xff, 0xff])!

    /// "aa:bb:cc:dd:ee:ff".
    public var text: [UInt8] {
        let digits = Bytes.of("0123456789abcdef")
        var out: [UInt8] = []
        for (i, octet) in octets.enumerated() {
            if i > 0 { out.append(58) }
            out.append(digits[Int(octet >> 4)])
            out.append(digits[Int(octet & 15)])
        }
        return out
    }

    static func hexDigit(_ byte: UInt8) -> UInt8? {
        switch byte {
        case 48...57: return byte - 48
        case 65...70: return byte - 55
        case 97...102: return byte - 87
        default: return nil
        }
    }
}

/// An IPv4 address as its 32-bit value (10.0.0.2 is 0x0A000002).
public struct IPv4Address: Equatable, Sendable {
    public let value: UInt32
    public init(_ value: UInt32) { self.value = value }
    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) {
        value = UInt32(a) << 24 | UInt32(b) << 16 | UInt32(c) << 8 | UInt32(d)
    }

    /// From dotted-quad text ("10.0.0.2"); nil otherwise.
    public init?(text: [UInt8]) {
        var parts: [UInt32] = []
        var current: UInt32 = 0
        var digits = 0
        for byte in text {
            if byte == 46 {  // '.'
                guard digits > 0, parts.count < 3 else { return nil }
                parts.append(current)
                current = 0
                digits = 0
            } else if byte >= 48 && byte <= 57 {
                current = current * 10 + UInt32(byte - 48)
                digits += 1
                guard digits <= 3, current <= 255 else { return nil }
            } else {
                return nil
            }
        }
        guard digits > 0, parts.count == 3 else { return nil }
        value = parts[0] << 24 | parts[1] << 16 | parts[2] << 8 | current
    }

    /// "10.0.0.2".
    public var text: [UInt8] {
        var out: [UInt8] = []
        for shift in [24, 16, 8, 0] {
            if shift != 24 { out.append(46) }
            out += Bytes.decimal(UInt64(value >> UInt32(shift) & 0xff))
        }
        return out
    }
}

/// What an echo reply answered.
public enum EchoKind: Sendable {
    case arp, icmp, udp
}

/// Ethernet, ARP, IPv4, ICMP and UDP over byte arrays (network byte order on the wire).
public enum Packets {
    public static let ethernetHeaderSize = 14
    public static let etherTypeIPv4: UInt16 = 0x0800
    public static let etherTypeARP: UInt16 = 0x0806
    public static let protocolICMP: UInt8 = 1
    public static let protocolTCP: UInt8 = 6
    public static let protocolUDP: UInt8 = 17

    // MARK: Bytes

    @inline(__always)
    static func load16(_ bytes: [UInt8], _ offset: Int) -> UInt16 {
        UInt16(bytes[offset]) << 8 | UInt16(bytes[offset + 1])
    }

    @inline(__always)
    static func load32(_ bytes: [UInt8], _ offset: Int) -> UInt32 {
        UInt32(bytes[offset]) << 24 | UInt32(bytes[offset + 1]) << 16 | UInt32(bytes[offset + 2]) << 8 | UInt32(bytes[offset + 3])
    }

    @inline(__always)
    static func store16(_ value: UInt16, _ bytes: inout [UInt8], _ offset: Int) {
        bytes[offset] = UInt8(value >> 8)
        bytes[offset + 1] = UInt8(truncatingIfNeeded: value)
    }

    @inline(__always)
    static func store32(_ value: UInt32, _ bytes: inout [UInt8], _ offset: Int) {
        for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: value >> UInt32(24 - 8 * i)) }
    }

    // MARK: Checksums

    /// The 32-bit one's-complement accumulation (RFC 1071) of `count` bytes from `offset`,
    /// added to `sum`; an odd last byte is padded with zero.
    public static func sum(_ bytes: [UInt8], from offset: Int, count: Int, into sum: UInt32 = 0) -> UInt32 {
        var total = UInt64(sum)
        var i = offset
        let end = offset + count
        while i + 1 < end {
            total += UInt64(bytes[i]) << 8 | UInt64(bytes[i + 1])
            i += 2
        }
        if i < end { total += UInt64(bytes[i]) << 8 }
        while total >> 16 != 0 { total = (total & 0xffff) + (total >> 16) }
        return UInt32(total)
    }

    /// Folds an accumulated sum to 16 bits and complements it: the Internet checksum.
    public static func finish(_ sum: UInt32) -> UInt16 {
        var total = sum
        while total >> 16 != 0 { total = (total & 0xffff) + (total >> 16) }
        return ~UInt16(total)
    }

    /// The Internet checksum of `count` bytes from `offset`.
    public static func internetChecksum(_ bytes: [UInt8], from offset: Int = 0, count: Int? = nil) -> UInt16 {
        finish(sum(bytes, from: offset, count: count ?? bytes.count - offset))
    }

    /// The IPv4 pseudo-header's sum (source, destination, protocol, transport length).
    static func pseudoHeaderSum(_ frame: [UInt8], ip: Int, protocolNumber: UInt8, length: Int) -> UInt32 {
        var total = sum(frame, from: ip + 12, count: 8)
        total += UInt32(protocolNumber) + UInt32(length)
        return total
    }

    // MARK: Parsing

    /// The IPv4 packet in an Ethernet frame, checked: version 4, a header of at least 20 bytes
    /// whose checksum is right, a total length within the frame, not a fragment.
    public struct IPv4View {
        /// Where the IP header starts in the frame (14).
        public let offset: Int
        public let headerLength: Int
        /// IP header plus payload, from the header's total length (the frame may be padded).
        public let totalLength: Int
        public let protocolNumber: UInt8
        public let source: IPv4Address
        public let destination: IPv4Address
        public var payloadOffset: Int { offset + headerLength }
        public var payloadLength: Int { totalLength - headerLength }
    }

    public static func ipv4(_ frame: [UInt8]) -> IPv4View? {
        let ip = ethernetHeaderSize
        guard frame.count >= ip + 20, load16(frame, 12) == etherTypeIPv4 else { return nil }
        let versionIHL = frame[ip]
        let headerLength = Int(versionIHL & 0x0f) * 4
        guard versionIHL >> 4 == 4, headerLength >= 20, frame.count >= ip + headerLength else { return nil }
        let totalLength = Int(load16(frame, ip + 2))
        guard totalLength >= headerLength, ip + totalLength <= frame.count else { return nil }
        guard internetChecksum(frame, from: ip, count: headerLength) == 0 else { return nil }
        // Fragments (MF set or a non-zero offset) are not reassembled here.
        guard load16(frame, ip + 6) & 0x3fff == 0 else { return nil }
        return IPv4View(offset: ip, headerLength: headerLength, totalLength: totalLength, protocolNumber: frame[ip + 9],
                        source: IPv4Address(load32(frame, ip + 12)), destination: IPv4Address(load32(frame, ip + 16)))
    }

    /// The reply frame's Ethernet header: to the sender, from `mac`, same EtherType.
    static func replyEthernet(_ frame: [UInt8], mac: MACAddress, into reply: inout [UInt8]) {
        for i in 0..<6 {
            reply[i] = frame[6 + i]
            reply[6 + i] = mac.octets[i]
        }
        reply[12] = frame[12]
        reply[13] = frame[13]
    }

    /// Whether `frame` is addressed to `mac` or is a broadcast.
    public static func isFor(_ frame: [UInt8], mac: MACAddress) -> Bool {
        guard frame.count >= ethernetHeaderSize else { return false }
        var mine = true, broadcast = true
        for i in 0..<6 {
            if frame[i] != mac.octets[i] { mine = false }
            if frame[i] != 0xff { broadcast = false }
        }
        return mine || broadcast
    }

    // MARK: Replies

    /// The ARP reply to an Ethernet/IPv4 ARP request asking for `ip`; nil for anything else.
    public static func arpReply(to frame: [UInt8], mac: MACAddress, ip: IPv4Address) -> [UInt8]? {
        let arp = ethernetHeaderSize
        guard frame.count >= arp + 28, load16(frame, 12) == etherTypeARP,
              load16(frame, arp) == 1, load16(frame, arp + 2) == etherTypeIPv4,
              frame[arp + 4] == 6, frame[arp + 5] == 4, load16(frame, arp + 6) == 1,
              load32(frame, arp + 24) == ip.value else { return nil }
        var reply = [UInt8](repeating: 0, count: arp + 28)
        replyEthernet(frame, mac: mac, into: &reply)
        for i in 0..<6 { reply[arp + i] = frame[arp + i] }  // htype, ptype, hlen, plen
        store16(2, &reply, arp + 6)                         // a reply
        for i in 0..<6 { reply[arp + 8 + i] = mac.octets[i] }
        store32(ip.value, &reply, arp + 14)
        for i in 0..<10 { reply[arp + 18 + i] = frame[arp + 8 + i] }  // the asker's MAC and IP
        return reply
    }

    /// An IPv4 reply to `view`: the request's header (options included) with the addresses
    /// swapped, TTL 64, a new identification-free checksum, and `payload` after it.
    static func ipv4Reply(to frame: [UInt8], _ view: IPv4View, mac: MACAddress, payloadLength: Int) -> [UInt8] {
        var reply = [UInt8](repeating: 0, count: view.offset + view.headerLength + payloadLength)
        replyEthernet(frame, mac: mac, into: &reply)
        for i in 0..<view.headerLength { reply[view.offset + i] = frame[view.offset + i] }
        store16(UInt16(view.headerLength + payloadLength), &reply, view.offset + 2)
        store16(0, &reply, view.offset + 6)  // not a fragment, DF clear
        reply[view.offset + 8] = 64
        store32(view.destination.value, &reply, view.offset + 12)
        store32(view.source.value, &reply, view.offset + 16)
        store16(0, &reply, view.offset + 10)
        store16(internetChecksum(reply, from: view.offset, count: view.headerLength), &reply, view.offset + 10)
        return reply
    }

    /// The ICMP echo reply to an echo request sent to `ip`; nil for anything else (a bad ICMP
    /// checksum included).
    public static func icmpEchoReply(to frame: [UInt8], mac: MACAddress, ip: IPv4Address) -> [UInt8]? {
        guard let view = ipv4(frame), view.protocolNumber == protocolICMP, view.destination == ip,
              view.payloadLength >= 8 else { return nil }
        let icmp = view.payloadOffset
        guard frame[icmp] == 8, frame[icmp + 1] == 0,
              internetChecksum(frame, from: icmp, count: view.payloadLength) == 0 else { return nil }
        var reply = ipv4Reply(to: frame, view, mac: mac, payloadLength: view.payloadLength)
        let out = view.payloadOffset
        for i in 0..<view.payloadLength { reply[out + i] = frame[icmp + i] }
        reply[out] = 0  // echo reply
        store16(0, &reply, out + 2)
        store16(internetChecksum(reply, from: out, count: view.payloadLength), &reply, out + 2)
        return reply
    }

    /// The UDP checksum a datagram at `view` should carry (0 is sent as 0xffff, RFC 768).
    static func udpChecksum(_ frame: [UInt8], _ view: IPv4View) -> UInt16 {
        let udp = view.payloadOffset
        let length = Int(load16(frame, udp + 4))
        var total = pseudoHeaderSum(frame, ip: view.offset, protocolNumber: protocolUDP, length: length)
        total = sum(frame, from: udp, count: 6, into: total)  // ports and length, not the checksum
        total = sum(frame, from: udp + 8, count: length - 8, into: total)
        let checksum = finish(total)
        return checksum == 0 ? 0xffff : checksum
    }

    /// The UDP echo reply to a datagram sent to `ip` (on `port`, or any port when nil): the
    /// same payload back to the sender's port, with a correct checksum. A datagram whose
    /// checksum is present and wrong is ignored unless `checksumBlank` says the sender left it
    /// to be filled in (NETRXF_csum_blank), in which case it is not verified.
    public static func udpEchoReply(to frame: [UInt8], mac: MACAddress, ip: IPv4Address, port: UInt16? = nil,
                                    checksumBlank: Bool = false) -> [UInt8]? {
        guard let view = ipv4(frame), view.protocolNumber == protocolUDP, view.destination == ip,
              view.payloadLength >= 8 else { return nil }
        let udp = view.payloadOffset
        let length = Int(load16(frame, udp + 4))
        guard length >= 8, length <= view.payloadLength else { return nil }
        if let port, load16(frame, udp + 2) != port { return nil }
        let received = load16(frame, udp + 6)
        if !checksumBlank && received != 0 && udpChecksum(frame, view) != received { return nil }
        var reply = ipv4Reply(to: frame, view, mac: mac, payloadLength: length)
        let out = view.payloadOffset
        store16(load16(frame, udp + 2), &reply, out)      // source port: the port it was sent to
        store16(load16(frame, udp), &reply, out + 2)      // destination: the sender's port
        store16(UInt16(length), &reply, out + 4)
        for i in 8..<length { reply[out + i] = frame[udp + i] }
        guard let replyView = ipv4(reply) else { return nil }
        store16(udpChecksum(reply, replyView), &reply, out + 6)
        return reply
    }

    /// The reply an echo host at `mac`/`ip` sends to `frame` (ARP, ICMP echo, UDP echo), and
    /// what it answered; nil when the frame asks for nothing (or is malformed, or not for us).
    public static func echoReply(to frame: [UInt8], mac: MACAddress, ip: IPv4Address, udpPort: UInt16? = nil,
                                 checksumBlank: Bool = false) -> (reply: [UInt8], kind: EchoKind)? {
        guard isFor(frame, mac: mac) else { return nil }
        if let reply = arpReply(to: frame, mac: mac, ip: ip) { return (reply, .arp) }
        if let reply = icmpEchoReply(to: frame, mac: mac, ip: ip) { return (reply, .icmp) }
        if let reply = udpEchoReply(to: frame, mac: mac, ip: ip, port: udpPort, checksumBlank: checksumBlank) {
            return (reply, .udp)
        }
        return nil
    }

    // MARK: Requests (a host that asks, too)

    /// A broadcast ARP request from `mac`/`ip` asking who has `target`.
    public static func arpRequest(from mac: MACAddress, ip: IPv4Address, asking target: IPv4Address) -> [UInt8] {
        let arp = ethernetHeaderSize
        var frame = [UInt8](repeating: 0, count: arp + 28)
        for i in 0..<6 {
            frame[i] = 0xff
            frame[6 + i] = mac.octets[i]
            frame[arp + 8 + i] = mac.octets[i]
        }
        store16(etherTypeARP, &frame, 12)
        store16(1, &frame, arp)               // Ethernet
        store16(etherTypeIPv4, &frame, arp + 2)
        frame[arp + 4] = 6
        frame[arp + 5] = 4
        store16(1, &frame, arp + 6)           // a request
        store32(ip.value, &frame, arp + 14)
        store32(target.value, &frame, arp + 24)  // the target MAC stays zero
        return frame
    }

    /// The MAC in an ARP reply from `target` to `ip`; nil for any other frame.
    public static func arpReplySender(_ frame: [UInt8], target: IPv4Address, ip: IPv4Address) -> MACAddress? {
        let arp = ethernetHeaderSize
        guard frame.count >= arp + 28, load16(frame, 12) == etherTypeARP, load16(frame, arp) == 1,
              load16(frame, arp + 2) == etherTypeIPv4, frame[arp + 4] == 6, frame[arp + 5] == 4,
              load16(frame, arp + 6) == 2, load32(frame, arp + 14) == target.value,
              load32(frame, arp + 24) == ip.value else { return nil }
        return MACAddress(octets: Array(frame[(arp + 8)..<(arp + 14)]))
    }

    /// An ICMP echo request from `mac`/`ip` to `peerMAC`/`peer`, with `identifier`, `sequence`
    /// and `payload` bytes of a counting pattern.
    public static func icmpEchoRequest(from mac: MACAddress, ip: IPv4Address, to peerMAC: MACAddress, _ peer: IPv4Address,
                                       identifier: UInt16, sequence: UInt16, payload: Int = 32) -> [UInt8] {
        let ipOffset = ethernetHeaderSize, icmp = ipOffset + 20
        var frame = [UInt8](repeating: 0, count: icmp + 8 + payload)
        for i in 0..<6 {
            frame[i] = peerMAC.octets[i]
            frame[6 + i] = mac.octets[i]
        }
        store16(etherTypeIPv4, &frame, 12)
        frame[ipOffset] = 0x45
        store16(UInt16(20 + 8 + payload), &frame, ipOffset + 2)
        store16(sequence, &frame, ipOffset + 4)
        frame[ipOffset + 8] = 64
        frame[ipOffset + 9] = protocolICMP
        store32(ip.value, &frame, ipOffset + 12)
        store32(peer.value, &frame, ipOffset + 16)
        store16(internetChecksum(frame, from: ipOffset, count: 20), &frame, ipOffset + 10)
        frame[icmp] = 8
        store16(identifier, &frame, icmp + 4)
        store16(sequence, &frame, icmp + 6)
        for i in 0..<payload { frame[icmp + 8 + i] = UInt8(truncatingIfNeeded: i) }
        store16(internetChecksum(frame, from: icmp, count: 8 + payload), &frame, icmp + 2)
        return frame
    }

    /// The sequence number of an ICMP echo reply from `peer` to `ip` carrying `identifier`
    /// (its checksums right); nil for any other frame.
    public static func icmpEchoReplySequence(_ frame: [UInt8], from peer: IPv4Address, to ip: IPv4Address,
                                             identifier: UInt16) -> UInt16? {
        guard let view = ipv4(frame), view.protocolNumber == protocolICMP, view.source == peer, view.destination == ip,
              view.payloadLength >= 8 else { return nil }
        let icmp = view.payloadOffset
        guard frame[icmp] == 0, frame[icmp + 1] == 0, load16(frame, icmp + 4) == identifier,
              internetChecksum(frame, from: icmp, count: view.payloadLength) == 0 else { return nil }
        return load16(frame, icmp + 6)
    }

    // MARK: Checksum offload

    /// Fills in the TCP or UDP checksum of an IPv4 frame sent or received with a blank checksum
    /// (NETTXF_csum_blank / NETRXF_csum_blank): whatever the field held (the pseudo-header sum,
    /// as Linux leaves it, or zero) is replaced by the full checksum. False when the frame is
    /// not IPv4 TCP/UDP or is malformed; the frame is then unchanged.
    @discardableResult
    public static func completeChecksum(_ frame: inout [UInt8]) -> Bool {
        guard let view = ipv4(frame) else { return false }
        let l4 = view.payloadOffset
        let field: Int
        switch view.protocolNumber {
        case protocolUDP:
            guard view.payloadLength >= 8 else { return false }
            let length = Int(load16(frame, l4 + 4))
            guard length >= 8, length <= view.payloadLength else { return false }
            store16(udpChecksum(frame, view), &frame, l4 + 6)
            return true
        case protocolTCP:
            guard view.payloadLength >= 20 else { return false }
            field = l4 + 16
        default:
            return false
        }
        store16(0, &frame, field)
        var total = pseudoHeaderSum(frame, ip: view.offset, protocolNumber: protocolTCP, length: view.payloadLength)
        total = sum(frame, from: l4, count: view.payloadLength, into: total)
        store16(finish(total), &frame, field)
        return true
    }

    /// Writes the pseudo-header sum into the TCP/UDP checksum field, as a sender that offloads
    /// the checksum does before it sends the frame with NETTXF_csum_blank. False when the frame
    /// is not IPv4 TCP/UDP.
    @discardableResult
    public static func prepareChecksumOffload(_ frame: inout [UInt8]) -> Bool {
        guard let view = ipv4(frame) else { return false }
        let l4 = view.payloadOffset
        let field: Int
        switch view.protocolNumber {
        case protocolUDP where view.payloadLength >= 8: field = l4 + 6
        case protocolTCP where view.payloadLength >= 20: field = l4 + 16
        default: return false
        }
        var total = pseudoHeaderSum(frame, ip: view.offset, protocolNumber: view.protocolNumber, length: view.payloadLength)
        while total >> 16 != 0 { total = (total & 0xffff) + (total >> 16) }
        store16(UInt16(total), &frame, field)
        return true
    }
}
