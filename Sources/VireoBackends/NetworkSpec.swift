/// One `--net` value of `vireo run`: `tap:IFNAME` or `switch:NAME`, then optional
/// `,mac=XX:XX:XX:XX:XX:XX` and `,rate=RATE/s` (xl.cfg's vif `rate`: a number with B, KB, MB,
/// GB for bytes or b, Kb, Mb, Gb for bits, decimal multiples). Errors name the field.
public struct NetworkSpec: Sendable, Equatable {
    public enum HostSide: Sendable, Equatable {
        /// A TAP interface, created (or attached to, if it exists) by name.
        case tap(String)
        /// An in-process switch, shared by every vif given the same name in one process.
        case networkSwitch(String)
    }

    public var hostSide: HostSide
    public var mac: EthernetAddress?
    public var rateBytesPerSecond: UInt64?

    public init(hostSide: HostSide, mac: EthernetAddress? = nil, rateBytesPerSecond: UInt64? = nil) {
        self.hostSide = hostSide
        self.mac = mac
        self.rateBytesPerSecond = rateBytesPerSecond
    }

    /// Parses the `--net` text.
    /// - Throws: ``BackendError`` starting with `--net` and naming the field that is wrong.
    public init(parsing text: String) throws(BackendError) {
        var parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let head = parts.removeFirst()
        if head.hasPrefix("tap:") {
            let name = String(head.dropFirst(4))
            guard !name.isEmpty, name.utf8.count <= 15, !name.contains("/"), !name.contains(" ") else {
                throw BackendError("--net tap: '\(name)' is not an interface name (1 to 15 bytes, no '/' or spaces)")
            }
            hostSide = .tap(name)
        } else if head.hasPrefix("switch:") {
            let name = String(head.dropFirst(7))
            guard !name.isEmpty else { throw BackendError("--net switch: give the switch a name (switch:NAME)") }
            hostSide = .networkSwitch(name)
        } else {
            throw BackendError("--net '\(head)': give tap:IFNAME or switch:NAME")
        }
        for part in parts {
            let pair = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard pair.count == 2 else { throw BackendError("--net '\(part)': options are mac=M and rate=R/s") }
            switch pair[0] {
            case "mac":
                guard let mac = EthernetAddress(parsing: pair[1]) else {
                    throw BackendError("--net mac: '\(pair[1])' is not six hex bytes like 00:16:3e:01:02:03")
                }
                guard !mac.isMulticast, mac.key != 0 else {
                    throw BackendError("--net mac: '\(pair[1])' is a multicast or zero address, not one a vif can own")
                }
                self.mac = mac
            case "rate":
                guard let rate = Self.parseRate(pair[1]) else {
                    throw BackendError("--net rate: '\(pair[1])' is not a rate like 10Mb/s or 1MB/s")
                }
                rateBytesPerSecond = rate
            default:
                throw BackendError("--net '\(pair[0])': unknown option (mac=M, rate=R/s)")
            }
        }
    }

    /// xl.cfg's rate: `N[K|M|G](B|b)/s` in bytes per second; nil when malformed or zero.
    static func parseRate(_ text: String) -> UInt64? {
        guard text.hasSuffix("/s") else { return nil }
        var body = String(text.dropLast(2))
        guard let unit = body.last, unit == "B" || unit == "b" else { return nil }
        body.removeLast()
        var multiplier: UInt64 = 1
        if let prefix = body.last, let scale = ["K": UInt64(1_000), "M": 1_000_000, "G": 1_000_000_000][String(prefix)] {
            multiplier = scale
            body.removeLast()
        }
        guard let number = UInt64(body), number > 0 else { return nil }
        let (bytes, overflow) = number.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { return nil }
        return unit == "B" ? bytes : max(1, bytes / 8)
    }
}
