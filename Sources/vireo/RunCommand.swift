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

    @Option(help: "The execution engine: kvm, soft (Vireo's x86-64 interpreter) or auto (KVM when /dev/kvm is usable, else soft).")
    var engine: Engine = .auto

    @Option(help: "Guest memory in MiB.")
    var memory: Int = 64

    @Option(help: "Virtual CPUs.")
    var vcpus: Int = 1

    @Option(help: "The guest's command line.")
    var cmdline: String = ""

    @Option(help: "A raw disk image served as xvda (device 51712); append ',ro' for read-only.")
    var disk: String?

    @Option(help: "Also append the guest's console ring output to this file (rate-limited like stdout).")
    var consoleLog: String?

    /// The --disk value: the path and whether it is read-only.
    var diskSpec: EmbeddedHost.Disk? {
        guard let disk else { return nil }
        if disk.hasSuffix(",ro") { return EmbeddedHost.Disk(path: String(disk.dropLast(3)), readOnly: true) }
        if disk.hasSuffix(",rw") { return EmbeddedHost.Disk(path: String(disk.dropLast(3)), readOnly: false) }
        return EmbeddedHost.Disk(path: disk, readOnly: false)
    }

    func validate() throws {
        if let spec = diskSpec, spec.path.isEmpty { throw ValidationError("--disk: give an image file, PATH or PATH,ro") }
        guard (2...65536).contains(memory) else { throw ValidationError("--memory \(memory): give 2 to 65536 MiB") }
        guard (1...128).contains(vcpus) else { throw ValidationError("--vcpus \(vcpus): give 1 to 128") }
    }

    static let exitCrash: Int32 = 2, exitReboot: Int32 = 3, exitOther: Int32 = 4

    func run() throws {
        let chosen: ExecutionEngine = switch engine {
        case .kvm: .kvm
        case .soft: .soft
        case .auto: ExecutionEngine.automatic
        }
        guard let bytes = FileManager.default.contents(atPath: kernel) else {
            throw RunError("cannot read the kernel '\(kernel)'")
        }
        if let spec = diskSpec {
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
                kernel: Array(bytes), commandLine: cmdline, disks: diskSpec.map { [$0] } ?? [], consoleLog: consoleLog,
                consoleInput: STDIN_FILENO, engine: chosen,
                console: { bytes in bytes.withUnsafeBytes { _ = write(STDOUT_FILENO, $0.baseAddress, $0.count) } })
        } catch let failure as BackendError {
            throw RunError(failure.description.hasPrefix("console") ? "\(failure)" : "--disk: \(failure)")
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
