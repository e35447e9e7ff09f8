/// A domain as an operator describes it in an xl.cfg file: what `vireo create` builds.
public struct DomainSpec: Equatable, Sendable, Codable {
    public enum Engine: String, Equatable, Sendable, Codable, CaseIterable { case kvm, soft, auto }

    /// What to do when the guest powers off, reboots or crashes (xl.cfg's on_* keys).
    public enum Action: String, Equatable, Sendable, Codable, CaseIterable {
        case destroy, restart, preserve
        case renameRestart = "rename-restart"
        case coredumpDestroy = "coredump-destroy"
        case coredumpRestart = "coredump-restart"
        case softReset = "soft-reset"
    }

    /// A virtual disk (xl-disk-configuration(5)): a raw image served by blkback.
    public struct Disk: Equatable, Sendable, Codable {
        public var target: String
        public var vdev: String
        /// The Xen virtual-device number of `vdev` (xvda = 51712).
        public var device: UInt32
        public var readOnly: Bool
        public init(target: String, vdev: String, device: UInt32, readOnly: Bool) {
            self.target = target
            self.vdev = vdev
            self.device = device
            self.readOnly = readOnly
        }
    }

    /// A virtual network interface (xl-network-configuration(5)).
    public struct Vif: Equatable, Sendable, Codable {
        /// The MAC address, six colon-separated hex bytes; nil: generated.
        public var mac: String?
        /// A Linux bridge to put the host side on.
        public var bridge: String?
        /// The host side's interface name (a TAP device).
        public var vifname: String?
        /// Vireo's in-process switch to connect to, instead of a TAP device.
        public var switchName: String?
        /// A rate limit as xl writes it ("10Mb/s", "1MB/s@20ms").
        public var rate: String?
        /// The vif's device ID (its handle: `device/vif/DEVID`), as xl's `devid=`; nil: the
        /// toolstack gives the lowest free one.
        public var devid: UInt32?
        public init(mac: String? = nil, bridge: String? = nil, vifname: String? = nil, switchName: String? = nil, rate: String? = nil,
                    devid: UInt32? = nil) {
            self.devid = devid
            self.mac = mac
            self.bridge = bridge
            self.vifname = vifname
            self.switchName = switchName
            self.rate = rate
        }
    }

    public var name: String
    public var memoryMiB: Int
    public var vcpus: Int
    public var kernel: String
    public var cmdline: String
    public var disks: [Disk]
    public var vifs: [Vif]
    public var onPoweroff: Action
    public var onReboot: Action
    public var onCrash: Action
    public var engine: Engine
    /// `cpu_weight`: the credit scheduler's weight (1...65535; nil = the default, 256).
    public var cpuWeight: Int?
    /// `cap`: the most CPU the domain may use, in percent of one host CPU (nil or 0 = none).
    public var cap: Int?

    public init(name: String, memoryMiB: Int = 128, vcpus: Int = 1, kernel: String, cmdline: String = "", disks: [Disk] = [],
                vifs: [Vif] = [], onPoweroff: Action = .destroy, onReboot: Action = .restart, onCrash: Action = .destroy,
                engine: Engine = .auto, cpuWeight: Int? = nil, cap: Int? = nil) {
        self.name = name
        self.memoryMiB = memoryMiB
        self.vcpus = vcpus
        self.kernel = kernel
        self.cmdline = cmdline
        self.disks = disks
        self.vifs = vifs
        self.onPoweroff = onPoweroff
        self.onReboot = onReboot
        self.onCrash = onCrash
        self.engine = engine
        self.cpuWeight = cpuWeight
        self.cap = cap
    }
}

/// Something in a configuration that is accepted but worth saying (an unknown key, a key
/// Vireo ignores), with where it is.
public struct ConfigWarning: Equatable, Sendable, CustomStringConvertible {
    public var location: SourceLocation
    public var message: String
    public var description: String { "\(location): warning: \(message)" }
}

extension DomainSpec {
    /// Keys Xen's xl knows that change nothing under Vireo: accepted with a warning.
    static let ignoredKeys: Set<String> = ["uuid", "maxmem", "maxvcpus", "cpus", "on_watchdog",
                                           "on_soft_reset", "vnc", "sdl", "serial", "localtime", "acpi", "apic", "pae",
                                           "hap", "nestedhvm", "device_model_version", "vfb", "vkb", "channel",
                                           "builder", "pvh"]
    /// Keys xl knows whose meaning Vireo cannot give: refused.
    static let unsupportedKeys: [String: String] = [
        "ramdisk": "Vireo boots PVH kernels without an initial ramdisk",
        "bootloader": "Vireo boots the kernel named by 'kernel' directly",
        "pci": "Vireo has no PCI passthrough", "usb": "Vireo has no USB devices", "usbdev": "Vireo has no USB devices",
        "device_model_override": "Vireo has no device model", "firmware": "Vireo boots PVH kernels directly",
    ]
    static let knownKeys: Set<String> = ["name", "memory", "vcpus", "kernel", "cmdline", "extra", "root", "disk", "vif",
                                         "on_poweroff", "on_reboot", "on_crash", "engine", "type", "cpu_weight", "cap"]

    /// Reads an xl.cfg file's text. Every error names the file, line and column; unknown keys
    /// and keys Vireo ignores come back as warnings.
    public static func parse(_ text: String, file: String) throws(ConfigError) -> (spec: DomainSpec, warnings: [ConfigWarning]) {
        let settings = try XLConfigParser.parse(text, file: file)
        var values: [String: XLValue] = [:]
        var order: [String] = []
        var warnings: [ConfigWarning] = []
        for setting in settings {
            if let reason = unsupportedKeys[setting.key] {
                throw ConfigError(setting.location, "'\(setting.key)' is not supported: \(reason)")
            }
            if !knownKeys.contains(setting.key) {
                let why = ignoredKeys.contains(setting.key) ? "has no effect under Vireo and is ignored" : "is not a key Vireo knows; ignored"
                warnings.append(ConfigWarning(location: setting.location, message: "'\(setting.key)' \(why)"))
                continue
            }
            if setting.appends, let earlier = values[setting.key] {
                switch (earlier, setting.value) {
                case (.list(let a, let l), .list(let b, _)): values[setting.key] = .list(a + b, l)
                case (.string(let a, let l), .string(let b, _)): values[setting.key] = .string(a + b, l)
                default:
                    throw ConfigError(setting.location, "'\(setting.key) +=' needs the same kind as before (\(earlier.kind)), not \(setting.value.kind)")
                }
            } else {
                values[setting.key] = setting.value
            }
            if !order.contains(setting.key) { order.append(setting.key) }
        }
        let end = SourceLocation(file: file, line: max(1, text.split(separator: "\n", omittingEmptySubsequences: false).count), column: 1)

        func string(_ key: String) throws(ConfigError) -> (String, SourceLocation)? {
            guard let value = values[key] else { return nil }
            guard case .string(let text, let at) = value else { throw ConfigError(value.location, "'\(key)' must be a quoted string, not \(value.kind)") }
            return (text, at)
        }
        func integer(_ key: String, _ range: ClosedRange<Int>, unit: String) throws(ConfigError) -> Int? {
            guard let value = values[key] else { return nil }
            let text: String
            switch value {
            case .number(let t, _), .string(let t, _): text = t
            case .list: throw ConfigError(value.location, "'\(key)' must be a number, not a list")
            }
            let hex = text.hasPrefix("0x") || text.hasPrefix("0X")
            guard let number = Int(hex ? String(text.dropFirst(2)) : text, radix: hex ? 16 : 10) else {
                throw ConfigError(value.location, "'\(key)' must be a number of \(unit), not '\(text)'")
            }
            guard range.contains(number) else {
                throw ConfigError(value.location, "'\(key)' is \(number) \(unit); give \(range.lowerBound) to \(range.upperBound)")
            }
            return number
        }
        func action(_ key: String, default fallback: Action) throws(ConfigError) -> Action {
            guard let (text, at) = try string(key) else { return fallback }
            guard let action = Action(rawValue: text) else {
                throw ConfigError(at, "'\(key)' is '\(text)'; give one of \(Action.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return action
        }

        guard let (name, nameAt) = try string("name") else { throw ConfigError(end, "the configuration has no 'name'") }
        guard !name.isEmpty, name.utf8.count <= 64,
              name.utf8.allSatisfy({ XLConfigParser.Lexer.isIdentifier($0) || $0 == UInt8(ascii: "-") || $0 == UInt8(ascii: ".") }) else {
            throw ConfigError(nameAt, "'name' must be 1 to 64 letters, digits, '_', '-' or '.', not '\(name)'")
        }
        guard let (kernel, kernelAt) = try string("kernel") else { throw ConfigError(end, "the configuration has no 'kernel'") }
        guard !kernel.isEmpty else { throw ConfigError(kernelAt, "'kernel' is empty") }
        if let (type, at) = try string("type"), type != "pvh" {
            throw ConfigError(at, "'type' is '\(type)'; Vireo runs PVH guests only (type = \"pvh\")")
        }
        var cmdline = ""
        if let (text, at) = try string("cmdline") {
            cmdline = text
            for other in ["root", "extra"] where values[other] != nil {
                warnings.append(ConfigWarning(location: at, message: "'cmdline' is given, so '\(other)' is ignored (as xl does)"))
            }
        } else {
            let root = try string("root").map { "root=" + $0.0 }
            let extra = try string("extra")?.0
            cmdline = [root, extra].compactMap { $0 }.joined(separator: " ")
        }
        var engine = Engine.auto
        if let (text, at) = try string("engine") {
            guard let chosen = Engine(rawValue: text) else {
                throw ConfigError(at, "'engine' is '\(text)'; give kvm, soft or auto")
            }
            engine = chosen
        }
        var disks: [Disk] = [], texts: [String] = []
        if let value = values["disk"] {
            for item in try Self.items(value, key: "disk") {
                let disk = try Disk.parse(item.0, at: item.1, warnings: &warnings)
                if let clash = disks.firstIndex(where: { $0.device == disk.device }) {
                    throw ConfigError(item.1, "disk '\(item.0)' is the same device as disk '\(texts[clash])'")
                }
                disks.append(disk)
                texts.append(item.0)
            }
        }
        var vifs: [Vif] = []
        if let value = values["vif"] {
            for item in try Self.items(value, key: "vif") { vifs.append(try Vif.parse(item.0, at: item.1, warnings: &warnings)) }
        }
        let spec = DomainSpec(name: name, memoryMiB: try integer("memory", 2...65536, unit: "MiB") ?? 128,
                              vcpus: try integer("vcpus", 1...128, unit: "vCPUs") ?? 1, kernel: kernel, cmdline: cmdline,
                              disks: disks, vifs: vifs, onPoweroff: try action("on_poweroff", default: .destroy),
                              onReboot: try action("on_reboot", default: .restart), onCrash: try action("on_crash", default: .destroy),
                              engine: engine, cpuWeight: try integer("cpu_weight", 1...65535, unit: "weight units"),
                              cap: try integer("cap", 0...12800, unit: "percent of one CPU"))
        return (spec, warnings)
    }

    /// The strings of a list setting (a single string counts as a list of one).
    static func items(_ value: XLValue, key: String) throws(ConfigError) -> [(String, SourceLocation)] {
        switch value {
        case .string(let text, let at): return [(text, at)]
        case .number: throw ConfigError(value.location, "'\(key)' must be a list of quoted strings, not a number")
        case .list(let items, _):
            var out: [(String, SourceLocation)] = []
            for item in items {
                guard case .string(let text, let at) = item else {
                    throw ConfigError(item.location, "each '\(key)' entry must be a quoted string, not \(item.kind)")
                }
                out.append((text, at))
            }
            return out
        }
    }

    /// `key=value` and positional parts of a comma-separated device string.
    static func parts(_ text: String) -> [(key: String?, value: String)] {
        text.split(separator: ",", omittingEmptySubsequences: false).map { part in
            let trimmed = part.trimmingSpaces()
            if let eq = trimmed.firstIndex(of: "=") {
                return (String(trimmed[..<eq]).trimmingSpaces(), String(trimmed[trimmed.index(after: eq)...]).trimmingSpaces())
            }
            return (nil, trimmed)
        }
    }
}

extension DomainSpec.Disk {
    /// One disk as `xl block-attach` takes it (the same string as an entry of `disk = [...]`);
    /// errors and warnings are placed at `source`, column 1.
    public static func parse(_ text: String, source: String) throws(ConfigError) -> (disk: Self, warnings: [ConfigWarning]) {
        var warnings: [ConfigWarning] = []
        let disk = try parse(text, at: SourceLocation(file: source, line: 1, column: 1), warnings: &warnings)
        return (disk, warnings)
    }

    /// An xl disk string: `target=PATH, vdev=xvda, access=rw, format=raw` or positional
    /// `PATH,raw,xvda,rw` / `PATH,xvda,rw` (a legacy `file:`/`phy:`/`aio:` prefix on the
    /// target is accepted).
    static func parse(_ text: String, at location: SourceLocation, warnings: inout [ConfigWarning]) throws(ConfigError) -> Self {
        var target: String?, format: String?, vdev: String?, access: String?
        var positional: [String] = []
        for part in DomainSpec.parts(text) {
            guard let key = part.key else {
                if !part.value.isEmpty { positional.append(part.value) }
                continue
            }
            switch key {
            case "target": target = part.value
            case "format": format = part.value
            case "vdev": vdev = part.value
            case "access": access = part.value
            case "devtype":
                guard part.value == "disk" else { throw ConfigError(location, "disk '\(text)': devtype '\(part.value)' is not supported (disk only)") }
            case "backendtype", "script", "backend", "discard", "no-discard", "direct-io-safe":
                warnings.append(ConfigWarning(location: location, message: "disk '\(text)': '\(key)' has no effect under Vireo"))
            default:
                throw ConfigError(location, "disk '\(text)': unknown parameter '\(key)'")
            }
        }
        switch positional.count {
        case 0: break
        case 1: target = target ?? positional[0]
        case 2: (target, vdev) = (target ?? positional[0], vdev ?? positional[1])
        case 3: (target, vdev, access) = (target ?? positional[0], vdev ?? positional[1], access ?? positional[2])
        case 4: (target, format, vdev, access) = (target ?? positional[0], format ?? positional[1], vdev ?? positional[2], access ?? positional[3])
        default: throw ConfigError(location, "disk '\(text)': more than four positional parameters (target, format, vdev, access)")
        }
        guard var path = target, !path.isEmpty else { throw ConfigError(location, "disk '\(text)': no target (the image file)") }
        for prefix in ["tap2:aio:", "tap:aio:", "file:", "phy:", "aio:", "raw:"] where path.hasPrefix(prefix) {
            path = String(path.dropFirst(prefix.count))
            break
        }
        if let format, format != "raw" {
            throw ConfigError(location, "disk '\(text)': format '\(format)' is not supported (Vireo serves raw images)")
        }
        guard let vdev, !vdev.isEmpty else { throw ConfigError(location, "disk '\(text)': no vdev (e.g. xvda)") }
        guard let device = Self.deviceNumber(vdev) else {
            throw ConfigError(location, "disk '\(text)': vdev '\(vdev)' is not a Xen disk name (xvda, xvdb, ... or a number)")
        }
        let readOnly: Bool
        switch access ?? "rw" {
        case "r", "ro": readOnly = true
        case "w", "rw": readOnly = false
        default: throw ConfigError(location, "disk '\(text)': access '\(access ?? "")' must be r, ro, w or rw")
        }
        return Self(target: path, vdev: vdev, device: device, readOnly: readOnly)
    }

    /// Xen's virtual-device number for a disk name: xvdX is major 202 (`202 << 8 | index << 4`,
    /// the extended form `1 << 28 | index << 8` from the 16th disk on); a decimal number as is.
    public static func deviceNumber(_ vdev: String) -> UInt32? {
        if let number = UInt32(vdev), number > 0 { return number }
        guard vdev.hasPrefix("xvd") else { return nil }
        let letters = vdev.utf8.dropFirst(3)
        guard !letters.isEmpty, letters.count <= 2, letters.allSatisfy({ $0 >= 97 && $0 <= 122 }) else { return nil }
        var index = 0
        for (i, letter) in letters.enumerated() { index = i == 0 ? Int(letter - 97) : (index + 1) * 26 + Int(letter - 97) }
        return index < 16 ? UInt32(202 << 8 | index << 4) : UInt32(1 << 28 | index << 8)
    }
}

extension DomainSpec.Vif {
    /// One vif as `xl network-attach` takes it (the same string as an entry of `vif = [...]`);
    /// errors and warnings are placed at `source`, column 1.
    public static func parse(_ text: String, source: String) throws(ConfigError) -> (vif: Self, warnings: [ConfigWarning]) {
        var warnings: [ConfigWarning] = []
        let vif = try parse(text, at: SourceLocation(file: source, line: 1, column: 1), warnings: &warnings)
        return (vif, warnings)
    }

    /// An xl vif string: `mac=00:16:3e:00:00:01, bridge=br0, vifname=vif1, rate=10Mb/s`, and
    /// Vireo's `switch=NAME`.
    static func parse(_ text: String, at location: SourceLocation, warnings: inout [ConfigWarning]) throws(ConfigError) -> Self {
        var vif = Self()
        for part in DomainSpec.parts(text) {
            guard let key = part.key else {
                if part.value.isEmpty { continue }
                throw ConfigError(location, "vif '\(text)': '\(part.value)' is not a key=value parameter")
            }
            switch key {
            case "mac":
                let bytes = part.value.split(separator: ":", omittingEmptySubsequences: false)
                guard bytes.count == 6, bytes.allSatisfy({ $0.count == 2 && UInt8($0, radix: 16) != nil }) else {
                    throw ConfigError(location, "vif '\(text)': mac '\(part.value)' is not six hex bytes like 00:16:3e:12:34:56")
                }
                guard let first = UInt8(bytes[0], radix: 16), first & 1 == 0 else {
                    throw ConfigError(location, "vif '\(text)': mac '\(part.value)' is a multicast address")
                }
                vif.mac = part.value.lowercased()
            case "bridge": vif.bridge = part.value
            case "vifname":
                guard !part.value.isEmpty, part.value.utf8.count < 16, !part.value.contains("/") else {
                    throw ConfigError(location, "vif '\(text)': vifname '\(part.value)' is not a Linux interface name (1-15 characters)")
                }
                vif.vifname = part.value
            case "switch": vif.switchName = part.value
            case "rate": vif.rate = part.value
            case "devid":
                guard let devid = UInt32(part.value), devid < 256 else {
                    throw ConfigError(location, "vif '\(text)': devid '\(part.value)' is not a number from 0 to 255")
                }
                vif.devid = devid
            case "type":
                guard part.value == "vif" else { throw ConfigError(location, "vif '\(text)': type '\(part.value)' is not supported (vif only)") }
            case "model", "script", "ip", "backend", "gatewaydev", "mtu":
                warnings.append(ConfigWarning(location: location, message: "vif '\(text)': '\(key)' has no effect under Vireo"))
            default:
                throw ConfigError(location, "vif '\(text)': unknown parameter '\(key)'")
            }
        }
        if vif.switchName != nil && (vif.bridge != nil || vif.vifname != nil) {
            throw ConfigError(location, "vif '\(text)': 'switch' connects to Vireo's own switch; it cannot be combined with 'bridge' or 'vifname'")
        }
        return vif
    }
}

extension StringProtocol {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let f = s.first, f == " " || f == "\t" { s = s.dropFirst() }
        while let l = s.last, l == " " || l == "\t" { s = s.dropLast() }
        return String(s)
    }
}
