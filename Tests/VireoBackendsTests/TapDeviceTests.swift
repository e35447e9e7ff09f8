import Foundation
import Glibc
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls

/// TAP needs root (CAP_NET_ADMIN) and /dev/net/tun; without them the suite is skipped and says why.
private let tapUnavailable: String? = {
    if getuid() != 0 { return "not root: creating a TAP needs CAP_NET_ADMIN" }
    if access("/dev/net/tun", R_OK | W_OK) != 0 { return "/dev/net/tun is missing" }
    return nil
}()

private func tapUsable() -> Bool {
    if let reason = tapUnavailable { print("TapDeviceTests skipped: \(reason)") }
    return tapUnavailable == nil
}

/// A raw AF_PACKET socket on one interface: sees every frame the kernel receives on it and sends
/// frames out of it (for a TAP: into the TAP's descriptor).
private final class PacketSocket {
    let fd: Int32
    let index: Int32

    init(interface: String) throws {
        index = Int32(if_nametoindex(interface))
        guard index > 0 else { throw BackendError("no interface \(interface)") }
        let all = UInt16(0x0003).bigEndian  // ETH_P_ALL
        fd = socket(AF_PACKET, Int32(SOCK_RAW.rawValue) | Int32(SOCK_NONBLOCK.rawValue), Int32(all))
        guard fd >= 0 else { throw BackendError("AF_PACKET socket: \(String(cString: strerror(errno)))") }
        var address = Self.address(index: index, protocol: all)
        let bound = address.withUnsafeMutableBytes {
            bind(fd, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
        }
        guard bound == 0 else { throw BackendError("bind: \(String(cString: strerror(errno)))") }
    }

    deinit { close(fd) }

    /// struct sockaddr_ll: family, protocol (network order), ifindex, hatype, pkttype, halen, addr[8].
    static func address(index: Int32, protocol: UInt16) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 20)
        let family = UInt16(AF_PACKET)
        bytes[0] = UInt8(family & 0xff)
        bytes[1] = UInt8(family >> 8)
        withUnsafeBytes(of: `protocol`) { bytes[2] = $0[0]; bytes[3] = $0[1] }
        withUnsafeBytes(of: index) { for i in 0..<4 { bytes[4 + i] = $0[i] } }
        bytes[11] = 6
        return bytes
    }

    func send(_ frame: [UInt8]) -> Bool {
        var address = Self.address(index: index, protocol: 0)
        let n = frame.withUnsafeBytes { data in
            address.withUnsafeMutableBytes {
                sendto(fd, data.baseAddress, data.count, 0, $0.baseAddress!.assumingMemoryBound(to: sockaddr.self), socklen_t($0.count))
            }
        }
        return n == frame.count
    }

    /// The next frame with `etherType`, within `timeout` seconds.
    func receive(etherType: UInt16, timeout: Double) -> [UInt8]? {
        let deadline = Date().addingTimeInterval(timeout)
        var buffer = [UInt8](repeating: 0, count: 65536)
        while Date() < deadline {
            var poller = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            _ = poll(&poller, 1, 50)
            let n = recv(fd, &buffer, buffer.count, 0)
            if n >= 14, UInt16(buffer[12]) << 8 | UInt16(buffer[13]) == etherType { return Array(buffer[0..<n]) }
        }
        return nil
    }
}

@Suite(.enabled(if: tapUsable(), "needs root and /dev/net/tun"), .serialized)
struct TapDeviceTests {
    /// A fresh interface name per test (IFNAMSIZ allows 15 bytes).
    static func name(_ tag: String) -> String { "vireo\(tag)\(getpid() % 100000)" }

    @Test func framesCrossBetweenASimulatedFrontendAndATap() throws {
        let tap = try TapDevice(name: Self.name("t"))
        #expect(tap.name == Self.name("t"))
        let socket = try PacketSocket(interface: tap.name)
        let rig = try NetRig()
        let vif = try rig.vif(1)
        vif.backend.attach(tap)
        try vif.connect()
        try vif.postReceive(64)

        // Guest -> TAP: the kernel receives the frame on the interface, as sent.
        let peer = EthernetAddress(0x02, 0, 0, 0, 0, 0x42)
        let frame = ethernetFrame(to: peer, from: vif.mac, payload: 200, seed: 4)
        try vif.send(frame, id: 1)
        vif.backend.poll()
        #expect(try vif.takeTransmitted().map(\.status) == [rspOkay])
        #expect(socket.receive(etherType: 0x88B5, timeout: 5) == frame)

        // A blank checksum is completed before the frame reaches the kernel.
        var udp = ipv4Frame(to: peer, from: vif.mac, payload: 64, checksumField: 0x7777)
        try vif.send(udp, id: 2, flags: VIREO_NETTXF_csum_blank | VIREO_NETTXF_data_validated)
        vif.backend.poll()
        let seen = try #require(socket.receive(etherType: 0x0800, timeout: 5))
        #expect(seen.withUnsafeBytes { ChecksumFill.verify($0) })
        udp[40] = seen[40]
        udp[41] = seen[41]
        #expect(seen == udp, "only the checksum changed")

        // TAP -> guest: a frame the kernel sends out of the interface lands in a posted page.
        let reply = ethernetFrame(to: vif.mac, from: peer, payload: 300, seed: 8)
        #expect(socket.send(reply))
        var got: [[UInt8]] = []
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline, !got.contains(reply) {
            vif.backend.poll()
            got += try vif.takeReceived().map(\.bytes)  // the kernel may send its own frames too
            usleep(2000)
        }
        #expect(got.contains(reply))
        #expect(vif.backend.statistics.rxPackets >= 1)
    }

    @Test func aSwitchWithATapUplinkReachesItsVifs() throws {
        let tap = try TapDevice(name: Self.name("u"))
        let socket = try PacketSocket(interface: tap.name)
        let rig = try NetRig()
        let fabric = NetworkSwitch(name: "uplinked")
        let vif = try rig.vif(1)
        fabric.connect(vif.backend)
        let uplink = try fabric.connect(tap: tap)
        defer { uplink.stop() }
        try vif.connect()
        try vif.postReceive(64)
        let peer = EthernetAddress(0x02, 0, 0, 0, 0, 0x43)
        let frame = ethernetFrame(to: peer, from: vif.mac, payload: 90, seed: 1)
        try vif.send(frame, id: 1)
        vif.backend.poll()
        #expect(socket.receive(etherType: 0x88B5, timeout: 5) == frame, "flooded to the uplink")
        let reply = ethernetFrame(to: vif.mac, from: peer, payload: 90, seed: 2)
        #expect(socket.send(reply))
        var got: [[UInt8]] = []
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline, !got.contains(reply) {
            vif.backend.poll()
            got += try vif.takeReceived().map(\.bytes)
            usleep(2000)
        }
        #expect(got.contains(reply), "the uplink thread read it into the switch, which knew the vif's address")
    }

    @Test func badNamesAreRefusedByName() {
        #expect(throws: BackendError.self) { try TapDevice(name: "a-name-far-too-long-for-linux") }
        #expect(throws: BackendError.self) { try TapDevice(name: "bad/name") }
    }
}
