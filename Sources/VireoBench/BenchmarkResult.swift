/// One benchmark's figure beside a limit measured in the same run.
///
/// The JSON contract (DESIGN.md): the last line `vireo bench NAME --json` prints is
/// `{"bench": NAME, "value": V, "unit": U, "baseline": B, "baseline_name": S, "ratio": V/B, ...}`
/// plus any other fields.
public struct BenchmarkResult: Sendable, Equatable {
    public var bench: String
    public var value: Double
    public var unit: String
    public var baseline: Double
    public var baselineName: String
    /// What a good ratio looks like, e.g. `">= 0.5"`; printed, never asserted by tests.
    public var goal: String?
    /// Further figures of the same run (secondary measurements, parameters).
    public var extra: [(key: String, value: JSONValue)]

    public init(
        bench: String, value: Double, unit: String, baseline: Double, baselineName: String,
        goal: String? = nil, extra: [(key: String, value: JSONValue)] = []
    ) {
        self.bench = bench
        self.value = value
        self.unit = unit
        self.baseline = baseline
        self.baselineName = baselineName
        self.goal = goal
        self.extra = extra
    }

    /// value / baseline; nil when the baseline is zero or either figure is not finite.
    public var ratio: Double? {
        guard baseline != 0, value.isFinite, baseline.isFinite else { return nil }
        return value / baseline
    }

    /// The contract's JSON object, on one line, keys in the contract's order then `extra`'s.
    public var jsonLine: String {
        var fields: [(String, JSONValue)] = [
            ("bench", .string(bench)),
            ("value", .number(value)),
            ("unit", .string(unit)),
            ("baseline", .number(baseline)),
            ("baseline_name", .string(baselineName)),
            ("ratio", ratio.map(JSONValue.number) ?? .null),
        ]
        if let goal { fields.append(("goal", .string(goal))) }
        fields += extra.map { ($0.key, $0.value) }
        return JSONValue.object(fields).encoded
    }

    /// A human-readable summary for the terminal.
    public var summary: String {
        let ratioText = ratio.map { formatFigure($0) } ?? "n/a"
        var text = "\(bench): \(formatFigure(value)) \(unit) vs \(baselineName) \(formatFigure(baseline)) \(unit)"
        text += " — ratio \(ratioText)"
        if let goal { text += " (goal \(goal))" }
        for (key, value) in extra { text += "\n  \(key): \(value.encoded)" }
        return text
    }

    public static func == (a: BenchmarkResult, b: BenchmarkResult) -> Bool {
        a.jsonLine == b.jsonLine
    }
}

/// Four significant figures, without Foundation's formatters.
public func formatFigure(_ x: Double) -> String {
    guard x.isFinite else { return x.isNaN ? "nan" : (x < 0 ? "-inf" : "inf") }
    if x == 0 { return "0" }
    let magnitude = abs(x)
    if magnitude >= 1e15 || magnitude < 1e-4 { return "\(x)" }
    var decimals = 0
    var scaled = magnitude
    while scaled < 1000 && decimals < 8 { scaled *= 10; decimals += 1 }
    let factor = (0..<decimals).reduce(1.0) { r, _ in r * 10 }
    let rounded = (x * factor).rounded() / factor
    var text = "\(rounded)"
    if text.hasSuffix(".0") { text.removeLast(2) }
    return text
}
