import Foundation
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoGuestBuilder
import VireoHypervisor
import VireoMachine

/// Two real guests on one embedded host, connected by Vireo's in-process switch: `netecho`
/// answering at 10.0.0.2, and a second `netecho` at 10.0.0.3 that resolves it by ARP and pings
/// it. Both vifs are netback ports of one NetworkSwitch; every frame crosses two netbacks, the
/// switch and both guests' NetFrontends on KVM. The asker grants its pages once and has its
/// backend hold them (static grants, over the control ring); the answerer grants per packet.
@Suite struct TwoGuestsOnASwitchTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    @Test func twoNetechoGuestsPingEachOtherOverTheSwitch() throws {
        guard access("/dev/kvm", R_OK | W_OK) == 0 else {
            print("skipped: /dev/kvm is missing or not accessible, so the two guests are not booted")
            return
        }
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-switch-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: work) }
        let builder = GuestBuilder(repository: GuestRepository(root: Self.root), toolchain: .standard(),
                                   workDirectory: work.appendingPathComponent("objects"))
        let image = try builder.build(directory: Self.root.appendingPathComponent("Hypercalls/samples/netecho"),
                                      output: work.appendingPathComponent("netecho.elf"))
        let kernel = try [UInt8](Data(contentsOf: image.path))

        let host = try EmbeddedHost()
        defer { host.shutdown() }
        let lan = try NetworkSpec(parsing: "switch:lan")
        let outputs = Mutex<[[UInt8]]>([[], []])
        let outcomes = Mutex<[Int: EmbeddedHost.Outcome]>([:])
        let failures = Mutex<[String]>([])
        // The answering guest stops after the asker's ARP request and three echo requests.
        let guests = [(name: "echo", cmdline: "ip=10.0.0.2 count=4"), (name: "asker", cmdline: "ip=10.0.0.3 ping=10.0.0.2 pings=3 grants=static")]
        var threads: [Thread] = []
        for (index, guest) in guests.enumerated() {
            let thread = Thread {
                do {
                    let outcome = try host.run(config: DomainConfig(id: DomainID(UInt16(index + 1)), name: guest.name, memoryBytes: 32 << 20),
                                               kernel: kernel, commandLine: guest.cmdline, networks: [lan]) { bytes in
                        outputs.withLock { $0[index] += bytes }
                    }
                    outcomes.withLock { $0[index] = outcome }
                } catch {
                    failures.withLock { $0.append("\(guest.name): \(error)") }
                }
            }
            thread.start()
            threads.append(thread)
        }
        let deadline = Date().addingTimeInterval(120)
        while threads.contains(where: { !$0.isFinished }) && Date() < deadline { usleep(20_000) }
        let echo = String(decoding: outputs.withLock { $0[0] }, as: UTF8.self)
        let asker = String(decoding: outputs.withLock { $0[1] }, as: UTF8.self)
        #expect(failures.withLock { $0 }.isEmpty, "\(failures.withLock { $0 })")
        #expect(!threads.contains(where: { !$0.isFinished }), "a guest did not finish: \(echo)\n\(asker)")
        #expect(asker.contains("netecho: ping 10.0.0.2: 3/3 replies\n"), "\(asker)")
        #expect(asker.contains(", static grants held\n"), "\(asker)")
        #expect(!echo.contains("static grants"), "\(echo)")
        #expect(echo.contains("netecho: done, ") && echo.contains(" arp 1 icmp 3 "), "\(echo)")
        #expect(outcomes.withLock { $0[0]?.reason } == .poweroff && outcomes.withLock { $0[1]?.reason } == .poweroff)
    }
}
