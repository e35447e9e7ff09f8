import VireoABI
import VireoCore
import VireoHypercalls

/// The hypercall page Vireo writes where the guest asks (WRMSR to the MSR that CPUID leaf
/// 0x40000002 reports): one 32-byte stub per hypercall number,
///
///     mov  $nr, %eax      b8 nr nr nr nr
///     out  %eax, $port    e7 port
///     ret                 c3
///     int3 ...            cc (padding)
///
/// The `out` exits to the engine, which reads the arguments from RDI, RSI, RDX, R10, R8 and
/// writes the result to RAX: every other register is preserved, as Xen preserves them. The same
/// bytes work from 32-bit and 64-bit code.
public enum HypercallPage {
    /// The I/O port the stubs use; Vireo's own (Xen has no such port). An `out` to it from
    /// anywhere but the page is still a hypercall: the guest can only hurt itself.
    public static let port: UInt16 = 0x00E5
    public static let stubSize = Int(VIREO_ABI_HYPERCALL_STUB_SIZE)

    /// The page's bytes.
    public static func bytes() -> [UInt8] {
        var page = [UInt8](repeating: 0xCC, count: guestPageSize)
        for nr in 0..<(guestPageSize / stubSize) {
            let at = nr * stubSize
            let stub: [UInt8] = [0xB8, UInt8(nr), 0, 0, 0, 0xE7, UInt8(port), 0xC3]
            page.replaceSubrange(at..<(at + stub.count), with: stub)
        }
        return page
    }

    /// Handles the guest's write to the hypercall-page MSR: `value` is the page's guest-physical
    /// address with the page index (0) in its low 12 bits. Returns false (the engine injects
    /// #GP, as Xen does) for a bad index or an address that is not the guest's RAM.
    public static func install(msrValue value: UInt64, in memory: GuestMemory) -> Bool {
        guard value & 0xFFF == 0 else { return false }
        let frame = GuestFrame(value >> 12)
        guard memory.isRAM(frame), let gpa = frame.address else { return false }
        return (try? memory.write(bytes(), at: gpa)) != nil
    }

    /// The hypercall number an exit on ``port`` carries (EAX), if it names one.
    public static func number(fromEAX eax: UInt64) -> UInt64 { eax & 0xFFFF_FFFF }
}
