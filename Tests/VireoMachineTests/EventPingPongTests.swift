import Foundation
import Testing
import VireoBenchmarks
import VireoCore
import VireoGuestBuilder

/// The `evtchnping` sample (what `vireo bench evtchn` times) against a host echo on a dom0 port,
/// on both engines and with both deliveries (immediate: the echo inside the guest's send; the
/// dispatcher thread: the guest polls with SCHEDOP_poll until the echo wakes it): it binds the
/// host's port named on its command line, makes its round trips and says so; the host answered
/// each of its events once.
@Suite struct EventPingPongTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func kernel() throws -> [UInt8] {
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-evtchnping-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: work) }
        let builder = GuestBuilder(repository: GuestRepository(root: root), toolchain: .standard(),
                                   workDirectory: work.appendingPathComponent("objects"))
        let image = try builder.build(directory: root.appendingPathComponent("Hypercalls/samples/evtchnping"),
                                      output: work.appendingPathComponent("evtchnping.elf"))
        return try [UInt8](Data(contentsOf: image.path))
    }

    @Test(arguments: [HostEventDomain.Delivery.immediate, .dispatcher])
    func evtchnpingMakesItsRoundTripsOnTheSoftCPU(echo: HostEventDomain.Delivery) throws {
        let run = try EventChannelBenchmark.pingPong(try Self.kernel(), on: .soft, rounds: 200, echo: echo)
        #expect(run.output.contains("evtchnping: 200 round trips ok\n"), "\(run.output)")
        #expect(!run.output.contains("FAIL"))
        #expect(run.echoed == 200, "the host echoed \(run.echoed) events")
    }

    @Test(arguments: [HostEventDomain.Delivery.immediate, .dispatcher])
    func evtchnpingMakesItsRoundTripsOnKVM(echo: HostEventDomain.Delivery) throws {
        guard access("/dev/kvm", R_OK | W_OK) == 0 else {
            print("skipped: /dev/kvm is missing or not accessible, so evtchnping is not booted on KVM")
            return
        }
        let run = try EventChannelBenchmark.pingPong(try Self.kernel(), on: .kvm, rounds: 30, echo: echo)
        #expect(run.output.contains("evtchnping: 30 round trips ok\n"), "\(run.output)")
        #expect(run.echoed == 30, "the host echoed \(run.echoed) events")
    }

    /// Without a port to bind the guest says why and crashes; it never claims its round trips.
    @Test func withoutAPortTheGuestFailsAndSaysWhy() throws {
        let kernel = try Self.kernel()
        do {
            _ = try EventChannelBenchmark.pingPong(kernel, on: .soft, rounds: 5, port: 0)
            Issue.record("the guest claimed its round trips without a port")
        } catch {
            #expect("\(error)".contains("evtchnping: FAIL no port= on the command line"), "\(error)")
            #expect("\(error)".contains("crash"), "\(error)")
        }
    }
}
