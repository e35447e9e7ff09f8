/// A benchmark `vireo bench NAME` can run. Each one measures its figure and, in the same run,
/// the limit it is compared with (raw exit cost, host file I/O, memory copy bandwidth...).
public protocol Benchmark: Sendable {
    /// The NAME in `vireo bench NAME`.
    var name: String { get }
    /// One line for `vireo bench --list`.
    var summary: String { get }
    func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult
}

/// Knobs every benchmark honours.
public struct BenchmarkOptions: Sendable {
    /// Shorter runs for smoke tests; the figures are noisier.
    public var quick: Bool
    /// Where progress lines go (stderr in the CLI), so stdout stays the contract's lines.
    public var log: @Sendable (String) -> Void
    /// How many items a benchmark that takes a count uses (density: live domains); nil for
    /// its default.
    public var count: Int?

    public init(quick: Bool = false, count: Int? = nil, log: @escaping @Sendable (String) -> Void = { _ in }) {
        self.quick = quick
        self.count = count
        self.log = log
    }

    /// How long each timed phase should run, in seconds.
    public var phaseSeconds: Double { quick ? 0.05 : 1.0 }
}

/// The benchmarks an executable knows, by name.
public struct BenchmarkRegistry: Sendable {
    public private(set) var benchmarks: [any Benchmark] = []

    public init(_ benchmarks: [any Benchmark] = []) {
        for b in benchmarks { register(b) }
    }

    /// Adds a benchmark; a second one with the same name is a programming error.
    public mutating func register(_ benchmark: any Benchmark) {
        precondition(self[benchmark.name] == nil, "two benchmarks named \(benchmark.name)")
        benchmarks.append(benchmark)
    }

    public subscript(name: String) -> (any Benchmark)? {
        benchmarks.first { $0.name == name }
    }

    public var names: [String] { benchmarks.map(\.name).sorted() }
}

public enum BenchmarkError: Error, CustomStringConvertible, Equatable {
    case unknown(name: String, known: [String])
    case unavailable(name: String, reason: String)

    public var description: String {
        switch self {
        case .unknown(let name, let known):
            let list = known.isEmpty ? "none yet" : known.joined(separator: ", ")
            return "no benchmark named '\(name)' (known: \(list))"
        case .unavailable(let name, let reason):
            return "benchmark '\(name)' cannot run here: \(reason)"
        }
    }
}
