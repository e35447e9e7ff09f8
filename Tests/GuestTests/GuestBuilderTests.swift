import Foundation
import Testing
import VireoGuestBuilder

/// The builder's failures name what went wrong: the missing tool, the failed step and its output.
@Suite struct GuestBuilderTests {
    @Test func aMissingToolIsNamedWithWhereTheBuilderLooked() throws {
        let builder = GuestSupport.builder(toolchain: GuestToolchain(searchDirectories: ["/nonexistent/bin"]))
        #expect(throws: GuestBuildError.missingTool(name: "clang", searched: ["/nonexistent/bin"])) {
            _ = try builder.build(directory: GuestSupport.repository.samples.appendingPathComponent("hello"),
                                  output: GuestSupport.temporaryDirectory("out").appendingPathComponent("x.elf"))
        }
        let message = GuestBuildError.missingTool(name: "ld.lld", searched: ["/a", "/b"]).description
        #expect(message.contains("cannot find ld.lld (looked in /a, /b)"))
    }

    @Test func theStandardToolchainLooksBesideSwiftThenOptSwift() {
        let toolchain = GuestToolchain.standard(environment: ["PATH": "/nonexistent", "VIREO_TOOLCHAIN": "/pinned"])
        #expect(toolchain.searchDirectories == ["/pinned", "/opt/swift/usr/bin"])
    }

    @Test func aFailedCompileCarriesTheCompilersOutput() throws {
        let builder = GuestSupport.builder()
        do {
            _ = try builder.build(directory: GuestSupport.fixtures.appendingPathComponent("broken"),
                                  output: GuestSupport.temporaryDirectory("out").appendingPathComponent("broken.elf"))
            Issue.record("a guest that does not compile was built")
        } catch {
            guard case .stepFailed(let step, let command, let status, let output) = error else {
                Issue.record("unexpected error \(error)")
                return
            }
            #expect(step == "compiling broken (swiftc, Embedded Swift)")
            #expect(command.first?.hasSuffix("swiftc") == true)
            #expect(status != 0)
            #expect(output.contains("main.swift:2"), "swiftc's diagnostic: \(output)")
            #expect(error.description.contains("failed (exit status"))
        }
    }

    @Test func aDirectoryWithoutSourcesIsRefused() throws {
        let empty = GuestSupport.temporaryDirectory("empty")
        try FileManager.default.createDirectory(at: empty, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: empty) }
        #expect(throws: GuestBuildError.noSources(directory: empty.path)) {
            _ = try GuestSupport.builder().build(directory: empty, output: empty.appendingPathComponent("x.elf"))
        }
    }

    @Test func theRepositoryIsFoundFromInsideIt() throws {
        let found = try GuestRepository.locate(from: GuestSupport.root.appendingPathComponent("Hypercalls/samples/hello"))
        #expect(found == GuestSupport.repository)
        #expect(throws: GuestBuildError.self) { _ = try GuestRepository.locate(from: URL(fileURLWithPath: "/")) }
    }
}
