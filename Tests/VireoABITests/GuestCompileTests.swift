import Foundation
import Testing

/// Guests in C and in Embedded Swift use the same Hypercalls/ headers as the host: both compile
/// against them for the bare-metal target, without libc and without SSE/MMX.
@Suite struct GuestCompileTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static var include: String { root.appendingPathComponent("Hypercalls/include").path }

    static func workDir() throws -> URL {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vireo-guest-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        return dir
    }

    @Test func cGuestCompilesFreestanding() throws {
        let clang = try #require(XenHeaderComparison.findClang())
        let dir = try Self.workDir()
        let source = dir.appendingPathComponent("guest.c")
        try """
        #include <vireo/vireo.h>
        unsigned guest_probe(struct vireo_shared_info *s, struct vireo_blkif_sring *ring) {
            struct vireo_evtchn_send send = { .port = 3 };
            s->evtchn_pending[send.port / 64] |= 1ull << (send.port % 64);
            return ring->req_prod + VIREO_HYPERVISOR_event_channel_op + VIREO_EVTCHNOP_send;
        }
        """.write(to: source, atomically: true, encoding: .utf8)
        let r = try XenHeaderComparison.run(clang, [
            "-target", "x86_64-unknown-none-elf", "-ffreestanding", "-nostdlibinc", "-std=c11",
            "-Wall", "-Wextra", "-Werror", "-mno-sse", "-mno-mmx", "-I", Self.include,
            "-c", source.path, "-o", dir.appendingPathComponent("guest.o").path,
        ])
        #expect(r.status == 0, "\(r.err)")
    }

    @Test func embeddedSwiftGuestImportsTheHeaders() throws {
        let clang = try #require(XenHeaderComparison.findClang())
        let swiftc = URL(fileURLWithPath: clang).deletingLastPathComponent().appendingPathComponent("swiftc").path
        guard FileManager.default.isExecutableFile(atPath: swiftc) else {
            print("skipped: no swiftc beside \(clang)")
            return
        }
        let dir = try Self.workDir()
        let source = dir.appendingPathComponent("guest.swift")
        try """
        import VireoHypercalls

        @_cdecl("guest_probe")
        public func probe() -> UInt32 {
            var send = vireo_evtchn_send()
            send.port = 3
            return send.port &+ UInt32(MemoryLayout<vireo_shared_info>.size) &+ UInt32(VIREO_EVTCHNOP_send)
        }
        """.write(to: source, atomically: true, encoding: .utf8)
        let r = try XenHeaderComparison.run(swiftc, [
            "-target", "x86_64-unknown-none-elf", "-enable-experimental-feature", "Embedded", "-wmo", "-Osize",
            "-parse-as-library", "-Xcc", "-ffreestanding", "-Xcc", "-mno-red-zone", "-Xcc", "-mno-sse",
            "-Xcc", "-mno-mmx", "-I", Self.include, "-c", source.path,
            "-o", dir.appendingPathComponent("guest.o").path,
        ])
        #expect(r.status == 0, "\(r.err)")
    }
}
