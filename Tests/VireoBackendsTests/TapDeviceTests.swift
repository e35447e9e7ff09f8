import Foundation
import Glibc
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls
import VireoLinux

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

/// `bridge=` in a vif spec: the TAP joins a Linux bridge, as Xen's vif-bridge script does. Each
/// test runs on a thread of its own that first moves into a fresh network namespace
/// (unshare(CLONE_NEWNET) acts on the calling thread only), makes its bridge there
/// (SIOCBRADDBR), and reads the result with `ip`, spawned from that thread: the host's
/// interfaces are never touched. Root only; skipped with the reason otherwise.
@Suite(.enabled(if: tapUsable(), "needs root and /dev/net/tun"), .serialized)
struct TapBridgeTests {
    /// Runs `body` on a new thread inside a new network namespace and waits for it.
    static func inFreshNamespace(_ body: @escaping @Sendable () throws -> Void) throws {
        final class Outcome: @unchecked Sendable { var error: (any Error)?; var done = false }  // written by the thread before `done`
        let outcome = Outcome()
        let lock = NSCondition()
        let thread = Thread {
            var failure: (any Error)?
            if vireo_unshare_network() != 0 {
                failure = BackendError("unshare(CLONE_NEWNET): \(String(cString: strerror(errno)))")
            } else {
                do { try body() } catch { failure = error }
            }
            lock.withLock {
                outcome.error = failure
                outcome.done = true
                lock.broadcast()
            }
        }
        thread.start()
        lock.withLock { while !outcome.done { lock.wait() } }
        if let error = outcome.error { throw error }
    }

    /// Creates a bridge in the calling thread's namespace.
    static func addBridge(_ name: String) throws {
        let sock = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        defer { close(sock) }
        var bytes = Array(name.utf8) + [0]
        let result = bytes.withUnsafeMutableBytes { vireo_ioctl_ptr(sock, 0x89a0, $0.baseAddress) }  // SIOCBRADDBR
        guard result == 0 else { throw BackendError("SIOCBRADDBR \(name): \(String(cString: strerror(errno)))") }
    }

    /// `ip -o link show NAME`, spawned from the calling thread with posix_spawn (so in its
    /// namespace; Foundation's Process needs a loopback socket the fresh namespace lacks).
    static func link(_ name: String) throws -> String {
        var fds: [Int32] = [-1, -1]
        guard pipe(&fds) == 0 else { throw BackendError("pipe: \(String(cString: strerror(errno)))") }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_adddup2(&actions, fds[1], 1)
        posix_spawn_file_actions_adddup2(&actions, fds[1], 2)
        posix_spawn_file_actions_addclose(&actions, fds[0])
        let arguments = ["/usr/sbin/ip", "-o", "link", "show", name]
        var argv: [UnsafeMutablePointer<CChar>?] = arguments.map { strdup($0) } + [nil]
        defer { for pointer in argv { free(pointer) } }
        var pid: pid_t = 0
        let spawned = posix_spawn(&pid, "/usr/sbin/ip", &actions, nil, &argv, environ)
        close(fds[1])
        defer { close(fds[0]) }
        guard spawned == 0 else { throw BackendError("posix_spawn ip: \(String(cString: strerror(spawned)))") }
        var output: [UInt8] = []
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fds[0], $0.baseAddress, $0.count) }
            if n <= 0 { break }
            output += buffer[0..<n]
        }
        var status: Int32 = 0
        waitpid(pid, &status, 0)
        return String(decoding: output, as: UTF8.self)
    }

    @Test func theTapJoinsTheBridgeTheVifNames() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") else {
            print("TapBridgeTests: /usr/sbin/ip is missing (iproute2); the bridge is checked by the ioctl's answer only")
            return
        }
        try Self.inFreshNamespace {
            try Self.addBridge("vbr-test")
            let tap = try TapDevice(name: "vtap-test")
            #expect(!(try Self.link("vtap-test")).contains("master"), "not on a bridge yet")
            try tap.addToBridge("vbr-test")
            let shown = try Self.link("vtap-test")
            #expect(shown.contains("master vbr-test"), "\(shown)")
        }
        #expect(if_nametoindex("vtap-test") == 0 && if_nametoindex("vbr-test") == 0, "the host's namespace never saw them")
    }

    @Test func aMissingBridgeOrOneThatIsNotABridgeIsRefusedByName() throws {
        try Self.inFreshNamespace {
            let tap = try TapDevice(name: "vtap-test")
            func refusal(_ bridge: String) -> String? {
                do { try tap.addToBridge(bridge) } catch { return error.description }
                return nil
            }
            let missing = refusal("vbr-none"), loopback = refusal("lo"), bad = refusal("a/b")
            #expect(missing?.hasPrefix("bridge 'vbr-none' does not exist") == true, "\(missing ?? "accepted")")
            #expect(loopback?.hasPrefix("bridge 'lo' is not a Linux bridge") == true, "\(loopback ?? "accepted")")
            #expect(bad?.contains("a bridge name is 1 to 15 bytes") == true, "\(bad ?? "accepted")")
        }
    }
}
