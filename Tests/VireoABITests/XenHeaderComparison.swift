import Foundation

/// Compares Vireo's ABI headers with Xen's published headers, mechanically:
/// 1. clang's AST dump of Vireo's umbrella header lists every structure, union, field, typedef
///    and enum constant Vireo defines; `clang -dM` lists every macro;
/// 2. a C program is generated that includes both header sets and checks, for each of them,
///    size, field offset, field size or value against Xen's name for it
///    (`struct vireo_X` <-> `struct X`, `VIREO_X` <-> `X`, `VIREO_HYPERVISOR_X` <-> `__HYPERVISOR_X`);
/// 3. the program runs and reports every mismatch.
/// Nothing is listed by hand, so a new definition in Hypercalls/ is checked the day it lands.
struct XenHeaderComparison {
    struct Failure: Error, CustomStringConvertible {
        var description: String
    }

    /// What was compared and what differed.
    struct Report {
        var checked = 0
        var mismatches: [String] = []
        var records: Set<String> = []      // Xen tags compared, e.g. "struct shared_info"
        var constants: Set<String> = []    // Xen names compared
        var typedefs: Set<String> = []
        var fieldChecks = 0
        var program = ""
    }

    /// Vireo names that are Vireo's own and have no Xen counterpart (besides the VIREO_ABI_ /
    /// vireo_abi_ prefix): Xen spells guest pointers XEN_GUEST_HANDLE(T), a macro, not a type.
    static let vireoOnlyNames: Set<String> = ["vireo_guest_handle_t"]

    /// Xen headers the comparison includes, in an order that compiles.
    static let xenHeaders = [
        "errno.h", "xen/xen.h", "xen/errno.h", "xen/features.h", "xen/event_channel.h",
        "xen/grant_table.h", "xen/memory.h", "xen/vcpu.h", "xen/sched.h", "xen/version.h",
        "xen/elfnote.h", "xen/hvm/params.h", "xen/hvm/hvm_op.h", "xen/arch-x86/hvm/start_info.h",
        "xen/io/ring.h", "xen/io/blkif.h", "xen/io/netif.h", "xen/io/console.h", "xen/io/xs_wire.h",
        "xen/io/xenbus.h", "xen/arch-x86/cpuid.h", "xen/hvm/hvm_vcpu.h",
    ]

    var clang: String
    /// The directory holding `vireo/` (Hypercalls/include).
    var vireoInclude: String
    /// The umbrella header, relative to vireoInclude.
    var umbrella = "vireo/vireo.h"
    /// The directory holding `xen/` (/usr/include).
    var xenInclude = "/usr/include"
    var xenInterfaceVersion = "0x00040e00"
    var workDir: URL

    static func findClang() -> String? {
        var candidates: [String] = []
        if let cc = ProcessInfo.processInfo.environment["VIREO_CLANG"] { candidates.append(cc) }
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        candidates += path.split(separator: ":").map { "\($0)/clang" }
        candidates.append("/opt/swift/usr/bin/clang")
        return candidates.first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    @discardableResult
    static func run(_ executable: String, _ arguments: [String]) throws -> (status: Int32, out: Data, err: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        // stdout through a pipe read to the end while the child runs (an AST dump is megabytes);
        // stderr into a file, so neither can stall the child.
        let errFile = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-stderr-\(UUID().uuidString)")
        _ = FileManager.default.createFile(atPath: errFile.path, contents: nil)
        defer { try? FileManager.default.removeItem(at: errFile) }
        let outPipe = Pipe()
        process.standardOutput = outPipe
        process.standardError = try FileHandle(forWritingTo: errFile)
        try process.run()
        let out = outPipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        let err = (try? String(contentsOf: errFile, encoding: .utf8)) ?? ""
        return (process.terminationStatus, out, err)
    }

    // MARK: - What Vireo defines

    struct Record {
        var tag: String        // "struct" or "union"
        var name: String       // vireo_...
        var fieldPaths: [String] = []
    }

    struct Definitions {
        var records: [Record] = []
        var typedefs: [String] = []
        var enumConstants: [String] = []
        var integerMacros: [String] = []
        var stringMacros: [String] = []
        var arrays: [String] = []  // global constant tables, e.g. vireo_xsd_errors
    }

    func definitions() throws -> Definitions {
        let header = "\(vireoInclude)/\(umbrella)"
        let ast = try Self.run(clang, ["-x", "c", "-std=c11", "-ffreestanding", "-fsyntax-only",
                                        "-I", vireoInclude, "-Xclang", "-ast-dump=json", header])
        guard ast.status == 0 else { throw Failure(description: "clang could not parse \(header):\n\(ast.err)") }
        guard let root = try JSONSerialization.jsonObject(with: ast.out) as? [String: Any] else {
            throw Failure(description: "clang's AST dump is not a JSON object")
        }
        var defs = Definitions()
        var seenRecords = Set<String>()
        func visit(_ node: [String: Any]) {
            let kind = node["kind"] as? String
            let name = node["name"] as? String ?? ""
            if kind == "RecordDecl", name.hasPrefix("vireo_"), !name.hasPrefix("vireo_abi_"),
               node["completeDefinition"] as? Bool == true, !seenRecords.contains(name) {
                seenRecords.insert(name)
                var record = Record(tag: node["tagUsed"] as? String ?? "struct", name: name)
                collectFields(node, prefix: "", into: &record.fieldPaths)
                defs.records.append(record)
            }
            if kind == "TypedefDecl", name.hasPrefix("vireo_"), !name.hasPrefix("vireo_abi_"),
               !Self.vireoOnlyNames.contains(name), !defs.typedefs.contains(name) {
                defs.typedefs.append(name)
            }
            if kind == "EnumConstantDecl", name.hasPrefix("VIREO_"), !name.hasPrefix("VIREO_ABI_") {
                defs.enumConstants.append(name)
            }
            if kind == "VarDecl", name.hasPrefix("vireo_"), !name.hasPrefix("vireo_abi_") {
                defs.arrays.append(name)
            }
            for child in node["inner"] as? [[String: Any]] ?? [] { visit(child) }
        }
        visit(root)

        let macros = try Self.run(clang, ["-x", "c", "-std=c11", "-ffreestanding", "-E", "-dM",
                                           "-I", vireoInclude, header])
        guard macros.status == 0 else { throw Failure(description: "clang -dM failed:\n\(macros.err)") }
        for line in String(decoding: macros.out, as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 2).map(String.init)
            guard parts.count == 3, parts[0] == "#define", parts[1].hasPrefix("VIREO_"),
                  !parts[1].hasPrefix("VIREO_ABI_"), !parts[1].contains("(") else { continue }
            if parts[2].hasPrefix("\"") { defs.stringMacros.append(parts[1]) } else { defs.integerMacros.append(parts[1]) }
        }
        return defs
    }

    /// Field paths usable in offsetof(): "a", "u.rw.id", "seg[0].gref"; anonymous members
    /// contribute their fields without a name of their own.
    private func collectFields(_ record: [String: Any], prefix: String, into paths: inout [String]) {
        let inner = record["inner"] as? [[String: Any]] ?? []
        var lastNestedRecord: [String: Any]?
        for child in inner {
            switch child["kind"] as? String {
            case "RecordDecl":
                lastNestedRecord = child
            case "FieldDecl":
                if child["isBitfield"] as? Bool == true { continue }
                let type = (child["type"] as? [String: Any])?["qualType"] as? String ?? ""
                let name = child["name"] as? String
                let isUnnamedType = type.contains("(unnamed") || type.contains("(anonymous")
                if let name {
                    paths.append(prefix + name)
                    if isUnnamedType, let nested = lastNestedRecord {
                        let subscriptPrefix = type.hasSuffix("]") ? "[0]." : "."
                        collectFields(nested, prefix: prefix + name + subscriptPrefix, into: &paths)
                    }
                } else if let nested = lastNestedRecord {
                    collectFields(nested, prefix: prefix, into: &paths)  // anonymous struct/union member
                }
            default:
                break
            }
        }
    }

    // MARK: - Names

    static func xenName(ofConstant name: String) -> String {
        if name.hasPrefix("VIREO_HYPERVISOR_") { return "__HYPERVISOR_" + name.dropFirst("VIREO_HYPERVISOR_".count) }
        return String(name.dropFirst("VIREO_".count))
    }

    static func xenName(ofType name: String) -> String { String(name.dropFirst("vireo_".count)) }

    // MARK: - The comparison program

    func compare() throws -> Report {
        let defs = try definitions()
        var report = Report()
        var body: [String] = []
        func check(_ what: String, _ vireo: String, _ xen: String) {
            body.append("    check(\"\(what)\", (long long)(\(vireo)), (long long)(\(xen)));")
        }
        for record in defs.records {
            let vireoType = "\(record.tag) \(record.name)"
            let xenType = "\(record.tag) \(Self.xenName(ofType: record.name))"
            report.records.insert(xenType)
            check("sizeof(\(xenType))", "sizeof(\(vireoType))", "sizeof(\(xenType))")
            for path in record.fieldPaths {
                report.fieldChecks += 1
                check("offsetof(\(xenType), \(path))", "offsetof(\(vireoType), \(path))", "offsetof(\(xenType), \(path))")
                check("sizeof(\(xenType).\(path))", "sizeof(((\(vireoType) *)0)->\(path))", "sizeof(((\(xenType) *)0)->\(path))")
            }
        }
        for typedef in defs.typedefs {
            let xen = Self.xenName(ofType: typedef)
            report.typedefs.insert(xen)
            check("sizeof(\(xen))", "sizeof(\(typedef))", "sizeof(\(xen))")
        }
        for constant in defs.integerMacros + defs.enumConstants {
            let xen = Self.xenName(ofConstant: constant)
            report.constants.insert(xen)
            check(xen, constant, xen)
        }
        for constant in defs.stringMacros {
            let xen = Self.xenName(ofConstant: constant)
            report.constants.insert(xen)
            body.append("    check_str(\"\(xen)\", \(constant), \(xen));")
        }
        if defs.arrays.contains("vireo_xsd_errors") {
            report.constants.insert("xsd_errors")
            body.append("""
                check("count(xsd_errors)", sizeof(vireo_xsd_errors) / sizeof(vireo_xsd_errors[0]),
                      sizeof(xsd_errors) / sizeof(xsd_errors[0]));
                for (size_t i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0])
                                   && i < sizeof(vireo_xsd_errors) / sizeof(vireo_xsd_errors[0]); i++) {
                    check_str("xsd_errors[i].errstring", vireo_xsd_errors[i].errstring, xsd_errors[i].errstring);
                    check("xsd_errors[i].errnum", vireo_xsd_errors[i].errnum, xsd_errors[i].errnum);
                }
            """)
        }

        let program = """
        /* Generated by Vireo's XenHeaderComparison test: every definition of Vireo's ABI headers
           against Xen's. */
        #include <stddef.h>
        #include <stdio.h>
        #include <string.h>
        #include <\(umbrella)>
        \(Self.xenHeaders.map { "#include <\($0)>" }.joined(separator: "\n"))

        static int checked, mismatches;
        static void check(const char *what, long long vireo, long long xen) {
            checked++;
            if (vireo != xen) { mismatches++; printf("MISMATCH %s: vireo=%lld xen=%lld\\n", what, vireo, xen); }
        }
        static void check_str(const char *what, const char *vireo, const char *xen) {
            checked++;
            if (strcmp(vireo, xen) != 0) { mismatches++; printf("MISMATCH %s: vireo=\\"%s\\" xen=\\"%s\\"\\n", what, vireo, xen); }
        }
        int main(void) {
        \(body.joined(separator: "\n"))
            printf("CHECKED %d MISMATCHES %d\\n", checked, mismatches);
            return 0;
        }
        """
        report.program = program

        let source = workDir.appendingPathComponent("abi_compare.c")
        let binary = workDir.appendingPathComponent("abi_compare")
        try program.write(to: source, atomically: true, encoding: .utf8)
        let build = try Self.run(clang, ["-std=c11", "-w", "-D__XEN_INTERFACE_VERSION__=\(xenInterfaceVersion)",
                                         "-I", vireoInclude, "-I", xenInclude, source.path, "-o", binary.path])
        guard build.status == 0 else {
            throw Failure(description: "the comparison program does not compile (a Vireo name without a Xen counterpart?):\n"
                + build.err.split(separator: "\n").filter { $0.contains("error") }.prefix(40).joined(separator: "\n"))
        }
        let result = try Self.run(binary.path, [])
        let output = String(decoding: result.out, as: UTF8.self)
        for line in output.split(separator: "\n") {
            if line.hasPrefix("MISMATCH ") { report.mismatches.append(String(line.dropFirst("MISMATCH ".count))) }
            if line.hasPrefix("CHECKED ") { report.checked = Int(line.split(separator: " ")[1]) ?? 0 }
        }
        guard result.status == 0, output.contains("CHECKED ") else {
            throw Failure(description: "the comparison program failed (status \(result.status)):\n\(output)\(result.err)")
        }
        return report
    }
}
