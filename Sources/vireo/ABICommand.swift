import ArgumentParser
import VireoABI
import VireoBench

/// `vireo abi`: the hypercall table Vireo implements, from the same data the dispatcher uses.
struct ABICommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "abi",
        abstract: "Print the supported hypercalls and sub-operations."
    )

    @Flag(help: "Print one JSON object instead of a table.")
    var json = false

    @Flag(name: .customLong("all"), help: "Also list unsupported hypercalls and sub-operations.")
    var showAll = false

    @Flag(help: "Print the tables of Docs/ABI.md (every hypercall and sub-operation).")
    var markdown = false

    func run() {
        if markdown {
            print(Self.markdown(), terminator: "")
        } else if json {
            print(Self.json().encoded)
        } else {
            print(Self.table(showAll: showAll), terminator: "")
        }
    }

    static func table(showAll: Bool) -> String {
        var out = "Vireo guest ABI \(vireoABIVersion) — Xen hypercalls (x86_64)\n"
        out += "unsupported calls and sub-ops return -\(HypercallTable.unsupportedResult.name)\n\n"
        for entry in HypercallTable.entries where showAll || entry.support.isSupported {
            let mark = entry.support.isSupported ? "yes" : "no "
            out += pad("\(entry.hypercall.rawValue)", 3) + "  " + pad(entry.hypercall.xenName, 26) + mark
            out += entry.support.note.isEmpty ? "\n" : "  \(entry.support.note)\n"
            for op in entry.subOps where showAll || op.support.isSupported {
                let opMark = op.support.isSupported ? "yes" : "no "
                out += "       " + pad("\(op.number)", 3) + pad(op.name, 38) + opMark
                out += op.support.note.isEmpty ? "\n" : "  \(op.support.note)\n"
            }
        }
        return out
    }

    /// The tables Docs/ABI.md holds; a test checks the document against the table.
    static func markdown() -> String {
        func cell(_ s: String) -> String { s.split(separator: "|", omittingEmptySubsequences: false).joined(separator: "\\|") }
        var out = "## Hypercalls\n\n| # | hypercall | Vireo | notes |\n|---|---|---|---|\n"
        for entry in HypercallTable.entries {
            out += "| \(entry.hypercall.rawValue) | `\(entry.hypercall.xenName)` | \(entry.support.isSupported ? "yes" : "no") | \(cell(entry.support.note)) |\n"
        }
        for entry in HypercallTable.entries where !entry.subOps.isEmpty {
            out += "\n### \(entry.hypercall.xenName) (\(entry.hypercall.rawValue))\n\n| # | sub-op | Vireo | notes |\n|---|---|---|---|\n"
            for op in entry.subOps {
                out += "| \(op.number) | `\(op.name)` | \(op.support.isSupported ? "yes" : "no") | \(cell(op.support.note)) |\n"
            }
        }
        return out
    }

    static func json() -> JSONValue {
        func support(_ s: HypercallTable.Support) -> [(String, JSONValue)] {
            [("supported", .bool(s.isSupported)), ("note", .string(s.note))]
        }
        let calls = HypercallTable.entries.map { entry in
            JSONValue.object([
                ("number", .integer(Int64(entry.hypercall.rawValue))),
                ("name", .string(entry.hypercall.xenName)),
            ] + support(entry.support) + [
                ("subops", .array(entry.subOps.map { op in
                    .object([("number", .integer(Int64(op.number))), ("name", .string(op.name))] + support(op.support))
                })),
            ])
        }
        return .object([
            ("abi_version", .integer(Int64(vireoABIVersion))),
            ("unsupported_result", .integer(HypercallTable.unsupportedResult.hypercallResult)),
            ("hypercalls", .array(calls)),
        ])
    }

    private static func pad(_ s: String, _ width: Int) -> String {
        s.count >= width ? s + " " : s + String(repeating: " ", count: width - s.count)
    }
}
