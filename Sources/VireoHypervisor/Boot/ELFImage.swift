import VireoHypercalls

/// Why an image cannot be booted; each case names what is wrong.
public enum BootImageError: Error, Equatable, Sendable, CustomStringConvertible {
    case notELF
    case unsupportedClass(UInt8)
    case bigEndian
    case unsupportedMachine(UInt16)
    case unsupportedType(UInt16)
    case truncated(String)
    case badSegment(index: Int, String)
    case overlappingSegments(Int, Int)
    case exceedsGuestMemory(index: Int, end: UInt64, ramSize: UInt64)
    case noLoadableSegments
    case noPVHEntry
    case entryOutsideImage(UInt64)
    case bootDataDoesNotFit(needed: UInt64, ramSize: UInt64)

    public var description: String {
        switch self {
        case .notELF: "not an ELF file (bad magic)"
        case .unsupportedClass(let c): "unsupported ELF class \(c) (expected 1 for ELF32 or 2 for ELF64)"
        case .bigEndian: "big-endian ELF files are not x86 images"
        case .unsupportedMachine(let m): "ELF machine \(m) is not x86 (expected 62, x86-64, or 3, i386)"
        case .unsupportedType(let t): "ELF type \(t) is not an executable (expected ET_EXEC)"
        case .truncated(let what): "the file is truncated: \(what)"
        case .badSegment(let i, let why): "program header \(i): \(why)"
        case .overlappingSegments(let a, let b): "loadable segments \(a) and \(b) overlap"
        case .exceedsGuestMemory(let i, let end, let ram):
            "loadable segment \(i) ends at 0x\(String(end, radix: 16)), beyond guest memory (0x\(String(ram, radix: 16)) bytes)"
        case .noLoadableSegments: "the file has no loadable (PT_LOAD) segment"
        case .noPVHEntry: "no Xen PVH entry: the file has no XEN_ELFNOTE_PHYS32_ENTRY note (is it a PVH kernel?)"
        case .entryOutsideImage(let e): "the PVH entry point 0x\(String(e, radix: 16)) lies outside every loadable segment"
        case .bootDataDoesNotFit(let needed, let ram):
            "the command line, memory map and modules (\(needed) bytes) do not fit in guest memory (0x\(String(ram, radix: 16)) bytes)"
        }
    }
}

/// The parts of an ELF executable a PVH loader needs: loadable segments by physical address,
/// and the Xen notes (the PHYS32 entry above all). Every offset and size read from the file is
/// checked against the file before use.
public struct ELFImage: Sendable {
    public struct Segment: Sendable, Equatable {
        public var physicalAddress: UInt64
        public var fileOffset: Int
        public var fileSize: Int
        public var memorySize: UInt64
        public var end: UInt64 { physicalAddress + memorySize }
    }

    public let is64Bit: Bool
    public let segments: [Segment]
    /// XEN_ELFNOTE_PHYS32_ENTRY, if present.
    public let pvhEntry: UInt64?
    /// Every Xen note found: type -> descriptor bytes.
    public let xenNotes: [UInt32: [UInt8]]

    /// Parses `bytes`; throws a ``BootImageError`` naming the first problem found.
    public init(_ bytes: [UInt8]) throws(BootImageError) {
        let file = ByteReader(bytes)
        guard bytes.count >= 16, bytes[0] == 0x7f, bytes[1] == 0x45, bytes[2] == 0x4c, bytes[3] == 0x46 else {
            throw .notELF
        }
        guard bytes[4] == 1 || bytes[4] == 2 else { throw .unsupportedClass(bytes[4]) }
        guard bytes[5] == 1 else { throw .bigEndian }
        let is64 = bytes[4] == 2
        guard bytes.count >= (is64 ? 64 : 52) else { throw .truncated("ELF header") }
        let type = try file.u16(16)
        let machine = try file.u16(18)
        guard type == 2 else { throw .unsupportedType(type) }
        guard machine == (is64 ? 62 : 3) else { throw .unsupportedMachine(machine) }
        let phoff = is64 ? try file.u64(32) : UInt64(try file.u32(28))
        let shoff = is64 ? try file.u64(40) : UInt64(try file.u32(32))
        let phentsize = Int(try file.u16(is64 ? 54 : 42))
        let phnum = Int(try file.u16(is64 ? 56 : 44))
        let shentsize = Int(try file.u16(is64 ? 58 : 46))
        let shnum = Int(try file.u16(is64 ? 60 : 48))
        guard phentsize >= (is64 ? 56 : 32) || phnum == 0 else { throw .truncated("program header entries are too small") }
        guard let phStart = Int(exactly: phoff), phStart <= bytes.count,
              phnum * phentsize <= bytes.count - phStart else { throw .truncated("program headers") }

        var segments: [Segment] = []
        var noteRanges: [(offset: Int, size: Int, align: Int)] = []
        for i in 0..<phnum {
            let h = phStart + i * phentsize
            let kind = try file.u32(h)
            let offset, paddr, filesz, memsz, align: UInt64
            if is64 {
                offset = try file.u64(h + 8); paddr = try file.u64(h + 24)
                filesz = try file.u64(h + 32); memsz = try file.u64(h + 40); align = try file.u64(h + 48)
            } else {
                offset = UInt64(try file.u32(h + 4)); paddr = UInt64(try file.u32(h + 12))
                filesz = UInt64(try file.u32(h + 16)); memsz = UInt64(try file.u32(h + 20)); align = UInt64(try file.u32(h + 28))
            }
            switch kind {
            case 1:  // PT_LOAD
                guard filesz <= memsz else { throw .badSegment(index: i, "file size \(filesz) exceeds memory size \(memsz)") }
                guard offset <= UInt64(bytes.count), filesz <= UInt64(bytes.count) - offset else {
                    throw .badSegment(index: i, "its \(filesz) bytes at offset \(offset) run past the end of the file")
                }
                guard !paddr.addingReportingOverflow(memsz).overflow else {
                    throw .badSegment(index: i, "physical address 0x\(String(paddr, radix: 16)) + size overflows")
                }
                if memsz > 0 {
                    segments.append(Segment(physicalAddress: paddr, fileOffset: Int(offset), fileSize: Int(filesz), memorySize: memsz))
                }
            case 4:  // PT_NOTE
                guard offset <= UInt64(bytes.count), filesz <= UInt64(bytes.count) - offset else {
                    throw .badSegment(index: i, "note segment runs past the end of the file")
                }
                noteRanges.append((Int(offset), Int(filesz), Int(min(align, 8))))
            default:
                break
            }
        }
        guard !segments.isEmpty else { throw .noLoadableSegments }
        let sorted = segments.enumerated().sorted { $0.element.physicalAddress < $1.element.physicalAddress }
        for (a, b) in zip(sorted, sorted.dropFirst()) where a.element.end > b.element.physicalAddress {
            throw .overlappingSegments(a.offset, b.offset)
        }

        var notes = try Self.xenNotes(file, noteRanges)
        if notes[UInt32(VIREO_XEN_ELFNOTE_PHYS32_ENTRY)] == nil {
            // Some linkers put the notes in sections only: look at SHT_NOTE sections.
            var sectionNotes: [(offset: Int, size: Int, align: Int)] = []
            if shnum > 0, shentsize >= (is64 ? 64 : 40), let shStart = Int(exactly: shoff), shStart <= bytes.count,
               shnum * shentsize <= bytes.count - shStart {
                for i in 0..<shnum {
                    let h = shStart + i * shentsize
                    guard try file.u32(h + 4) == 7 else { continue }  // SHT_NOTE
                    let offset = is64 ? try file.u64(h + 24) : UInt64(try file.u32(h + 16))
                    let size = is64 ? try file.u64(h + 32) : UInt64(try file.u32(h + 20))
                    let align = is64 ? try file.u64(h + 48) : UInt64(try file.u32(h + 32))
                    guard offset <= UInt64(bytes.count), size <= UInt64(bytes.count) - offset else { continue }
                    sectionNotes.append((Int(offset), Int(size), Int(min(align, 8))))
                }
            }
            notes.merge(try Self.xenNotes(file, sectionNotes)) { a, _ in a }
        }
        self.is64Bit = is64
        self.segments = segments
        self.xenNotes = notes
        if let desc = notes[UInt32(VIREO_XEN_ELFNOTE_PHYS32_ENTRY)] {
            // 4 bytes by the spec; some producers write 8 (QEMU reads 8 in ELF64 images).
            let reader = ByteReader(desc)
            self.pvhEntry = desc.count >= 8 ? try reader.u64(0) : desc.count >= 4 ? UInt64(try reader.u32(0)) : nil
        } else {
            self.pvhEntry = nil
        }
    }

    /// Notes named "Xen" in the given ranges. Names and descriptors are padded to 4 bytes
    /// (or to the range's 8-byte alignment where the producer used that).
    private static func xenNotes(_ file: ByteReader, _ ranges: [(offset: Int, size: Int, align: Int)]) throws(BootImageError) -> [UInt32: [UInt8]] {
        var notes: [UInt32: [UInt8]] = [:]
        for range in ranges {
            let align = range.align == 8 ? 8 : 4
            var at = range.offset
            let end = range.offset + range.size
            while end - at >= 12 {
                let namesz = Int(try file.u32(at)), descsz = Int(try file.u32(at + 4)), type = try file.u32(at + 8)
                let nameStart = at + 12
                let descStart = nameStart + (namesz + align - 1) / align * align
                let next = descStart + (descsz + align - 1) / align * align
                guard namesz <= range.size, descsz <= range.size, descStart <= end, descStart + descsz <= end else {
                    throw .truncated("an ELF note runs past its segment")
                }
                let name = file.bytes[nameStart..<(nameStart + namesz)].prefix { $0 != 0 }
                if Array(name) == Array("Xen".utf8) {
                    notes[type] = Array(file.bytes[descStart..<(descStart + descsz)])
                }
                at = next
            }
        }
        return notes
    }
}

/// Little-endian reads with bounds checks.
struct ByteReader {
    let bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    func u16(_ at: Int) throws(BootImageError) -> UInt16 {
        guard at >= 0, at <= bytes.count - 2 else { throw .truncated("read at offset \(at)") }
        return UInt16(bytes[at]) | UInt16(bytes[at + 1]) << 8
    }
    func u32(_ at: Int) throws(BootImageError) -> UInt32 {
        guard at >= 0, at <= bytes.count - 4 else { throw .truncated("read at offset \(at)") }
        return (0..<4).reduce(0) { $0 | UInt32(bytes[at + $1]) << (8 * UInt32($1)) }
    }
    func u64(_ at: Int) throws(BootImageError) -> UInt64 {
        UInt64(try u32(at)) | UInt64(try u32(at + 4)) << 32
    }
}
