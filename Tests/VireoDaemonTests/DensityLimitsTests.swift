import Foundation
import Testing
import VireoABI
@testable import VireoDaemon

/// What a thousand live domains need of the daemon: one copy of a kernel file however many
/// domains boot it, and enough of dom0's event-channel ports (two per idle domain: its store
/// and its console) for more than the 511 domains a guest's default 1024 ports allowed.
@Suite(.serialized) struct DensityLimitsTests {
    @Test func domainsBootingOneUnchangedKernelShareOneCopy() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireod-kernel-\(UUID().uuidString.prefix(8))")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let daemon = try Daemon(options: .init(stateDirectory: directory.appendingPathComponent("state")))
        defer { daemon.stop() }
        let path = directory.appendingPathComponent("k.elf").path
        #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: 0x90, count: 4096)))
        let first = try #require(daemon.kernelImage(path))
        let second = try #require(daemon.kernelImage(path))
        #expect(first === second, "one copy for both")
        #expect(first.bytes.count == 4096)
        // The file changes (another size): the next domain gets the new bytes.
        #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: 0xCC, count: 8192)))
        let changed = try #require(daemon.kernelImage(path))
        #expect(changed !== first && changed.bytes.count == 8192 && changed.bytes.first == 0xCC)
        #expect(daemon.kernelImage(directory.appendingPathComponent("none.elf").path) == nil)
        #expect(daemon.kernelImage(directory.path) == nil, "a directory is no kernel")
    }

    @Test func dom0HasPortsForAThousandDomains() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireod-ports-\(UUID().uuidString.prefix(8))")
        defer { try? FileManager.default.removeItem(at: directory) }
        let daemon = try Daemon(options: .init(stateDirectory: directory.appendingPathComponent("state")))
        defer { daemon.stop() }
        var ports: [EventPort] = []
        for domain in 1...1000 {
            for _ in 0..<2 { ports.append(try daemon.host.host.allocUnbound(remote: DomainID(UInt16(domain)))) }
        }
        #expect(Set(ports).count == 2000)
        for port in ports { try daemon.host.host.close(port) }
    }
}
