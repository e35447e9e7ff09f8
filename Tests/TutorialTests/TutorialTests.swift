import Foundation
import Synchronization
import Testing
import VireoABI
import VireoBackends
import VireoGuestBuilder
import VireoHypervisor
import VireoMachine

/// Docs/writing-a-driver.md adds a device, "vrng", end to end: its frontend guest
/// (Docs/tutorial/vrng/main.swift) and its backend (RandomDevice.swift here) are the files the
/// page shows, and this suite builds the guest and runs it on KVM with the backend.
@Suite struct TutorialTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    @Test func thePageShowsTheFilesTheTestRuns() throws {
        let page = try String(contentsOf: Self.root.appendingPathComponent("Docs/writing-a-driver.md"), encoding: .utf8)
        for file in ["Docs/tutorial/vrng/main.swift", "Tests/TutorialTests/RandomDevice.swift"] {
            let text = try String(contentsOf: Self.root.appendingPathComponent(file), encoding: .utf8)
            #expect(page.contains("```swift\n" + text + "```\n"), "Docs/writing-a-driver.md does not show \(file) as it is")
        }
    }

    @Test func theGuestGetsTheBackendsBytesOnKVM() throws {
        guard access("/dev/kvm", R_OK | W_OK) == 0 else {
            print("skipped: /dev/kvm is missing or not accessible, so the tutorial's guest is not booted")
            return
        }
        let work = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-tutorial-\(UUID().uuidString)")
        defer { try? FileManager.default.removeItem(at: work) }
        let builder = GuestBuilder(repository: GuestRepository(root: Self.root), toolchain: .standard(),
                                   workDirectory: work.appendingPathComponent("objects"))
        let image = try builder.build(directory: Self.root.appendingPathComponent("Docs/tutorial/vrng"),
                                      output: work.appendingPathComponent("vrng.elf"))
        let kernel = try [UInt8](Data(contentsOf: image.path))

        // The host program of the page's last step, with a counting source instead of random bytes.
        let host = try EmbeddedHost()
        defer { host.shutdown() }
        let config = DomainConfig(id: DomainID(1), name: "vrng", memoryBytes: 16 << 20)
        let next = Mutex<UInt8>(0)
        let device = RandomDevice { buffer in
            next.withLock { value in
                for i in buffer.indices {
                    buffer[i] = value
                    value &+= 1
                }
            }
        }
        let backend = try XenbusBackend(device, frontend: config.id, handle: 0, store: host.store, grants: host.grants,
                                        host: host.host)
        let console = Mutex<[UInt8]>([])
        let outcome = try host.run(config: config, kernel: kernel, commandLine: "", devices: [backend]) { bytes in
            console.withLock { $0 += bytes }
        }
        let text = String(decoding: console.withLock { $0 }, as: UTF8.self)
        #expect(outcome.reason == .poweroff, "\(text)\n\(outcome.failure ?? "")")
        #expect(text.contains("vrng: connected to /local/domain/0/backend/vrng/1/0\n"), "\(text)")
        #expect(text.contains("vrng: 16 bytes: 000102030405060708090a0b0c0d0e0f\n"), "\(text)")
        #expect(text.contains("vrng: 16 bytes: 101112131415161718191a1b1c1d1e1f\n"), "\(text)")
        #expect(text.contains("vrng: done\n"), "\(text)")
        #expect(backend.connections == 1)
        #expect(backend.lastFailure == nil)
    }
}
