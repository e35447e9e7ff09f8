import Foundation
import Testing

/// The guest's half of the event channel ABI must build for a bare-metal guest: Embedded Swift,
/// freestanding, no SSE/MMX, with only SharedRegion, the C headers and VireoABI's identifiers.
@Suite struct GuestEventStateEmbeddedTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func findSwiftc() -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let candidates = path.split(separator: ":").map { "\($0)/swiftc" } + ["/opt/swift/usr/bin/swiftc"]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    static func swiftc(_ swiftc: String, _ arguments: [String]) throws -> (status: Int32, errors: String) {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-swiftc-\(UUID().uuidString).log")
        _ = FileManager.default.createFile(atPath: log.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: log) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: swiftc)
        process.arguments = arguments
        process.standardOutput = try FileHandle(forWritingTo: log)
        process.standardError = process.standardOutput
        try process.run()
        process.waitUntilExit()
        return (process.terminationStatus, (try? String(contentsOf: log, encoding: .utf8)) ?? "")
    }

    @Test func guestEventStateImportsOnlyFreestandingModules() throws {
        let text = try String(
            contentsOf: Self.root.appendingPathComponent("Sources/VireoCore/Events/GuestEventState.swift"), encoding: .utf8)
        let imports = text.split(separator: "\n").filter { $0.hasPrefix("import ") }.map { $0.dropFirst(7) }
        #expect(Set(imports).isSubset(of: ["VireoABI", "VireoHypercalls", "VireoAtomics"]), "\(imports)")
    }

    @Test func guestEventStateCompilesForBareMetal() throws {
        guard let swiftc = Self.findSwiftc() else {
            print("skipped: no swiftc on PATH")
            return
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-embedded-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let atomics = Self.root.appendingPathComponent("Sources/VireoAtomics/include/vireo_atomics.h").path
        try "module VireoAtomics { header \"\(atomics)\" export * }\n"
            .write(to: dir.appendingPathComponent("module.modulemap"), atomically: true, encoding: .utf8)
        let common = [
            "-target", "x86_64-unknown-none-elf", "-enable-experimental-feature", "Embedded", "-wmo", "-Osize",
            "-parse-as-library", "-Xcc", "-ffreestanding", "-Xcc", "-mno-red-zone", "-Xcc", "-mno-sse", "-Xcc", "-mno-mmx",
            "-I", Self.root.appendingPathComponent("Hypercalls/include").path, "-I", dir.path,
        ]
        func source(_ path: String) -> String { Self.root.appendingPathComponent(path).path }
        // VireoABI's identifiers (EventPort), as the guest library will build them.
        let abi = try Self.swiftc(swiftc, common + [
            "-module-name", "VireoABI", "-emit-module", "-emit-module-path", dir.appendingPathComponent("VireoABI.swiftmodule").path,
            source("Sources/VireoABI/Identifiers.swift"), "-c", "-o", dir.appendingPathComponent("abi.o").path,
        ])
        #expect(abi.status == 0, "\(abi.errors)")
        let guest = try Self.swiftc(swiftc, common + [
            "-module-name", "GuestEvents",
            source("Sources/VireoCore/Memory/SharedRegion.swift"), source("Sources/VireoCore/Events/GuestEventState.swift"),
            "-c", "-o", dir.appendingPathComponent("guest.o").path,
        ])
        #expect(guest.status == 0, "\(guest.errors)")
    }
}
