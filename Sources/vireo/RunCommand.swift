import ArgumentParser
import Foundation
import Glibc
import VireoABI
import VireoBackends
import VireoCore
import VireoHypervisor
import VireoMachine

/// `vireo run KERNEL.elf`: one domain in the foreground, on the embedded default (no daemon).
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract: "Boot a PVH kernel in the foreground; its console goes to stdout, and stdin to its console.",
        discussion: """
            Exit status: 0 when the guest powers off; 1 when the domain cannot be created \
            (bad file, bad option, no engine); 2 when the guest crashes (its own crash shutdown, \
            a triple fault, an instruction the engine cannot run); 3 when it asks to reboot; \
            4 for any other shutdown reason (suspend, watchdog, soft reset).
            """
    )

    enum Engine: String, ExpressibleByArgument, CaseIterable {
        case kvm, soft, auto
    }

    @Argument(help: "The guest kernel: an ELF image with a Xen PVH entry note.")
    var kernel: String

    @Option(help: "The execution engine: kvm, soft (Vireo's x86-64 interpreter) or auto (KVM where it is hardware-accelerated, else soft).")
    var engine: Engine = .auto

    @Option(help: "Guest memory in MiB.")
    var memory: Int = 64

    @Option(help: "Virtual CPUs.")
    var vcpus: Int = 1

    @Option(help: "The guest's command line.")
    var cmdline: String = ""

    @Option(help: "A raw disk image served as xvda (device 51712): PATH[,ro][,sector=4096] (',ro' read-only; 'sector=4096' 4096-byte logical sectors).")
    var disk: String?

    @Option(help: ArgumentHelp(
        "A network interface (repeatable; vif 0, 1, ...): tap:IFNAME (create or attach the TAP) or switch:NAME (an in-process switch), then optional ,mac=XX:XX:XX:XX:XX:XX and ,rate=R/s (xl's vif rate, e.g. 10Mb/s).",
        valueName: "tap:IFNAME|switch:NAME[,mac=M][,rate=R/s]"))
    var net: [String] = []

    @Option(help: "Also append the guest's console ring output to this file (rate-limited like stdout).")
    var consoleLog: String?

    /// The --disk value: PATH[,ro|,rw][,sector=512|4096], options in any order after the path.
    var diskSpec: EmbeddedHost.Disk? {
        get throws {
            guard var path = disk else { return nil }
            var spec = EmbeddedHost.Disk(path: "")
            // Options are taken from the end, so a path may itself contain commas.
            while let comma = path.lastIndex(of: ",") {
                let option = String(path[path.index(after: comma)...])
                if option == "ro" || option == "rw" {
                    spec.readOnly = option == "ro"
                } else if option.hasPrefix("sector=") {
                    guard let size = Int(option.dropFirst(7)), size == 512 || size == 4096 else {
                        throw ValidationError("--disk: \(option): the sector size is 512 or 4096")
                    }
                    spec.sectorSize = size
                } else {
                    break
                }
                path = String(path[..<comma])
            }
            spec.path = path
            return spec
        }
    }

    /// Bad option values: a setup error (exit status 1, as the discussion above says), not
    /// ArgumentParser's usage status, so every "the domain cannot be created" exits alike.
    func checkOptions() throws {
        let disk: EmbeddedHost.Disk?
        do { disk = try diskSpec } catch let error as ValidationError { throw RunError(error.message) }
        if let disk, disk.path.isEmpty { throw RunError("--disk: give an image file, PATH[,ro][,sector=4096]") }
        guard (2...65536).contains(memory) else { throw RunError("--memory \(memory): give 2 to 65536 MiB") }
        guard (1...128).contains(vcpus) else { throw RunError("--vcpus \(vcpus): give 1 to 128") }
    }

    static let exitCrash: Int32 = 2, exitReboot: Int32 = 3, exitOther: Int32 = 4

    func run() throws {
        try checkOptions()
        // Before anything starts: a bad --net value is a setup error naming its field.
        var networks: [NetworkSpec] = []
        for text in net {
            do { networks.append(try NetworkSpec(parsing: text)) } catch { throw RunError(error.description) }
        }
        let chosen: ExecutionEngine = switch engine {
        case .kvm: .kvm
        case .soft: .soft
        case .auto: ExecutionEngine.automatic
        }
        guard let bytes = FileManager.default.contents(atPath: kernel) else {
            throw RunError("cannot read the kernel '\(kernel)'")
        }
        if let spec = try diskSpec {
            // Before anything starts: a missing image is a setup error naming the file.
            var info = stat()
            guard stat(spec.path, &info) == 0 else { throw RunError("--disk: cannot find the disk image '\(spec.path)'") }
            guard (info.st_mode & S_IFMT) == S_IFREG else { throw RunError("--disk: '\(spec.path)' is not a regular file") }
        }
        if let consoleLog {
            // Before anything starts: a log that cannot be opened is a setup error naming it.
            let fd = open(consoleLog, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
            guard fd >= 0 else {
                throw RunError("--console-log: cannot open '\(consoleLog)': \(String(cString: strerror(errno)))")
            }
            close(fd)
        }
        let host: EmbeddedHost
        do { host = try EmbeddedHost() } catch { throw RunError("cannot set up the host domain: \(error)") }
        defer { host.shutdown() }
        let outcome: EmbeddedHost.Outcome
        do {
            outcome = try host.run(
                config: DomainConfig(id: DomainID(1), name: URL(fileURLWithPath: kernel).lastPathComponent,
                                     memoryBytes: UInt64(memory) << 20, vcpus: vcpus),
                kernel: Array(bytes), commandLine: cmdline, disks: (try diskSpec).map { [$0] } ?? [], networks: networks,
                consoleLog: consoleLog, consoleInput: STDIN_FILENO, engine: chosen,
                console: { bytes in bytes.withUnsafeBytes { _ = write(STDOUT_FILENO, $0.baseAddress, $0.count) } })
        } catch let failure as BackendError {
            let text = failure.description
            if text.hasPrefix("console") { throw RunError(text) }
            throw RunError(text.hasPrefix("tap ") || text.hasPrefix("vif") ? "--net: \(text)" : "--disk: \(text)")
        } catch let failure as DomainBuilder.Failure {
            throw RunError("\(kernel): \(failure)")
        } catch {
            throw RunError("cannot start the domain: \(error)")
        }
        if let failure = outcome.failure {
            FileHandle.standardError.write(Data("vireo: \(failure)\n".utf8))
        }
        let reason = outcome.reason
        switch reason {
        case .poweroff: return
        case .crash: throw ExitCode(Self.exitCrash)
        case .reboot: throw ExitCode(Self.exitReboot)
        default: throw ExitCode(Self.exitOther)
        }
    }
}

/// A setup error for `vireo run`: printed, exit status 1.
struct RunError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
