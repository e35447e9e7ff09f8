import Foundation
import VireoBench
import VireoGuestBuilder
import VireoHypervisor

/// Sample guests the benchmarks boot: taken from `.build/guests/` under the current directory
/// (what `vireo guest build --samples` writes), built there first if missing.
enum BenchmarkGuests {
    static func image(_ name: String, benchmark: String, log: (String) -> Void) throws -> [UInt8] {
        let root = URL(fileURLWithPath: FileManager.default.currentDirectoryPath)
        let path = root.appendingPathComponent(".build/guests/\(name).elf")
        if let bytes = FileManager.default.contents(atPath: path.path) { return Array(bytes) }
        guard FileManager.default.fileExists(atPath: root.appendingPathComponent("Hypercalls/samples/\(name)").path) else {
            throw BenchmarkError.unavailable(
                name: benchmark, reason: "no \(path.path) and no Hypercalls/samples/\(name) here: run from the repository")
        }
        log("\(benchmark): building the sample guests (vireo guest build --samples)")
        let builder = GuestBuilder(repository: GuestRepository(root: root), toolchain: .standard(),
                                   workDirectory: root.appendingPathComponent(".build/guests/obj"))
        do { _ = try builder.buildSamples(into: root.appendingPathComponent(".build/guests")) } catch {
            throw BenchmarkError.unavailable(name: benchmark, reason: "building the sample guests failed: \(error)")
        }
        guard let bytes = FileManager.default.contents(atPath: path.path) else {
            throw BenchmarkError.unavailable(name: benchmark, reason: "\(path.path) was not built")
        }
        return Array(bytes)
    }
}
