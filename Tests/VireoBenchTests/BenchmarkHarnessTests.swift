import Foundation
import Testing
import VireoBench

@Suite struct BenchmarkHarnessTests {
    @Test func jsonLineFollowsTheContract() throws {
        let result = BenchmarkResult(
            bench: "ring", value: 30, unit: "Mreq/s", baseline: 40, baselineName: "spsc queue",
            goal: ">= 0.5", extra: [("batch", .integer(64)), ("note", .string("a \"quoted\"\nline"))])
        let line = result.jsonLine
        #expect(!line.contains("\n"))
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["bench"] as? String == "ring")
        #expect(object["value"] as? Double == 30)
        #expect(object["unit"] as? String == "Mreq/s")
        #expect(object["baseline"] as? Double == 40)
        #expect(object["baseline_name"] as? String == "spsc queue")
        #expect(object["ratio"] as? Double == 0.75)
        #expect(object["batch"] as? Int == 64)
        #expect(object["note"] as? String == "a \"quoted\"\nline")
        #expect(line.hasPrefix("{\"bench\": \"ring\", \"value\": 30, \"unit\""), "contract keys first, in order")
    }

    @Test func ratioIsNullWithoutABaseline() throws {
        let line = BenchmarkResult(bench: "x", value: 1, unit: "u", baseline: 0, baselineName: "none").jsonLine
        let object = try #require(try JSONSerialization.jsonObject(with: Data(line.utf8)) as? [String: Any])
        #expect(object["ratio"] is NSNull)
    }

    @Test func jsonEscapesControlCharactersAndNonFiniteNumbers() {
        #expect(JSONValue.string("\u{1}").encoded == "\"\\u0001\"")
        #expect(JSONValue.number(.infinity).encoded == "null")
        #expect(JSONValue.number(0.5).encoded == "0.5")
        #expect(JSONValue.array([.bool(true), .null]).encoded == "[true, null]")
    }

    @Test func figuresAreFormattedToFourSignificantDigits() {
        #expect(formatFigure(1234.5678) == "1235")
        #expect(formatFigure(0.012345) == "0.01235")
        #expect(formatFigure(2) == "2")
        #expect(formatFigure(.nan) == "nan")
    }

    struct Fixed: Benchmark {
        let name: String
        var summary: String { "a fixed figure" }
        func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
            BenchmarkResult(bench: name, value: 2, unit: "x", baseline: 4, baselineName: "four")
        }
    }

    @Test func registryFindsBenchmarksByName() async throws {
        let registry = BenchmarkRegistry([Fixed(name: "b"), Fixed(name: "a")])
        #expect(registry.names == ["a", "b"])
        let result = try await #require(registry["a"]).run(BenchmarkOptions(quick: true))
        #expect(result.ratio == 0.5)
        #expect(registry["zzz"] == nil)
        #expect("\(BenchmarkError.unknown(name: "zzz", known: registry.names))" == "no benchmark named 'zzz' (known: a, b)")
    }

    @Test func rateMeasuresOperationsOverTime() {
        var calls = 0
        let rate = Measure.rate(seconds: 0.01) { calls += 1; return 10 }
        #expect(rate.nanoseconds >= 10_000_000)
        #expect(rate.operations == UInt64(calls - 1) * 10, "the warm-up batch is not counted")
        #expect(rate.perSecond > 0)
        let m = Measure.median([.init(operations: 1, nanoseconds: 1), .init(operations: 3, nanoseconds: 1),
                                .init(operations: 2, nanoseconds: 1)])
        #expect(m.operations == 2)
    }
}
