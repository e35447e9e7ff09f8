import Glibc

/// An Ethernet (MAC) address.
public struct EthernetAddress: Hashable, Sendable, CustomStringConvertible {
    public var bytes: (UInt8, UInt8, UInt8, UInt8, UInt8, UInt8)

    public init(_ b0: UInt8, _ b1: UInt8, _ b2: UInt8, _ b3: UInt8, _ b4: UInt8, _ b5: UInt8) {
        bytes = (b0, b1, b2, b3, b4, b5)
    }

    /// The address in the first six bytes of `buffer` (which must hold six).
    public init(_ buffer: UnsafeRawBufferPointer, at offset: Int = 0) {
        precondition(offset >= 0 && offset + 6 <= buffer.count, "an Ethernet address needs six bytes")
        bytes = (buffer[offset], buffer[offset + 1], buffer[offset + 2], buffer[offset + 3], buffer[offset + 4], buffer[offset + 5])
    }

    /// Parses "aa:bb:cc:dd:ee:ff" (hex, either case); nil for anything else.
    public init?(parsing text: String) {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        var values: [UInt8] = []
        for part in parts {
            guard part.utf8.count == 2, let value = UInt8(part, radix: 16) else { return nil }
            values.append(value)
        }
        self.init(values[0], values[1], values[2], values[3], values[4], values[5])
    }

    /// The address `vireo` gives a vif that was given none: Xen's 00:16:3e prefix with the
    /// locally-administered bit set (02:16:3e, so it can never clash with an address Xen's own
    /// tools hand out from their OUI), then the frontend's domain ID (two bytes) and the low
    /// byte of the vif handle. Unique per (domain, handle) while handles stay below 256.
    public static func generated(domain: UInt16, handle: UInt32) -> EthernetAddress {
        EthernetAddress(0x02, 0x16, 0x3e, UInt8(domain >> 8), UInt8(domain & 0xff), UInt8(truncatingIfNeeded: handle))
    }

    public static let broadcast = EthernetAddress(0xff, 0xff, 0xff, 0xff, 0xff, 0xff)

    /// Group (multicast or broadcast) addresses have the low bit of the first byte set.
    public var isMulticast: Bool { bytes.0 & 1 != 0 }

    /// The address as a 48-bit number (first byte most significant): a cheap table key.
    public var key: UInt64 {
        UInt64(bytes.0) << 40 | UInt64(bytes.1) << 32 | UInt64(bytes.2) << 24
            | UInt64(bytes.3) << 16 | UInt64(bytes.4) << 8 | UInt64(bytes.5)
    }

    public var description: String {
        [bytes.0, bytes.1, bytes.2, bytes.3, bytes.4, bytes.5]
            .map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined(separator: ":")
    }

    public static func == (a: EthernetAddress, b: EthernetAddress) -> Bool { a.key == b.key }
    public func hash(into hasher: inout Hasher) { hasher.combine(key) }
}

/// What is known about a frame's TCP/UDP checksum as it crosses the host side: the meaning of
/// netif's NETTXF_csum_blank / NETTXF_data_validated on transmit and NETRXF_* on receive.
public struct FrameChecksum: Hashable, Sendable {
    public let rawValue: UInt8
    /// Nothing is known: the receiver verifies it (a frame from a TAP).
    public static let unknown = FrameChecksum(rawValue: 0)
    /// The data is known to be intact (the sender checked or computed the checksum).
    public static let validated = FrameChecksum(rawValue: 1)
    /// The TCP/UDP checksum field was never filled in (checksum offload): whoever delivers the
    /// frame beyond a receiver that accepts blank checksums must compute it first.
    public static let blank = FrameChecksum(rawValue: 2)
}

/// The host side of one vif: where frames the guest transmits go, and optionally a descriptor
/// the vif's service loop polls for frames coming the other way (a TAP). A switch port, a TAP
/// device and a test's capture all conform.
public protocol NetworkAttachment: AnyObject, Sendable {
    /// A frame the guest sent (a whole Ethernet frame, 14 to 65535 bytes). The buffer is the
    /// backend's and valid only during the call; the attachment may rewrite it in place (to
    /// fill in a blank checksum). Returns false when the frame was dropped (the guest then gets
    /// NETIF_RSP_DROPPED).
    func transmit(_ frame: UnsafeMutableRawBufferPointer, checksum: FrameChecksum) -> Bool

    /// A non-blocking descriptor that becomes readable when frames wait for the guest, or nil
    /// when frames arrive by ``NetBackend/receive(_:checksum:)`` instead.
    var pollDescriptor: Int32? { get }

    /// Called by the backend's loop when ``pollDescriptor`` is readable and its receive queue
    /// has room: reads at most `limit` frames without blocking and hands each to `deliver`
    /// (which copies it); stops early when `deliver` returns false (the queue is full).
    func pump(limit: Int, deliver: (UnsafeRawBufferPointer, FrameChecksum) -> Bool)
}

extension NetworkAttachment {
    public var pollDescriptor: Int32? { nil }
    public func pump(limit: Int, deliver: (UnsafeRawBufferPointer, FrameChecksum) -> Bool) {}
}
