import Foundation
import Testing

/// The frontend half of the core (shared regions, rings, guest event state, the granting side
/// of grant tables) is the code the guest library will compile for bare-metal guests: it must
/// import only freestanding modules and build in Embedded Swift, without SSE/MMX, as it is.
@Suite struct GuestLibraryEmbeddedTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The guest-side sources, and the modules each may import.
    static let guestSources = [
        "Sources/VireoCore/Memory/SharedRegion.swift",
        "Sources/VireoCore/Ring/RingLayout.swift",
        "Sources/VireoCore/Ring/SharedRing.swift",
        "Sources/VireoCore/Ring/ByteRing.swift",
        "Sources/VireoCore/Ring/BlkifRequest.swift",
        "Sources/VireoCore/Events/GuestEventState.swift",
        "Sources/VireoCore/Grants/GrantTableLayout.swift",
        "Sources/VireoCore/Grants/GuestGrantTable.swift",
    ]
    static let freestanding: Set<String> = ["VireoABI", "VireoHypercalls", "VireoAtomics"]

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

    @Test func guestSourcesImportOnlyFreestandingModules() throws {
        for path in Self.guestSources {
            let text = try String(contentsOf: Self.root.appendingPathComponent(path), encoding: .utf8)
            let imports = text.split(separator: "\n").filter { $0.hasPrefix("import ") }.map { String($0.dropFirst(7)) }
            #expect(Set(imports).isSubset(of: Self.freestanding), "\(path) imports \(imports)")
        }
    }

    @Test func guestSourcesCompileForBareMetal() throws {
        guard let swiftc = Self.findSwiftc() else {
            print("skipped: no swiftc on PATH")
            return
        }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-embedded-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        // SwiftPM generates VireoAtomics' module map; a guest build writes its own.
        let atomics = Self.root.appendingPathComponent("Sources/VireoAtomics/include/vireo_atomics.h").path
        try "module VireoAtomics { header \"\(atomics)\" export * }\n"
            .write(to: dir.appendingPathComponent("module.modulemap"), atomically: true, encoding: .utf8)
        let common = [
            "-target", "x86_64-unknown-none-elf", "-enable-experimental-feature", "Embedded", "-wmo", "-Osize",
            "-parse-as-library", "-Xcc", "-ffreestanding", "-Xcc", "-mno-red-zone", "-Xcc", "-mno-sse", "-Xcc", "-mno-mmx",
            "-I", Self.root.appendingPathComponent("Hypercalls/include").path, "-I", dir.path,
        ]
        func source(_ path: String) -> String { Self.root.appendingPathComponent(path).path }
        // VireoABI's identifiers, as the guest library will build them.
        let abi = try Self.swiftc(swiftc, common + [
            "-module-name", "VireoABI", "-emit-module", "-emit-module-path", dir.appendingPathComponent("VireoABI.swiftmodule").path,
            source("Sources/VireoABI/Identifiers.swift"), "-c", "-o", dir.appendingPathComponent("abi.o").path,
        ])
        #expect(abi.status == 0, "\(abi.errors)")
        // A frontend using all of it: grant the ring page, produce a request, scan events.
        let probe = dir.appendingPathComponent("probe.swift")
        try """
        import VireoABI
        import VireoHypercalls

        @_cdecl("guest_frontend_probe")
        public func probe(_ ring: UnsafeMutableRawPointer, _ table: UnsafeMutableRawPointer,
                          _ sharedInfo: UnsafeMutableRawPointer) -> UInt64 {
            var grants = GuestGrantTable(frames: [SharedRegion.unsafe(table, count: 4096)])
            guard let ref = grants.grantAccess(to: DomainID(0), frame: GuestFrame(5), readOnly: false) else { return 0 }
            guard var front = try? FrontRing<vireo_blkif_request, vireo_blkif_response>(
                initializing: SharedRegion.unsafe(ring, count: 4096)) else { return 0 }
            var request = vireo_blkif_request()
            request.id = 7
            guard (try? front.produceRequest(request)) != nil else { return 0 }
            let notify = front.pushRequestsAndCheckNotify()
            let events = GuestEventState(sharedInfo: SharedRegion.unsafe(sharedInfo, count: 4096))
            var pending: UInt64 = 0
            _ = events.scanPending(vcpu: 0) { _ in pending &+= 1 }
            let revoked = grants.endAccess(ref)
            return (notify ? 1 : 0) &+ pending &+ (revoked ? 2 : 0) &+ UInt64(ref.rawValue)
        }
        """.write(to: probe, atomically: true, encoding: .utf8)
        let guest = try Self.swiftc(swiftc, common + ["-module-name", "GuestKit", "-warnings-as-errors", probe.path]
            + Self.guestSources.map(source) + ["-c", "-o", dir.appendingPathComponent("guest.o").path])
        #expect(guest.status == 0, "\(guest.errors)")
    }
}
