import Glibc
import VireoLinux

/// A Linux TAP interface as the host side of a vif: frames the guest sends are written to it
/// (the host's kernel receives them on that interface) and frames the kernel sends out of it
/// are read for the guest. Opened through `/dev/net/tun` with IFF_TAP | IFF_NO_PI: one frame per
/// read or write, no packet-information prefix and no virtio-net header, so every frame written
/// carries a complete checksum (``transmit(_:checksum:)`` computes one the guest left blank).
/// The descriptor is non-blocking: a full kernel queue drops the frame (counted by the caller).
public final class TapDevice: NetworkAttachment, @unchecked Sendable {  // `buffer` is used only by the one thread that pumps
    /// The interface's name (the kernel's choice when none was asked for).
    public let name: String
    /// The `/dev/net/tun` descriptor (non-blocking).
    public let descriptor: Int32
    private let buffer: UnsafeMutableRawBufferPointer

    // <linux/if_tun.h> and <linux/if.h>; ifreq is 40 bytes on x86_64: the name (16), then the
    // union whose first member here is the short flags.
    private static let tunSetInterface: UInt = 0x4004_54ca  // TUNSETIFF = _IOW('T', 202, int)
    private static let interfaceTap: UInt16 = 0x0002       // IFF_TAP
    private static let noPacketInfo: UInt16 = 0x1000       // IFF_NO_PI
    private static let getFlags: UInt = 0x8913              // SIOCGIFFLAGS
    private static let setFlags: UInt = 0x8914              // SIOCSIFFLAGS
    private static let interfaceUp: UInt16 = 0x0001         // IFF_UP
    private static let nameCapacity = 16                    // IFNAMSIZ

    /// Creates the TAP `name`, or attaches to it when it exists (made by `ip tuntap add NAME
    /// mode tap`, owned by this user); an empty name lets the kernel pick `tapN`. With `up`,
    /// the interface is brought up (needs CAP_NET_ADMIN, as creating does).
    /// - Throws: ``BackendError`` naming the interface and the reason.
    public init(name: String = "", up: Bool = true) throws(BackendError) {
        guard name.utf8.count < Self.nameCapacity, !name.utf8.contains(0), !name.contains("/") else {
            throw BackendError("tap '\(name)': an interface name is 1 to 15 bytes, without '/'")
        }
        let fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC)
        guard fd >= 0 else {
            throw BackendError("tap '\(name)': cannot open /dev/net/tun: \(String(cString: strerror(errno)))")
        }
        var request = [UInt8](repeating: 0, count: 40)
        for (i, byte) in name.utf8.enumerated() { request[i] = byte }
        let flags = Self.interfaceTap | Self.noPacketInfo
        request[16] = UInt8(flags & 0xff)
        request[17] = UInt8(flags >> 8)
        let result = request.withUnsafeMutableBytes { vireo_ioctl_ptr(fd, Self.tunSetInterface, $0.baseAddress) }
        guard result == 0 else {
            let reason = String(cString: strerror(errno))
            close(fd)
            throw BackendError("tap '\(name)': TUNSETIFF failed: \(reason)")
        }
        let actual = String(decoding: request[0..<Self.nameCapacity].prefix { $0 != 0 }, as: UTF8.self)
        if up {
            do { try Self.bringUp(actual) } catch {
                close(fd)
                throw error
            }
        }
        self.name = actual
        descriptor = fd
        buffer = .allocate(byteCount: 65536, alignment: 64)
    }

    deinit {
        close(descriptor)
        buffer.deallocate()
    }

    /// Sets IFF_UP on the interface (SIOCGIFFLAGS, then SIOCSIFFLAGS).
    static func bringUp(_ name: String) throws(BackendError) {
        let sock = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard sock >= 0 else { throw BackendError("tap '\(name)': cannot open a socket to bring it up") }
        defer { close(sock) }
        var request = [UInt8](repeating: 0, count: 40)
        for (i, byte) in name.utf8.enumerated() { request[i] = byte }
        let ok = request.withUnsafeMutableBytes { bytes -> Bool in
            guard vireo_ioctl_ptr(sock, getFlags, bytes.baseAddress) == 0 else { return false }
            let flags = (UInt16(bytes[17]) << 8 | UInt16(bytes[16])) | interfaceUp
            bytes[16] = UInt8(flags & 0xff)
            bytes[17] = UInt8(flags >> 8)
            return vireo_ioctl_ptr(sock, setFlags, bytes.baseAddress) == 0
        }
        guard ok else { throw BackendError("tap '\(name)': cannot bring it up: \(String(cString: strerror(errno)))") }
    }

    /// Adds the interface to the Linux bridge `bridge`, as Xen's vif-bridge script does
    /// (`ip link set TAP master BRIDGE`): SIOCBRADDIF on the bridge with the TAP's index.
    /// Needs CAP_NET_ADMIN. - Throws: ``BackendError`` naming the bridge when it does not
    /// exist or is not a bridge, or the reason the kernel gave.
    public func addToBridge(_ bridge: String) throws(BackendError) {
        guard !bridge.isEmpty, bridge.utf8.count < Self.nameCapacity, !bridge.utf8.contains(0), !bridge.contains("/") else {
            throw BackendError("bridge '\(bridge)': a bridge name is 1 to 15 bytes, without '/'")
        }
        guard if_nametoindex(bridge) != 0 else { throw BackendError("bridge '\(bridge)' does not exist (create it: ip link add \(bridge) type bridge)") }
        let index = if_nametoindex(name)
        guard index != 0 else { throw BackendError("tap '\(name)': gone before it could join bridge '\(bridge)'") }
        let sock = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard sock >= 0 else { throw BackendError("bridge '\(bridge)': cannot open a socket: \(String(cString: strerror(errno)))") }
        defer { close(sock) }
        // ifreq: the bridge's name (16 bytes), then ifr_ifindex (an int) in the union.
        var request = [UInt8](repeating: 0, count: 40)
        for (i, byte) in bridge.utf8.enumerated() { request[i] = byte }
        withUnsafeBytes(of: Int32(bitPattern: index).littleEndian) { for i in 0..<4 { request[16 + i] = $0[i] } }
        let result = request.withUnsafeMutableBytes { vireo_ioctl_ptr(sock, Self.bridgeAddInterface, $0.baseAddress) }
        guard result == 0 else {
            let code = errno
            if code == EOPNOTSUPP || code == EINVAL || code == ENODEV {
                throw BackendError("bridge '\(bridge)' is not a Linux bridge (tap '\(name)' cannot join it: \(String(cString: strerror(code))))")
            }
            throw BackendError("bridge '\(bridge)': cannot add tap '\(name)': \(String(cString: strerror(code)))")
        }
    }

    private static let bridgeAddInterface: UInt = 0x89a2  // SIOCBRADDIF (<linux/sockios.h>)

    /// Writes one frame to the TAP, after filling in a checksum the guest left blank (a TAP
    /// without virtio-net headers passes frames to the kernel as complete). False when the
    /// kernel refused it (its queue full, the interface down).
    public func transmit(_ frame: UnsafeMutableRawBufferPointer, checksum: FrameChecksum) -> Bool {
        if checksum == .blank { ChecksumFill.fill(frame) }
        while true {
            let n = Glibc.write(descriptor, frame.baseAddress, frame.count)
            if n < 0 && errno == EINTR { continue }
            return n == frame.count
        }
    }

    public var pollDescriptor: Int32? { descriptor }

    /// Reads frames the kernel sent out of the interface until none is waiting, `limit` are
    /// read, or `deliver` refuses one. The kernel vouches for nothing: `.unknown` checksums.
    public func pump(limit: Int, deliver: (UnsafeRawBufferPointer, FrameChecksum) -> Bool) {
        var count = 0
        while count < limit {
            let n = Glibc.read(descriptor, buffer.baseAddress, buffer.count)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { return }
            count += 1
            guard n >= 14 else { continue }
            if !deliver(UnsafeRawBufferPointer(rebasing: buffer[0..<n]), .unknown) { return }
        }
    }
}
