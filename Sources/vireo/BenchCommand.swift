import ArgumentParser
import Glibc
import VireoBench
import VireoBenchmarks

/// `vireo bench NAME [--json]`: runs one benchmark; the last line is its figure, its same-run
/// baseline and their ratio (as one JSON object with `--json`).
struct BenchCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Run a benchmark and print its figure beside a baseline measured in the same run."
    )

    /// Every benchmark the CLI knows. Later layers add theirs here.
    static let registry = BenchmarkRegistry([
        RingBenchmark(), GrantBenchmark(), StoreBenchmark(), RawExitBenchmark(), HypercallBenchmark(), BootBenchmark(), BlockBenchmark(),
        NetBenchmark(), CPUBenchmark(), DensityBenchmark(), SchedBenchmark(),
    ])

    @Argument(help: "The benchmark to run (see --list).")
    var name: String?

    @Flag(help: "Print the result as one JSON object on the last line.")
    var json = false

    @Flag(help: "A short run, for smoke tests (noisier figures).")
    var quick = false

    @Flag(help: "List the benchmarks.")
    var list = false

    @Option(help: "How many items, for benchmarks that take a count (density: live domains, default 200).")
    var count: Int?

    func validate() throws {
        if !list && name == nil {
            throw ValidationError("name a benchmark, or pass --list")
        }
        if let count, !(1...100_000).contains(count) {
            throw ValidationError("--count \(count): give 1 to 100000")
        }
    }

    func run() async throws {
        if list {
            for b in Self.registry.benchmarks.sorted(by: { $0.name < $1.name }) {
                print("\(b.name)\t\(b.summary)")
            }
            if Self.registry.benchmarks.isEmpty { print("(no benchmarks yet)") }
            return
        }
        guard let name else { return }
        guard let benchmark = Self.registry[name] else {
            throw BenchmarkError.unknown(name: name, known: Self.registry.names)
        }
        let options = BenchmarkOptions(quick: quick, count: count) { line in
            var text = line + "\n"
            text.withUTF8 { _ = write(STDERR_FILENO, $0.baseAddress, $0.count) }
        }
        let result = try await benchmark.run(options)
        print(json ? result.jsonLine : result.summary)
    }
}
