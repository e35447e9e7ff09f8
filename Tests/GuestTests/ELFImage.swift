import Foundation

/// Just enough of an ELF64 reader to check a guest image: the header, program headers, notes.
/// Written for the tests, independent of the builder and of Vireo's loader.
struct ELFImage {
    struct Segment {
        let type: UInt32
        let flags: UInt32
        let offset: UInt64
        let virtualAddress: UInt64
        let physicalAddress: UInt64
        let fileSize: UInt64
        let memorySize: UInt64
        let alignment: UInt64

        static let load: UInt32 = 1
        static let note: UInt32 = 4
        var executable: Bool { flags & 1 != 0 }
        func contains(physical address: UInt64) -> Bool {
            address >= physicalAddress && address < physicalAddress + memorySize
        }
    }

    struct Note {
        let name: String
        let type: UInt32
        let descriptor: [UInt8]
        var number: UInt64 {
            descriptor.prefix(8).enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        }
    }

    enum Failure: Error { case tooShort, notELF64, badTable(String) }

    let bytes: [UInt8]
    let elfClass: UInt8
    let littleEndian: Bool
    let type: UInt16
    let machine: UInt16
    let entry: UInt64
    let segments: [Segment]

    static func u16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) | UInt16(b[at + 1]) << 8 }
    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[at + $1]) << (8 * UInt32($1)) } }
    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[at + $1]) << (8 * UInt64($1)) } }

    init(_ data: Data) throws {
        let b = [UInt8](data)
        guard b.count >= 64, b[0..<4] == [0x7f, 0x45, 0x4c, 0x46], b[4] == 2, b[5] == 1 else { throw Failure.notELF64 }
        bytes = b
        elfClass = b[4]
        littleEndian = b[5] == 1
        type = Self.u16(b, 16)
        machine = Self.u16(b, 18)
        entry = Self.u64(b, 24)
        let tableOffset = Int(Self.u64(b, 32)), entrySize = Int(Self.u16(b, 54)), count = Int(Self.u16(b, 56))
        guard entrySize == 56, tableOffset + count * entrySize <= b.count else {
            throw Failure.badTable("program headers at \(tableOffset), \(count) x \(entrySize)")
        }
        segments = (0..<count).map { i in
            let at = tableOffset + i * entrySize
            return Segment(type: Self.u32(b, at), flags: Self.u32(b, at + 4), offset: Self.u64(b, at + 8),
                           virtualAddress: Self.u64(b, at + 16), physicalAddress: Self.u64(b, at + 24),
                           fileSize: Self.u64(b, at + 32), memorySize: Self.u64(b, at + 40), alignment: Self.u64(b, at + 48))
        }
    }

    var loads: [Segment] { segments.filter { $0.type == Segment.load } }

    /// Every note of every PT_NOTE segment, walked with the segment's alignment.
    func notes() throws -> [Note] {
        func u32(_ at: Int) -> UInt32 { Self.u32(bytes, at) }
        var result: [Note] = []
        for segment in segments where segment.type == Segment.note {
            let align = Int(max(segment.alignment, 4))
            func rounded(_ n: Int) -> Int { (n + align - 1) / align * align }
            var at = Int(segment.offset)
            let end = at + Int(segment.fileSize)
            guard end <= bytes.count else { throw Failure.badTable("PT_NOTE beyond the file") }
            while at + 12 <= end {
                let nameSize = Int(u32(at)), descriptorSize = Int(u32(at + 4)), type = u32(at + 8)
                let nameStart = at + 12
                let descriptorStart = nameStart + rounded(nameSize)
                guard descriptorStart + descriptorSize <= end else { throw Failure.badTable("note overruns PT_NOTE") }
                let name = String(decoding: bytes[nameStart..<nameStart + max(nameSize - 1, 0)], as: UTF8.self)
                result.append(Note(name: name, type: type, descriptor: Array(bytes[descriptorStart..<descriptorStart + descriptorSize])))
                at = descriptorStart + rounded(descriptorSize)
            }
        }
        return result
    }
}
