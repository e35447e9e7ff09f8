import VireoABI

/// Xen's PVH entry convention (Hypercalls/include/vireo/hvm/start_info.h): the machine state
/// at a PVH guest's first instruction.
public enum PVHEntry {
    /// Selector values for the flat segments. PVH promises no selectors and no GDT; these are
    /// the conventional ones (a guest that loads its own GDT replaces them).
    public static let codeSelector: UInt16 = 0x08
    public static let dataSelector: UInt16 = 0x10
    public static let taskSelector: UInt16 = 0x18

    /// The special registers at entry, starting from `current` (to keep the APIC base):
    /// 32-bit protected mode, paging off (CR0 = PE | ET, CR3 = CR4 = EFER = 0); CS a flat
    /// 4 GiB 32-bit code segment; DS, ES, SS, FS, GS flat 4 GiB data segments; TR an active
    /// 32-bit TSS at base 0, limit 0x67; LDTR unusable; GDTR and IDTR empty.
    public static func specialRegisters(from current: X86SpecialRegisters) -> X86SpecialRegisters {
        var s = current
        s.cs = .flat32(code: true, selector: codeSelector)
        let data = X86Segment.flat32(code: false, selector: dataSelector)
        s.ds = data; s.es = data; s.ss = data; s.fs = data; s.gs = data
        var tr = X86Segment()
        tr.selector = taskSelector
        tr.limit = 0x67
        tr.type = 0xB  // busy 32-bit TSS
        tr.present = true
        s.tr = tr
        var ldt = X86Segment()
        ldt.type = 0x2
        ldt.unusable = true
        s.ldt = ldt
        s.gdt = X86DescriptorTable()
        s.idt = X86DescriptorTable()
        s.cr0 = X86SpecialRegisters.cr0ProtectionEnable | X86SpecialRegisters.cr0ExtensionType
        s.cr2 = 0; s.cr3 = 0; s.cr4 = 0; s.cr8 = 0
        s.efer = 0
        return s
    }

    /// The general registers at entry: EIP = `entry`, EBX = `startInfo` (the guest-physical
    /// address of hvm_start_info), EFLAGS = 0x2 (IF, TF, VM clear), every other register 0.
    public static func registers(entry: UInt32, startInfo: GuestPhysicalAddress) -> X86Registers {
        var r = X86Registers()
        r.rip = UInt64(entry)
        r.rbx = startInfo.rawValue
        r.rflags = 0x2
        return r
    }
}

extension KVMVirtualCPU {
    /// Puts the vCPU in Xen's PVH entry state (``PVHEntry``), ready to run at `entry` with EBX
    /// holding the guest-physical address of hvm_start_info. Set CPUID first.
    public func setPVHEntryState(entry: UInt32, startInfo: GuestPhysicalAddress) throws(KVMError) {
        guard startInfo.rawValue <= UInt64(UInt32.max) else {
            throw .invalidArgument("hvm_start_info at \(startInfo) is above 4 GiB (EBX is 32 bits)")
        }
        try setSpecialRegisters(PVHEntry.specialRegisters(from: try specialRegisters()))
        registers = PVHEntry.registers(entry: entry, startInfo: startInfo)
    }
}
