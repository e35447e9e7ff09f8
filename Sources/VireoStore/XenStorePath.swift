import VireoABI
import VireoHypercalls

/// Path rules of the store (Xen's): absolute paths start with "/", relative ones resolve under
/// the connection's `/local/domain/<id>`; names use `[A-Za-z0-9]` and `-/_@`; no "//", no
/// trailing "/" (except the root itself); bounded lengths. "@introduceDomain" and
/// "@releaseDomain" are the special watch paths.
public enum XenStorePath {
    public static let absoluteMax = Int(VIREO_XENSTORE_ABS_PATH_MAX)
    public static let relativeMax = Int(VIREO_XENSTORE_REL_PATH_MAX)
    public static let introduceDomain = "@introduceDomain"
    public static let releaseDomain = "@releaseDomain"
    public static let specials: Set<String> = [introduceDomain, releaseDomain]

    /// A domain's home: `/local/domain/<id>`.
    public static func domainPath(_ domain: DomainID) -> String { "/local/domain/\(domain.rawValue)" }

    @inline(__always)
    static func isAllowed(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
             UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"), UInt8(ascii: "/"),
             UInt8(ascii: "_"), UInt8(ascii: "@"):
            true
        default:
            false
        }
    }

    /// Whether `path` (already absolute) is a valid node name.
    static func isValidAbsolute(_ path: Substring.UTF8View) -> Bool {
        guard let first = path.first, first == UInt8(ascii: "/"), path.count <= absoluteMax else { return false }
        if path.count == 1 { return true }
        var previous: UInt8 = 0
        for c in path {
            guard isAllowed(c) else { return false }
            if c == UInt8(ascii: "/") && previous == UInt8(ascii: "/") { return false }
            previous = c
        }
        return previous != UInt8(ascii: "/")
    }

    /// The absolute node path for `raw` as a connection of `domain` sent it.
    /// - Throws: EINVAL for anything that is not a valid node path (special paths included).
    public static func resolve(_ raw: Substring, for domain: DomainID) throws(XenStoreError) -> String {
        if raw.utf8.first == UInt8(ascii: "/") {
            guard isValidAbsolute(raw.utf8) else { throw .EINVAL }
            return String(raw)
        }
        // "@..." names the special watch paths, never a node (Xen's rule).
        guard !raw.isEmpty, raw.utf8.first != UInt8(ascii: "@"), raw.utf8.count <= relativeMax else { throw .EINVAL }
        let full = domainPath(domain) + "/" + raw
        guard isValidAbsolute(full[...].utf8) else { throw .EINVAL }
        return full
    }

    /// The parent of an absolute path ("/" for top-level nodes); nil for the root.
    static func parent(of path: String) -> String? {
        guard path != "/" else { return nil }
        let utf8 = path.utf8
        var i = utf8.endIndex
        while i > utf8.startIndex {
            i = utf8.index(before: i)
            if utf8[i] == UInt8(ascii: "/") { break }
        }
        return i == utf8.startIndex ? "/" : String(path[..<i])
    }

    /// The last component of an absolute path.
    static func name(of path: String) -> String {
        guard let slash = path.utf8.lastIndex(of: UInt8(ascii: "/")) else { return path }
        return String(path[path.utf8.index(after: slash)...])
    }

    static func child(_ parent: String, _ name: String) -> String {
        parent == "/" ? "/" + name : parent + "/" + name
    }

    /// Whether `path` is `ancestor` or lies below it.
    static func isAtOrBelow(_ path: String, _ ancestor: String) -> Bool {
        if ancestor == "/" { return path.utf8.first == UInt8(ascii: "/") }
        guard path.hasPrefix(ancestor) else { return false }
        let rest = path.utf8.dropFirst(ancestor.utf8.count)
        return rest.isEmpty || rest.first == UInt8(ascii: "/")
    }
}

/// Strict decimal parsing of protocol integers: digits only, no sign, no overflow.
enum XenStoreNumber {
    static func parse<T: FixedWidthInteger & UnsignedInteger>(_ text: Substring, as: T.Type = T.self) -> T? {
        guard !text.isEmpty, text.utf8.count <= 20 else { return nil }
        var value: T = 0
        for c in text.utf8 {
            guard c >= UInt8(ascii: "0"), c <= UInt8(ascii: "9") else { return nil }
            let (m, o1) = value.multipliedReportingOverflow(by: 10)
            let (a, o2) = m.addingReportingOverflow(T(c - UInt8(ascii: "0")))
            guard !o1, !o2 else { return nil }
            value = a
        }
        return value
    }

    /// A domain ID naming an ordinary domain (below DOMID_FIRST_RESERVED).
    static func domain(_ text: Substring) throws(XenStoreError) -> DomainID {
        guard let raw = parse(text, as: UInt16.self), DomainID(raw).isOrdinary else { throw .EINVAL }
        return DomainID(raw)
    }
}

/// One entry of a node's permission list (Xen's `xs_permissions`): a domain and its access.
/// The first entry of a list names the owner and the access of every domain not listed.
public struct XenStorePermission: Hashable, Sendable, CustomStringConvertible {
    public enum Access: UInt8, Sendable {
        case none = 0, read = 1, write = 2, both = 3

        public var letter: Character {
            switch self {
            case .none: "n"
            case .read: "r"
            case .write: "w"
            case .both: "b"
            }
        }
        public var canRead: Bool { rawValue & 1 != 0 }
        public var canWrite: Bool { rawValue & 2 != 0 }
    }

    public var domain: DomainID
    public var access: Access

    public init(_ access: Access, _ domain: DomainID) {
        self.access = access
        self.domain = domain
    }

    /// "r1", "n0", ...: a letter and a decimal domain ID (any 16-bit value; no truncation).
    public init?(_ text: Substring) {
        guard let letter = text.first else { return nil }
        switch letter {
        case "n": access = .none
        case "r": access = .read
        case "w": access = .write
        case "b": access = .both
        default: return nil
        }
        guard let id = XenStoreNumber.parse(text.dropFirst(), as: UInt16.self) else { return nil }
        domain = DomainID(id)
    }

    public var description: String { "\(access.letter)\(domain.rawValue)" }
}
