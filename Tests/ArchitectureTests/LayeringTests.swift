import Foundation
import Testing

/// Docs/architecture.md states which module may import which; these tests hold the code to it.
@Suite struct LayeringTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// Modules every Swift file may import.
    static let alwaysAllowed: Set<String> = ["Swift", "_Concurrency", "Synchronization", "_StringProcessing"]

    /// module -> allowed imports, read from the table between the architecture-table markers.
    static func allowedImports() throws -> [String: Set<String>] {
        let doc = try String(contentsOf: root.appendingPathComponent("Docs/architecture.md"), encoding: .utf8)
        guard let begin = doc.range(of: "<!-- architecture-table: begin -->"),
              let end = doc.range(of: "<!-- architecture-table: end -->") else {
            Issue.record("Docs/architecture.md lacks the architecture-table markers")
            return [:]
        }
        var table: [String: Set<String>] = [:]
        for line in doc[begin.upperBound..<end.lowerBound].split(separator: "\n") {
            let cells = line.split(separator: "|", omittingEmptySubsequences: false)
                .map { $0.trimmingCharacters(in: .whitespaces) }
            guard cells.count >= 5, !cells[1].isEmpty, cells[1] != "module", !cells[1].hasPrefix("---") else { continue }
            let imports = cells[3] == "—" ? [] : cells[3].split(separator: ",").map {
                $0.trimmingCharacters(in: .whitespaces)
            }
            table[cells[1]] = Set(imports)
        }
        return table
    }

    static func swiftFiles(in dir: URL) -> [URL] {
        let walker = FileManager.default.enumerator(at: dir, includingPropertiesForKeys: nil)
        return (walker?.allObjects as? [URL] ?? []).filter { $0.pathExtension == "swift" }
    }

    /// The modules a Swift file imports (`import X`, `@testable import X`, `import struct X.Y`).
    static func imports(of file: URL) throws -> [String] {
        let text = try String(contentsOf: file, encoding: .utf8)
        var result: [String] = []
        for raw in text.split(separator: "\n") {
            var words = raw.split(separator: " ").map(String.init)
            while let first = words.first, first.hasPrefix("@") { words.removeFirst() }
            guard words.first == "import", words.count >= 2 else { continue }
            let kinds: Set<String> = ["struct", "class", "enum", "protocol", "func", "var", "let", "typealias"]
            let path = kinds.contains(words[1]) && words.count >= 3 ? words[2] : words[1]
            result.append(String(path.split(separator: ".")[0]))
        }
        return result
    }

    @Test func everySourceModuleIsInTheTable() throws {
        let table = try Self.allowedImports()
        let modules = try FileManager.default.contentsOfDirectory(atPath: Self.root.appendingPathComponent("Sources").path)
        #expect(!modules.isEmpty)
        for module in modules {
            #expect(table[module] != nil, "Sources/\(module) is not in Docs/architecture.md's table")
        }
        #expect(table["VireoHypercalls"] != nil, "the C ABI module is in the table")
    }

    @Test func importsOnlyPointDown() throws {
        let table = try Self.allowedImports()
        var checked = 0
        for (module, allowed) in table {
            let dir = Self.root.appendingPathComponent("Sources/\(module)")
            for file in Self.swiftFiles(in: dir) {
                for imported in try Self.imports(of: file) where !Self.alwaysAllowed.contains(imported) {
                    checked += 1
                    #expect(allowed.contains(imported),
                            "\(module)/\(file.lastPathComponent) imports \(imported), which Docs/architecture.md does not allow")
                }
            }
        }
        #expect(checked > 0)
    }

    /// The ABI headers are freestanding: a bare-metal guest can include them with no libc.
    @Test func hypercallHeadersAreSelfContained() throws {
        let dir = Self.root.appendingPathComponent("Hypercalls/include")
        let walker = FileManager.default.enumerator(at: dir, includingPropertiesForKeys: nil)
        let headers = (walker?.allObjects as? [URL] ?? []).filter { $0.pathExtension == "h" }
        #expect(headers.count >= 10)
        for header in headers {
            let text = try String(contentsOf: header, encoding: .utf8)
            for line in text.split(separator: "\n") where line.hasPrefix("#include") {
                let ok = line.contains("<stdint.h>") || line.contains("<stddef.h>") || line.contains("\"")
                #expect(ok, "\(header.lastPathComponent): \(line) is not freestanding")
            }
        }
    }
}
