import ArgumentParser
import Glibc
import VireoABI

/// `vireo`: the command operators and developers type.
@main
struct Vireo: AsyncParsableCommand {
    static let version = "0.1.0-dev"

    static let configuration = CommandConfiguration(
        commandName: "vireo",
        abstract: "A paravirtualized microhypervisor toolkit with Xen's guest ABI.",
        discussion: "The domain verbs talk to vireod: `vireo --socket PATH VERB`, `vireo VERB --socket PATH` or VIREO_SOCKET name its socket.",
        version: "vireo \(version) (guest ABI \(vireoABIVersion), Xen interface 4.14)",
        subcommands: [RunCommand.self, CreateCommand.self, ListCommand.self, ShutdownCommand.self, RebootCommand.self,
                      DestroyCommand.self, PauseCommand.self, UnpauseCommand.self, ConsoleCommand.self, TopCommand.self, SchedCreditCommand.self, BlockAttachCommand.self, BlockDetachCommand.self,
                      NetworkAttachCommand.self,
                      NetworkDetachCommand.self,
                      GuestCommand.self, StoreCommand.self, ABICommand.self, BenchCommand.self]
    )

    /// `vireo --socket PATH VERB ...` (DESIGN.md's form): the socket before the verb becomes
    /// VIREO_SOCKET for the verb, so `vireo store serve --socket PATH` keeps its own option.
    static func main() async {
        // A parent may have left SIGINT/SIGTERM blocked (test runners do); the commands that
        // stop on them (store serve) must get them, on whichever thread runs the command.
        var stopSignals = sigset_t()
        sigemptyset(&stopSignals)
        sigaddset(&stopSignals, SIGINT)
        sigaddset(&stopSignals, SIGTERM)
        pthread_sigmask(SIG_UNBLOCK, &stopSignals, nil)
        var arguments = Array(CommandLine.arguments.dropFirst())
        if arguments.first == "--socket", arguments.count >= 2 {
            setenv("VIREO_SOCKET", arguments[1], 1)
            arguments.removeFirst(2)
        } else if let first = arguments.first, first.hasPrefix("--socket=") {
            setenv("VIREO_SOCKET", String(first.dropFirst("--socket=".count)), 1)
            arguments.removeFirst()
        }
        do {
            var command = try parseAsRoot(arguments)
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            exit(withError: error)
        }
    }
}
