import Foundation
import Testing
import VireoBenchmarks
import VireoGuestBuilder

/// The `evtchnping` sample (what `vireo bench evtchn` times) against a host echo on dom0's
/// event dispatcher, on both engines: it binds the host's port named on its command line,
/// makes its round trips and says so; the host answered each of its events once.
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

    @Test func evtchnpingMakesItsRoundTripsOnTheSoftCPU() throws {
        let run = try EventChannelBenchmark.pingPong(try Self.kernel(), on: .soft, rounds: 200)
        #expect(run.output.contains("evtchnping: 200 round trips ok\n"), "\(run.output)")
        #expect(!run.output.contains("FAIL"))
        #expect(run.echoed == 200, "the host echoed \(run.echoed) events")
    }

    @Test func evtchnpingMakesItsRoundTripsOnKVM() throws {
        guard access("/dev/kvm", R_OK | W_OK) == 0 else {
            print("skipped: /dev/kvm is missing or not accessible, so evtchnping is not booted on KVM")
            return
        }
        let run = try EventChannelBenchmark.pingPong(try Self.kernel(), on: .kvm, rounds: 30)
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
