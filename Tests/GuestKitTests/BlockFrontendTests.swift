import Foundation
import GuestKit
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls
import VireoHypervisor
import VireoStore

/// GuestKit's BlockFrontend, every hypercall through the real dispatcher and the store over the
/// guest's ring, against the real BlockBackend over a temporary image file.
@Suite(.serialized) struct BlockFrontendTests {
    final class Rig {
        let machine: TestMachine
        let backend: BlockBackend
        let path: String
        let server: Thread

        init(sectors: Int = 512, readOnly: Bool = false, sectorSize: Int = 512) throws {
            machine = try TestMachine(memory: 8 << 20)
            path = NSTemporaryDirectory() + "vireo-blkfront-\(UUID().uuidString).img"
            try Data(repeating: 0, count: sectors * 512).write(to: URL(fileURLWithPath: path))
            backend = try BlockBackend(path: path, readOnly: readOnly, frontend: machine.domain.id, sectorSize: sectorSize,
                                       store: machine.store, grants: machine.grants, host: machine.host)
            try backend.create()
            let backend = self.backend
            server = Thread { backend.run() }
            server.start()
        }

        func file() throws -> [UInt8] { Array(try Data(contentsOf: URL(fileURLWithPath: path))) }

        deinit {
            backend.stop()
            while !server.isFinished { usleep(1000) }
            try? FileManager.default.removeItem(atPath: path)
        }
    }

    @Test func theFrontendWritesFlushesAndReadsBackThroughTheRealBackend() throws {
        let rig = try Rig(sectors: 512)
        let platform = rig.machine.platform
        let guest = Guest(platform: platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        let disk = try BlockFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest))
        try disk.connect()
        #expect(disk.sectors == 512 && !disk.readOnly && disk.canFlush)
        #expect(disk.ringSize == 32)
        #expect(rig.backend.state == XenbusBackendState.connected)

        // 48 one-page writes, all submitted before any is awaited: more than the ring holds.
        var pages: [GuestFrame] = []
        for i in 0..<48 {
            let address = platform.allocatePage()
            platform.memory(at: address, count: 4096).withUnsafeMutableBytes(offset: 0, count: 4096) { bytes in
                for j in 0..<4096 { bytes[j] = UInt8(truncatingIfNeeded: i &* 7 &+ j &* 3) }
            }
            pages.append(GuestFrame(address >> guestPageShift))
        }
        var ids: [UInt64] = []
        for i in 0..<48 {
            if ids.count == disk.ringSize { #expect(try disk.wait(ids.removeFirst()) == Int16(VIREO_BLKIF_RSP_OKAY)) }
            ids.append(try disk.submit(VIREO_BLKIF_OP_WRITE, sector: UInt64(i * 8), frames: [pages[i]], count: 8))
        }
        for id in ids { #expect(try disk.wait(id) == Int16(VIREO_BLKIF_RSP_OKAY)) }
        try disk.flush()
        let file = try rig.file()
        for i in [0, 31, 47] {
            #expect(file[i * 4096 + 100] == UInt8(truncatingIfNeeded: i &* 7 &+ 300))
        }
        // Read back with multi-page requests (11 pages, then a partial last page).
        let targets = (0..<11).map { _ in GuestFrame(platform.allocatePage() >> guestPageShift) }
        try disk.read(sector: 0, count: 88, into: targets)
        for (i, frame) in targets.enumerated() {
            let bytes = try rig.machine.domain.memory.bytes(at: frame.address!, count: 4096)
            #expect(bytes == (0..<4096).map { UInt8(truncatingIfNeeded: i &* 7 &+ $0 &* 3) }, "page \(i)")
        }
        try disk.write(sector: 500, count: 3, from: [pages[1]])
        #expect(try rig.file()[500 * 512 + 1] == UInt8(truncatingIfNeeded: 7 + 3))
        // Errors come back as errors: past the disk's end.
        #expect(throws: GuestError.EIO) { try disk.read(sector: 510, count: 8, into: [targets[0]]) }
        #expect(disk.leakedGrants == 0)
        #expect(disk.grants.freeCount > 0)
        try disk.disconnect()
        #expect(rig.backend.state == XenbusBackendState.closed)
        #expect(disk.leakedGrants == 0, "every grant, the ring's included, was revoked")
    }

    @Test func aReadOnlyDiskRefusesTheFrontendsWrites() throws {
        let rig = try Rig(sectors: 64, readOnly: true)
        let guest = Guest(platform: rig.machine.platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        let disk = try BlockFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest))
        try disk.connect()
        #expect(disk.readOnly)
        let page = GuestFrame(rig.machine.platform.allocatePage() >> guestPageShift)
        #expect(throws: GuestError.EIO) { try disk.write(sector: 0, count: 8, from: [page]) }
        try disk.read(sector: 0, count: 8, into: [page])
    }

    @Test func theFrontendUsesIndirectSegmentsBarriersAndDiscardWhenOffered() throws {
        let rig = try Rig(sectors: 2048)
        let platform = rig.machine.platform
        let guest = Guest(platform: platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        let disk = try BlockFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest))
        try disk.connect()
        #expect(disk.canBarrier && disk.canDiscard && disk.maxSegments == 256 && disk.sectorSize == 512)
        #expect(disk.discardGranularity >= 512)

        // 40 pages in one request: one indirect request, both ways.
        var sources: [GuestFrame] = [], targets: [GuestFrame] = []
        for i in 0..<40 {
            let address = platform.allocatePage()
            platform.memory(at: address, count: 4096).withUnsafeMutableBytes(offset: 0, count: 4096) { bytes in
                for j in 0..<4096 { bytes[j] = UInt8(truncatingIfNeeded: i &* 11 &+ j) }
            }
            sources.append(GuestFrame(address >> guestPageShift))
            targets.append(GuestFrame(platform.allocatePage() >> guestPageShift))
        }
        let before = rig.backend.statistics.indirect
        try disk.write(sector: 16, count: 40 * 8 - 3, from: sources)  // the last page partly
        try disk.read(sector: 16, count: 40 * 8, into: targets)
        #expect(rig.backend.statistics.indirect == before + 2, "one indirect request each way")
        for i in [0, 17, 38] {
            let bytes = try rig.machine.domain.memory.bytes(at: targets[i].address!, count: 4096)
            #expect(bytes == (0..<4096).map { UInt8(truncatingIfNeeded: i &* 11 &+ $0) }, "page \(i)")
        }
        let last = try rig.machine.domain.memory.bytes(at: targets[39].address!, count: 4096)
        #expect(last[5 * 512 - 1] == UInt8(truncatingIfNeeded: 39 &* 11 &+ 2559) && last[5 * 512] == 0)
        // More pages than the backend's maximum is the caller's error.
        #expect(throws: GuestError.EINVAL) {
            _ = try disk.submit(VIREO_BLKIF_OP_READ, sector: 0, frames: Array(repeating: targets[0], count: 257), count: 8 * 257)
        }

        // A barrier after the writes, then a discard that makes a range read as zeros.
        try disk.writeBarrier(sector: 0, count: 8, from: [sources[1]])
        try disk.writeBarrier(sector: 0, count: 0, from: [])
        #expect(rig.backend.statistics.barriers == 2)
        try disk.discard(sector: 16, count: 64)
        let file = try rig.file()
        #expect(file[0] == 11 && file[16 * 512 ..< 80 * 512].allSatisfy { $0 == 0 })
        #expect(file[80 * 512] == UInt8(truncatingIfNeeded: 8 &* 11))
        // A discard past the end is refused by the backend.
        #expect(throws: GuestError.EIO) { try disk.discard(sector: 2040, count: 16) }
        #expect(disk.leakedGrants == 0)
        try disk.disconnect()
        #expect(disk.leakedGrants == 0, "the indirect pages' grants were revoked too")
    }

    @Test func aDiskWith4096ByteSectorsIsReadAsXenSays() throws {
        let rig = try Rig(sectors: 64, sectorSize: 4096)
        let guest = Guest(platform: rig.machine.platform)
        try guest.mapSharedInfo()
        let store = try XenStoreClient(guest: guest)
        let disk = try BlockFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest))
        try disk.connect()
        #expect(disk.sectorSize == 4096 && disk.sectors == 64)
        let page = GuestFrame(rig.machine.platform.allocatePage() >> guestPageShift)
        try disk.write(sector: 8, count: 8, from: [page])
        #expect(throws: GuestError.EIO) { try disk.write(sector: 4, count: 8, from: [page]) }
        #expect(throws: GuestError.EIO) { try disk.read(sector: 8, count: 4, into: [page]) }
    }
}
