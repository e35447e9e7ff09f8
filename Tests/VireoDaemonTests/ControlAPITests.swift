import Foundation
import Glibc
import Testing
@testable import VireoDaemon

/// The control API served on a real Unix socket by a real daemon (no guest needed here: the
/// KVM end-to-end test in GuestTests runs guests through it), every route and every error it
/// can give without a running guest, each status checked against Docs/openapi.yaml.
@Suite(.serialized) struct ControlAPITests {
    static let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// The document's operations: path → method → documented statuses.
    static let document: [String: [String: Set<Int>]] = {
        let text = (try? String(contentsOf: root.appendingPathComponent("Docs/openapi.yaml"), encoding: .utf8)) ?? ""
        var result: [String: [String: Set<Int>]] = [:]
        var path: String?, method: String?
        for line in text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init) {
            if line.hasPrefix("  /"), line.hasSuffix(":") {
                path = String(line.dropFirst(2).dropLast())
                method = nil
                result[path!] = [:]
            } else if line.hasPrefix("    "), !line.hasPrefix("     "), let p = path,
                      let m = ["get", "post", "put", "delete", "patch"].first(where: { line == "    \($0):" }) {
                method = m.uppercased()
                result[p]![method!] = []
            } else if line.hasPrefix("        \""), let p = path, let m = method,
                      let status = Int(line.dropFirst(9).prefix(3)) {
                result[p]![m]!.insert(status)
            } else if !line.hasPrefix(" ") && !line.isEmpty && line != "paths:" {
                path = nil
            }
        }
        return result
    }()

    final class Fixture {
        let directory: URL
        let daemon: Daemon
        let server: ControlServer
        let client: DaemonClient
        init(records: [DomainRecord] = [], tcp: Bool = false) throws {
            directory = FileManager.default.temporaryDirectory.appendingPathComponent("vireod-test-\(UUID().uuidString.prefix(8))")
            let domains = directory.appendingPathComponent("state/domains")
            try FileManager.default.createDirectory(at: domains, withIntermediateDirectories: true)
            let encoder = JSONEncoder()
            encoder.dateEncodingStrategy = .iso8601
            for record in records {
                try encoder.encode(record).write(to: domains.appendingPathComponent("\(record.id).json"))
            }
            daemon = try Daemon(options: .init(stateDirectory: directory.appendingPathComponent("state"), shutdownTimeout: 1))
            let socket = directory.appendingPathComponent("s").path
            server = try ControlServer(api: ControlAPI(daemon: daemon), socketPath: socket, tcp: tcp ? ("127.0.0.1", 0) : nil)
            client = DaemonClient(socketPath: socket)
        }
        deinit {
            server.close()
            daemon.stop()
            try? FileManager.default.removeItem(at: directory)
        }

        /// Sends a request; checks its status is the expected one and is documented for the route.
        @discardableResult
        func expect(_ method: String, _ target: String, route: String, body: String? = nil, status: Int,
                    field: String? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws -> DaemonClient.Response {
            let response = try client.request(method, target, body: body.map { Array($0.utf8) })
            #expect(response.status == status, "\(method) \(target): \(response.text)", sourceLocation: sourceLocation)
            let documented = ControlAPITests.document[route]?[method] ?? []
            #expect(documented.contains(status), "\(method) \(route) → \(status) is not in Docs/openapi.yaml", sourceLocation: sourceLocation)
            if status >= 400 {
                let error = try? JSONDecoder().decode(ErrorBody.self, from: Data(response.body))
                #expect(error != nil && !(error?.error.isEmpty ?? true), "an error body: \(response.text)", sourceLocation: sourceLocation)
                if let field { #expect(error?.field == field, "field of \(response.text)", sourceLocation: sourceLocation) }
            }
            return response
        }
    }

    static func record(_ id: UInt16, _ name: String, _ state: DomainState) -> DomainRecord {
        DomainRecord(id: id, spec: .init(name: name, memoryMiB: 16, kernel: "/nonexistent/\(name).elf"), configFile: "/etc/vireo/\(name).cfg",
                     state: state, created: Date(timeIntervalSince1970: 1_800_000_000), lastShutdown: nil, failure: nil, restarts: 0)
    }

    @Test func theDocumentAndTheServerHaveTheSameRoutes() {
        let documented = Set(Self.document.flatMap { path, methods in methods.keys.map { "\($0) \(path)" } })
        let served = Set(ControlAPI.routes.map { "\($0.method) \($0.path)" })
        #expect(!documented.isEmpty)
        #expect(documented == served, "only documented: \(documented.subtracting(served)); only served: \(served.subtracting(documented))")
    }

    /// A daemon finds the records a dead daemon left: running ones are lost, stopped ones kept;
    /// destroy removes a lost record and its file.
    @Test func recordsOfADeadDaemonComeBackLost() throws {
        let f = try Fixture(records: [Self.record(3, "web", .running), Self.record(5, "db", .shutdown), Self.record(6, "p", .paused)])
        let list = try JSONDecoder.api.decode([DomainInfo].self, from: Data(f.expect("GET", "/v1/domains", route: "/v1/domains", status: 200).body))
        #expect(list.map(\.name) == ["web", "db", "p"])
        #expect(list.map(\.state) == [.lost, .shutdown, .lost])
        #expect(list[0].failure?.contains("daemon") == true)
        let onDisk = try Data(contentsOf: f.directory.appendingPathComponent("state/domains/3.json"))
        #expect(try JSONDecoder.api.decode(DomainRecord.self, from: onDisk).state == .lost, "the file says lost too")
        try f.expect("POST", "/v1/domains/web/destroy", route: "/v1/domains/{domain}/destroy", status: 200)
        try f.expect("GET", "/v1/domains/3", route: "/v1/domains/{domain}", status: 404, field: "domain")
        #expect(!FileManager.default.fileExists(atPath: f.directory.appendingPathComponent("state/domains/3.json").path))
    }

    /// Every route answers, and every error the API gives without a running guest is the
    /// documented one, with a JSON body naming the bad field.
    @Test func everyRouteAndItsErrors() throws {
        let f = try Fixture(records: [Self.record(1, "old", .lost)])
        try f.expect("GET", "/v1/version", route: "/v1/version", status: 200)
        let metrics = try f.expect("GET", "/metrics", route: "/metrics", status: 200).text
        #expect(metrics.contains("vireo_domains{state=\"lost\"} 1"))
        #expect(metrics.contains("vireo_domain_memory_bytes{id=\"1\",domain=\"old\"} 16777216"))
        #expect(metrics.contains("# TYPE vireo_domain_hypercalls_total counter\nvireo_domain_hypercalls_total{id=\"1\",domain=\"old\"} 0\n"))
        for series in ["events_sent", "events_received", "ring_requests", "block_read_bytes", "block_written_bytes",
                       "net_transmit_bytes", "net_receive_bytes", "io_errors"] {
            let name = "vireo_domain_\(series)_total"
            #expect(metrics.contains("# TYPE \(name) counter\n\(name){id=\"1\",domain=\"old\"} 0\n"), "\(name)")
        }
        try f.expect("GET", "/v1/domains", route: "/v1/domains", status: 200)
        try f.expect("GET", "/v1/domains/old", route: "/v1/domains/{domain}", status: 200)
        try f.expect("GET", "/v1/domains/1", route: "/v1/domains/{domain}", status: 200)
        try f.expect("GET", "/v1/domains/nosuch", route: "/v1/domains/{domain}", status: 404, field: "domain")

        // Creating: every bad body and bad file names what is wrong.
        let create = "/v1/domains"
        try f.expect("POST", create, route: create, body: "", status: 400, field: "body")
        try f.expect("POST", create, route: create, body: "{not json", status: 400, field: "body")
        try f.expect("POST", create, route: create, body: "{\"file\": \"x.cfg\"}", status: 400, field: "config")
        try f.expect("POST", create, route: create, body: "{\"config\": 7}", status: 400, field: "config")
        let syntax = try f.expect("POST", create, route: create, body: #"{"config": "name = \"a\"\nmemory = = 3\n", "file": "bad.cfg"}"#,
                                  status: 400, field: "config")
        #expect(syntax.errorMessage.hasPrefix("bad.cfg:2:"), "file:line:column: \(syntax.errorMessage)")
        let memory = try f.expect("POST", create, route: create, body: #"{"config": "name = \"a\"\nmemory = 1\nkernel = \"/k\"\n", "file": "m.cfg"}"#,
                                  status: 400, field: "config")
        #expect(memory.errorMessage.hasPrefix("m.cfg:2:10: 'memory'"), "\(memory.errorMessage)")
        try f.expect("POST", create, route: create, body: #"{"config": "name = \"a\"\nvcpus = 0\nkernel = \"/k\"\n"}"#, status: 400, field: "config")
        // A vif the network side cannot take is refused by name.
        try f.expect("POST", create, route: create, body: #"{"config": "name = \"a\"\nvif = [ 'switch=lan, rate=fast' ]\nkernel = \"/bin/true\"\n"}"#,
                     status: 400, field: "vif")
        // The SoftCPU is an engine like KVM: a soft domain gets as far as reading its kernel.
        try f.expect("POST", create, route: create, body: #"{"config": "name = \"a\"\nengine = \"soft\"\nkernel = \"/k\"\n"}"#,
                     status: 400, field: "kernel")
        let kvm = access("/dev/kvm", R_OK | W_OK) == 0
        if kvm {
            let r = try f.expect("POST", create, route: create, body: #"{"config": "name = \"a\"\nkernel = \"k.elf\"\n", "file": "/srv/a.cfg"}"#,
                                 status: 400, field: "kernel")
            #expect(r.errorMessage.contains("/srv/k.elf"), "relative to the file's directory: \(r.errorMessage)")
            try f.expect("POST", create, route: create, body: #"{"config": "name = \"old\"\nkernel = \"/bin/true\"\n"}"#, status: 409)
        } else {
            try f.expect("POST", create, route: create, body: #"{"config": "name = \"a\"\nengine = \"kvm\"\nkernel = \"/bin/true\"\n"}"#,
                         status: 503)
        }
        let huge = "{\"config\": \"" + String(repeating: "#", count: ControlAPI.maxBody) + "\"}"
        try f.expect("POST", create, route: create, body: huge, status: 413, field: "body")

        // Operations on a domain that is not running.
        for verb in ["shutdown", "reboot", "pause", "unpause"] {
            let route = "/v1/domains/{domain}/\(verb)"
            try f.expect("POST", "/v1/domains/old/\(verb)", route: route, status: 409)
            try f.expect("POST", "/v1/domains/nosuch/\(verb)", route: route, status: 404, field: "domain")
        }
        for verb in ["block-attach", "block-detach"] {
            let route = "/v1/domains/{domain}/\(verb)"
            let body = verb == "block-attach" ? #"{"disk": "/tmp/x.img,raw,xvdb,rw"}"# : #"{"vdev": "xvdb"}"#
            try f.expect("POST", "/v1/domains/old/\(verb)", route: route, body: body, status: 409)
            try f.expect("POST", "/v1/domains/nosuch/\(verb)", route: route, body: body, status: 404, field: "domain")
            try f.expect("POST", "/v1/domains/old/\(verb)", route: route, body: "", status: 400, field: "body")
            try f.expect("POST", "/v1/domains/old/\(verb)", route: route, body: "{}", status: 400,
                         field: verb == "block-attach" ? "disk" : "vdev")
        }
        // The credit scheduler's weight and cap: read, set (kept for the next run), refused by field.
        let sched = "/v1/domains/{domain}/sched-credit"
        let credit = try JSONDecoder.api.decode(SchedCredit.self, from: Data(f.expect("GET", "/v1/domains/old/sched-credit", route: sched, status: 200).body))
        #expect(credit == SchedCredit(id: 1, name: "old", weight: 256, cap: 0), "xl's defaults")
        let set = try f.expect("PUT", "/v1/domains/1/sched-credit", route: sched, body: #"{"weight": 512, "cap": 50}"#, status: 200)
        #expect(try JSONDecoder.api.decode(SchedCredit.self, from: Data(set.body)) == SchedCredit(id: 1, name: "old", weight: 512, cap: 50))
        let weightOnly = try f.expect("PUT", "/v1/domains/old/sched-credit", route: sched, body: #"{"weight": 100}"#, status: 200)
        #expect(try JSONDecoder.api.decode(SchedCredit.self, from: Data(weightOnly.body)).cap == 50, "an absent field is kept")
        let onDisk = try JSONDecoder.api.decode(DomainRecord.self, from: Data(contentsOf: f.directory.appendingPathComponent("state/domains/1.json")))
        #expect(onDisk.spec.cpuWeight == 100 && onDisk.spec.cap == 50, "recorded for the next run")
        try f.expect("GET", "/v1/domains/nosuch/sched-credit", route: sched, status: 404, field: "domain")
        try f.expect("PUT", "/v1/domains/nosuch/sched-credit", route: sched, body: #"{"weight": 1}"#, status: 404, field: "domain")
        try f.expect("PUT", "/v1/domains/old/sched-credit", route: sched, body: "", status: 400, field: "body")
        try f.expect("PUT", "/v1/domains/old/sched-credit", route: sched, body: #"{"weight": 0}"#, status: 400, field: "weight")
        try f.expect("PUT", "/v1/domains/old/sched-credit", route: sched, body: #"{"weight": 65536}"#, status: 400, field: "weight")
        try f.expect("PUT", "/v1/domains/old/sched-credit", route: sched, body: #"{"weight": "heavy"}"#, status: 400, field: "weight")
        try f.expect("PUT", "/v1/domains/old/sched-credit", route: sched, body: #"{"cap": -1}"#, status: 400, field: "cap")
        try f.expect("PUT", "/v1/domains/old/sched-credit", route: sched, body: #"{"cap": 12801}"#, status: 400, field: "cap")
        #expect(try f.client.request("POST", "/v1/domains/old/sched-credit").status == 405)

        for verb in ["network-attach", "network-detach"] {
            let route = "/v1/domains/{domain}/\(verb)"
            let body = verb == "network-attach" ? #"{"vif": "switch=lan"}"# : #"{"device": "0"}"#
            let field = verb == "network-attach" ? "vif" : "device"
            try f.expect("POST", "/v1/domains/old/\(verb)", route: route, body: body, status: 409)
            try f.expect("POST", "/v1/domains/nosuch/\(verb)", route: route, body: body, status: 404, field: "domain")
            try f.expect("POST", "/v1/domains/old/\(verb)", route: route, body: "", status: 400, field: "body")
            try f.expect("POST", "/v1/domains/old/\(verb)", route: route, body: "{}", status: 400, field: field)
            try f.expect("POST", "/v1/domains/old/\(verb)", route: route, body: "{\"\(field)\": 3}", status: 400, field: field)
        }
        for verb in ["block-detach", "network-detach"] {
            let body = verb == "block-detach" ? #"{"vdev": "xvdb"}"# : #"{"device": "0"}"#
            for bad in ["soon", "-1", "3601"] {
                try f.expect("POST", "/v1/domains/old/\(verb)?timeout=\(bad)", route: "/v1/domains/{domain}/\(verb)", body: body,
                             status: 400, field: "timeout")
            }
        }
        try f.expect("POST", "/v1/domains/old/shutdown?timeout=soon", route: "/v1/domains/{domain}/shutdown", status: 400, field: "timeout")
        try f.expect("POST", "/v1/domains/nosuch/destroy", route: "/v1/domains/{domain}/destroy", status: 404, field: "domain")
        let console = "/v1/domains/{domain}/console"
        try f.expect("GET", "/v1/domains/old/console", route: console, status: 200)
        try f.expect("GET", "/v1/domains/old/console?offset=-1", route: console, status: 400, field: "offset")
        try f.expect("GET", "/v1/domains/nosuch/console", route: console, status: 404, field: "domain")
        try f.expect("POST", "/v1/domains/old/console", route: console, body: #"{"input": "x"}"#, status: 409)
        try f.expect("POST", "/v1/domains/nosuch/console", route: console, body: #"{"input": "x"}"#, status: 404, field: "domain")
        try f.expect("POST", "/v1/domains/old/console", route: console, body: "{}", status: 400, field: "input")
        try f.expect("POST", "/v1/domains/old/console", route: console,
                     body: "{\"input\": \"" + String(repeating: "a", count: 65537) + "\"}", status: 400, field: "input")

        // The XenStore, as dom0.
        try f.expect("GET", "/v1/store", route: "/v1/store", status: 400, field: "path")
        try f.expect("GET", "/v1/store?path=local", route: "/v1/store", status: 400, field: "path")
        try f.expect("GET", "/v1/store?path=/no/such/node", route: "/v1/store", status: 404, field: "path")
        try f.expect("PUT", "/v1/store", route: "/v1/store", body: #"{"path": "/tool/test/key", "value": "v 1"}"#, status: 200)
        let read = try f.expect("GET", "/v1/store?path=%2Ftool%2Ftest%2Fkey", route: "/v1/store", status: 200)
        #expect(try JSONDecoder.api.decode(StoreNode.self, from: Data(read.body)).value == "v 1")
        let parent = try JSONDecoder.api.decode(StoreNode.self, from: Data(f.expect("GET", "/v1/store?path=/tool/test", route: "/v1/store", status: 200).body))
        #expect(parent.children == ["key"])
        try f.expect("PUT", "/v1/store", route: "/v1/store", body: #"{"path": "/tool/x"}"#, status: 400, field: "value")
        try f.expect("PUT", "/v1/store", route: "/v1/store", body: #"{"value": "x"}"#, status: 400, field: "path")
        try f.expect("PUT", "/v1/store", route: "/v1/store", body: #"{"path": "/bad//path", "value": "x"}"#, status: 400, field: "path")

        // Unknown routes and methods.
        #expect(try f.client.request("GET", "/v2/nothing").status == 404)
        let wrong = try f.client.request("DELETE", "/v1/domains")
        #expect(wrong.status == 405 && wrong.headers["allow"] == "GET, POST", "\(wrong.headers)")
        #expect(try f.client.request("GET", "/v1/domains/old/frobnicate").status == 404)
        try f.expect("POST", "/v1/domains/old/destroy", route: "/v1/domains/{domain}/destroy", status: 200)
        // Gone, but its console stays readable for a minute (a follower sees the end).
        try f.expect("GET", "/v1/domains/old", route: "/v1/domains/{domain}", status: 404, field: "domain")
        let last = try f.expect("GET", "/v1/domains/old/console", route: console, status: 200)
        #expect(try JSONDecoder.api.decode(ConsoleChunk.self, from: Data(last.body)).state == .destroyed)
    }

    /// schemathesis (PyPI) generates requests from Docs/openapi.yaml against the running
    /// server: no 5xx, every status and body as documented, `Allow` on 405s. One check is left
    /// out: "a schema-valid request is accepted" cannot hold for POST /v1/domains, whose
    /// `config` must be a valid xl.cfg file, which a JSON schema cannot say.
    @Test func theDocumentFuzzedAgainstTheServer() throws {
        let path = ProcessInfo.processInfo.environment["PATH"] ?? ""
        guard let tool = path.split(separator: ":").map({ "\($0)/schemathesis" }).first(where: { FileManager.default.isExecutableFile(atPath: $0) }) else {
            if ProcessInfo.processInfo.environment["CI"] == "true" {
                Issue.record("schemathesis is not on PATH; CI needs it (.ci/run installs it with pip)")
            } else {
                print("skipped: schemathesis is not on PATH (pip install schemathesis)")
            }
            return
        }
        let f = try Fixture(records: [Self.record(1, "old", .lost), Self.record(2, "kept", .shutdown)], tcp: true)
        let port = try #require(f.server.tcpPort)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: tool)
        process.arguments = ["run", Self.root.appendingPathComponent("Docs/openapi.yaml").path, "--url", "http://127.0.0.1:\(port)",
                             "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                             "--max-examples", "40", "--seed", "8", "--no-color"]
        let output = f.directory.appendingPathComponent("schemathesis.out")
        _ = FileManager.default.createFile(atPath: output.path, contents: nil)
        process.standardOutput = try FileHandle(forWritingTo: output)
        process.standardError = try FileHandle(forWritingTo: output)
        process.standardInput = FileHandle.nullDevice
        var environment = ProcessInfo.processInfo.environment
        environment["SCHEMATHESIS_HOOKS"] = nil
        process.environment = environment
        try process.run()
        process.waitUntilExit()
        let text = (try? String(contentsOf: output, encoding: .utf8)) ?? ""
        #expect(process.terminationStatus == 0, "\(text.suffix(6000))")
        #expect(!text.contains("Server error"), "\(text.suffix(6000))")
        #expect(text.contains("passed") || text.contains("generated"), "it ran: \(text.suffix(2000))")
    }

    /// A second daemon on a live socket is refused; a file that is not a socket is left alone;
    /// a stale socket (its daemon gone) is replaced.
    @Test func theSocketPathIsTakenCarefully() throws {
        let f = try Fixture()
        #expect { try ControlServer(api: ControlAPI(daemon: f.daemon), socketPath: f.client.socketPath) } throws: { error in
            "\(error)".contains("another vireod answers")
        }
        let plain = f.directory.appendingPathComponent("plain").path
        #expect(FileManager.default.createFile(atPath: plain, contents: Data("keep".utf8)))
        #expect { try ControlServer(api: ControlAPI(daemon: f.daemon), socketPath: plain) } throws: { error in
            "\(error)".contains("not a socket")
        }
        #expect(FileManager.default.contents(atPath: plain) == Data("keep".utf8))
        // A stale socket: bound, then its listener gone without removing the file.
        let stale = f.directory.appendingPathComponent("stale").path
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in for (i, b) in stale.utf8.enumerated() { raw[i] = b } }
        let bound = withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        #expect(bound == 0)
        close(fd)
        let server = try ControlServer(api: ControlAPI(daemon: f.daemon), socketPath: stale)
        #expect(try DaemonClient(socketPath: stale).request("GET", "/v1/version").status == 200)
        server.close()
    }

    /// With no daemon the client names the socket and why.
    @Test func anAbsentDaemonIsNamed() {
        let client = DaemonClient(socketPath: "/nonexistent/vireod.sock")
        #expect { try client.request("GET", "/v1/domains") } throws: { error in
            "\(error)".hasPrefix("cannot reach vireod at /nonexistent/vireod.sock: ")
        }
    }
}

extension JSONDecoder {
    static var api: JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }
}
