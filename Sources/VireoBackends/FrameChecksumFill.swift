/// Computes and stores the TCP or UDP checksum of an Ethernet frame whose checksum field was
/// left blank (NETTXF_csum_blank): over IPv4 (any header length, not a fragment) or IPv6 (no
/// extension headers), with or without one 802.1Q tag. The field's old value is ignored (Linux
/// leaves the pseudo-header sum there; other senders zero), and the sum is computed from scratch.
public enum ChecksumFill {
    /// Where the transport segment of a frame is, and its pseudo-header sum.
    struct Transport {
        var start: Int          // first byte of the TCP/UDP header
        var length: Int         // header + payload
        var fieldOffset: Int    // the checksum field, from `start`
        var isUDP: Bool
        var isIPv6: Bool
        var pseudoSum: UInt32   // sum of the pseudo-header's 16-bit words, unfolded
    }

    /// The TCP/UDP segment of `frame`, or nil when the frame is not one of the layouts above
    /// or its lengths do not fit the frame. `frame` may be only the frame's first bytes (at
    /// least the headers: 58 bytes cover every layout) when `frameLength` gives the whole
    /// frame's length; headers cut short by the end of `frame` give nil.
    static func locate(_ frame: UnsafeRawBufferPointer, frameLength: Int? = nil) -> Transport? {
        let frameLength = frameLength ?? frame.count
        guard frame.count >= 14, frame.count <= frameLength else { return nil }
        var l3 = 12
        var type = UInt16(frame[l3]) << 8 | UInt16(frame[l3 + 1])
        if type == 0x8100 {  // one VLAN tag
            guard frame.count >= 18 else { return nil }
            l3 = 16
            type = UInt16(frame[l3]) << 8 | UInt16(frame[l3 + 1])
        }
        l3 += 2
        func word(_ at: Int) -> UInt32 { UInt32(frame[at]) << 8 | UInt32(frame[at + 1]) }
        let proto: UInt8, start: Int, length: Int
        var sum: UInt32 = 0
        switch type {
        case 0x0800:
            guard frame.count >= l3 + 20, frame[l3] >> 4 == 4 else { return nil }
            let headerBytes = Int(frame[l3] & 0x0f) * 4
            let total = Int(word(l3 + 2))
            guard headerBytes >= 20, total >= headerBytes, l3 + total <= frameLength else { return nil }
            // A fragment (more fragments, or an offset) carries no whole segment.
            guard word(l3 + 6) & 0x3fff == 0 else { return nil }
            proto = frame[l3 + 9]
            start = l3 + headerBytes
            length = total - headerBytes
            for i in stride(from: l3 + 12, to: l3 + 20, by: 2) { sum &+= word(i) }
        case 0x86dd:
            guard frame.count >= l3 + 40, frame[l3] >> 4 == 6 else { return nil }
            proto = frame[l3 + 6]
            start = l3 + 40
            length = Int(word(l3 + 4))
            guard start + length <= frameLength else { return nil }
            for i in stride(from: l3 + 8, to: l3 + 40, by: 2) { sum &+= word(i) }
        default:
            return nil
        }
        let isUDP: Bool
        switch proto {
        case 6: isUDP = false; guard length >= 20 else { return nil }
        case 17: isUDP = true; guard length >= 8 else { return nil }
        default: return nil
        }
        sum &+= UInt32(proto)
        sum &+= UInt32(length & 0xffff) &+ UInt32(length >> 16)
        return Transport(start: start, length: length, fieldOffset: isUDP ? 6 : 16, isUDP: isUDP,
                         isIPv6: type == 0x86dd, pseudoSum: sum)
    }

    /// Whether the frame is a TCP/UDP segment over IPv6 (the csum offload keys differ per family).
    static func isIPv6(_ frame: UnsafeRawBufferPointer, frameLength: Int? = nil) -> Bool? {
        locate(frame, frameLength: frameLength).map(\.isIPv6)
    }

    /// Fills in the checksum; false (frame untouched) when the frame is not a TCP/UDP segment
    /// this can parse.
    @discardableResult
    public static func fill(_ frame: UnsafeMutableRawBufferPointer) -> Bool {
        guard let t = locate(UnsafeRawBufferPointer(frame)) else { return false }
        let field = t.start + t.fieldOffset
        frame[field] = 0
        frame[field + 1] = 0
        var result = ~foldedSum(UnsafeRawBufferPointer(frame), t)
        if t.isUDP && result == 0 { result = 0xffff }  // 0 means "no checksum" for UDP over IPv4
        frame[field] = UInt8(result >> 8)
        frame[field + 1] = UInt8(result & 0xff)
        return true
    }

    /// Whether the frame's TCP/UDP checksum is correct (for tests and diagnostics).
    public static func verify(_ frame: UnsafeRawBufferPointer) -> Bool {
        guard let t = locate(frame) else { return false }
        return foldedSum(frame, t) == 0xffff
    }

    /// The pseudo-header's sum plus the segment's 16-bit words (an odd last byte padded with
    /// zero), folded to 16 bits: RFC 1071's one's-complement sum.
    private static func foldedSum(_ frame: UnsafeRawBufferPointer, _ t: Transport) -> UInt16 {
        var sum = UInt64(t.pseudoSum)
        let end = t.start + t.length
        var i = t.start
        while i + 1 < end {
            sum &+= UInt64(frame[i]) << 8 | UInt64(frame[i + 1])
            i += 2
        }
        if i < end { sum &+= UInt64(frame[i]) << 8 }
        while sum >> 16 != 0 { sum = (sum & 0xffff) &+ (sum >> 16) }
        return UInt16(truncatingIfNeeded: sum)
    }
}
