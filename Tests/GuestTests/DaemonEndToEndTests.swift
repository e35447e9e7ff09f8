import Foundation
import Glibc
import Testing
import VireoMachine

/// vireod as an operator runs it: a subprocess on a temporary socket and state directory,
/// driven by `vireo`'s verbs, running the `idle` sample (it waits on control/shutdown in
/// the XenStore, as a Xen guest does) on the engine `auto` picks (KVM where it is
/// hardware-accelerated; the SoftCPU on this project's kvm_pvm hosts).
@Suite(.serialized) struct DaemonEndToEndTests {
    final class Daemon {
        let directory: URL
        var socket: String { directory.appendingPathComponent("vireod.sock").path }
        var state: URL { directory.appendingPathComponent("state") }
        private(set) var process: Process?
        private var starts = 0

        init() throws {
            directory = GuestSupport.temporaryDirectory("vireod")
            try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        }

        var vireod: String { URL(fileURLWithPath: GuestSupport.vireo).deletingLastPathComponent().appendingPathComponent("vireod").path }

        func start() throws {
            starts += 1
            let logFile = directory.appendingPathComponent("vireod-\(starts).log")
            _ = FileManager.default.createFile(atPath: logFile.path, contents: nil)
            let process = Process()
            process.executableURL = URL(fileURLWithPath: vireod)
            process.arguments = ["--socket", socket, "--state-dir", state.path, "--shutdown-timeout", "5"]
            process.standardInput = FileHandle.nullDevice
            process.standardOutput = try FileHandle(forWritingTo: logFile)
            process.standardError = try FileHandle(forWritingTo: logFile)
            try process.run()
            self.process = process
            let deadline = Date().addingTimeInterval(20)
            while Date() < deadline {
                if (try? vireo(["list"]))?.status == 0 { return }
                usleep(50_000)
            }
            Issue.record("vireod did not answer on \(socket): \(log(starts))")
        }

        func log(_ n: Int) -> String { (try? String(contentsOf: directory.appendingPathComponent("vireod-\(n).log"), encoding: .utf8)) ?? "" }

        /// Stops the daemon with `signal` and waits for it; returns its exit status.
        @discardableResult
        func stop(_ signal: Int32 = SIGTERM) -> Int32 {
            guard let process else { return -1 }
            kill(process.processIdentifier, signal)
            process.waitUntilExit()
            self.process = nil
            return process.terminationStatus
        }

        func vireo(_ arguments: [String], timeout: Double = 60) throws -> (status: Int32, out: String, err: String, timedOut: Bool) {
            // --socket after the verb (store's verbs are one level down).
            try GuestSupport.run(GuestSupport.vireo, arguments + ["--socket", socket], timeout: timeout)
        }

        /// `GET /metrics` straight off the socket (HTTP/1.1, `Connection: close`): the body.
        func metrics() -> String {
            let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { return "" }
            defer { Glibc.close(fd) }
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &address.sun_path) { path in
                for (i, byte) in socket.utf8.prefix(path.count - 1).enumerated() { path[i] = byte }
            }
            let connected = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            guard connected == 0 else { return "" }
            let request = Array("GET /metrics HTTP/1.1\r\nHost: vireod\r\nConnection: close\r\n\r\n".utf8)
            guard request.withUnsafeBytes({ Glibc.write(fd, $0.baseAddress, $0.count) }) == request.count else { return "" }
            var response: [UInt8] = []
            var buffer = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                if n <= 0 { break }
                response += buffer[0..<n]
            }
            let text = String(decoding: response, as: UTF8.self)
            return text.range(of: "\r\n\r\n").map { String(text[$0.upperBound...]) } ?? ""
        }

        /// Polls until `condition` holds for `vireo ARGS`'s output (at most `seconds`).
        func wait(_ arguments: [String], seconds: Double = 30, until condition: (String) -> Bool) throws -> String {
            let deadline = Date().addingTimeInterval(seconds)
            var last = ""
            while Date() < deadline {
                let r = try vireo(arguments)
                last = r.out + r.err
                if condition(r.out) { return r.out }
                usleep(100_000)
            }
            Issue.record("timed out waiting on vireo \(arguments.joined(separator: " ")): \(last)")
            return last
        }

        /// Writes an xl.cfg for the idle guest and returns its path.
        func config(_ name: String, _ extra: String = "") throws -> String {
            let kernel = try GuestSupport.image("idle").path.path
            let path = directory.appendingPathComponent("\(name).cfg")
            try Data("""
                # \(name): the idle sample
                name = "\(name)"
                memory = 16
                kernel = "\(kernel)"
                \(extra)
                """.utf8).write(to: path)
            return path.path
        }

        deinit {
            stop(SIGKILL)
            try? FileManager.default.removeItem(at: directory)
        }
    }

    /// Row `name` of `vireo list`: its columns.
    static func row(_ table: String, _ name: String) -> [String]? {
        table.split(separator: "\n").map { $0.split(separator: " ").map(String.init) }.first { $0.first == name }
    }

    @Test func createListConsolePauseShutdownAndTheStateDirectory() throws {
        guard GuestSupport.kvmAvailable() else {
            print("vireod end-to-end skipped: /dev/kvm is missing")
            return
        }
        let d = try Daemon()
        try d.start()
        let image = d.directory.appendingPathComponent("disk.img")
        #expect(FileManager.default.createFile(atPath: image.path, contents: Data(count: 1 << 20)))
        let cfg = try d.config("e2e-idle", """
            disk = [ 'format=raw, vdev=xvda, access=rw, target=disk.img' ]
            on_poweroff = "preserve"
            frobnicate = 1
            vif = [ 'switch=lan, mac=00:16:3e:00:00:42' ]
            """)

        // create: warnings name file:line:column; the domain gets ID 1 and runs.
        let created = try d.vireo(["create", cfg])
        #expect(created.status == 0, "\(created.err)")
        #expect(created.out == "created domain 'e2e-idle' (id 1)\n", "\(created.out)")
        #expect(created.err.contains("\(cfg):7:1: warning: 'frobnicate'"), "\(created.err)")
        let list = try d.vireo(["list"])
        #expect(list.out.hasPrefix("Name"), "\(list.out)")
        #expect(Self.row(list.out, "e2e-idle").map { Array($0[1...4]) } == ["1", "16", "1", "running"], "\(list.out)")
        #expect(try d.vireo(["create", cfg]).err.contains("a domain named 'e2e-idle' exists"), "names are unique")

        // The console: the guest's line, from its XenStore name.
        _ = try d.wait(["console", "e2e-idle", "--no-follow"]) { $0.contains("idle: e2e-idle ready\n") }
        // Its counters: the guest's hypercalls (XenStore, console, events) and exits.
        let counters = try JSONSerialization.jsonObject(with: Data(try d.vireo(["list", "--json", "e2e-idle"]).out.utf8)) as? [[String: Any]]
        #expect((counters?.first?["hypercalls"] as? Int ?? 0) > 0 && (counters?.first?["exits"] as? Int ?? 0) > 0, "\(String(describing: counters))")
        // top: two refreshes, the second with rates.
        let top = try d.vireo(["top", "--batch", "--iterations", "2", "--delay", "0.2"])
        #expect(top.status == 0 && top.out.components(separatedBy: "NAME").count == 3, "\(top.out)\(top.err)")
        #expect(top.out.split(separator: "\n").last.map { $0.hasPrefix("e2e-idle") && $0.contains(" running ") } == true, "\(top.out)")
        // The XenStore the guest uses, through the daemon; its disk's backend is there.
        #expect(try d.vireo(["store", "read", "/local/domain/1/name"]).out == "e2e-idle\n")
        let backend = try d.vireo(["store", "ls", "/local/domain/0/backend/vbd/1/51712"])
        #expect(backend.out.contains("state = \"2\""), "blkback waits for the frontend (InitWait): \(backend.out)\(backend.err)")
        // The config's vif: netback on the in-process switch, with the config's MAC.
        let vif = try d.vireo(["store", "ls", "/local/domain/0/backend/vif/1/0"])
        #expect(vif.out.contains("state = \"2\"") && vif.out.contains("mac = \"00:16:3e:00:00:42\""), "\(vif.out)\(vif.err)")

        // block-attach: a second image as xvdb (51728); its backend and frontend nodes appear,
        // and go again with block-detach. The disk given at create can be detached too.
        let second = d.directory.appendingPathComponent("second.img")
        #expect(FileManager.default.createFile(atPath: second.path, contents: Data(count: 1 << 20)))
        let attach = try d.vireo(["block-attach", "e2e-idle", "format=raw, vdev=xvdb, access=ro, target=\(second.path)"])
        #expect(attach.status == 0, "\(attach.err)")
        let attached = try d.vireo(["store", "ls", "/local/domain/0/backend/vbd/1/51728"]).out
        #expect(attached.contains("state = \"2\"") && attached.contains("mode = \"r\""), "\(attached)")
        #expect(try d.vireo(["store", "read", "/local/domain/1/device/vbd/51728/backend-id"]).out == "0\n")
        #expect(try d.vireo(["list", "--json", "e2e-idle"]).out.contains("\"vdev\":\"xvdb\""))
        #expect(try d.vireo(["block-attach", "e2e-idle", "\(second.path),raw,xvdb,ro"]).err.contains("has a disk on xvdb already"))
        #expect(try d.vireo(["block-attach", "e2e-idle", "/nonexistent.img,raw,xvdc,ro"]).err.contains("is not an image file"))
        #expect(try d.vireo(["block-detach", "e2e-idle", "xvdb"]).status == 0)
        #expect(try d.vireo(["store", "read", "/local/domain/0/backend/vbd/1/51728/state"]).err.contains("no node"))
        #expect(try d.vireo(["store", "read", "/local/domain/1/device/vbd/51728/state"]).err.contains("no node"))
        #expect(try d.vireo(["block-detach", "e2e-idle", "xvdb"]).err.contains("has no disk xvdb"))
        // The idle guest never opened xvda (its frontend is Initialising): nothing to close.
        let detachA = try d.vireo(["block-detach", "e2e-idle", "xvda"])
        #expect(detachA.status == 0 && detachA.err.isEmpty, "\(detachA.err)")
        #expect(try d.vireo(["store", "read", "/local/domain/0/backend/vbd/1/51712/state"]).err.contains("no node"))
        #expect(try !d.vireo(["list", "--json", "e2e-idle"]).out.contains("\"vdev\":\"xvda\""))

        // network-attach: a second vif (devid 1) on the switch; both sides' nodes appear as
        // at create, with a generated MAC (02:16:3e, the domain, the devid).
        let netAttach = try d.vireo(["network-attach", "e2e-idle", "switch=lan"])
        #expect(netAttach.status == 0 && netAttach.out == "attached vif 1 (mac 02:16:3e:00:01:01)\n", "\(netAttach.out)\(netAttach.err)")
        let vif1 = try d.vireo(["store", "ls", "/local/domain/0/backend/vif/1/1"]).out
        #expect(vif1.contains("state = \"2\"") && vif1.contains("handle = \"1\""), "\(vif1)")
        #expect(try d.vireo(["store", "read", "/local/domain/1/device/vif/1/mac"]).out == "02:16:3e:00:01:01\n")
        #expect(try d.vireo(["network-attach", "e2e-idle", "devid=1, switch=lan"]).err.contains("has a vif with devid 1 already"))
        #expect(try d.vireo(["network-attach", "e2e-idle", "colour=red"]).err.contains("unknown parameter 'colour'"))
        #expect(try d.vireo(["network-attach", "e2e-idle", "switch=lan, bridge=br0"]).err.contains("cannot be combined"))
        // A frontend that says Connected but never answers Closing is forced after the timeout
        // (its backend, finding no rings, went to Closing itself; the detach still waits for
        // the frontend's Closed).
        #expect(try d.vireo(["store", "write", "/local/domain/1/device/vif/1/state", "4"]).status == 0)
        let forcedVif = try d.vireo(["network-detach", "e2e-idle", "1", "--timeout", "0.5"])
        #expect(forcedVif.status == 0 && forcedVif.err.contains("did not close vif 1 in time: forced away"), "\(forcedVif.err)")
        #expect(try d.vireo(["store", "read", "/local/domain/0/backend/vif/1/1/state"]).err.contains("no node"))
        #expect(try d.vireo(["store", "read", "/local/domain/1/device/vif/1/state"]).err.contains("no node"))
        // The config's vif, by its MAC; then it is gone.
        #expect(try d.vireo(["network-detach", "e2e-idle", "00:16:3e:00:00:42"]).status == 0)
        #expect(try d.vireo(["store", "read", "/local/domain/0/backend/vif/1/0/state"]).err.contains("no node"))
        #expect(try d.vireo(["network-detach", "e2e-idle", "0"]).err.contains("has no vif 0"))
        #expect(try d.vireo(["network-detach", "e2e-idle", "eth0"]).err.contains("give a vif's devid"))
        // The domain's traffic in the metrics: the idle guest's XenStore ring is event-driven.
        let metrics = d.metrics()
        let sent = metrics.split(separator: "\n").first { $0.hasPrefix("vireo_domain_events_sent_total{id=\"1\"") }
        #expect(sent.flatMap { Int($0.split(separator: " ").last ?? "") }.map { $0 > 0 } == true, "\(metrics)")
        #expect(metrics.contains("vireo_domain_ring_requests_total{id=\"1\",domain=\"e2e-idle\"} 0"), "no I/O yet: \(metrics)")

        // pause: the vCPU stops. A poweroff request written now waits until unpause.
        #expect(try d.vireo(["pause", "e2e-idle"]).status == 0)
        #expect(Self.row(try d.vireo(["list"]).out, "e2e-idle")?[4] == "paused")
        let again = try d.vireo(["pause", "e2e-idle"])
        #expect(again.status == 1 && again.err.contains("is paused, not running"), "\(again.err)")
        #expect(try d.vireo(["store", "write", "/local/domain/1/control/shutdown", "poweroff"]).status == 0)
        usleep(1_500_000)
        #expect(Self.row(try d.vireo(["list"]).out, "e2e-idle")?[4] == "paused", "a paused guest does not act")
        #expect(try !d.vireo(["console", "e2e-idle", "--no-follow"]).out.contains("powering off"))
        #expect(try d.vireo(["unpause", "e2e-idle"]).status == 0)
        // on_poweroff = "preserve": kept as shut down, its console still there.
        _ = try d.wait(["list", "e2e-idle"]) { Self.row($0, "e2e-idle")?[4] == "shutdown" }
        let console = try d.vireo(["console", "e2e-idle"])  // follows, and returns: the domain has stopped
        #expect(console.status == 0 && console.out == "idle: e2e-idle ready\nidle: powering off\n", "\(console.out)\(console.err)")
        #expect(try d.vireo(["unpause", "e2e-idle"]).err.contains("is shutdown, not paused"))

        // reboot (on_reboot = "restart" by default) runs it again; shutdown -w waits; the
        // default on_poweroff ("destroy") forgets it; a console follower sees all of it.
        let two = try d.config("e2e-two")
        #expect(try d.vireo(["create", two]).out == "created domain 'e2e-two' (id 2)\n")
        let followerOut = d.directory.appendingPathComponent("follow.out")
        _ = FileManager.default.createFile(atPath: followerOut.path, contents: nil)
        let follower = Process()
        follower.executableURL = URL(fileURLWithPath: GuestSupport.vireo)
        follower.arguments = ["--socket", d.socket, "console", "e2e-two"]
        follower.standardInput = FileHandle.nullDevice
        follower.standardOutput = try FileHandle(forWritingTo: followerOut)
        try follower.run()
        _ = try d.wait(["console", "2", "--no-follow"]) { $0.contains("ready") }
        #expect(try d.vireo(["reboot", "e2e-two"]).status == 0)
        _ = try d.wait(["console", "2", "--no-follow"]) { $0.components(separatedBy: "idle: e2e-two ready").count == 3 }
        let down = try d.vireo(["shutdown", "-w", "e2e-two"], timeout: 30)
        #expect(down.status == 0 && !down.timedOut, "\(down.err)")
        let gone = try d.vireo(["list", "e2e-two"])
        #expect(gone.status == 1 && gone.err.contains("no domain 'e2e-two'"), "\(gone.err)")
        let deadline = Date().addingTimeInterval(10)
        while follower.isRunning && Date() < deadline { usleep(50_000) }
        #expect(!follower.isRunning, "the console follower returns once the domain is gone")
        if follower.isRunning { follower.terminate() }
        let followed = (try? String(contentsOf: followerOut, encoding: .utf8)) ?? ""
        #expect(followed == "idle: e2e-two ready\nidle: rebooting\nidle: e2e-two ready\nidle: powering off\n", "\(followed)")

        // A guest that spins and never looks at control/shutdown (cpubench, a long loop): pause
        // stops its CPU time; shutdown destroys it once its timeout passes.
        let spinKernel = try GuestSupport.image("cpubench").path.path
        let spinConfig = d.directory.appendingPathComponent("spin.cfg")
        try Data("name = \"e2e-spin\"\nmemory = 8\nkernel = \"\(spinKernel)\"\ncmdline = \"100000000000\"\n".utf8).write(to: spinConfig)
        #expect(try d.vireo(["create", spinConfig.path]).status == 0)
        func cpu() throws -> Double {
            let text = try d.vireo(["list", "--json", "e2e-spin"]).out
            let object = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]]
            return object?.first?["cpu_seconds"] as? Double ?? -1
        }
        // sched-credit, as xl: set a weight and cap, read xl's table back; bad values are refused.
        #expect(try d.vireo(["sched-credit", "-d", "e2e-spin", "-w", "512", "-c", "50"]).status == 0)
        let credit = try d.vireo(["sched-credit", "-d", "e2e-spin"]).out
        #expect(credit.hasPrefix("Name") && Self.row(credit, "e2e-spin").map { Array($0.suffix(2)) } == ["512", "50"], "\(credit)")
        #expect(Self.row(try d.vireo(["sched-credit"]).out, "e2e-spin") != nil, "every domain without -d")
        let refused = try d.vireo(["sched-credit", "-d", "e2e-spin", "-w", "0"])
        #expect(refused.status != 0 && refused.err.contains("-w 0"), "\(refused.err)")
        #expect(try d.vireo(["sched-credit", "-d", "e2e-spin", "-c", "0"]).status == 0)
        usleep(500_000)
        #expect(try d.vireo(["pause", "e2e-spin"]).status == 0)
        usleep(300_000)
        let pausedAt = try cpu()
        usleep(1_000_000)
        let pausedGrowth = try cpu() - pausedAt
        #expect(pausedAt > 0 && pausedGrowth < 0.1, "a paused vCPU uses no CPU: \(pausedAt) then +\(pausedGrowth) s")
        #expect(try d.vireo(["unpause", "e2e-spin"]).status == 0)
        usleep(1_000_000)
        #expect(try cpu() - pausedAt > 0.2, "it runs again")
        let started = Date()
        let forced = try d.vireo(["shutdown", "-w", "--timeout", "1", "e2e-spin"], timeout: 30)
        #expect(forced.status == 0 && Date().timeIntervalSince(started) >= 1, "\(forced.err)")
        #expect(Self.row(try d.vireo(["list"]).out, "e2e-spin") == nil, "destroyed after the timeout")

        // Console input: what `vireo console` reads from its stdin reaches the guest's console
        // ring (console-echo reads a line and echoes it, then powers off).
        let echoConfig = d.directory.appendingPathComponent("echo.cfg")
        try Data("name = \"e2e-echo\"\nmemory = 8\nkernel = \"\(try GuestSupport.image("console-echo").path.path)\"\non_poweroff = \"preserve\"\n".utf8)
            .write(to: echoConfig)
        #expect(try d.vireo(["create", echoConfig.path]).status == 0)
        _ = try d.wait(["console", "e2e-echo", "--no-follow"]) { $0.contains("console-echo: ready") }
        let echoed = try GuestSupport.run(GuestSupport.vireo, ["--socket", d.socket, "console", "e2e-echo"], timeout: 60, input: "through vireod\n")
        #expect(echoed.status == 0 && echoed.out.contains("console-echo: got 'through vireod'"), "\(echoed.out)\(echoed.err)")
        #expect(try d.vireo(["destroy", "e2e-echo"]).status == 0)

        // destroy ends a running domain at once. On KVM a weight or cap goes to the host's cpu
        // cgroup where it has one (Docs/scheduling.md), at run time and from the file; where it
        // has none, it is refused naming why.
        #expect(try d.vireo(["create", try d.config("e2e-three", "engine = \"kvm\"")]).status == 0)
        let kvmCap = try d.vireo(["sched-credit", "-d", "e2e-three", "-c", "50"])
        let kvmCredit = Self.row(try d.vireo(["sched-credit", "-d", "e2e-three"]).out, "e2e-three").map { Array($0.suffix(2)) }
        // vireod is this process's child, in the same cgroups: it can apply it exactly when we could.
        let hostHasCPUCgroup = (try? HostCPUController.find()) != nil
        #expect((kvmCap.status == 0) == hostHasCPUCgroup, "\(kvmCap.err)")
        if kvmCap.status == 0 {
            #expect(kvmCredit == ["256", "50"])
        } else {
            #expect(kvmCap.err.contains("cap 50 on a KVM domain") && kvmCap.err.contains("cgroup"), "\(kvmCap.err)")
            #expect(kvmCredit == ["256", "0"])
        }
        #expect(try d.vireo(["destroy", "e2e-three"]).status == 0)
        let kvmWeight = try d.vireo(["create", try d.config("e2e-kvmw", "engine = \"kvm\"\ncpu_weight = 512")])
        if kvmCap.status == 0 {
            #expect(kvmWeight.status == 0, "\(kvmWeight.err)")
            #expect(Self.row(try d.vireo(["sched-credit", "-d", "e2e-kvmw"]).out, "e2e-kvmw").map { Array($0.suffix(2)) } == ["512", "0"])
            #expect(try d.vireo(["destroy", "e2e-kvmw"]).status == 0)
        } else {
            #expect(kvmWeight.status != 0 && kvmWeight.err.contains("weight 512 on a KVM domain"), "\(kvmWeight.err)")
        }
        #expect(Self.row(try d.vireo(["list"]).out, "e2e-three") == nil)

        // A daemon that dies (SIGKILL) leaves its running domain lost; kept ones stay kept.
        #expect(try d.vireo(["create", try d.config("e2e-four")]).status == 0)
        d.stop(SIGKILL)
        let absent = try GuestSupport.run(GuestSupport.vireo, ["--socket", d.socket, "list"])
        #expect(absent.status == 1 && absent.err.contains("cannot reach vireod at \(d.socket)"), "\(absent.err)")
        try d.start()
        let after = try d.vireo(["list"]).out
        #expect(Self.row(after, "e2e-four")?[4] == "lost", "\(after)")
        #expect(Self.row(after, "e2e-idle")?[4] == "shutdown", "\(after)")
        #expect(try d.vireo(["console", "e2e-idle", "--no-follow"]).out.contains("idle: powering off"), "the console log's tail")
        #expect(try d.vireo(["destroy", "e2e-four"]).status == 0, "destroy removes a lost record")
        #expect(!FileManager.default.fileExists(atPath: d.state.appendingPathComponent("domains/4.json").path))

        // SIGTERM: the running guest is asked to power off, the daemon exits 0, and the next
        // daemon shows the domain as shut down (stopped with vireod), never forgotten.
        #expect(try d.vireo(["create", try d.config("e2e-five")]).status == 0)
        _ = try d.wait(["console", "e2e-five", "--no-follow"]) { $0.contains("ready") }
        #expect(d.stop(SIGTERM) == 0, "\(d.log(2))")
        let log = (try? String(contentsOf: d.state.appendingPathComponent("console/e2e-five.log"), encoding: .utf8)) ?? ""
        #expect(log.contains("idle: powering off"), "the guest powered off cleanly: \(log)")
        try d.start()
        let five = try d.vireo(["list", "--json", "e2e-five"]).out
        #expect(five.contains("\"state\":\"shutdown\"") && five.contains("stopped with vireod"), "\(five)")
        #expect(d.stop(SIGTERM) == 0)
    }
}
