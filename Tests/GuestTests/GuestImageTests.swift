import Foundation
import Testing
import VireoGuestBuilder

/// The images `vireo guest build` writes are PVH guests every loader accepts: ELF64 x86-64,
/// loaded at 1 MiB, with the PHYS32_ENTRY note pointing into the code, and no SSE/MMX/x87.
@Suite struct GuestImageTests {
    static let guests = ["hello", "hello-c", "hypercalls", "evtchnping", "hello-kit", "cpubench", "netecho", "trap", "heap", "hostile", "xenstore", "timer", "upcall", "smp", "console-echo"]
    static let phys32Entry: UInt32 = 18  // XEN_ELFNOTE_PHYS32_ENTRY

    @Test func theSamplesAreEveryDirectoryUnderSamples() throws {
        #expect(try GuestSupport.repository.sampleNames() == ["blkcheck", "cpubench", "evtchnping", "hello", "hello-c", "hello-kit", "hypercalls", "idle", "netecho"])
    }

    @Test(arguments: guests) func imageIsAnELF64PVHGuest(name: String) throws {
        let image = try GuestSupport.image(name)
        let elf = try ELFImage(Data(contentsOf: image.path))
        #expect(elf.type == 2, "ET_EXEC")
        #expect(elf.machine == 62, "EM_X86_64")

        let loads = elf.loads
        #expect(loads.count >= 3, "text, rodata and data segments")
        #expect(loads.first?.physicalAddress == 0x10_0000, "the image starts at 1 MiB")
        for load in loads {
            #expect(load.physicalAddress >= 0x10_0000)
            #expect(load.virtualAddress == load.physicalAddress, "identity-mapped")
            #expect(load.fileSize <= load.memorySize)
            #expect(load.physicalAddress + load.memorySize < 0x4000_0000, "inside the 1 GiB identity map")
        }

        let notes = try elf.notes()
        let entry = try #require(notes.first { $0.name == "Xen" && $0.type == Self.phys32Entry },
                                 "a Xen PHYS32_ENTRY note in a PT_NOTE")
        #expect(entry.descriptor.count == 8, "the value is a .quad (QEMU reads 8 bytes)")
        let segment = try #require(loads.first { $0.contains(physical: entry.number) }, "the entry lies in a PT_LOAD")
        #expect(segment.executable)
        #expect(segment.physicalAddress == 0x10_0000, "the entry is in the first, code, segment")
        #expect(elf.entry == entry.number)
        #expect(notes.contains { $0.name == "Xen" && $0.type == 6 && $0.descriptor.starts(with: Array("Vireo".utf8)) },
                "GUEST_OS names Vireo")
    }

    /// Every instruction in the image: no xmm/ymm/zmm or mm registers, no x87 (mnemonics in
    /// f...), no SSE state instructions. kvm_pvm hosts cannot execute any of them.
    @Test(arguments: guests) func imageHasNoSSEMMXOrX87(name: String) throws {
        let image = try GuestSupport.image(name)
        guard let objdump = GuestSupport.objdump() else {
            Issue.record("no llvm-objdump beside the toolchain and no objdump on PATH")
            return
        }
        let r = try GuestSupport.run(objdump, ["-d", "--no-show-raw-insn", image.path.path])
        #expect(r.status == 0, "\(r.err)")
        let (instructions, offending) = Self.forbiddenInstructions(in: r.out)
        #expect(instructions > 100, "the disassembly was read")
        #expect(offending.isEmpty, "SSE/MMX/x87 in \(name): \(offending.prefix(10))")
    }

    /// Reads `objdump -d --no-show-raw-insn` output: the number of instructions, and the lines
    /// using an SSE/MMX/x87 register or instruction.
    static func forbiddenInstructions(in disassembly: String) -> (instructions: Int, offending: [String]) {
        let forbiddenRegisters = ["%xmm", "%ymm", "%zmm", "%mm0", "%mm1", "%mm2", "%mm3", "%mm4", "%mm5", "%mm6", "%mm7", "%st"]
        let forbiddenMnemonics: Set<String> = ["emms", "ldmxcsr", "stmxcsr", "movnti", "xsave", "xrstor", "fxsave", "fxrstor"]
        var instructions = 0
        var offending: [String] = []
        for line in disassembly.split(separator: "\n") {
            // "  100000:      \tcli" : an address, a colon, then tab-separated mnemonic and operands.
            let columns = line.split(separator: "\t", omittingEmptySubsequences: false)
            let address = columns[0].trimmingCharacters(in: .whitespaces)
            guard columns.count >= 2, address.hasSuffix(":"), UInt64(address.dropLast(), radix: 16) != nil else { continue }
            let mnemonic = columns[1].trimmingCharacters(in: .whitespaces)
            guard !mnemonic.isEmpty else { continue }
            instructions += 1
            let operands = columns.dropFirst(2).joined(separator: "\t")
            // Every x87 mnemonic starts with f; no integer instruction does.
            if mnemonic.hasPrefix("f") || forbiddenMnemonics.contains(mnemonic)
                || forbiddenRegisters.contains(where: { operands.contains($0) }) {
                offending.append(String(line))
            }
        }
        return (instructions, offending)
    }

    /// The scanner itself catches what it is meant to (so a pass above means something).
    @Test func theScannerFindsSSEMMXAndX87() {
        let sample = """
            /tmp/x.elf:\tfile format elf64-x86-64
            0000000000100000 <f>:
              100000:      \tmovl\t$0x1, %eax
              100005:      \tmovaps\t%xmm0, (%rdi)
              100008:      \tfldt\t(%rsp)
              10000b:      \tpaddb\t%mm1, %mm0
              10000e:      \tret
            """
        let (instructions, offending) = Self.forbiddenInstructions(in: sample)
        #expect(instructions == 5)
        #expect(offending.count == 3)
    }
}
