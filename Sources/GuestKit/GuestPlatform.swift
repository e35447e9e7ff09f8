// GuestKit: the frontend side of Vireo's guest ABI, one set of sources for two worlds. In a
// bare-metal guest (Embedded Swift) the builder compiles these files with the guest-side
// VireoCore sources into one module, so VireoCore is imported only where it is a module.
#if canImport(VireoCore)
import VireoCore
#endif

/// What GuestKit needs from the machine it runs in, and nothing more: hypercalls, a view of
/// guest-physical memory, pages of its own RAM, and a cycle counter.
///
/// A bare-metal guest's platform calls the hypercall page and reads identity-mapped memory
/// (`Hypercalls/runtime/swift/PVHPlatform.swift`). A host test's platform is a real `Domain`
/// whose hypercalls go through the real `HypercallDispatcher`. GuestKit is generic over it
/// (Embedded Swift has no existentials of non-class protocols).
public protocol GuestPlatform {
    /// Hypercall `number` with RDI, RSI, RDX, R10, R8 = `a1`...`a5`; the hypervisor's RAX.
    /// Pointer arguments are guest-physical addresses (GuestKit runs with them identity-mapped).
    func hypercall(_ number: UInt64, _ a1: UInt64, _ a2: UInt64, _ a3: UInt64, _ a4: UInt64, _ a5: UInt64) -> Int64
    /// The `count` bytes of guest-physical memory at `address` (RAM or a special frame the
    /// guest has placed, such as shared_info).
    func memory(at address: UInt64, count: Int) -> SharedRegion
    /// A zeroed, page-aligned page of the guest's own RAM, never freed: its guest-physical address.
    func allocatePage() -> UInt64
    /// The cycle counter the pvclock record is scaled from (RDTSC on x86).
    func timestampCounter() -> UInt64

    /// Points the platform's upcall entry (an interrupt vector) at vCPU 0's
    /// `evtchn_upcall_pending` byte, at guest-physical `upcallPending`, which the entry clears;
    /// returns the vector, or nil where the platform takes no interrupts (then events are
    /// waited for with SCHEDOP_block). By default, nil.
    func installUpcallEntry(acknowledging upcallPending: UInt64) -> UInt8?
    /// Sleeps until the upcall interrupt arrives, unless the byte at `upcallPending` is set.
    func waitForUpcall(pending upcallPending: UInt64)
    /// Upcall interrupts taken so far.
    func upcallCount() -> UInt64
}

extension GuestPlatform {
    public func installUpcallEntry(acknowledging upcallPending: UInt64) -> UInt8? { nil }
    public func waitForUpcall(pending upcallPending: UInt64) {}
    public func upcallCount() -> UInt64 { 0 }
}

/// A hypercall or protocol failure: Xen's negative errno, as a positive code.
public struct GuestError: Error, Equatable, Sendable {
    public let code: Int64
    public init(code: Int64) { self.code = code }
    /// From a hypercall's return value (which is negative).
    public init(result: Int64) { self.code = -result }

    public static let EPERM = GuestError(code: 1)
    public static let ENOENT = GuestError(code: 2)
    public static let EIO = GuestError(code: 5)
    public static let E2BIG = GuestError(code: 7)
    public static let EAGAIN = GuestError(code: 11)
    public static let ENOMEM = GuestError(code: 12)
    public static let EACCES = GuestError(code: 13)
    public static let EBUSY = GuestError(code: 16)
    public static let EEXIST = GuestError(code: 17)
    public static let EISDIR = GuestError(code: 21)
    public static let EINVAL = GuestError(code: 22)
    public static let ENOSPC = GuestError(code: 28)
    public static let EROFS = GuestError(code: 30)
    public static let ENOSYS = GuestError(code: 38)
    public static let ENOTEMPTY = GuestError(code: 39)
    public static let EQUOTA = GuestError(code: 122)

    /// The error a XenStore XS_ERROR reply names ("ENOENT"); EIO for a name it does not know.
    public init(storeErrorName name: [UInt8]) {
        let known: [(StaticString, GuestError)] = [
            ("ENOENT", .ENOENT), ("EAGAIN", .EAGAIN), ("EACCES", .EACCES), ("EEXIST", .EEXIST),
            ("EINVAL", .EINVAL), ("EISDIR", .EISDIR), ("ENOSPC", .ENOSPC), ("EBUSY", .EBUSY),
            ("E2BIG", .E2BIG), ("EROFS", .EROFS), ("ENOSYS", .ENOSYS), ("ENOTEMPTY", .ENOTEMPTY),
            ("EQUOTA", .EQUOTA), ("EPERM", .EPERM), ("ENOMEM", .ENOMEM),
        ]
        for (text, error) in known where Bytes.equal(name, text) {
            self = error
            return
        }
        self = .EIO
    }
}

/// Byte-string helpers that stay clear of String comparison (which pulls Unicode tables into
/// an embedded image).
public enum Bytes {
    public static func equal(_ bytes: [UInt8], _ text: StaticString) -> Bool {
        guard bytes.count == text.utf8CodeUnitCount else { return false }
        let start = text.utf8Start
        for i in 0..<bytes.count where bytes[i] != start[i] { return false }
        return true
    }

    public static func of(_ text: StaticString) -> [UInt8] {
        Array(UnsafeBufferPointer(start: text.utf8Start, count: text.utf8CodeUnitCount))
    }

    /// The decimal digits of `bytes` as a number; nil when there are none or another byte.
    public static func decimal(_ bytes: [UInt8]) -> UInt64? {
        guard !bytes.isEmpty else { return nil }
        var value: UInt64 = 0
        for byte in bytes {
            guard byte >= 48 && byte <= 57 else { return nil }
            let (times, o1) = value.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times.addingReportingOverflow(UInt64(byte - 48))
            guard !o1 && !o2 else { return nil }
            value = sum
        }
        return value
    }

    /// `value` in decimal.
    public static func decimal(_ value: UInt64) -> [UInt8] {
        var digits: [UInt8] = []
        var rest = value
        repeat {
            digits.append(UInt8(48 + rest % 10))
            rest /= 10
        } while rest != 0
        return digits.reversed()
    }
}
