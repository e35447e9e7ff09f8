import Testing
import VireoABI
import VireoCore
import VireoHypercalls
@testable import VireoHypervisor

/// Writes small ELF executables for the loader tests: PT_LOAD segments, an optional PT_NOTE
/// with the Xen PHYS32_ENTRY note, optionally the note in a section only.
struct ELFBuilder {
    struct Load { var paddr: UInt64; var bytes: [UInt8]; var memsz: UInt64 }
    var is64 = true
    var machine: UInt16 = 62
    var loads: [Load] = []
    var entryNote: UInt64? = nil
    var entryNoteWidth = 4
    var noteInSectionOnly = false

    private static func le(_ v: UInt64, _ n: Int) -> [UInt8] { (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    func build() -> [UInt8] {
        let ehsize = is64 ? 64 : 52, phentsize = is64 ? 56 : 32, shentsize = is64 ? 64 : 40
        var note: [UInt8] = []
        if let entryNote {
            note = Self.le(4, 4) + Self.le(UInt64(entryNoteWidth), 4) + Self.le(UInt64(VIREO_XEN_ELFNOTE_PHYS32_ENTRY), 4)
                + Array("Xen\0".utf8) + Self.le(entryNote, entryNoteWidth)
        }
        let phnum = loads.count + (note.isEmpty || noteInSectionOnly ? 0 : 1)
        var offset = ehsize + phnum * phentsize
        var data: [UInt8] = []
        var loadOffsets: [Int] = []
        for l in loads { loadOffsets.append(offset + data.count); data += l.bytes }
        let noteOffset = offset + data.count
        data += note
        offset += data.count
        let shnum = noteInSectionOnly && !note.isEmpty ? 2 : 0
        let shoff = shnum > 0 ? offset : 0
        var out: [UInt8] = [0x7f, 0x45, 0x4c, 0x46, is64 ? 2 : 1, 1, 1, 0] + [UInt8](repeating: 0, count: 8)
        out += Self.le(2, 2) + Self.le(UInt64(machine), 2) + Self.le(1, 4)
        if is64 {
            out += Self.le(entryNote ?? 0, 8) + Self.le(UInt64(ehsize), 8) + Self.le(UInt64(shoff), 8)
        } else {
            out += Self.le(entryNote ?? 0, 4) + Self.le(UInt64(ehsize), 4) + Self.le(UInt64(shoff), 4)
        }
        out += Self.le(0, 4) + Self.le(UInt64(ehsize), 2) + Self.le(UInt64(phentsize), 2) + Self.le(UInt64(phnum), 2)
        out += Self.le(UInt64(shentsize), 2) + Self.le(UInt64(shnum), 2) + Self.le(0, 2)
        func ph(_ type: UInt32, _ off: Int, _ paddr: UInt64, _ filesz: Int, _ memsz: UInt64, _ align: UInt64) -> [UInt8] {
            if is64 {
                return Self.le(UInt64(type), 4) + Self.le(7, 4) + Self.le(UInt64(off), 8) + Self.le(paddr, 8) + Self.le(paddr, 8)
                    + Self.le(UInt64(filesz), 8) + Self.le(memsz, 8) + Self.le(align, 8)
            }
            return Self.le(UInt64(type), 4) + Self.le(UInt64(off), 4) + Self.le(paddr, 4) + Self.le(paddr, 4)
                + Self.le(UInt64(filesz), 4) + Self.le(memsz, 4) + Self.le(7, 4) + Self.le(align, 4)
        }
        for (l, off) in zip(loads, loadOffsets) { out += ph(1, off, l.paddr, l.bytes.count, l.memsz, 4096) }
        if !note.isEmpty && !noteInSectionOnly { out += ph(4, noteOffset, 0, note.count, UInt64(note.count), 4) }
        out += data
        if shnum > 0 {
            out += [UInt8](repeating: 0, count: shentsize)  // the null section
            if is64 {
                out += Self.le(0, 4) + Self.le(7, 4) + Self.le(0, 8) + Self.le(0, 8) + Self.le(UInt64(noteOffset), 8)
                    + Self.le(UInt64(note.count), 8) + Self.le(0, 4) + Self.le(0, 4) + Self.le(4, 8) + Self.le(0, 8)
            } else {
                out += Self.le(0, 4) + Self.le(7, 4) + Self.le(0, 4) + Self.le(0, 4) + Self.le(UInt64(noteOffset), 4)
                    + Self.le(UInt64(note.count), 4) + Self.le(0, 4) + Self.le(0, 4) + Self.le(4, 4) + Self.le(0, 4)
            }
        }
        return out
    }

    static func hello(entry: UInt64 = 0x10_0000) -> ELFBuilder {
        var b = ELFBuilder()
        b.loads = [Load(paddr: 0x10_0000, bytes: [0xf4, 0xeb, 0xfd] + [UInt8](repeating: 0x90, count: 61), memsz: 0x3000)]
        b.entryNote = entry
        return b
    }
}

@Suite struct PVHLoaderTests {
    static func memory(_ mib: UInt64 = 4) throws -> GuestMemory { try GuestMemory(ramBytes: mib << 20) }

    @Test func loadsSegmentsZeroesBSSAndWritesStartInfo() throws {
        let memory = try Self.memory()
        try memory.fill(0xcc, at: GuestPhysicalAddress(0x10_0000), count: 0x3000)  // stale bytes where BSS goes
        let bytes = ELFBuilder.hello().build()
        let image = try ELFImage(bytes)
        #expect(image.pvhEntry == 0x10_0000)
        let boot = try PVHLoader.load(image, fileBytes: bytes, into: memory, commandLine: "console=hvc0 quiet",
                                      modules: [BootModule(bytes: [1, 2, 3], commandLine: "initrd")])
        #expect(boot.entry == 0x10_0000)
        #expect(try memory.bytes(at: GuestPhysicalAddress(0x10_0000), count: 3) == [0xf4, 0xeb, 0xfd])
        #expect(try memory.bytes(at: GuestPhysicalAddress(0x10_0040), count: 0x3000 - 0x40).allSatisfy { $0 == 0 }, "BSS zeroed")
        #expect(boot.startInfo % 8 == 0 && UInt64(boot.startInfo) >= boot.imageEnd)
        let info = try memory.load(vireo_hvm_start_info.self, at: GuestPhysicalAddress(UInt64(boot.startInfo)))
        #expect(info.magic == UInt32(VIREO_XEN_HVM_START_MAGIC_VALUE))
        #expect(info.version == 1)
        let cmdline = try memory.bytes(at: GuestPhysicalAddress(info.cmdline_paddr), count: 19)
        #expect(cmdline == Array("console=hvc0 quiet".utf8) + [0])
        #expect(info.nr_modules == 1)
        let module = try memory.load(vireo_hvm_modlist_entry.self, at: GuestPhysicalAddress(info.modlist_paddr))
        #expect(module.size == 3 && module.paddr % 4096 == 0)
        #expect(try memory.bytes(at: GuestPhysicalAddress(module.paddr), count: 3) == [1, 2, 3])
        #expect(info.memmap_entries == 3)
        let last = try memory.load(vireo_hvm_memmap_table_entry.self,
                                   at: GuestPhysicalAddress(info.memmap_paddr + 2 * 24))
        #expect(last.addr == 0x10_0000 && last.addr + last.size == 4 << 20 && last.type == 1)
    }

    @Test func theEntryNoteMayBeEightBytesOrInASection() throws {
        var eight = ELFBuilder.hello(entry: 0x10_0002)
        eight.entryNoteWidth = 8
        #expect(try ELFImage(eight.build()).pvhEntry == 0x10_0002)
        var section = ELFBuilder.hello(entry: 0x10_0001)
        section.noteInSectionOnly = true
        #expect(try ELFImage(section.build()).pvhEntry == 0x10_0001)
        var elf32 = ELFBuilder.hello()
        elf32.is64 = false
        elf32.machine = 3
        #expect(try ELFImage(elf32.build()).pvhEntry == 0x10_0000)
    }

    @Test func brokenFilesAreRefusedWithAReason() throws {
        let good = ELFBuilder.hello().build()
        #expect(throws: BootImageError.notELF) { try ELFImage(Array("#!/bin/sh\necho hi\n".utf8)) }
        #expect(throws: BootImageError.notELF) { try ELFImage([]) }
        var bad = good; bad[5] = 2
        #expect(throws: BootImageError.bigEndian) { try ELFImage(bad) }
        bad = good; bad[4] = 9
        #expect(throws: BootImageError.unsupportedClass(9)) { try ELFImage(bad) }
        var arm = ELFBuilder.hello(); arm.machine = 183
        #expect(throws: BootImageError.unsupportedMachine(183)) { try ELFImage(arm.build()) }
        #expect(throws: BootImageError.self) { try ELFImage(Array(good.prefix(100))) }
        var noNote = ELFBuilder.hello(); noNote.entryNote = nil
        let noEntry = try ELFImage(noNote.build())
        #expect(throws: BootImageError.noPVHEntry) {
            try PVHLoader.load(noEntry, fileBytes: noNote.build(), into: try Self.memory())
        }
        var overlap = ELFBuilder.hello()
        overlap.loads.append(.init(paddr: 0x10_1000, bytes: [1], memsz: 16))
        #expect(throws: BootImageError.overlappingSegments(0, 1)) { try ELFImage(overlap.build()) }
        var huge = ELFBuilder.hello()
        huge.loads[0].memsz = 64 << 20
        let hugeBytes = huge.build()
        #expect(throws: BootImageError.exceedsGuestMemory(index: 0, end: 0x10_0000 + (64 << 20), ramSize: 4 << 20)) {
            try PVHLoader.load(try ELFImage(hugeBytes), fileBytes: hugeBytes, into: try Self.memory())
        }
        let outside = ELFBuilder.hello(entry: 0x5000).build()
        #expect(throws: BootImageError.entryOutsideImage(0x5000)) {
            try PVHLoader.load(try ELFImage(outside), fileBytes: outside, into: try Self.memory())
        }
        let message = "\(BootImageError.noPVHEntry)"
        #expect(message.contains("PHYS32_ENTRY"))
    }

    /// Fuzz: truncations and random byte flips of a valid image never crash the parser.
    @Test func corruptedImagesNeverCrashTheParser() throws {
        let good = ELFBuilder.hello().build()
        for length in stride(from: 0, to: good.count, by: 3) { _ = try? ELFImage(Array(good.prefix(length))) }
        var state: UInt64 = 0x1234_5678
        for _ in 0..<3_000 {
            var bytes = good
            for _ in 0..<4 {
                state = state &* 6364136223846793005 &+ 1442695040888963407
                bytes[Int(state >> 33) % bytes.count] = UInt8(truncatingIfNeeded: state >> 17)
            }
            if let image = try? ELFImage(bytes) {
                _ = try? PVHLoader.load(image, fileBytes: bytes, into: try Self.memory(2))
            }
        }
    }

    @Test func memoryMapCutsOutReservedRanges() {
        let map = PVHLoader.memoryMap(ramSize: 16 << 20, reserved: [.init(start: (16 << 20) - 0x2000, size: 0x2000)])
        #expect(map.map { [$0.addr, $0.size, UInt64($0.type)] } == [
            [0, 0xA_0000, 1], [0xA_0000, 0x6_0000, 2], [0x10_0000, (15 << 20) - 0x2000, 1], [(16 << 20) - 0x2000, 0x2000, 2],
        ])
    }
}
