import Foundation
import Testing
@testable import VireoABI

/// The hypercall table (what `vireo abi` prints and the dispatcher follows) against the headers
/// and against Docs/ABI.md.
@Suite struct HypercallTableTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// `#define VIREO_<prefix>name value` lines of every header, as (Xen name, value).
    static func headerConstants(prefix: String) throws -> [(name: String, value: Int)] {
        let dir = root.appendingPathComponent("Hypercalls/include/vireo")
        let walker = FileManager.default.enumerator(at: dir, includingPropertiesForKeys: nil)
        var found: [(String, Int)] = []
        for case let file as URL in walker ?? FileManager.DirectoryEnumerator() where file.pathExtension == "h" {
            for line in try String(contentsOf: file, encoding: .utf8).split(separator: "\n") {
                let words = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
                guard words.count >= 3, words[0] == "#define", words[1].hasPrefix("VIREO_" + prefix),
                      let value = Int(words[2]) else { continue }
                found.append((String(words[1].dropFirst("VIREO_".count)), value))
            }
        }
        return found
    }

    /// Sub-operation families: the constant prefix and the hypercall whose sub-ops they are.
    static let families: [(prefix: String, call: Hypercall)] = [
        ("EVTCHNOP_", .eventChannelOp), ("GNTTABOP_", .grantTableOp), ("XENMEM_", .memoryOp),
        ("VCPUOP_", .vcpuOp), ("SCHEDOP_", .schedOp), ("HVMOP_", .hvmOp), ("XENVER_", .xenVersion),
        ("CONSOLEIO_", .consoleIo),
    ]

    @Test func everyHeaderHypercallIsInTheEnumWithItsNumber() throws {
        let numbers = try Self.headerConstants(prefix: "HYPERVISOR_")
        #expect(numbers.count == Hypercall.allCases.count)
        for (name, value) in numbers {
            let call = Hypercall(rawValue: UInt64(value))
            #expect(call?.xenName == String(name.dropFirst("HYPERVISOR_".count)), "\(name) = \(value)")
        }
        for call in Hypercall.allCases { #expect(Int(call.headerValue) == Int(call.rawValue)) }
    }

    @Test func everyHeaderSubOpIsInTheTable() throws {
        for (prefix, call) in Self.families {
            let entry = HypercallTable.entry(call)
            let constants = try Self.headerConstants(prefix: prefix)
            #expect(!constants.isEmpty, "\(prefix) constants in the headers")
            for (name, value) in constants {
                #expect(entry.subOps.contains { $0.name == name && $0.number == value },
                        "\(name) = \(value) is stated in Hypercalls/ but missing from HypercallTable")
            }
            for op in entry.subOps {
                #expect(constants.contains { $0.name == op.name && $0.value == op.number }, "\(op.name) in the table")
            }
        }
    }

    @Test func supportedSubsetIsTheOneTheDesignNames() {
        let supported = Set(HypercallTable.entries.filter(\.support.isSupported).map(\.hypercall))
        #expect(supported == [.consoleIo, .xenVersion, .memoryOp, .grantTableOp, .eventChannelOp,
                              .schedOp, .setTimerOp, .vcpuOp, .hvmOp])
        #expect(HypercallTable.entry(.grantTableOp).subOp(Int(8))?.support.isSupported == false, "no v2")
        #expect(HypercallTable.unsupportedResult.hypercallResult == -38)
    }

    /// Rows `| number | name | yes/no | note |` of Docs/ABI.md.
    static func documentedRows() throws -> [(number: Int, name: String, supported: Bool)] {
        let doc = try String(contentsOf: root.appendingPathComponent("Docs/ABI.md"), encoding: .utf8)
        return doc.split(separator: "\n").compactMap { line in
            let cells = line.split(separator: "|", omittingEmptySubsequences: false).map { $0.trimmingCharacters(in: .whitespaces) }
            guard cells.count >= 5, let number = Int(cells[1]), cells[3] == "yes" || cells[3] == "no" else { return nil }
            return (number, cells[2].trimmingCharacters(in: CharacterSet(charactersIn: "`")), cells[3] == "yes")
        }
    }

    @Test func docsListEveryHypercallAndSubOp() throws {
        let rows = try Self.documentedRows()
        for entry in HypercallTable.entries {
            let row = rows.first { $0.name == entry.hypercall.xenName && $0.number == Int(entry.hypercall.rawValue) }
            #expect(row != nil, "Docs/ABI.md lacks hypercall \(entry.hypercall.xenName)")
            #expect(row?.supported == entry.support.isSupported, "Docs/ABI.md: \(entry.hypercall.xenName) support")
            for op in entry.subOps {
                let opRow = rows.first { $0.name == op.name && $0.number == op.number }
                #expect(opRow != nil, "Docs/ABI.md lacks \(op.name)")
                #expect(opRow?.supported == op.support.isSupported, "Docs/ABI.md: \(op.name) support")
            }
        }
    }
}

@Suite struct TypedNameTests {
    @Test func domainIDs() {
        #expect(DomainID.calling.rawValue == 0x7FF0)
        #expect(DomainID(5).isOrdinary)
        #expect(!DomainID.invalid.isOrdinary)
        #expect("\(DomainID(3))" == "dom3")
        #expect("\(DomainID.calling)" == "DOMID_SELF")
    }

    @Test func addressesAndFrames() {
        let a = GuestPhysicalAddress(0x12345)
        #expect(a.frame == GuestFrame(0x12))
        #expect(a.offsetInPage == 0x345)
        #expect(GuestFrame(0x12).address == GuestPhysicalAddress(0x12000))
        #expect(GuestFrame(UInt64.max).address == nil, "a frame whose address overflows has none")
        #expect(GuestPhysicalAddress(UInt64.max).advanced(by: 1) == nil)
        #expect(GuestVirtualAddress(10).advanced(by: 5) == GuestVirtualAddress(15))
    }

    @Test func xenErrors() {
        #expect(XenError.EINVAL.rawValue == 22)
        #expect(XenError.EINVAL.hypercallResult == -22)
        #expect(XenError(hypercallResult: -38) == .ENOSYS)
        #expect(XenError(hypercallResult: 0) == nil)
        #expect(XenError(hypercallResult: 7) == nil)
        #expect(XenError.EWOULDBLOCK == .EAGAIN)
        #expect(XenError.EAGAIN.name == "EAGAIN")
        #expect(XenError(rawValue: 4000).name == "E4000")
        #expect(Set(XenError.all.map(\.error.rawValue)).count == XenError.all.count, "no duplicates")
    }

    @Test func abiVersionIsStated() {
        #expect(vireoABIVersion >= 1)
    }
}
