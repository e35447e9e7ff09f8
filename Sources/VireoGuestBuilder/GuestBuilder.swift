import Foundation

/// A guest image the builder wrote.
public struct GuestImage: Sendable, Equatable {
    public let name: String
    public let path: URL
    public let fileSize: Int
}

/// Builds bare-metal guest images: the runtime (boot stub and C runtime), the guest's own Swift
/// and C files, linked by the runtime's linker script into a PVH ELF that Vireo, Xen and QEMU boot.
public struct GuestBuilder: Sendable {
    public let repository: GuestRepository
    public let toolchain: GuestToolchain
    /// Where objects go (one subdirectory per guest, one for the runtime).
    public let workDirectory: URL
    /// Told each command before it runs (for `--verbose`).
    public let log: (@Sendable (String) -> Void)?

    public init(repository: GuestRepository, toolchain: GuestToolchain, workDirectory: URL,
                log: (@Sendable (String) -> Void)? = nil) {
        self.repository = repository
        self.toolchain = toolchain
        self.workDirectory = workDirectory
        self.log = log
    }

    /// No SSE, MMX or x87 anywhere (kvm_pvm hosts cannot run them, DESIGN.md); no red zone,
    /// since exceptions arrive on the same stack.
    static let targetFlags = ["-target", "x86_64-unknown-none-elf"]
    static let cFlags = targetFlags + [
        "-std=c11", "-ffreestanding", "-nostdlibinc", "-fno-builtin", "-fno-pic", "-fno-stack-protector",
        "-mno-red-zone", "-mno-sse", "-mno-mmx", "-Os", "-Wall", "-Wextra", "-Werror",
    ]
    static let swiftFlags = targetFlags + [
        "-enable-experimental-feature", "Embedded", "-wmo", "-Osize",
        "-Xcc", "-ffreestanding", "-Xcc", "-mno-red-zone", "-Xcc", "-mno-sse", "-Xcc", "-mno-mmx",
        "-Xfrontend", "-disable-stack-protector",
    ]

    /// Every sample under Hypercalls/samples, to `outputDirectory/NAME.elf`.
    public func buildSamples(into outputDirectory: URL) throws(GuestBuildError) -> [GuestImage] {
        let runtime = try buildRuntime()
        var images: [GuestImage] = []
        for name in try repository.sampleNames() {
            images.append(try build(directory: repository.samples.appendingPathComponent(name), name: name,
                                    output: outputDirectory.appendingPathComponent("\(name).elf"), runtime: runtime))
        }
        return images
    }

    /// The guest whose sources are the `.swift` and `.c` files in `directory`, to `output`.
    /// With a `main.swift` the Swift files are a program (top-level code); without one, one
    /// type carries `@main`. C guests define `int main(int, char **)`.
    public func build(directory: URL, name: String? = nil, output: URL) throws(GuestBuildError) -> GuestImage {
        let name = name ?? directory.standardizedFileURL.lastPathComponent
        return try build(directory: directory, name: name, output: output, runtime: try buildRuntime())
    }

    /// The boot stub and the C runtime, as objects every guest links.
    func buildRuntime() throws(GuestBuildError) -> [URL] {
        let clang = try toolchain.clang()
        let objects = workDirectory.appendingPathComponent("runtime")
        try makeDirectory(objects)
        let boot = objects.appendingPathComponent("boot.o")
        try produce(boot, step: "assembling the boot stub (clang)", tool: clang) { out in
            Self.targetFlags + includes() + ["-c", repository.runtime.appendingPathComponent("boot.S").path, "-o", out]
        }
        let runtime = objects.appendingPathComponent("runtime.o")
        try produce(runtime, step: "compiling the guest runtime (clang)", tool: clang) { out in
            Self.cFlags + includes() + ["-c", repository.runtime.appendingPathComponent("runtime.c").path, "-o", out]
        }
        return [boot, runtime]
    }

    func includes() -> [String] {
        ["-I", repository.abiHeaders.path, "-I", repository.runtimeHeaders.path]
    }

    func build(directory: URL, name: String, output: URL, runtime: [URL]) throws(GuestBuildError) -> GuestImage {
        let files: [String]
        do {
            files = try FileManager.default.contentsOfDirectory(atPath: directory.path).sorted()
        } catch {
            throw .fileSystem(path: directory.path, reason: "cannot list the guest's sources (\(error.localizedDescription))")
        }
        let swiftFiles = files.filter { $0.hasSuffix(".swift") }.map { directory.appendingPathComponent($0).path }
        let cFiles = files.filter { $0.hasSuffix(".c") }.map { directory.appendingPathComponent($0).path }
        if swiftFiles.isEmpty && cFiles.isEmpty { throw .noSources(directory: directory.path) }

        let objects = workDirectory.appendingPathComponent(name)
        try makeDirectory(objects)
        var linked = runtime
        if !cFiles.isEmpty {
            let clang = try toolchain.clang()
            for file in cFiles {
                let object = objects.appendingPathComponent(URL(fileURLWithPath: file).deletingPathExtension()
                    .lastPathComponent + ".c.o")
                try produce(object, step: "compiling \(name)/\(URL(fileURLWithPath: file).lastPathComponent) (clang)",
                            tool: clang) { out in
                    Self.cFlags + includes() + ["-I", directory.path, "-c", file, "-o", out]
                }
                linked.append(object)
            }
        }
        if !swiftFiles.isEmpty {
            let swiftc = try toolchain.swiftc()
            var kit: [String] = []
            var sources = swiftFiles
            if try usesGuestKit(swiftFiles) {
                let (modules, kitObjects, kitSources) = try buildGuestKit()
                kit = ["-I", modules.path]
                sources += kitSources
                linked += kitObjects
            }
            let object = objects.appendingPathComponent("swift.o")
            let program = files.contains("main.swift") ? [] : ["-parse-as-library"]
            try produce(object, step: "compiling \(name) (swiftc, Embedded Swift)", tool: swiftc) { out in
                Self.swiftFlags + program + includes() + kit + [
                    "-module-name", Self.moduleName(name), "-module-cache-path",
                    workDirectory.appendingPathComponent("module-cache").path,
                ] + sources + ["-c", "-o", out]
            }
            linked.append(object)
        }

        try makeDirectory(output.deletingLastPathComponent())
        try produce(output, step: "linking \(name) (ld.lld)", tool: try toolchain.linker()) { out in
            ["-static", "-nostdlib", "--no-pie", "-z", "max-page-size=4096", "--gc-sections",
             "-T", repository.linkerScript.path] + linked.map(\.path) + ["-o", out]
        }
        let attributes = try? FileManager.default.attributesOfItem(atPath: output.path)
        return GuestImage(name: name, path: output, fileSize: (attributes?[.size] as? Int) ?? 0)
    }

    /// Whether a guest's Swift files import GuestKit.
    func usesGuestKit(_ swiftFiles: [String]) throws(GuestBuildError) -> Bool {
        for file in swiftFiles {
            guard let text = try? String(contentsOfFile: file, encoding: .utf8) else {
                throw .fileSystem(path: file, reason: "cannot read the guest's source")
            }
            if text.split(separator: "\n").contains(where: { $0.trimmingCharacters(in: .whitespaces) == "import GuestKit" }) {
                return true
            }
        }
        return false
    }

    /// GuestKit for a bare-metal guest. VireoABI's identifiers become the module VireoABI;
    /// GuestKit's sources, the guest-side VireoCore sources and the PVH platform are compiled
    /// into the guest's own module (returned as `sources`), and `import GuestKit` finds an
    /// empty module of that name. One module, because Swift 6.3's Embedded mode crashes
    /// deserializing GuestKit's generic hypercall helpers in a client module ("Conformance of
    /// 'vireo_sched_shutdown' to 'BitwiseCopyable' not found"); see Docs/guestkit.md.
    func buildGuestKit() throws(GuestBuildError) -> (modules: URL, objects: [URL], sources: [String]) {
        let swiftc = try toolchain.swiftc()
        let modules = workDirectory.appendingPathComponent("guestkit")
        try makeDirectory(modules)
        // SwiftPM generates VireoAtomics' module map on the host; a guest build writes its own.
        let map = "module VireoAtomics { header \"\(repository.atomicsHeader.path)\" export * }\n"
        let stub = modules.appendingPathComponent("GuestKitModule.swift")
        do {
            try map.write(to: modules.appendingPathComponent("module.modulemap"), atomically: true, encoding: .utf8)
            try "// GuestKit itself is compiled into the guest's module (GuestBuilder.buildGuestKit).\n"
                .write(to: stub, atomically: true, encoding: .utf8)
        } catch {
            throw .fileSystem(path: modules.path, reason: "cannot write GuestKit's module files (\(error.localizedDescription))")
        }
        let kitSources: [String]
        do {
            kitSources = try FileManager.default.contentsOfDirectory(atPath: repository.guestKit.path).filter { $0.hasSuffix(".swift") }
                .sorted().map { repository.guestKit.appendingPathComponent($0).path }
        } catch {
            throw .fileSystem(path: repository.guestKit.path, reason: "cannot list GuestKit's sources (\(error.localizedDescription))")
        }
        let common = Self.swiftFlags + ["-parse-as-library"] + includes() + [
            "-I", modules.path, "-module-cache-path", workDirectory.appendingPathComponent("module-cache").path,
        ]
        let abi = modules.appendingPathComponent("VireoABI.o")
        try produce(abi, step: "compiling VireoABI's identifiers (swiftc, Embedded Swift)", tool: swiftc) { out in
            common + ["-module-name", "VireoABI", "-emit-module", "-emit-module-path",
                      modules.appendingPathComponent("VireoABI.swiftmodule").path,
                      repository.abiIdentifiers.path, "-c", "-o", out]
        }
        let empty = modules.appendingPathComponent("GuestKit.o")
        try produce(empty, step: "writing the GuestKit module (swiftc, Embedded Swift)", tool: swiftc) { out in
            common + ["-module-name", "GuestKit", "-emit-module", "-emit-module-path",
                      modules.appendingPathComponent("GuestKit.swiftmodule").path, stub.path, "-c", "-o", out]
        }
        let sources = repository.guestCoreSources.map(\.path) + kitSources + [repository.guestKitPlatform.path]
        return (modules, [abi], sources)
    }

    /// A Swift module name from a guest's name ("hello-c" -> "hello_c").
    static func moduleName(_ name: String) -> String {
        var result = String(name.map { $0.isLetter || $0.isNumber || $0 == "_" ? $0 : "_" })
        if result.first.map({ !$0.isLetter && $0 != "_" }) ?? true { result = "guest_" + result }
        return result
    }

    func makeDirectory(_ url: URL) throws(GuestBuildError) {
        do {
            try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        } catch {
            throw .fileSystem(path: url.path, reason: "cannot create the directory (\(error.localizedDescription))")
        }
    }

    /// Runs a step that writes `output`: to a temporary name, then renamed into place, so that
    /// two builds sharing a directory never read each other's half-written files.
    func produce(_ output: URL, step: String, tool: String,
                 arguments: (String) -> [String]) throws(GuestBuildError) {
        let temporary = output.path + ".\(ProcessInfo.processInfo.processIdentifier)-\(UUID().uuidString.prefix(8)).tmp"
        do {
            try run(tool, arguments(temporary), step: step)
        } catch {
            unlink(temporary)
            throw error
        }
        if rename(temporary, output.path) != 0 {
            unlink(temporary)
            throw .fileSystem(path: output.path, reason: "cannot move \(temporary) into place (errno \(errno))")
        }
    }

    /// Runs one step; on failure the error carries the command and everything it printed.
    func run(_ tool: String, _ arguments: [String], step: String) throws(GuestBuildError) {
        log?(([tool] + arguments).joined(separator: " "))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        // One pipe for stdout and stderr: read to the end, so a chatty tool cannot block on a full pipe.
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        process.standardInput = FileHandle.nullDevice
        do {
            try process.run()
        } catch {
            throw .cannotLaunch(tool: tool, reason: error.localizedDescription)
        }
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationReason == .exit, process.terminationStatus == 0 else {
            throw .stepFailed(step: step, command: [tool] + arguments, status: process.terminationStatus,
                              output: String(decoding: output, as: UTF8.self))
        }
    }
}
