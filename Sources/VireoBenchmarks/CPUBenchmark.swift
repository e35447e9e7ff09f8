import Foundation
import VireoABI
import VireoBench
import VireoCore
import VireoKVM
import VireoMachine

/// `vireo bench cpu`: guest instructions per second of the SoftCPU running the `cpubench`
/// sample (an integer loop), counted by the interpreter itself. The baseline is QEMU's TCG
/// running the same ELF with the same iteration count in the same run, its rate derived from
/// the SoftCPU's instruction count for the same work; without QEMU, Vireo's KVM engine on the
/// same work. Boot and exit are taken out by timing a short run too and using the difference.
public struct CPUBenchmark: Benchmark {
    public let name = "cpu"
    public let summary = "SoftCPU guest instructions/s on the cpubench loop, beside QEMU TCG (or KVM) on the same work"

    public init() {}

    struct Run {
        var seconds: Double
        /// CPU time of the domain's vCPUs (the machine is shared: wall time includes waiting
        /// for a core).
        var cpuSeconds: Double = 0
        var instructions: UInt64
        var output: String
    }

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        let kernel = try BenchmarkGuests.image("cpubench", benchmark: name, log: options.log)
        // Long enough that the difference of the two runs dwarfs QEMU's spawn-time noise
        // (tens of milliseconds) at several G instructions/s.
        let long: UInt64 = options.quick ? 300_000 : 30_000_000
        let short: UInt64 = long / 10
        let repeats = options.quick ? 1 : 3
        func best(_ body: () throws -> Run) rethrows -> Run {
            var runs: [Run] = []
            for _ in 0..<repeats { runs.append(try body()) }
            return runs.min { $0.seconds < $1.seconds }!
        }
        options.log("cpu: cpubench \(long) and \(short) iterations on the SoftCPU")
        let softLong = try best { try Self.boot(.soft, kernel, iterations: long) }
        let softShort = try best { try Self.boot(.soft, kernel, iterations: short) }
        let work = softLong.instructions - softShort.instructions
        let softSeconds = softLong.seconds - softShort.seconds
        guard work > 0, softSeconds > 0 else { throw BenchmarkError.unavailable(name: name, reason: "no measurable work") }
        let softRate = Double(work) / softSeconds
        let checksum = softLong.output.split(separator: "\n").first { $0.hasPrefix("cpubench:") }.map(String.init) ?? ""

        var extra: [(String, JSONValue)] = [
            ("iterations", .integer(Int64(long))),
            ("instructions_per_iteration", .number(Double(work) / Double(long - short))),
            ("soft_seconds", .number(softSeconds)),
            ("soft_instructions_per_cpu_second", .number(Double(work) / max(softLong.cpuSeconds - softShort.cpuSeconds, 1e-9))),
            ("soft_total_instructions", .integer(Int64(softLong.instructions))),
        ]
        // The same on the interpreter alone (the native tier off, see Docs/softcpu.md), with a
        // tenth of the iterations: what the native tier adds.
        options.log("cpu: cpubench \(long / 10) and \(short / 10) iterations on the SoftCPU's interpreter alone")
        setenv("VIREO_SOFTCPU_NATIVE", "0", 1)
        let interpreted = Result { () throws -> (Run, Run) in
            (try best { try Self.boot(.soft, kernel, iterations: long / 10) }, try best { try Self.boot(.soft, kernel, iterations: short / 10) })
        }
        unsetenv("VIREO_SOFTCPU_NATIVE")
        let (iLong, iShort) = try interpreted.get()
        let iWork = Double(iLong.instructions - iShort.instructions)
        extra.append(("interpreter_instructions_per_second", .number(iWork / max(iLong.seconds - iShort.seconds, 1e-9))))
        extra.append(("interpreter_instructions_per_cpu_second", .number(iWork / max(iLong.cpuSeconds - iShort.cpuSeconds, 1e-9))))
        var baseline: Double = 0
        var baselineName = ""
        let path = FileManager.default.currentDirectoryPath + "/.build/guests/cpubench.elf"
        if let qemu = BootBenchmark.findQEMU() {
            options.log("cpu: the same on QEMU TCG")
            let qLong = try best { try Self.qemu(qemu, path, iterations: long) }
            let qShort = try best { try Self.qemu(qemu, path, iterations: short) }
            let seconds = max(qLong.seconds - qShort.seconds, 1e-6)
            baseline = Double(work) / seconds
            baselineName = "QEMU TCG (microvm) on the same ELF and iterations, instructions/s from the SoftCPU's count"
            extra.append(("qemu_seconds", .number(seconds)))
            extra.append(("same_checksum_as_qemu", .bool(qLong.output.contains(checksum) && !checksum.isEmpty)))
        }
        if KVMSystem.unavailableReason() == nil {
            // KVM on this host may be kvm_pvm (~2 M instructions/s): a short pair of runs.
            let kShortIterations = options.quick ? 2_000 : 20_000
            options.log("cpu: \(kShortIterations * 2) and \(kShortIterations) iterations on KVM")
            let kLong = try Self.boot(.kvm, kernel, iterations: UInt64(kShortIterations * 2))
            let kShort = try Self.boot(.kvm, kernel, iterations: UInt64(kShortIterations))
            let kWork = Double(work) / Double(long - short) * Double(kShortIterations)
            let kRate = kWork / max(kLong.seconds - kShort.seconds, 1e-6)
            extra.append(("kvm_instructions_per_second", .number(kRate)))
            if baseline == 0 {
                baseline = kRate
                baselineName = "Vireo's KVM engine on the same ELF (QEMU is not installed), instructions/s from the SoftCPU's count"
            }
        }
        guard baseline > 0 else {
            throw BenchmarkError.unavailable(name: name, reason: "neither QEMU nor KVM is available for a baseline")
        }
        extra.append(("checksum_line", .string(checksum)))
        return BenchmarkResult(bench: name, value: softRate, unit: "instructions/s", baseline: baseline,
                               baselineName: baselineName, goal: ">= 3e8 instructions/s and ratio >= 0.1", extra: extra)
    }

    /// One boot of cpubench on `engine`: wall time of the run, the vCPUs' CPU time, the
    /// instructions retired (counted by the SoftCPU; 0 on KVM) and the console output.
    static func boot(_ engine: ExecutionEngine, _ kernel: [UInt8], iterations: UInt64) throws -> Run {
        let hub = EventChannels(), grants = GrantTables()
        let host = try HostEventDomain(hub: hub)
        let run = try GuestBoot.run(kernel, name: "cpubench", commandLine: "\(iterations)", on: engine, hub: hub, grants: grants)
        withExtendedLifetime(host) {}
        guard run.reason == .poweroff else {
            let on = engine == .kvm ? "KVM" : "the SoftCPU"
            throw BenchmarkError.unavailable(name: "cpu", reason: "cpubench on \(on) ended with \(run.reason) \(run.failure ?? "")")
        }
        return Run(seconds: Double(run.nanoseconds) / 1e9, cpuSeconds: Double(run.cpuNanoseconds) / 1e9,
                   instructions: run.instructions, output: run.output)
    }

    /// Spawn → exit of QEMU TCG running cpubench (the runtime powers off through isa-debug-exit).
    static func qemu(_ qemu: String, _ path: String, iterations: UInt64) throws -> Run {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: qemu)
        process.arguments = ["-M", "microvm", "-accel", "tcg", "-m", "64", "-kernel", path, "-append", "\(iterations)",
                             "-nodefaults", "-nographic", "-no-reboot", "-debugcon", "stdio",
                             "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        process.standardInput = FileHandle.nullDevice
        let start = Measure.now()
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return Run(seconds: Double(Measure.now() - start) / 1e9, instructions: 0, output: String(decoding: data, as: UTF8.self))
    }
}
