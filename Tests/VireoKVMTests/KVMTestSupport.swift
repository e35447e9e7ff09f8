import Testing
import VireoABI
import VireoCore
import VireoKVM

/// Why KVM tests cannot run on this host, or nil (they run).
let kvmUnavailable: String? = {
    let reason = KVMSystem.unavailableReason()
    if let reason { print("VireoKVMTests: skipping KVM tests: \(reason)") }
    return reason
}()

/// The trait every test needing /dev/kvm carries: skipped, with the reason, where KVM is missing.
let requiresKVM = ConditionTrait.enabled(if: kvmUnavailable == nil, Comment(rawValue: kvmUnavailable ?? "KVM present"))

/// Where test code is placed and where PVH entry points EBX (no start info is written: the
/// tests only look at the register).
let codeAddress: UInt32 = 0x1000
let startInfoAddress = GuestPhysicalAddress(0x9000)

/// A one-vCPU guest with 64 KiB of RAM (plus `specialFrames`), `code` at 0x1000, Vireo's guest
/// CPUID, and the vCPU in the PVH entry state at 0x1000. The VM lives for the body.
func withGuest<R>(code: [UInt8], specialFrames: Int = 0, vcpuID: UInt32 = 0,
                  _ body: (GuestMemory, borrowing KVMVirtualMachine, KVMVirtualCPU) throws -> R) throws -> R {
    let memory = try GuestMemory(ramBytes: 64 * 1024, specialFrames: specialFrames)
    try memory.write(code, at: GuestPhysicalAddress(UInt64(codeAddress)))
    let kvm = try KVMSystem()
    let vm = try kvm.makeVirtualMachine(memory: memory)
    let vcpu = try vm.makeVirtualCPU(id: vcpuID)
    try vcpu.setCPUID(XenCPUID.guestCPUID(supported: kvm.supportedCPUID(), vcpu: vcpuID, domain: DomainID(1)))
    try vcpu.setPVHEntryState(entry: codeAddress, startInfo: startInfoAddress)
    return try body(memory, vm, vcpu)
}

/// Little x86 encodings for the test guests (hand-assembled; 32-bit operand size).
enum X86 {
    static func movEAX(_ v: UInt32) -> [UInt8] { [0xB8] + le32(v) }
    static func movECX(_ v: UInt32) -> [UInt8] { [0xB9] + le32(v) }
    static func movEDX(_ v: UInt32) -> [UInt8] { [0xBA] + le32(v) }
    /// out %eax, $port
    static func outEAX(_ port: UInt8) -> [UInt8] { [0xE7, port] }
    /// out %al, $port
    static func outAL(_ port: UInt8) -> [UInt8] { [0xE6, port] }
    /// in $port, %eax
    static func inEAX(_ port: UInt8) -> [UInt8] { [0xE5, port] }
    /// mov %eax, (addr)
    static func storeEAX(_ address: UInt32) -> [UInt8] { [0xA3] + le32(address) }
    static let movEAXfromEDX: [UInt8] = [0x89, 0xD0]
    static let xorEAX: [UInt8] = [0x31, 0xC0]
    static let xorEDX: [UInt8] = [0x31, 0xD2]
    static let wrmsr: [UInt8] = [0x0F, 0x30]
    static let rdmsr: [UInt8] = [0x0F, 0x32]
    static let cpuid: [UInt8] = [0x0F, 0xA2]
    static let hlt: [UInt8] = [0xF4]
    static let sti: [UInt8] = [0xFB]
    static let iret: [UInt8] = [0xCF]
    static let iretq: [UInt8] = [0x48, 0xCF]
    /// jmp . (a two-byte loop to itself)
    static let spin: [UInt8] = [0xEB, 0xFE]

    static func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
    static func le64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
}

/// Runs until an exit that is not `.interrupted` (a stray signal), at most `limit` times.
func nextExit(_ vcpu: KVMVirtualCPU, limit: Int = 8) throws -> KVMExit {
    var exit = KVMExit.interrupted
    for _ in 0..<limit {
        exit = try vcpu.run()
        if exit != .interrupted { break }
    }
    return exit
}

/// Puts the vCPU straight into 64-bit long mode (as a guest's boot code would after PVH
/// entry): identity-mapped first 2 MiB (one large page; tables at 0x5000-0x7FFF), a GDT at
/// 0x3000 (0x08 64-bit code, 0x10 data), an IDT at 0x4000 with the given gates, RSP 0x8000.
func enterLongMode(_ memory: GuestMemory, _ vcpu: KVMVirtualCPU, rip: UInt64, idt gates: [(vector: UInt8, handler: UInt64)]) throws {
    try LongModeSetup.enter(memory, vcpu, rip: rip, idt: gates)
}
