import Foundation
import VireoToolstack

/// Where a domain is in its life, as the API and `vireo list` show it.
public enum DomainState: String, Codable, Sendable, CaseIterable {
    /// Being built: the record exists, the guest has not started.
    case creating
    case running
    case paused
    /// Powered off (or stopped) and kept: `on_poweroff = "preserve"`, or stopped with the daemon.
    case shutdown
    /// Crashed and kept (`on_crash = "preserve"`), or failed to restart.
    case crashed
    /// Recorded as running by a daemon that is gone: the process that ran it no longer exists.
    case lost
    /// Only in a console answer: the domain has just been destroyed (its last output stays
    /// readable for a minute, so a console follower sees the end).
    case destroyed
}

/// A domain as the daemon keeps it on disk: one JSON file per domain in the state directory.
public struct DomainRecord: Codable, Sendable, Equatable {
    public var id: UInt16
    public var spec: DomainSpec
    /// The configuration file it was created from, as the client named it.
    public var configFile: String
    public var state: DomainState
    public var created: Date
    /// Why the guest last stopped (poweroff, reboot, crash, destroyed...), if it has.
    public var lastShutdown: String?
    /// What went wrong, when the engine or the daemon stopped it.
    public var failure: String?
    public var restarts: Int
}

/// A domain as the API returns it (`GET /v1/domains/{domain}`).
public struct DomainInfo: Codable, Sendable, Equatable {
    public var id: UInt16
    public var name: String
    public var state: DomainState
    public var memoryMiB: Int
    public var vcpus: Int
    public var kernel: String
    public var cmdline: String
    public var configFile: String
    public var created: Date
    /// Host CPU time of the domain's vCPU threads, over all its runs in this daemon.
    public var cpuSeconds: Double
    public var exits: Int
    public var hypercalls: Int
    public var consoleBytes: UInt64
    public var restarts: Int
    public var lastShutdown: String?
    public var failure: String?
    public var onPoweroff: String
    public var onReboot: String
    public var onCrash: String
    /// Its disks: at create and attached since.
    public var disks: [DiskInfo]

    public struct DiskInfo: Codable, Sendable, Equatable {
        public var vdev: String
        public var target: String
        public var access: String
    }
    /// Its vifs: at create and attached since.
    public var vifs: [VifInfo]

    public struct VifInfo: Codable, Sendable, Equatable {
        public var devid: UInt32
        public var mac: String
        public var bridge: String?
        public var switchName: String?
        public var vifname: String?
        enum CodingKeys: String, CodingKey {
            case devid, mac, bridge, vifname
            case switchName = "switch"
        }
    }

    enum CodingKeys: String, CodingKey {
        case id, name, state, vcpus, kernel, cmdline, created, exits, hypercalls, restarts, failure, disks, vifs
        case memoryMiB = "memory_mib", configFile = "config_file", cpuSeconds = "cpu_seconds"
        case consoleBytes = "console_bytes", lastShutdown = "last_shutdown"
        case onPoweroff = "on_poweroff", onReboot = "on_reboot", onCrash = "on_crash"
    }
}

/// `POST /v1/domains`: an xl.cfg file's text and the file's name (for error locations and
/// for resolving relative paths in it).
public struct CreateRequest: Codable, Sendable {
    public var config: String
    public var file: String?
    public init(config: String, file: String?) {
        self.config = config
        self.file = file
    }
}

/// `POST /v1/domains` → 201.
public struct CreateResponse: Codable, Sendable {
    public var domain: DomainInfo
    public var warnings: [String]
}

/// `POST /v1/domains/{domain}/block-attach`: one disk, as xl writes it.
public struct BlockAttachRequest: Codable, Sendable {
    public var disk: String
    public init(disk: String) { self.disk = disk }
}

/// `POST /v1/domains/{domain}/block-detach`.
public struct BlockDetachRequest: Codable, Sendable {
    public var vdev: String
    public init(vdev: String) { self.vdev = vdev }
}

/// `POST /v1/domains/{domain}/network-attach`: one vif, as xl writes it.
public struct NetworkAttachRequest: Codable, Sendable {
    public var vif: String
    public init(vif: String) { self.vif = vif }
}

/// `POST /v1/domains/{domain}/network-detach`: the vif's devid or MAC address.
public struct NetworkDetachRequest: Codable, Sendable {
    public var device: String
    public init(device: String) { self.device = device }
}

/// `POST /v1/domains/{domain}/console`: bytes for the guest's console input, and how many
/// were taken.
public struct ConsoleInput: Codable, Sendable {
    public var input: String
    public init(input: String) { self.input = input }
}

public struct ConsoleInputAccepted: Codable, Sendable {
    public var accepted: Int
}

/// `GET /v1/domains/{domain}/console`.
public struct ConsoleChunk: Codable, Sendable {
    /// The output, as UTF-8 text (invalid sequences replaced).
    public var data: String
    /// The offset to ask for next (`?offset=`).
    public var next: UInt64
    /// Bytes lost to the buffer wrapping since the offset asked for.
    public var missed: UInt64
    public var state: DomainState
}

/// `GET /v1/store`, `PUT /v1/store`.
public struct StoreNode: Codable, Sendable {
    public var path: String
    public var value: String?
    public var children: [String]?
    public init(path: String, value: String?, children: [String]?) {
        self.path = path
        self.value = value
        self.children = children
    }
}

/// `GET`/`PUT /v1/domains/{domain}/sched-credit`: the domain's credit-scheduler parameters,
/// as `xl sched-credit` shows them (Docs/scheduling.md).
public struct SchedCredit: Codable, Sendable, Equatable {
    public var id: UInt16
    public var name: String
    /// 1...65535; 256 by default.
    public var weight: Int
    /// Percent of one host CPU; 0 = no cap.
    public var cap: Int
}

/// `PUT /v1/domains/{domain}/sched-credit`: what to change (an absent field is kept).
public struct SchedCreditRequest: Codable, Sendable {
    public var weight: Int?
    public var cap: Int?
    public init(weight: Int?, cap: Int?) {
        self.weight = weight
        self.cap = cap
    }
}

/// Every error response's body.
public struct ErrorBody: Codable, Sendable, Equatable {
    public var error: String
    /// The request field (or path parameter) that was wrong, when one was.
    public var field: String?
}

/// An error the API answers with: its HTTP status and a message naming what was wrong.
public struct APIError: Error, Sendable, CustomStringConvertible {
    public var status: Int
    public var message: String
    public var field: String?
    /// For 405: the methods the path takes (the `Allow` header).
    public var allow: [String] = []
    public init(_ status: Int, _ message: String, field: String? = nil, allow: [String] = []) {
        self.status = status
        self.message = message
        self.field = field
        self.allow = allow
    }
    public var description: String { message }

    static func badRequest(_ message: String, field: String? = nil) -> APIError { APIError(400, message, field: field) }
    static func notFound(_ message: String, field: String? = nil) -> APIError { APIError(404, message, field: field) }
    static func conflict(_ message: String) -> APIError { APIError(409, message) }
}
