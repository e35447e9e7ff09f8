import Foundation

/// Where the guest runtime, the ABI headers and the sample guests live in a Vireo checkout.
public struct GuestRepository: Sendable, Equatable {
    public let root: URL

    public init(root: URL) { self.root = root.standardizedFileURL }

    public var abiHeaders: URL { root.appendingPathComponent("Hypercalls/include") }
    public var runtime: URL { root.appendingPathComponent("Hypercalls/runtime") }
    public var runtimeHeaders: URL { runtime.appendingPathComponent("include") }
    public var linkerScript: URL { runtime.appendingPathComponent("guest.ld") }
    public var samples: URL { root.appendingPathComponent("Hypercalls/samples") }
    /// GuestKit's sources (Docs/guestkit.md), compiled into a guest that imports GuestKit.
    public var guestKit: URL { root.appendingPathComponent("Sources/GuestKit") }
    /// The bare-metal platform GuestKit runs on in a guest image.
    public var guestKitPlatform: URL { runtime.appendingPathComponent("swift/PVHPlatform.swift") }
    /// The guest-side core GuestKit is built on (freestanding: GuestLibraryEmbeddedTests).
    public var guestCoreSources: [URL] {
        ["Memory/SharedRegion.swift", "Ring/RingLayout.swift", "Ring/SharedRing.swift", "Ring/ByteRing.swift", "Ring/BlkifRequest.swift",
         "Events/GuestEventState.swift", "Grants/GrantTableLayout.swift", "Grants/GuestGrantTable.swift"]
            .map { root.appendingPathComponent("Sources/VireoCore/\($0)") }
    }
    /// VireoABI's typed identifiers (DomainID, EventPort, GrantRef...), the part a guest uses.
    public var abiIdentifiers: URL { root.appendingPathComponent("Sources/VireoABI/Identifiers.swift") }
    public var atomicsHeader: URL { root.appendingPathComponent("Sources/VireoAtomics/include/vireo_atomics.h") }
    /// Where `vireo guest build --samples` puts `NAME.elf` (DESIGN.md's interface).
    public var samplesOutput: URL { root.appendingPathComponent(".build/guests") }

    /// The repository holding `start`, found by walking up to the directory with the runtime.
    public static func locate(from start: URL) throws(GuestBuildError) -> GuestRepository {
        var directory = start.standardizedFileURL
        while true {
            let candidate = GuestRepository(root: directory)
            if FileManager.default.fileExists(atPath: candidate.linkerScript.path) { return candidate }
            let parent = directory.deletingLastPathComponent()
            if parent.path == directory.path { throw .repositoryNotFound(searchedFrom: start.path) }
            directory = parent
        }
    }

    /// This checkout, as compiled into the builder: the fallback when the working directory
    /// is outside any checkout.
    public static var compiledIn: GuestRepository? {
        try? locate(from: URL(fileURLWithPath: #filePath).deletingLastPathComponent())
    }

    /// The sample guests: every directory under Hypercalls/samples, by name.
    public func sampleNames() throws(GuestBuildError) -> [String] {
        let entries: [String]
        do {
            entries = try FileManager.default.contentsOfDirectory(atPath: samples.path)
        } catch {
            throw .fileSystem(path: samples.path, reason: "cannot list the samples (\(error.localizedDescription))")
        }
        return entries.filter { name in
            var isDirectory: ObjCBool = false
            let path = samples.appendingPathComponent(name).path
            return FileManager.default.fileExists(atPath: path, isDirectory: &isDirectory) && isDirectory.boolValue
        }.sorted()
    }
}

/// The three tools a guest build runs: swiftc (Embedded Swift), clang (C and the boot stub),
/// ld.lld (the link). They ship together in the Swift toolchain.
public struct GuestToolchain: Sendable, Equatable {
    /// The directories searched, in order.
    public let searchDirectories: [String]

    public init(searchDirectories: [String]) { self.searchDirectories = searchDirectories }

    /// The directory of `swift` on PATH (symlinks resolved), then /opt/swift/usr/bin: the tools
    /// come from one toolchain, never a mix with a system clang. `VIREO_TOOLCHAIN=DIR` goes first.
    public static func standard(environment: [String: String] = ProcessInfo.processInfo.environment) -> GuestToolchain {
        var directories: [String] = []
        if let pinned = environment["VIREO_TOOLCHAIN"], !pinned.isEmpty { directories.append(pinned) }
        let path = (environment["PATH"] ?? "").split(separator: ":").map(String.init).filter { !$0.isEmpty }
        for directory in path {
            let swift = URL(fileURLWithPath: directory).appendingPathComponent("swift")
            if FileManager.default.isExecutableFile(atPath: swift.path) {
                directories.append(swift.resolvingSymlinksInPath().deletingLastPathComponent().path)
                break
            }
        }
        directories.append("/opt/swift/usr/bin")
        var seen = Set<String>()
        return GuestToolchain(searchDirectories: directories.filter { seen.insert($0).inserted })
    }

    /// The full path of `name`, or `.missingTool` naming it and where the builder looked.
    public func tool(_ name: String) throws(GuestBuildError) -> String {
        for directory in searchDirectories {
            let path = URL(fileURLWithPath: directory).appendingPathComponent(name).path
            if FileManager.default.isExecutableFile(atPath: path) { return path }
        }
        throw .missingTool(name: name, searched: searchDirectories)
    }

    public func swiftc() throws(GuestBuildError) -> String { try tool("swiftc") }
    public func clang() throws(GuestBuildError) -> String { try tool("clang") }
    public func linker() throws(GuestBuildError) -> String { try tool("ld.lld") }
}
