import ArgumentParser
import Glibc
import Synchronization
import VireoStore

/// The write end of `vireo store serve`'s stop pipe, for its signal handler.
private let stopSignalFD = Atomic<Int32>(-1)

/// `vireo store ...`: the XenStore on its own.
struct StoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "store",
        abstract: "The XenStore: serve one on its own (Xen's tools reach it with XENSTORED_PATH), or read and write vireod's.",
        subcommands: [Serve.self, StoreListCommand.self, StoreReadCommand.self, StoreWriteCommand.self]
    )

    /// `vireo store serve --socket PATH`: serves until SIGINT or SIGTERM, then removes the socket.
    struct Serve: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Serve the store on a Unix socket until SIGINT or SIGTERM."
        )

        @Option(help: "The Unix socket to create (Xen's tools: XENSTORED_PATH=PATH).")
        var socket: String

        @Option(help: "Nodes a domain may own.")
        var nodesPerDomain = XenStoreQuotas().nodesPerDomain

        @Option(help: "Bytes of one node (value plus 4 per permission entry).")
        var nodeSize = XenStoreQuotas().nodeSize

        @Option(help: "Watches a domain may hold.")
        var watchesPerDomain = XenStoreQuotas().watchesPerDomain

        @Option(help: "Open transactions per connection.")
        var transactionsPerConnection = XenStoreQuotas().transactionsPerConnection

        @Option(help: "Unread replies before a connection's requests wait.")
        var outstandingRequests = XenStoreQuotas().outstandingRequests

        @Option(help: "Unread watch events kept per connection (later ones are dropped).")
        var queuedWatchEvents = XenStoreQuotas().queuedWatchEvents

        func validate() throws {
            for (name, value) in [("nodes-per-domain", nodesPerDomain), ("node-size", nodeSize),
                                  ("watches-per-domain", watchesPerDomain),
                                  ("transactions-per-connection", transactionsPerConnection),
                                  ("outstanding-requests", outstandingRequests),
                                  ("queued-watch-events", queuedWatchEvents)] where value < 1 {
                throw ValidationError("--\(name) must be at least 1, not \(value)")
            }
        }

        func run() throws {
            let quotas = XenStoreQuotas(
                nodesPerDomain: nodesPerDomain, nodeSize: nodeSize, watchesPerDomain: watchesPerDomain,
                transactionsPerConnection: transactionsPerConnection, outstandingRequests: outstandingRequests,
                queuedWatchEvents: queuedWatchEvents)
            // Whichever thread takes SIGINT/SIGTERM, its handler writes to a pipe this thread reads.
            var fds: [Int32] = [0, 0]
            guard pipe(&fds) == 0 else { throw ValidationError("pipe: \(String(cString: strerror(errno)))") }
            stopSignalFD.store(fds[1], ordering: .sequentiallyConsistent)
            for sig in [SIGINT, SIGTERM] {
                signal(sig) { _ in
                    var byte: UInt8 = 1
                    _ = write(stopSignalFD.load(ordering: .relaxed), &byte, 1)
                }
            }
            let server = try XenStoreSocketServer(store: XenStore(quotas: quotas), path: socket)
            server.start()
            // Unbuffered, so a script waiting for this line sees it at once.
            var line = "vireo store: serving on \(socket)\n"
            line.withUTF8 { _ = write(STDOUT_FILENO, $0.baseAddress, $0.count) }
            var byte: UInt8 = 0
            while read(fds[0], &byte, 1) < 0 && errno == EINTR {}
            server.stop()
        }
    }
}
