import VireoKVMSys

/// The general-purpose registers, RIP and RFLAGS of a vCPU (KVM's kvm_regs, as Swift values).
public struct X86Registers: Equatable, Sendable {
    public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
    public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
    public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
    public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
    public var rip: UInt64 = 0
    /// Bit 1 is reserved and always set.
    public var rflags: UInt64 = 0x2

    public init() {}

    init(_ r: kvm_regs) {
        rax = r.rax; rbx = r.rbx; rcx = r.rcx; rdx = r.rdx
        rsi = r.rsi; rdi = r.rdi; rsp = r.rsp; rbp = r.rbp
        r8 = r.r8; r9 = r.r9; r10 = r.r10; r11 = r.r11
        r12 = r.r12; r13 = r.r13; r14 = r.r14; r15 = r.r15
        rip = r.rip; rflags = r.rflags
    }

    var kvm: kvm_regs {
        kvm_regs(rax: rax, rbx: rbx, rcx: rcx, rdx: rdx, rsi: rsi, rdi: rdi, rsp: rsp, rbp: rbp,
                 r8: r8, r9: r9, r10: r10, r11: r11, r12: r12, r13: r13, r14: r14, r15: r15,
                 rip: rip, rflags: rflags)
    }
}

/// A segment register with its hidden (cached) descriptor, as KVM holds it.
public struct X86Segment: Equatable, Sendable {
    public var base: UInt64 = 0
    public var limit: UInt32 = 0
    public var selector: UInt16 = 0
    /// The descriptor's 4-bit type (for code/data: accessed, read/write, conforming, code).
    public var type: UInt8 = 0
    public var present = false
    public var privilegeLevel: UInt8 = 0
    /// D/B: 32-bit default operand size.
    public var defaultSize32 = false
    /// S: a code or data segment (clear for system segments such as the TSS).
    public var codeOrData = false
    /// L: 64-bit code.
    public var longMode = false
    /// G: the limit counts 4 KiB pages.
    public var granularity = false
    public var unusable = false

    public init() {}

    init(_ s: kvm_segment) {
        base = s.base; limit = s.limit; selector = s.selector; type = s.type
        present = s.present != 0; privilegeLevel = s.dpl; defaultSize32 = s.db != 0
        codeOrData = s.s != 0; longMode = s.l != 0; granularity = s.g != 0; unusable = s.unusable != 0
    }

    var kvm: kvm_segment {
        var s = kvm_segment()
        s.base = base; s.limit = limit; s.selector = selector; s.type = type
        s.present = present ? 1 : 0; s.dpl = privilegeLevel; s.db = defaultSize32 ? 1 : 0
        s.s = codeOrData ? 1 : 0; s.l = longMode ? 1 : 0; s.g = granularity ? 1 : 0
        s.unusable = unusable ? 1 : 0
        return s
    }

    /// A flat 4 GiB 32-bit segment: code (execute/read) or data (read/write), accessed.
    public static func flat32(code: Bool, selector: UInt16) -> X86Segment {
        var s = X86Segment()
        s.limit = 0xFFFF_FFFF
        s.selector = selector
        s.type = code ? 0xB : 0x3
        s.present = true
        s.defaultSize32 = true
        s.codeOrData = true
        s.granularity = true
        return s
    }
}

/// A descriptor-table register (GDTR, IDTR).
public struct X86DescriptorTable: Equatable, Sendable {
    public var base: UInt64
    public var limit: UInt16
    public init(base: UInt64 = 0, limit: UInt16 = 0) {
        self.base = base
        self.limit = limit
    }
}

/// Control registers, segments and descriptor tables of a vCPU (KVM's kvm_sregs). Read with
/// ``KVMVirtualCPU/specialRegisters()``, change, write back with
/// ``KVMVirtualCPU/setSpecialRegisters(_:)``; fields Vireo does not name (the APIC base, the
/// pending-interrupt bitmap) are carried through unchanged.
public struct X86SpecialRegisters: Equatable, Sendable {
    var raw: kvm_sregs

    init(_ raw: kvm_sregs) { self.raw = raw }

    public var cs: X86Segment { get { X86Segment(raw.cs) } set { raw.cs = newValue.kvm } }
    public var ds: X86Segment { get { X86Segment(raw.ds) } set { raw.ds = newValue.kvm } }
    public var es: X86Segment { get { X86Segment(raw.es) } set { raw.es = newValue.kvm } }
    public var fs: X86Segment { get { X86Segment(raw.fs) } set { raw.fs = newValue.kvm } }
    public var gs: X86Segment { get { X86Segment(raw.gs) } set { raw.gs = newValue.kvm } }
    public var ss: X86Segment { get { X86Segment(raw.ss) } set { raw.ss = newValue.kvm } }
    public var tr: X86Segment { get { X86Segment(raw.tr) } set { raw.tr = newValue.kvm } }
    public var ldt: X86Segment { get { X86Segment(raw.ldt) } set { raw.ldt = newValue.kvm } }
    public var gdt: X86DescriptorTable {
        get { X86DescriptorTable(base: raw.gdt.base, limit: raw.gdt.limit) }
        set { raw.gdt.base = newValue.base; raw.gdt.limit = newValue.limit }
    }
    public var idt: X86DescriptorTable {
        get { X86DescriptorTable(base: raw.idt.base, limit: raw.idt.limit) }
        set { raw.idt.base = newValue.base; raw.idt.limit = newValue.limit }
    }
    public var cr0: UInt64 { get { raw.cr0 } set { raw.cr0 = newValue } }
    public var cr2: UInt64 { get { raw.cr2 } set { raw.cr2 = newValue } }
    public var cr3: UInt64 { get { raw.cr3 } set { raw.cr3 = newValue } }
    public var cr4: UInt64 { get { raw.cr4 } set { raw.cr4 = newValue } }
    public var cr8: UInt64 { get { raw.cr8 } set { raw.cr8 = newValue } }
    public var efer: UInt64 { get { raw.efer } set { raw.efer = newValue } }
    public var apicBase: UInt64 { get { raw.apic_base } set { raw.apic_base = newValue } }

    public static func == (a: X86SpecialRegisters, b: X86SpecialRegisters) -> Bool {
        withUnsafeBytes(of: a.raw) { x in withUnsafeBytes(of: b.raw) { y in x.elementsEqual(y) } }
    }

    /// CR0 bits.
    public static let cr0ProtectionEnable: UInt64 = 1 << 0
    public static let cr0ExtensionType: UInt64 = 1 << 4
    public static let cr0Paging: UInt64 = 1 << 31
}

/// One CPUID leaf (and sub-leaf) as the guest will see it.
public struct CPUIDEntry: Equatable, Sendable {
    public var function: UInt32
    public var index: UInt32
    /// KVM_CPUID_FLAG_* (bit 0: the sub-leaf index is significant).
    public var flags: UInt32
    public var eax: UInt32, ebx: UInt32, ecx: UInt32, edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, significantIndex: Bool = false,
                eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function
        self.index = index
        self.flags = significantIndex ? UInt32(KVM_CPUID_FLAG_SIGNIFCANT_INDEX) : 0
        self.eax = eax; self.ebx = ebx; self.ecx = ecx; self.edx = edx
    }

    init(_ e: kvm_cpuid_entry2) {
        function = e.function; index = e.index; flags = e.flags
        eax = e.eax; ebx = e.ebx; ecx = e.ecx; edx = e.edx
    }

    var kvm: kvm_cpuid_entry2 {
        var e = kvm_cpuid_entry2()
        e.function = function; e.index = index; e.flags = flags
        e.eax = eax; e.ebx = ebx; e.ecx = ecx; e.edx = edx
        return e
    }

    public var significantIndex: Bool { flags & UInt32(KVM_CPUID_FLAG_SIGNIFCANT_INDEX) != 0 }
}

/// A kvm_cpuid2 with room for `capacity` entries, for KVM_GET_SUPPORTED_CPUID/KVM_SET_CPUID2.
struct CPUIDBuffer: ~Copyable {
    let raw: UnsafeMutableRawPointer
    let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
        let bytes = MemoryLayout<kvm_cpuid2>.size + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
        raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        header.pointee.nent = UInt32(capacity)
    }

    init(_ entries: [CPUIDEntry]) {
        self.init(capacity: entries.count)
        let e = vireo_kvm_cpuid_entries(header)!
        for (i, entry) in entries.enumerated() { e[i] = entry.kvm }
    }

    deinit { raw.deallocate() }

    var header: UnsafeMutablePointer<kvm_cpuid2> { raw.assumingMemoryBound(to: kvm_cpuid2.self) }

    var entries: [CPUIDEntry] {
        let e = vireo_kvm_cpuid_entries(header)!
        return (0..<Int(min(header.pointee.nent, UInt32(capacity)))).map { CPUIDEntry(e[$0]) }
    }
}
