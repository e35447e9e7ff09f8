import VireoABI
import VireoCore

/// Puts a vCPU straight into 64-bit long mode, as a guest's boot code would after the PVH
/// entry, for code the host places itself (tests, benchmarks): the first 2 MiB identity-mapped
/// with one large page (tables at 0x5000–0x7FFF), a GDT at 0x3000 (0x08 64-bit code, 0x10
/// data), an IDT at 0x4000 with the given interrupt gates.
public enum LongModeSetup {
    public static func enter(_ memory: GuestMemory, _ vcpu: KVMVirtualCPU, rip: UInt64, rsp: UInt64 = 0x8000,
                             idt gates: [(vector: UInt8, handler: UInt64)] = []) throws {
        let pml4: UInt64 = 0x5000, pdpt: UInt64 = 0x6000, pd: UInt64 = 0x7000, gdt: UInt64 = 0x3000, idt: UInt64 = 0x4000
        try memory.store(pdpt | 0x3, at: GuestPhysicalAddress(pml4))
        try memory.store(pd | 0x3, at: GuestPhysicalAddress(pdpt))
        try memory.store(UInt64(0x83), at: GuestPhysicalAddress(pd))  // 2 MiB page at 0: present, writable, large
        try memory.store(UInt64(0), at: GuestPhysicalAddress(gdt))
        try memory.store(UInt64(0x00AF_9A00_0000_FFFF), at: GuestPhysicalAddress(gdt + 8))   // 64-bit code
        try memory.store(UInt64(0x00CF_9200_0000_FFFF), at: GuestPhysicalAddress(gdt + 16))  // data
        for (vector, handler) in gates {
            let low = UInt64(PVHEntry.codeSelector) << 16 | (handler & 0xFFFF) | (handler & 0xFFFF_0000) << 32 | UInt64(0x8E00) << 32
            try memory.store(low, at: GuestPhysicalAddress(idt + UInt64(vector) * 16))
            try memory.store(handler >> 32, at: GuestPhysicalAddress(idt + UInt64(vector) * 16 + 8))
        }
        var s = try vcpu.specialRegisters()
        s.gdt = X86DescriptorTable(base: gdt, limit: 23)
        s.idt = X86DescriptorTable(base: idt, limit: 0xFFF)
        s.cr3 = pml4
        s.cr4 = 1 << 5                              // PAE
        s.cr0 = 0x8000_0011                         // PG | ET | PE
        s.efer = 0x500                              // LME | LMA
        var cs = s.cs
        cs.longMode = true
        cs.defaultSize32 = false
        s.cs = cs
        try vcpu.setSpecialRegisters(s)
        var r = vcpu.registers
        r.rip = rip
        r.rsp = rsp
        vcpu.registers = r
    }
}
