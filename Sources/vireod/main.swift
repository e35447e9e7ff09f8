import ArgumentParser
import Foundation
import Glibc
import Logging
import VireoDaemon

/// `vireod`: the daemon that holds domains, the XenStore and the backends; `vireo`'s verbs
/// drive it over the control API on its Unix socket (Docs/toolstack.md, Docs/openapi.yaml).
struct VireoD: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vireod",
        abstract: "The Vireo daemon: domains, the XenStore and the backends, driven over a Unix socket.",
        discussion: """
            SIGTERM or SIGINT: every running guest is asked to power off (control/shutdown), those \
            still running after --shutdown-timeout are destroyed, disks are synced, each domain is \
            recorded as shut down, and vireod exits 0. Domains a previous vireod was running when \
            it died are listed as 'lost'.
            """,
        version: "vireod \(ControlAPI.version)"
    )

    @Option(help: "The control socket (else VIREO_SOCKET, else /run/vireo/vireod.sock).")
    var socket: String?

    @Option(help: "The state directory: domain records and console logs (else VIREO_STATE_DIR, else /var/lib/vireo).")
    var stateDir: String?

    @Option(help: "Seconds a guest has to power off after a shutdown request before it is destroyed.")
    var shutdownTimeout: Double = 30

    @Option(help: "Also serve the API on this loopback TCP address (HOST:PORT, 127.0.0.1 or ::1 only; no authentication: for API tools such as fuzzers).")
    var listenTcp: String?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "info"

    @Option(help: "Host threads the SoftCPU domains' credit scheduler runs their vCPUs on (default: the active cores).")
    var schedThreads: Int?

    /// --listen-tcp's host and port.
    var tcpAddress: (host: String, port: Int)? {
        guard let listenTcp, let colon = listenTcp.lastIndex(of: ":"), let port = Int(listenTcp[listenTcp.index(after: colon)...]),
              (0...65535).contains(port) else { return nil }
        var host = String(listenTcp[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        return (host, port)
    }

    func validate() throws {
        if listenTcp != nil && tcpAddress == nil { throw ValidationError("--listen-tcp \(listenTcp!): give HOST:PORT, e.g. 127.0.0.1:8080") }
        guard shutdownTimeout >= 0 && shutdownTimeout <= 86400 else { throw ValidationError("--shutdown-timeout: give 0 to 86400 seconds") }
        if let schedThreads, !(1...1024).contains(schedThreads) { throw ValidationError("--sched-threads \(schedThreads): give 1 to 1024") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("--log-level \(logLevel): give trace, debug, info, notice, warning, error or critical") }
    }

    func run() throws {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
        let logger = Logger(label: "vireod")
        let socketPath = DaemonClient.defaultSocket(socket)
        let state = stateDir ?? ProcessInfo.processInfo.environment["VIREO_STATE_DIR"] ?? "/var/lib/vireo"
        signal(SIGPIPE, SIG_IGN)
        HostLimits.raiseOpenFiles()  // a thousand live domains hold a few descriptors each
        let daemon: Daemon
        do {
            daemon = try Daemon(options: .init(stateDirectory: URL(fileURLWithPath: state), shutdownTimeout: shutdownTimeout,
                                               schedulerThreads: schedThreads),
                                logger: logger)
        } catch {
            throw ValidationError("cannot open the state directory \(state): \(error)")
        }
        try? FileManager.default.createDirectory(atPath: URL(fileURLWithPath: socketPath).deletingLastPathComponent().path,
                                                 withIntermediateDirectories: true)
        let server: ControlServer
        do { server = try ControlServer(api: ControlAPI(daemon: daemon), socketPath: socketPath, tcp: tcpAddress) } catch {
            throw ValidationError("\(error)")
        }
        logger.info("listening", metadata: ["socket": "\(socketPath)", "state_dir": "\(state)", "domains": "\(daemon.list().count)",
                                            "tcp": "\(server.tcpPort.map { "\(tcpAddress!.host):\($0)" } ?? "none")"])
        var sources: [DispatchSourceSignal] = []
        let stopOnce = DispatchQueue(label: "vireod-stop")
        for number in [SIGTERM, SIGINT] {
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: stopOnce)
            source.setEventHandler {
                logger.info("signal received; stopping", metadata: ["signal": "\(number)"])
                daemon.stop()
                server.close()
                Glibc.exit(0)
            }
            source.resume()
            sources.append(source)
        }
        withExtendedLifetime(sources) { dispatchMain() }
    }
}

VireoD.main()
