import Foundation
import Testing
import VireoGuestBuilder

/// The repository, the sample guests and the test fixtures built once per test run, and ways to
/// look at and boot them.
enum GuestSupport {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let repository = GuestRepository(root: root)
    static let fixtures = root.appendingPathComponent("Tests/GuestTests/Fixtures")

    static func temporaryDirectory(_ label: String) -> URL {
        FileManager.default.temporaryDirectory.appendingPathComponent("vireo-\(label)-\(UUID().uuidString)")
    }

    static func builder(toolchain: GuestToolchain = .standard()) -> GuestBuilder {
        GuestBuilder(repository: repository, toolchain: toolchain, workDirectory: temporaryDirectory("guest-objects"))
    }

    /// Every sample plus the runnable fixtures (`trap`, `heap`), built by the builder itself, once.
    static let built: Result<[String: GuestImage], GuestBuildError> = Result { () throws(GuestBuildError) in
        let output = temporaryDirectory("guests")
        let guestBuilder = builder()
        var images = try guestBuilder.buildSamples(into: output)
        for fixture in ["trap", "heap", "hostile", "xenstore", "timer", "upcall", "smp", "console-echo"] {
            images.append(try guestBuilder.build(directory: fixtures.appendingPathComponent(fixture),
                                                 output: output.appendingPathComponent("\(fixture).elf")))
        }
        return Dictionary(uniqueKeysWithValues: images.map { ($0.name, $0) })
    }

    static func image(_ name: String) throws -> GuestImage {
        let images = try built.get()
        return try #require(images[name], "no guest \(name) among \(images.keys.sorted())")
    }

    /// Runs a tool to completion (or until `timeout` seconds pass), capturing stdout and stderr.
    /// `input`, when given, is the tool's stdin (else /dev/null).
    static func run(_ tool: String, _ arguments: [String], timeout: Double = 120, input: String? = nil)
        throws -> (status: Int32, out: String, err: String, timedOut: Bool)
    {
        let directory = temporaryDirectory("run")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let out = directory.appendingPathComponent("out"), err = directory.appendingPathComponent("err")
        _ = FileManager.default.createFile(atPath: out.path, contents: nil)
        _ = FileManager.default.createFile(atPath: err.path, contents: nil)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = arguments
        if let input {
            let file = directory.appendingPathComponent("in")
            try Data(input.utf8).write(to: file)
            process.standardInput = try FileHandle(forReadingFrom: file)
        } else {
            process.standardInput = FileHandle.nullDevice
        }
        process.standardOutput = try FileHandle(forWritingTo: out)
        process.standardError = try FileHandle(forWritingTo: err)
        try process.run()
        let deadline = Date().addingTimeInterval(timeout)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        let timedOut = process.isRunning
        if timedOut {
            process.terminate()
        }
        process.waitUntilExit()
        return (process.terminationStatus, (try? String(contentsOf: out, encoding: .utf8)) ?? "",
                (try? String(contentsOf: err, encoding: .utf8)) ?? "", timedOut)
    }

    /// What the cpubench sample prints as its checksum after `iterations` (its loop, on the host).
    static func cpubenchChecksum(iterations: Int) -> UInt64 {
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15, sum: UInt64 = 0
        for _ in 0..<iterations {
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            sum = sum &* 31 &+ (state >> 11)
        }
        return sum
    }

    static func onPath(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        return path.split(separator: ":").map { "\($0)/\(name)" }.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// qemu-system-x86_64, or nil after saying why the test is skipped; under CI=true its
    /// absence is a failure (.ci/run installs qemu-system-x86).
    static func qemu() -> String? {
        if let qemu = onPath("qemu-system-x86_64") { return qemu }
        if ProcessInfo.processInfo.environment["CI"] == "true" {
            Issue.record("qemu-system-x86_64 is not on PATH; CI needs it (apt-get install qemu-system-x86)")
        } else {
            print("skipped: qemu-system-x86_64 is not on PATH, so guests are not booted")
        }
        return nil
    }

    /// Boots a PVH image on QEMU's microvm (no Xen): the debug console (port 0xe9) on stdout,
    /// and isa-debug-exit at 0xf4, where the runtime writes its shutdown reason, so QEMU exits
    /// with (reason << 1) | 1: 1 for poweroff, 7 for crash.
    static func boot(_ qemu: String, _ image: GuestImage, commandLine: String? = nil)
        throws -> (status: Int32, out: String, err: String, timedOut: Bool)
    {
        var arguments = [
            "-M", "microvm", "-accel", "tcg", "-m", "64", "-kernel", image.path.path,
            "-nodefaults", "-nographic", "-no-reboot",
            "-debugcon", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
        ]
        if let commandLine { arguments += ["-append", commandLine] }
        return try run(qemu, arguments, timeout: 60)
    }

    static let poweroffStatus: Int32 = 1  // (SHUTDOWN_poweroff = 0) << 1 | 1
    static let crashStatus: Int32 = 7     // (SHUTDOWN_crash = 3) << 1 | 1

    /// The `vireo` executable built beside the test bundle.
    static var vireo: String {
        URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("vireo").path
    }

    /// Whether /dev/kvm can be used; otherwise says why the test is skipped.
    static func kvmAvailable() -> Bool {
        if access("/dev/kvm", R_OK | W_OK) == 0 { return true }
        print("skipped: /dev/kvm is missing or not accessible, so guests are not booted on Vireo's KVM engine")
        return false
    }

    /// A disassembler: llvm-objdump from the toolchain, else objdump on PATH.
    static func objdump() -> String? {
        (try? GuestToolchain.standard().tool("llvm-objdump")) ?? onPath("objdump")
    }
}
