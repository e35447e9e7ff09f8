import ArgumentParser
import VireoABI

/// `vireo`: the command operators and developers type.
@main
struct Vireo: AsyncParsableCommand {
    static let version = "0.1.0-dev"

    static let configuration = CommandConfiguration(
        commandName: "vireo",
        abstract: "A paravirtualized microhypervisor toolkit with Xen's guest ABI.",
        version: "vireo \(version) (guest ABI \(vireoABIVersion), Xen interface 4.14)",
        subcommands: [RunCommand.self, CreateCommand.self, ListCommand.self, ShutdownCommand.self, RebootCommand.self,
                      DestroyCommand.self, PauseCommand.self, UnpauseCommand.self, ConsoleCommand.self, TopCommand.self, BlockAttachCommand.self, BlockDetachCommand.self,
                      GuestCommand.self, StoreCommand.self, ABICommand.self, BenchCommand.self]
    )

    /// vireod's control socket for the domain verbs (they also take --socket after the verb).
    @Option(help: "vireod's control socket (else VIREO_SOCKET, else /run/vireo/vireod.sock).")
    var socket: String?
}
