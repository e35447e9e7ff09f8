/// Why a guest did not build, worded for the person who typed the command.
public enum GuestBuildError: Error, Equatable, CustomStringConvertible {
    /// A tool of the toolchain is not where the builder looked.
    case missingTool(name: String, searched: [String])
    /// No directory above the starting point holds the guest runtime.
    case repositoryNotFound(searchedFrom: String)
    /// The guest directory has no `.swift` or `.c` file.
    case noSources(directory: String)
    /// A tool ran and failed: which step, the command line, its exit status and its output.
    case stepFailed(step: String, command: [String], status: Int32, output: String)
    /// A tool could not be started at all.
    case cannotLaunch(tool: String, reason: String)
    /// A file or directory could not be read or written.
    case fileSystem(path: String, reason: String)

    public var description: String {
        switch self {
        case .missingTool(let name, let searched):
            return "guest build: cannot find \(name) (looked in \(searched.joined(separator: ", "))); "
                + "install the Swift toolchain (swiftc, clang and ld.lld ship with it) or put it on PATH"
        case .repositoryNotFound(let start):
            return "guest build: no Vireo repository (Hypercalls/runtime/guest.ld) at or above \(start); "
                + "run inside the repository or pass --repository"
        case .noSources(let directory):
            return "guest build: \(directory) has no .swift or .c files"
        case .stepFailed(let step, let command, let status, let output):
            let trimmed = output.hasSuffix("\n") ? String(output.dropLast()) : output
            return "guest build: \(step) failed (exit status \(status))\n  command: \(command.joined(separator: " "))\n"
                + trimmed
        case .cannotLaunch(let tool, let reason):
            return "guest build: cannot run \(tool): \(reason)"
        case .fileSystem(let path, let reason):
            return "guest build: \(path): \(reason)"
        }
    }
}
