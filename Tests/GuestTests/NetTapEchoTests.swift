import Foundation
import Glibc
import Testing

/// End to end on KVM: the `netecho` sample guest (GuestKit's NetFrontend) behind `vireo run
/// --net tap:NAME`, reached from the host's own network stack. The host gives the TAP an
/// address, sends UDP datagrams to the guest and gets them echoed: ARP, the vif handshake, both
/// rings and the TAP, all real. Needs /dev/kvm, root, /dev/net/tun and the netecho sample
/// (it lands with GuestKit's network frontend); skipped with the reason printed otherwise.
@Suite(.serialized) struct NetTapEchoTests {
    static func unavailable() -> String? {
        if !GuestSupport.kvmAvailable() { return "/dev/kvm is missing" }
        if getuid() != 0 { return "not root (a TAP needs CAP_NET_ADMIN)" }
        if access("/dev/net/tun", R_OK | W_OK) != 0 { return "/dev/net/tun is missing" }
        let sample = GuestSupport.root.appendingPathComponent("Hypercalls/samples/netecho").path
        if !FileManager.default.fileExists(atPath: sample) { return "the netecho sample is not in this tree" }
        return nil
    }

    @Test func udpFromTheHostIsEchoedByAGuestBehindATap() throws {
        if let reason = Self.unavailable() {
            print("netecho over a TAP skipped: \(reason)")
            return
        }
        let tap = "vireoecho\(getpid() % 10000)"
        let subnet = 100 + Int(getpid() % 100)  // 10.<subnet>.0.0/24, unlikely to be in use
        let kernel = try GuestSupport.image("netecho").path.path
        let directory = GuestSupport.temporaryDirectory("netecho")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let out = directory.appendingPathComponent("out")
        _ = FileManager.default.createFile(atPath: out.path, contents: nil)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: GuestSupport.vireo)
        process.arguments = ["run", kernel, "--engine", "kvm", "--net", "tap:\(tap)",
                             "--cmdline", "ip=10.\(subnet).0.2 count=3"]
        process.standardInput = FileHandle.nullDevice
        process.standardOutput = try FileHandle(forWritingTo: out)
        process.standardError = try FileHandle(forWritingTo: out)
        try process.run()
        defer {
            if process.isRunning { process.terminate() }
            process.waitUntilExit()
        }
        // The TAP appears once vireo has opened it; give it the host's address.
        let appear = Date().addingTimeInterval(30)
        while if_nametoindex(tap) == 0 && Date() < appear && process.isRunning { usleep(20_000) }
        try #require(if_nametoindex(tap) != 0, "the TAP \(tap) never appeared")
        let ip = Process()
        ip.executableURL = URL(fileURLWithPath: "/usr/sbin/ip")
        ip.arguments = ["addr", "add", "10.\(subnet).0.1/24", "dev", tap]
        try ip.run()
        ip.waitUntilExit()
        try #require(ip.terminationStatus == 0, "ip addr add failed")

        let sock = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        try #require(sock >= 0)
        defer { close(sock) }
        var peer = sockaddr_in()
        peer.sin_family = sa_family_t(AF_INET)
        peer.sin_port = UInt16(7).bigEndian
        _ = inet_pton(AF_INET, "10.\(subnet).0.2", &peer.sin_addr)
        var echoed: [String] = []
        let deadline = Date().addingTimeInterval(60)
        for i in 0..<2 {
            let message = "vireo echo \(i)"
            while Date() < deadline {
                let sent = message.withCString { text in
                    withUnsafePointer(to: &peer) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                            sendto(sock, text, strlen(text), 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                        }
                    }
                }
                #expect(sent == message.utf8.count)
                var poller = pollfd(fd: sock, events: Int16(POLLIN), revents: 0)
                if poll(&poller, 1, 2000) > 0 {
                    var buffer = [UInt8](repeating: 0, count: 2048)
                    let n = recv(sock, &buffer, buffer.count, 0)
                    if n > 0 { echoed.append(String(decoding: buffer[0..<n], as: UTF8.self)) }
                    break
                }
            }
        }
        #expect(echoed == ["vireo echo 0", "vireo echo 1"])
        // count=3: the ARP answer and two echoes, then the guest powers off.
        let end = Date().addingTimeInterval(30)
        while process.isRunning && Date() < end { usleep(20_000) }
        let output = (try? String(contentsOf: out, encoding: .utf8)) ?? ""
        #expect(!process.isRunning, "netecho did not power off: \(output)")
        if !process.isRunning { #expect(process.terminationStatus == 0, "\(output)") }
        #expect(output.contains("netecho: vif0 connected"), "\(output)")
        #expect(output.contains("netecho: done"), "\(output)")
    }
}
