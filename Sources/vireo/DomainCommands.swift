import ArgumentParser
import Foundation
import Glibc
import VireoDaemon
import VireoToolstack

/// Where vireod listens: `--socket` after the verb, else VIREO_SOCKET (which `vireo --socket
/// PATH VERB` sets: see ``Vireo/main()``).
struct DaemonOptions: ParsableArguments {
    @Option(help: "vireod's control socket (else VIREO_SOCKET, else /run/vireo/vireod.sock).")
    var socket: String?
}

/// What the domain verbs share: the client, JSON decoding, errors printed as xl prints them.
protocol DaemonVerb: ParsableCommand {
    var daemon: DaemonOptions { get }
}

extension DaemonVerb {
    var client: DaemonClient { DaemonClient(socketPath: DaemonClient.defaultSocket(daemon.socket)) }

    /// Sends a request; a non-2xx answer becomes an error carrying the daemon's message.
    func call(_ method: String, _ target: String, body: [UInt8]? = nil) throws -> DaemonClient.Response {
        let response: DaemonClient.Response
        do { response = try client.request(method, target, body: body) } catch { throw RunError("\(error)") }
        guard (200..<300).contains(response.status) else { throw RunError(response.errorMessage) }
        return response
    }

    func decode<T: Decodable>(_ type: T.Type, _ response: DaemonClient.Response) throws -> T {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        do { return try decoder.decode(type, from: Data(response.body)) } catch {
            throw RunError("vireod sent an answer this vireo cannot read: \(error)")
        }
    }

    static func escape(_ s: String) -> String {
        s.addingPercentEncoding(withAllowedCharacters: .urlPathAllowed.subtracting(CharacterSet(charactersIn: "/?&=#"))) ?? s
    }
}

/// `vireo create CFG`: an xl.cfg file to vireod, which builds and starts the domain.
struct CreateCommand: DaemonVerb {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a domain from an xl.cfg file (xl's syntax; Docs/toolstack.md lists the keys)."
    )
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "The domain's configuration file.", completion: .file(extensions: ["cfg"]))
    var config: String
    @Flag(name: .shortAndLong, help: "Print only the new domain's ID.")
    var quiet = false

    func run() throws {
        let path = URL(fileURLWithPath: config).standardizedFileURL.path
        guard let data = FileManager.default.contents(atPath: path) else { throw RunError("cannot read '\(config)'") }
        let text = String(decoding: data, as: UTF8.self)
        if !quiet { FileHandle.standardError.write(Data("Parsing config from \(config)\n".utf8)) }
        // Locally first: a bad file is reported even when vireod is not running.
        do { _ = try DomainSpec.parse(text, file: path) } catch { throw RunError("\(error)") }
        let body = try JSONEncoder().encode(CreateRequest(config: text, file: path))
        let created = try decode(CreateResponse.self, try call("POST", "/v1/domains", body: Array(body)))
        for warning in created.warnings { FileHandle.standardError.write(Data("\(warning)\n".utf8)) }
        print(quiet ? "\(created.domain.id)" : "created domain '\(created.domain.name)' (id \(created.domain.id))")
    }
}

/// `vireo list [DOMAIN...]`: the table `xl list` prints.
struct ListCommand: DaemonVerb {
    static let configuration = CommandConfiguration(commandName: "list", abstract: "List domains (like xl list).")
    @OptionGroup var daemon: DaemonOptions
    @Flag(help: "Print the domains as JSON, as the API returns them.")
    var json = false
    @Argument(help: "Only these domains (ID or name).")
    var domains: [String] = []

    func run() throws {
        var all: [DomainInfo]
        if domains.isEmpty {
            let response = try call("GET", "/v1/domains")
            if json { return print(response.text, terminator: "") }
            all = try decode([DomainInfo].self, response)
        } else {
            all = try domains.map { try decode(DomainInfo.self, try call("GET", "/v1/domains/\(Self.escape($0))")) }
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys]
                encoder.dateEncodingStrategy = .iso8601
                return print(String(decoding: try encoder.encode(all), as: UTF8.self))
            }
        }
        print(Self.table(all), terminator: "")
    }

    /// Name, ID, Mem (MiB), VCPUs, State, Time(s): xl list's columns; the state is a word.
    static func table(_ domains: [DomainInfo]) -> String {
        let nameWidth = max(40, (domains.map(\.name.count).max() ?? 0) + 1)
        func pad(_ s: String, _ width: Int, right: Bool = true) -> String {
            s.count >= width ? s : (right ? String(repeating: " ", count: width - s.count) + s : s + String(repeating: " ", count: width - s.count))
        }
        var out = pad("Name", nameWidth, right: false) + pad("ID", 5) + pad("Mem", 6) + pad("VCPUs", 6) + "  " + pad("State", 9, right: false) + pad("Time(s)", 10) + "\n"
        for d in domains {
            out += pad(d.name, nameWidth, right: false) + pad("\(d.id)", 5) + pad("\(d.memoryMiB)", 6) + pad("\(d.vcpus)", 6) + "  "
                + pad(d.state.rawValue, 9, right: false) + pad(String(format: "%.1f", d.cpuSeconds), 10) + "\n"
        }
        return out
    }
}

/// The verbs that take one domain and post to it: shutdown, reboot, destroy, pause, unpause.
struct ShutdownCommand: DaemonVerb {
    static let configuration = CommandConfiguration(
        commandName: "shutdown",
        abstract: "Ask a domain to power off (control/shutdown = poweroff); destroyed if it has not after the timeout.")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "The domain: ID or name.") var domain: String
    @Flag(name: .shortAndLong, help: "Wait until the domain has stopped.") var wait = false
    @Option(help: "Seconds before it is destroyed (default: vireod's --shutdown-timeout).") var timeout: Double?

    func run() throws {
        let query = timeout.map { "?timeout=\($0)" } ?? ""
        let info = try decode(DomainInfo.self, try call("POST", "/v1/domains/\(Self.escape(domain))/shutdown\(query)"))
        guard wait else { return }
        // Until the record is gone (destroyed) or kept in a stopped state.
        while true {
            let response: DaemonClient.Response
            do { response = try client.request("GET", "/v1/domains/\(info.id)") } catch { throw RunError("\(error)") }
            if response.status == 404 { return }
            if let now = try? decode(DomainInfo.self, response), [.shutdown, .crashed].contains(now.state) { return }
            usleep(100_000)
        }
    }
}

struct RebootCommand: DaemonVerb {
    static let configuration = CommandConfiguration(commandName: "reboot", abstract: "Ask a domain to reboot (control/shutdown = reboot).")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "The domain: ID or name.") var domain: String
    func run() throws { _ = try call("POST", "/v1/domains/\(Self.escape(domain))/reboot") }
}

struct DestroyCommand: DaemonVerb {
    static let configuration = CommandConfiguration(
        commandName: "destroy", abstract: "End a domain at once and forget it (also removes a lost or stopped record).")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "The domain: ID or name.") var domain: String
    func run() throws { _ = try call("POST", "/v1/domains/\(Self.escape(domain))/destroy") }
}

struct PauseCommand: DaemonVerb {
    static let configuration = CommandConfiguration(commandName: "pause", abstract: "Stop a domain's vCPUs until unpause.")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "The domain: ID or name.") var domain: String
    func run() throws { _ = try call("POST", "/v1/domains/\(Self.escape(domain))/pause") }
}

struct UnpauseCommand: DaemonVerb {
    static let configuration = CommandConfiguration(commandName: "unpause", abstract: "Let a paused domain's vCPUs run again.")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "The domain: ID or name.") var domain: String
    func run() throws { _ = try call("POST", "/v1/domains/\(Self.escape(domain))/unpause") }
}

/// `vireo console DOMAIN`: the recent output, then what follows; Ctrl-] detaches.
struct ConsoleCommand: DaemonVerb {
    static let configuration = CommandConfiguration(
        commandName: "console",
        abstract: "Print a domain's console output and follow it; Ctrl-] detaches (on a terminal).")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "The domain: ID or name.") var domain: String
    @Flag(help: "Print what is kept and return, without following.") var noFollow = false

    func run() throws {
        let target = "/v1/domains/\(Self.escape(domain))/console"
        var chunk = try decode(ConsoleChunk.self, try call("GET", target))
        emit(chunk)
        guard !noFollow else { return }
        let terminal = isatty(STDIN_FILENO) == 1
        var saved = termios()
        if terminal {
            tcgetattr(STDIN_FILENO, &saved)
            var raw = saved
            cfmakeraw(&raw)
            raw.c_oflag |= tcflag_t(OPOST)  // keep newline translation for the output
            tcsetattr(STDIN_FILENO, TCSANOW, &raw)
        }
        defer { if terminal { tcsetattr(STDIN_FILENO, TCSANOW, &saved) } }
        var inputOpen = true
        while true {
            // What is typed (or piped in) goes to the guest's console; Ctrl-] detaches.
            if inputOpen {
                switch readInput() {
                case .detach: if terminal { return }
                case .end: inputOpen = false
                case .bytes(let bytes):
                    try send(bytes, to: target)
                case .none: break
                }
            }
            if [.shutdown, .crashed, .lost, .destroyed].contains(chunk.state) { return }
            let response: DaemonClient.Response
            do { response = try client.request("GET", "\(target)?offset=\(chunk.next)") } catch { throw RunError("\(error)") }
            if response.status == 404 { return }  // destroyed: nothing more will come
            guard response.status == 200 else { throw RunError(response.errorMessage) }
            chunk = try decode(ConsoleChunk.self, response)
            emit(chunk)
            if chunk.data.isEmpty { usleep(100_000) }
        }
    }

    private func emit(_ chunk: ConsoleChunk) {
        if chunk.missed > 0 { FileHandle.standardError.write(Data("[vireo: \(chunk.missed) console bytes were lost]\n".utf8)) }
        if !chunk.data.isEmpty { FileHandle.standardOutput.write(Data(chunk.data.utf8)) }
    }

    enum Input { case none, end, detach, bytes([UInt8]) }

    /// What stdin has now (without waiting): Ctrl-] (0x1d) detaches, as in xl console.
    private func readInput() -> Input {
        var poller = pollfd(fd: STDIN_FILENO, events: Int16(POLLIN), revents: 0)
        guard poll(&poller, 1, 0) > 0 else { return .none }
        var buffer = [UInt8](repeating: 0, count: 4096)
        let n = read(STDIN_FILENO, &buffer, buffer.count)
        guard n > 0 else { return .end }
        let bytes = Array(buffer[..<n])
        if let stop = bytes.firstIndex(of: 0x1d) { return stop == 0 ? .detach : .bytes(Array(bytes[..<stop])) }
        return .bytes(bytes)
    }

    /// Sends input to the guest, retrying while its ring and the daemon's pipe are full.
    private func send(_ bytes: [UInt8], to target: String) throws {
        var pending = bytes
        var attempts = 0
        while !pending.isEmpty && attempts < 100 {
            let body = try JSONEncoder().encode(ConsoleInput(input: String(decoding: pending, as: UTF8.self)))
            let response = try decode(ConsoleInputAccepted.self, try call("POST", target, body: Array(body)))
            pending.removeFirst(min(response.accepted, pending.count))
            if !pending.isEmpty { attempts += 1; usleep(20_000) }
        }
    }
}

/// `vireo block-attach DOMAIN DISK`: one more disk for a running domain, in xl's disk syntax.
struct BlockAttachCommand: DaemonVerb {
    static let configuration = CommandConfiguration(
        commandName: "block-attach",
        abstract: "Attach a disk to a running domain ('format=raw, vdev=xvdb, access=rw, target=/img' or 'IMG,raw,xvdb,rw').")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "The domain: ID or name.") var domain: String
    @Argument(help: "The disk, as in xl.cfg's disk list (a relative target is made absolute here).") var disk: String

    func run() throws {
        // A relative image path means the caller's directory, as the shell would.
        var spec = disk
        if let parsed = try? DomainSpec.Disk.parse(disk, source: "disk").disk, !parsed.target.hasPrefix("/") {
            let absolute = URL(fileURLWithPath: parsed.target).standardizedFileURL.path
            spec = "format=raw, vdev=\(parsed.vdev), access=\(parsed.readOnly ? "ro" : "rw"), target=\(absolute)"
        }
        let body = try JSONEncoder().encode(BlockAttachRequest(disk: spec))
        _ = try call("POST", "/v1/domains/\(Self.escape(domain))/block-attach", body: Array(body))
    }
}

/// How long a detach gives the frontend to close (`--timeout`, `--force`), and what the
/// daemon said it did.
struct DetachOptions: ParsableArguments {
    @Option(help: "Seconds the guest has to close the device before it is forced away (default 10, as xl).") var timeout: Double?
    @Flag(name: .shortAndLong, help: "Force the device away at once, without asking the guest.") var force = false

    var query: String {
        if force { return "?timeout=0" }
        return timeout.map { "?timeout=\($0)" } ?? ""
    }

    /// A detach the guest did not answer in time is said on stderr (it still succeeded).
    func report(_ response: DaemonClient.Response, _ what: String) {
        if response.headers["vireo-detach"] == "forced" && !force {
            FileHandle.standardError.write(Data("vireo: the guest did not close \(what) in time: forced away\n".utf8))
        }
    }
}

/// `vireo block-detach DOMAIN VDEV`: asks the guest to close the disk, then removes it.
struct BlockDetachCommand: DaemonVerb {
    static let configuration = CommandConfiguration(
        commandName: "block-detach",
        abstract: "Detach a disk: the guest is asked to close it (Closing, then Closed), then its backend stops and its nodes go.")
    @OptionGroup var daemon: DaemonOptions
    @OptionGroup var detach: DetachOptions
    @Argument(help: "The domain: ID or name.") var domain: String
    @Argument(help: "The disk's vdev (xvda, xvdb...).") var vdev: String

    func run() throws {
        let body = try JSONEncoder().encode(BlockDetachRequest(vdev: vdev))
        detach.report(try call("POST", "/v1/domains/\(Self.escape(domain))/block-detach\(detach.query)", body: Array(body)), vdev)
    }
}

/// `vireo network-attach DOMAIN VIF`: one more vif for a running domain, in xl's vif syntax.
struct NetworkAttachCommand: DaemonVerb {
    static let configuration = CommandConfiguration(
        commandName: "network-attach",
        abstract: "Attach a network interface to a running domain ('mac=00:16:3e:01:02:03, bridge=br0', 'switch=lan', ...).")
    @OptionGroup var daemon: DaemonOptions
    @Argument(help: "The domain: ID or name.") var domain: String
    @Argument(help: "The vif, as in xl.cfg's vif list.") var vif: String

    func run() throws {
        let body = try JSONEncoder().encode(NetworkAttachRequest(vif: vif))
        let before = try decode(DomainInfo.self, try call("GET", "/v1/domains/\(Self.escape(domain))")).vifs.map(\.devid)
        let info = try decode(DomainInfo.self, try call("POST", "/v1/domains/\(Self.escape(domain))/network-attach", body: Array(body)))
        if let added = info.vifs.first(where: { !before.contains($0.devid) }) {
            print("attached vif \(added.devid) (mac \(added.mac))")
        }
    }
}

/// `vireo network-detach DOMAIN DEVID|MAC`: asks the guest to close the vif, then removes it.
struct NetworkDetachCommand: DaemonVerb {
    static let configuration = CommandConfiguration(
        commandName: "network-detach",
        abstract: "Detach a network interface (by devid or MAC): the guest is asked to close it, then its backend and host side go.")
    @OptionGroup var daemon: DaemonOptions
    @OptionGroup var detach: DetachOptions
    @Argument(help: "The domain: ID or name.") var domain: String
    @Argument(help: "The vif's devid (0, 1, ...) or MAC address.") var device: String

    func run() throws {
        let body = try JSONEncoder().encode(NetworkDetachRequest(device: device))
        detach.report(try call("POST", "/v1/domains/\(Self.escape(domain))/network-detach\(detach.query)", body: Array(body)),
                      "vif \(device)")
    }
}

/// `vireo sched-credit [-d DOMAIN [-w WEIGHT] [-c CAP]]`, as `xl sched-credit`: with -w or -c,
/// sets the domain's weight or cap; otherwise prints xl's table (Name ID Weight Cap) for the
/// domain, or for every domain without -d.
struct SchedCreditCommand: DaemonVerb {
    static let configuration = CommandConfiguration(
        commandName: "sched-credit",
        abstract: "Show or set domains' credit-scheduler weight and cap (as xl sched-credit).")
    @OptionGroup var daemon: DaemonOptions
    @Option(name: .short, help: "The domain: ID or name.") var domain: String?
    @Option(name: .short, help: "Weight, 1 to 65535 (default 256): shares of the CPU relative to other domains.") var weight: Int?
    @Option(name: .short, help: "Cap, in percent of one host CPU (0 = none).") var cap: Int?

    func validate() throws {
        if (weight != nil || cap != nil) && domain == nil { throw ValidationError("-w and -c need -d DOMAIN") }
        if let weight, !(1...65535).contains(weight) { throw ValidationError("-w \(weight): give 1 to 65535") }
        if let cap, !(0...12800).contains(cap) { throw ValidationError("-c \(cap): give 0 (none) to 12800") }
    }

    func run() throws {
        if let domain, weight != nil || cap != nil {
            let body = try JSONEncoder().encode(SchedCreditRequest(weight: weight, cap: cap))
            _ = try call("PUT", "/v1/domains/\(Self.escape(domain))/sched-credit", body: Array(body))
            return
        }
        let names = try domain.map { [$0] } ?? decode([DomainInfo].self, try call("GET", "/v1/domains")).map { "\($0.id)" }
        var rows = [Self.row("Name", "ID", "Weight", "Cap")]
        for name in names {
            let credit = try decode(SchedCredit.self, try call("GET", "/v1/domains/\(Self.escape(name))/sched-credit"))
            rows.append(Self.row(credit.name, "\(credit.id)", "\(credit.weight)", "\(credit.cap)"))
        }
        print(rows.joined(separator: "\n"))
    }

    /// xl's columns: the name left in 33, then ID in 4, weight in 6, cap in 4, right-aligned.
    static func row(_ name: String, _ id: String, _ weight: String, _ cap: String) -> String {
        func right(_ s: String, _ w: Int) -> String { String(repeating: " ", count: max(0, w - s.count)) + s }
        return name.padding(toLength: max(33, name.count), withPad: " ", startingAt: 0) + " " + right(id, 4) + " " + right(weight, 6) + " " + right(cap, 4)
    }
}
