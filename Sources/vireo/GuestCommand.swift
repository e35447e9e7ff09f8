import ArgumentParser
import Foundation
import VireoGuestBuilder

/// `vireo guest ...`: guest images (DESIGN.md: `vireo guest build --samples`,
/// `vireo guest build DIR -o OUT.elf`).
struct GuestCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "guest",
        abstract: "Build bare-metal guests (Embedded Swift or C) against Vireo's guest runtime.",
        subcommands: [GuestBuildCommand.self]
    )
}

struct GuestBuildCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "build",
        abstract: "Build the sample guests, or a guest from the Swift and C files in a directory.",
        discussion: """
            --samples builds every directory of Hypercalls/samples to .build/guests/NAME.elf.
            DIR -o OUT.elf builds the .swift and .c files in DIR into one PVH ELF image.
            The tools (swiftc, clang, ld.lld) are taken from beside `swift` on PATH, else
            /opt/swift/usr/bin; VIREO_TOOLCHAIN=DIR names another directory.
            """
    )

    @Flag(help: "Build every sample guest to .build/guests/NAME.elf.")
    var samples = false

    @Argument(help: "A directory of .swift and/or .c files: the guest to build.")
    var directory: String?

    @Option(name: .shortAndLong, help: "Where to write the guest's ELF image (with DIR).")
    var output: String?

    @Option(help: "The guest's name (default: DIR's last component).")
    var name: String?

    @Option(help: "The Vireo checkout holding Hypercalls/runtime (default: found from the working directory).")
    var repository: String?

    @Flag(help: "Print each command before it runs.")
    var verbose = false

    func validate() throws {
        if samples == (directory != nil) {
            throw ValidationError("pass either --samples or a guest directory (with -o OUT.elf)")
        }
        if directory != nil && output == nil {
            throw ValidationError("name the image to write with -o OUT.elf")
        }
        if samples && (output != nil || name != nil) {
            throw ValidationError("--samples writes .build/guests/NAME.elf; -o and --name go with a directory")
        }
    }

    func run() throws {
        let cwd = URL(fileURLWithPath: FileManager.default.currentDirectoryPath)
        let repo: GuestRepository
        if let repository {
            repo = try GuestRepository.locate(from: URL(fileURLWithPath: repository, relativeTo: cwd))
        } else if let found = try? GuestRepository.locate(from: cwd) {
            repo = found
        } else if let compiled = GuestRepository.compiledIn {
            repo = compiled
        } else {
            throw GuestBuildError.repositoryNotFound(searchedFrom: cwd.path)
        }
        var log: (@Sendable (String) -> Void)?
        if verbose {
            log = { line in print("+ \(line)") }
        }
        let builder = GuestBuilder(repository: repo, toolchain: .standard(),
                                   workDirectory: repo.samplesOutput.appendingPathComponent("obj"), log: log)
        let images: [GuestImage]
        if samples {
            images = try builder.buildSamples(into: repo.samplesOutput)
        } else if let directory, let output {
            let source = URL(fileURLWithPath: directory, relativeTo: cwd)
            images = [try builder.build(directory: source, name: name, output: URL(fileURLWithPath: output, relativeTo: cwd))]
        } else {
            images = []
        }
        for image in images {
            print("\(image.name)\t\(image.path.standardizedFileURL.path)\t\(image.fileSize) bytes")
        }
    }
}
