import VireoHypercalls

/// A domain's identity (Xen's `domid_t`).
///
/// Ordinary domains are numbered below ``DomainID/firstReserved``; the values above it are
/// Xen's special IDs, which hypercall arguments use (`DOMID_SELF` = "the caller").
public struct DomainID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public init(_ rawValue: UInt16) { self.rawValue = rawValue }

    /// The backend domain (Xen's domain 0), where Vireo's backends live.
    public static let zero = DomainID(0)
    public static let firstReserved = DomainID(UInt16(VIREO_DOMID_FIRST_RESERVED))
    /// "The calling domain" in hypercall arguments (`DOMID_SELF`).
    public static let calling = DomainID(UInt16(VIREO_DOMID_SELF))
    public static let io = DomainID(UInt16(VIREO_DOMID_IO))
    public static let xen = DomainID(UInt16(VIREO_DOMID_XEN))
    public static let cow = DomainID(UInt16(VIREO_DOMID_COW))
    public static let invalid = DomainID(UInt16(VIREO_DOMID_INVALID))
    public static let idle = DomainID(UInt16(VIREO_DOMID_IDLE))

    /// True for IDs that name a real domain rather than one of the special values.
    public var isOrdinary: Bool { rawValue < VIREO_DOMID_FIRST_RESERVED }

    public static func < (a: DomainID, b: DomainID) -> Bool { a.rawValue < b.rawValue }

    public var description: String {
        switch self {
        case .calling: "DOMID_SELF"
        case .io: "DOMID_IO"
        case .xen: "DOMID_XEN"
        case .cow: "DOMID_COW"
        case .invalid: "DOMID_INVALID"
        case .idle: "DOMID_IDLE"
        default: "dom\(rawValue)"
        }
    }
}

/// A grant reference: an index into the granting domain's grant table (Xen's `grant_ref_t`).
public struct GrantRef: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public init(_ rawValue: UInt32) { self.rawValue = rawValue }
    public static func < (a: GrantRef, b: GrantRef) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "gref \(rawValue)" }
}

/// A handle the host returns for one grant mapping (Xen's `grant_handle_t`).
public struct GrantHandle: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public init(_ rawValue: UInt32) { self.rawValue = rawValue }
    public var description: String { "grant handle \(rawValue)" }
}

/// An event channel port, local to one domain (Xen's `evtchn_port_t`). Port 0 is never bound.
public struct EventPort: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public init(_ rawValue: UInt32) { self.rawValue = rawValue }
    public static func < (a: EventPort, b: EventPort) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "port \(rawValue)" }
}

/// The size of a guest page and of a grant: 4 KiB.
public let guestPageSize = Int(VIREO_ABI_PAGE_SIZE)
public let guestPageShift = UInt64(VIREO_ABI_PAGE_SHIFT)

/// A guest frame number: a guest-physical address shifted right by 12 (Xen's `xen_pfn_t`).
public struct GuestFrame: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (a: GuestFrame, b: GuestFrame) -> Bool { a.rawValue < b.rawValue }

    /// The frame's first byte, or nil when the shift would overflow 64 bits.
    public var address: GuestPhysicalAddress? {
        rawValue >> (64 - guestPageShift) == 0 ? GuestPhysicalAddress(rawValue << guestPageShift) : nil
    }
    public var description: String { "gfn 0x" + String(rawValue, radix: 16) }
}

/// An address in a guest's physical address space. Never a host pointer: every access goes
/// through guest memory's one checked translation.
public struct GuestPhysicalAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (a: GuestPhysicalAddress, b: GuestPhysicalAddress) -> Bool { a.rawValue < b.rawValue }

    public var frame: GuestFrame { GuestFrame(rawValue >> guestPageShift) }
    public var offsetInPage: Int { Int(rawValue & UInt64(guestPageSize - 1)) }

    /// `self + bytes`, or nil if it would wrap around the address space.
    public func advanced(by bytes: UInt64) -> GuestPhysicalAddress? {
        let (sum, overflow) = rawValue.addingReportingOverflow(bytes)
        return overflow ? nil : GuestPhysicalAddress(sum)
    }
    public var description: String { "gpa 0x" + String(rawValue, radix: 16) }
}

/// An address in a guest's virtual address space, as hypercall pointer arguments carry
/// (Xen's guest handles). Translated through the guest's page tables on every use.
public struct GuestVirtualAddress: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ rawValue: UInt64) { self.rawValue = rawValue }
    public static func < (a: GuestVirtualAddress, b: GuestVirtualAddress) -> Bool { a.rawValue < b.rawValue }
    public func advanced(by bytes: UInt64) -> GuestVirtualAddress? {
        let (sum, overflow) = rawValue.addingReportingOverflow(bytes)
        return overflow ? nil : GuestVirtualAddress(sum)
    }
    public var description: String { "gva 0x" + String(rawValue, radix: 16) }
}

/// The version of Vireo's guest ABI statement (Hypercalls/include/vireo/abi.h).
public let vireoABIVersion = Int(VIREO_ABI_VERSION)
