import Foundation
import Testing

/// The ring sources (and SharedRegion, which they build on) compile for a bare-metal guest in
/// Embedded Swift as they are, so GuestKit can reuse them.
@Suite struct SharedRingEmbeddedTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    static func findSwiftc() -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        let candidates = path.split(separator: ":").map { "\($0)/swiftc" } + ["/opt/swift/usr/bin/swiftc"]
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    @Test func ringSourcesCompileInEmbeddedSwift() throws {
        guard let swiftc = Self.findSwiftc() else {
            print("skipped: no swiftc")
            return
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-embedded-ring-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir.appendingPathComponent("atomics"), withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        // SwiftPM generates VireoAtomics' module map; a guest build writes its own.
        try FileManager.default.copyItem(
            at: Self.root.appendingPathComponent("Sources/VireoAtomics/include/vireo_atomics.h"),
            to: dir.appendingPathComponent("atomics/vireo_atomics.h"))
        try "module VireoAtomics {\n  header \"vireo_atomics.h\"\n  export *\n}\n"
            .write(to: dir.appendingPathComponent("atomics/module.modulemap"), atomically: true, encoding: .utf8)
        let guest = dir.appendingPathComponent("guest.swift")
        try """
        import VireoHypercalls

        // A guest's blkif frontend: one request out, one response back.
        @_cdecl("guest_ring_probe")
        public func probe(_ base: UnsafeMutableRawPointer) -> UInt64 {
            let region = SharedRegion.unsafe(base, count: 4096)
            guard var front = try? FrontRing<vireo_blkif_request, vireo_blkif_response>(initializing: region) else {
                return 0
            }
            var request = vireo_blkif_request()
            request.id = 7
            guard (try? front.produceRequest(request)) != nil else { return 0 }
            let notify = front.pushRequestsAndCheckNotify()
            _ = try? front.finalCheckForResponses()
            let response = try? front.consumeResponse()
            return (notify ? 1 : 0) &+ (response?.id ?? 0)
        }
        """.write(to: guest, atomically: true, encoding: .utf8)

        let sources = ["Sources/VireoCore/Ring/RingLayout.swift", "Sources/VireoCore/Ring/SharedRing.swift",
                       "Sources/VireoCore/Memory/SharedRegion.swift"].map { Self.root.appendingPathComponent($0).path }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: swiftc)
        process.arguments = [
            "-target", "x86_64-unknown-none-elf", "-enable-experimental-feature", "Embedded", "-wmo", "-Osize",
            "-parse-as-library", "-module-name", "GuestKit", "-Xcc", "-ffreestanding", "-Xcc", "-mno-red-zone",
            "-Xcc", "-mno-sse", "-Xcc", "-mno-mmx", "-warnings-as-errors",
            "-I", Self.root.appendingPathComponent("Hypercalls/include").path,
            "-I", dir.appendingPathComponent("atomics").path,
            "-c", guest.path,
        ] + sources + ["-o", dir.appendingPathComponent("guest.o").path]
        let errors = Pipe()
        process.standardError = errors
        process.standardOutput = FileHandle.nullDevice
        try process.run()
        let text = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        #expect(process.terminationStatus == 0, "\(text)")
        // The ring files import nothing host-only.
        for path in sources.prefix(2) {
            let imports = try String(contentsOfFile: path, encoding: .utf8).split(separator: "\n")
                .filter { $0.hasPrefix("import ") }
            #expect(imports.allSatisfy { $0 == "import VireoHypercalls" }, "\(path): \(imports)")
        }
    }
}
