import Foundation
import Testing
import VireoABI
import VireoBackends
import VireoCore
import VireoHypercalls
import VireoStore

private let okay = Int16(VIREO_BLKIF_RSP_OKAY)
private let failed = Int16(VIREO_BLKIF_RSP_ERROR)
private let unsupported = Int16(VIREO_BLKIF_RSP_EOPNOTSUPP)

/// blkback's optional features (barrier, discard, indirect segments, 4096-byte sectors,
/// multi-queue): each served through the real backend, and each one's hostile variants refused
/// while the ring carries on.
@Suite struct BlockBackendFeatureTests {
    @Test func everyFeatureNodeIsPublishedAsXenNamesIt() throws {
        let rig = try BlockRig(sectors: 100)
        let back = rig.backend.backendPath
        let expected = ["feature-flush-cache": "1", "feature-barrier": "1", "feature-discard": "1",
                        "discard-alignment": "0", "discard-secure": "0", "feature-max-indirect-segments": "256",
                        "multi-queue-max-queues": "4", "max-ring-page-order": "0", "sector-size": "512",
                        "physical-sector-size": "512", "sectors": "100"]
        for (key, value) in expected { #expect(rig.guestRead(back + "/" + key) == value, "\(key)") }
        let granularity = Int(rig.guestRead(back + "/discard-granularity") ?? "") ?? 0
        #expect(granularity >= 512 && granularity & (granularity - 1) == 0)
        // The frontend may not change them.
        #expect(rig.guestWrite(back + "/feature-max-indirect-segments", "100000")?.type == .error)
    }

    @Test func a4096ByteSectorDiskCountsSectorsIn512ByteUnitsAndRefusesMisalignedIO() throws {
        // 100 512-byte sectors: 12 whole 4096-byte sectors, published as 96 512-byte units.
        let rig = try BlockRig(sectors: 100, sectorSize: 4096)
        let back = rig.backend.backendPath
        #expect(rig.guestRead(back + "/sector-size") == "4096")
        #expect(rig.guestRead(back + "/physical-sector-size") == "4096")
        #expect(rig.guestRead(back + "/sectors") == "96")
        try rig.connect()
        let page = try rig.page { UInt8(truncatingIfNeeded: $0 &+ 1) }
        let ref = try rig.guest.grantAccess(to: .zero, frame: page, readOnly: false)
        let responses = try rig.run([
            BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 1, sector: 8, [(ref, 0, 7)]),           // aligned: fine
            BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 2, sector: 4, [(ref, 0, 7)]),           // start not aligned
            BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 3, sector: 16, [(ref, 0, 3)]),          // 4 sectors only
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 4, sector: 88, [(ref, 0, 7)]),           // the last 4 KiB
            BlockRig.request(VIREO_BLKIF_OP_READ, id: 5, sector: 96, [(ref, 0, 7)]),           // past the end
            BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 6, sector: 24, [(ref, 4, 7), (ref, 0, 3)]),  // 8 sectors in two pieces
            BlockRig.discard(id: 7, sector: 8, count: 4),                                       // discard not aligned
            BlockRig.discard(id: 8, sector: 24, count: 8),                                      // aligned discard
        ])
        #expect(responses == [1: okay, 2: failed, 3: failed, 4: okay, 5: failed, 6: okay, 7: failed, 8: okay])
        let file = try rig.image.bytes()
        #expect(file.count == 100 * 512, "the file keeps its size")
        #expect(file[8 * 512] == 1 && file[8 * 512 + 4095] == 0)
        #expect(file[16 * 512 ..< 24 * 512].allSatisfy { $0 == 0 }, "refused writes left no trace")
        #expect(file[24 * 512 ..< 32 * 512].allSatisfy { $0 == 0 }, "discarded")
    }

    @Test func writeBarriersAreDurableWritesAndReadOnlyDisksRefuseThem() throws {
        let rig = try BlockRig(sectors: 64)
        try rig.connect()
        let a = try rig.page { _ in 0x11 }, b = try rig.page { _ in 0x22 }
        let ra = try rig.guest.grantAccess(to: .zero, frame: a, readOnly: true)
        let rb = try rig.guest.grantAccess(to: .zero, frame: b, readOnly: true)
        var twelve = BlockRig.request(VIREO_BLKIF_OP_WRITE_BARRIER, id: 4, sector: 0, [(ra, 0, 7)])
        twelve.nr_segments = 12
        let responses = try rig.run([
            BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 1, sector: 0, [(ra, 0, 7)]),
            BlockRig.request(VIREO_BLKIF_OP_WRITE_BARRIER, id: 2, sector: 8, [(rb, 0, 7)]),
            BlockRig.request(VIREO_BLKIF_OP_WRITE_BARRIER, id: 3, sector: 0, []),              // a pure barrier
            twelve,
            BlockRig.request(VIREO_BLKIF_OP_WRITE_BARRIER, id: 5, sector: 60, [(rb, 0, 7)]),   // past the end
            BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 6, sector: 0, [(rb, 0, 0)]),            // after the barrier
        ])
        #expect(responses == [1: okay, 2: okay, 3: okay, 4: failed, 5: failed, 6: okay])
        let file = try rig.image.bytes()
        #expect(file[0] == 0x22 && file[512] == 0x11 && file[8 * 512] == 0x22 && file[60 * 512] == 0)
        #expect(rig.backend.statistics.barriers == 3, "the 12-segment one was refused before it counted")

        let readOnly = try BlockRig(sectors: 16, readOnly: true)
        try readOnly.connect()
        let page = try readOnly.page { _ in 0x33 }
        let ref = try readOnly.guest.grantAccess(to: .zero, frame: page, readOnly: true)
        #expect(try readOnly.run([
            BlockRig.request(VIREO_BLKIF_OP_WRITE_BARRIER, id: 1, sector: 0, [(ref, 0, 7)]),
            BlockRig.request(VIREO_BLKIF_OP_WRITE_BARRIER, id: 2, sector: 0, []),
        ]) == [1: failed, 2: failed])
        #expect(try readOnly.image.bytes().allSatisfy { $0 == 0 })
    }

    @Test func discardPunchesAHoleAndHostileDiscardsAreRefused() throws {
        let rig = try BlockRig(sectors: 64, fill: 0x77)
        try rig.connect()
        let responses = try rig.run([
            BlockRig.discard(id: 1, sector: 8, count: 16),
            BlockRig.discard(id: 2, sector: 60, count: 8),                            // past the end
            BlockRig.discard(id: 3, sector: 1, count: UInt64.max),                    // overflow
            BlockRig.discard(id: 4, sector: UInt64.max, count: 1),                    // far past the end
            BlockRig.discard(id: 5, sector: 0, count: 8, flag: UInt8(VIREO_BLKIF_DISCARD_SECURE)),  // not offered
            BlockRig.discard(id: 6, sector: 0, count: 8, flag: 0x80),                 // unknown flag
            BlockRig.discard(id: 7, sector: 64, count: 0),                            // empty, at the end: fine
            BlockRig.discard(id: 8, sector: 63, count: 1),                            // the last sector
        ])
        #expect(responses == [1: okay, 2: failed, 3: failed, 4: failed, 5: unsupported, 6: failed, 7: okay, 8: okay])
        let file = try rig.image.bytes()
        #expect(file.count == 64 * 512)
        #expect(file[0 ..< 8 * 512].allSatisfy { $0 == 0x77 })
        #expect(file[8 * 512 ..< 24 * 512].allSatisfy { $0 == 0 }, "the discarded range reads as zeros")
        #expect(file[24 * 512 ..< 63 * 512].allSatisfy { $0 == 0x77 })
        #expect(file[63 * 512 ..< 64 * 512].allSatisfy { $0 == 0 })
        #expect(rig.backend.state == XenbusBackendState.connected)

        let readOnly = try BlockRig(sectors: 16, readOnly: true, fill: 0x55)
        try readOnly.connect()
        #expect(try readOnly.run([BlockRig.discard(id: 1, sector: 0, count: 8)]) == [1: failed])
        #expect(try readOnly.image.bytes().allSatisfy { $0 == 0x55 })
    }

    @Test func indirectRequestsCarryManySegmentsBothWays() throws {
        let rig = try BlockRig(sectors: 2048)
        try rig.connect()
        // 40 pages written by one indirect request, read back by another (with partial pages).
        var sources: [GrantRef] = [], targets: [(GuestFrame, GrantRef)] = []
        for i in 0..<40 {
            let page = try rig.page { UInt8(truncatingIfNeeded: i &* 13 &+ $0) }
            sources.append(try rig.guest.grantAccess(to: .zero, frame: page, readOnly: true))
            let target = try rig.guest.allocatePage()
            targets.append((target, try rig.guest.grantAccess(to: .zero, frame: target, readOnly: false)))
        }
        let writeList = try rig.indirectPage(sources.map { ($0, 0, 7) })
        let readList = try rig.indirectPage(targets.map { ($0.1, 0, 7) })
        #expect(try rig.run([BlockRig.indirect(VIREO_BLKIF_OP_WRITE, id: 1, sector: 64, segments: 40, pages: [writeList])])
                == [1: okay])
        #expect(try rig.run([BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 2, sector: 64, segments: 40, pages: [readList])])
                == [2: okay])
        for (i, target) in targets.enumerated() {
            let bytes = try rig.guest.memory.bytes(at: target.0.address!, count: 4096)
            #expect(bytes == (0..<4096).map { UInt8(truncatingIfNeeded: i &* 13 &+ $0) }, "page \(i)")
        }
        let file = try rig.image.bytes()
        #expect(file[64 * 512 + 39 * 4096 + 7] == UInt8(truncatingIfNeeded: 39 &* 13 &+ 7))
        // The maximum, 256 segments of one sector each.
        let maxList = try rig.indirectPage(Array(repeating: (targets[0].1, 3, 3), count: 256))
        #expect(try rig.run([BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 3, sector: 0, segments: 256, pages: [maxList])])
                == [3: okay])
        #expect(rig.backend.statistics.indirect == 3)
    }

    /// SECURITY 1-6 for indirect requests: bad counts, bad indirect grants, bad descriptors.
    @Test func hostileIndirectRequestsGetErrorsAndTheBackendCarriesOn() throws {
        let rig = try BlockRig(sectors: 256)
        try rig.connect()
        let data = try rig.guest.allocatePage()
        let ref = try rig.guest.grantAccess(to: .zero, frame: data, readOnly: false)
        let readOnlyRef = try rig.guest.grantAccess(to: .zero, frame: data, readOnly: true)
        let good = try rig.indirectPage(Array(repeating: (ref, 0, 7), count: 4))
        let badLast = try rig.indirectPage([(ref, 0, 7), (ref, 0, 8)])
        let badFirst = try rig.indirectPage([(ref, 6, 2)])
        let badGref = try rig.indirectPage([(GrantRef(99_999), 0, 7)])
        let readOnlyTarget = try rig.indirectPage([(readOnlyRef, 0, 7)])
        let listPage = try rig.guest.allocatePage()
        let otherDomainList = try rig.guest.grantAccess(to: DomainID(5), frame: listPage, readOnly: true)
        let tooBig = try rig.indirectPage(Array(repeating: (ref, 0, 7), count: 300))
        let responses = try rig.run([
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 1, sector: 0, segments: 4, pages: [good]),     // fine
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 2, sector: 0, segments: 0, pages: [good]),     // zero segments
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 3, sector: 0, segments: 257, pages: [tooBig]), // past the max
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 4, sector: 0, segments: 65535, pages: [tooBig]),
            BlockRig.indirect(VIREO_BLKIF_OP_FLUSH_DISKCACHE, id: 5, sector: 0, segments: 4, pages: [good]),  // not READ/WRITE
            BlockRig.indirect(VIREO_BLKIF_OP_INDIRECT, id: 6, sector: 0, segments: 4, pages: [good]),
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 7, sector: 0, segments: 4, pages: [GrantRef(77_777)]),  // bad indirect gref
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 8, sector: 0, segments: 1, pages: [otherDomainList]),   // not ours
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 9, sector: 0, segments: 2, pages: [badLast]),
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 10, sector: 0, segments: 1, pages: [badFirst]),
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 11, sector: 0, segments: 1, pages: [badGref]),
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 12, sector: 0, segments: 1, pages: [readOnlyTarget]),  // read into r/o
            BlockRig.indirect(VIREO_BLKIF_OP_WRITE, id: 13, sector: 250, segments: 4, pages: [good]),  // past the end
            BlockRig.indirect(VIREO_BLKIF_OP_WRITE, id: 14, sector: UInt64.max - 4, segments: 4, pages: [good]),  // overflow
            BlockRig.indirect(VIREO_BLKIF_OP_READ, id: 15, sector: 224, segments: 4, pages: [good]),  // the last 32: fine
        ])
        #expect(responses == [1: okay, 2: failed, 3: failed, 4: failed, 5: failed, 6: failed, 7: failed, 8: failed,
                              9: failed, 10: failed, 11: failed, 12: failed, 13: failed, 14: failed, 15: okay])
        #expect(try rig.image.bytes().allSatisfy { $0 == 0 })
        #expect(rig.backend.state == XenbusBackendState.connected)
        // No pin is left behind by a refused request: every grant can be revoked.
        for r in [ref, readOnlyRef, good, badLast, otherDomainList] { #expect(rig.guest.endAccess(r)) }

        let readOnly = try BlockRig(sectors: 64, readOnly: true)
        try readOnly.connect()
        let page = try readOnly.guest.allocatePage()
        let pageRef = try readOnly.guest.grantAccess(to: .zero, frame: page, readOnly: true)
        let list = try readOnly.indirectPage([(pageRef, 0, 7)])
        #expect(try readOnly.run([BlockRig.indirect(VIREO_BLKIF_OP_WRITE, id: 1, sector: 0, segments: 1, pages: [list])])
                == [1: failed])
    }

    @Test func multiQueueServesEveryRing() throws {
        let rig = try BlockRig(sectors: 256)
        try rig.connect(queues: 3)
        #expect(rig.backend.queueCount == 3)
        for queue in 0..<3 {
            let page = try rig.page { _ in UInt8(0x40 + queue) }
            let ref = try rig.guest.grantAccess(to: .zero, frame: page, readOnly: true)
            #expect(try rig.run([BlockRig.request(VIREO_BLKIF_OP_WRITE, id: UInt64(queue), sector: UInt64(queue * 8), [(ref, 0, 7)])],
                                queue: queue) == [UInt64(queue): okay])
        }
        let file = try rig.image.bytes()
        #expect(file[0] == 0x40 && file[8 * 512] == 0x41 && file[16 * 512] == 0x42)
    }

    /// One hostile ring among several: the device is disconnected, every ring unmapped.
    @Test func aBrokenQueueDisconnectsTheDevice() throws {
        let rig = try BlockRig(sectors: 64)
        try rig.connect(queues: 2)
        let page = try rig.page { _ in 1 }
        let ref = try rig.guest.grantAccess(to: .zero, frame: page, readOnly: true)
        #expect(try rig.run([BlockRig.request(VIREO_BLKIF_OP_WRITE, id: 1, sector: 0, [(ref, 0, 7)])], queue: 0) == [1: okay])
        // Queue 1's ring page: req_prod far past a ring ahead.
        try rig.guest.page(rig.queueFrames[1]).store(UInt32(1000), at: 0)
        try rig.guest.notify(rig.ports[1])
        try rig.waitForBackend(XenbusBackendState.closing)
        #expect(rig.backend.lastFailure?.contains("queue 1") == true)
        #expect(rig.backend.queueCount == 0)
        rig.shutdown()
        #expect(rig.guest.endAccess(rig.ringRef) && rig.guest.endAccess(rig.queueRefs[1]), "both rings were unmapped")
    }

    @Test(arguments: ["5", "0", "-1", "two", "99999999999999999999"])
    func aQueueCountBeyondThePublishedMaxIsRefused(_ value: String) throws {
        let rig = try BlockRig(sectors: 64, maxQueues: 4)
        try rig.connect(queues: 1, numQueuesValue: value, expect: XenbusBackendState.closing)
        #expect(rig.backend.lastFailure?.contains("multi-queue-num-queues") == true)
        #expect(rig.backend.queueCount == 0)
    }

    @Test func aMissingQueueKeyIsNamedAndNothingStaysBound() throws {
        let rig = try BlockRig(sectors: 64)
        try rig.waitForBackend(XenbusBackendState.initWait)
        // Two queues announced, queue-1's keys never written.
        let frame = try rig.guest.allocatePage()
        _ = try rig.guest.frontRing(on: frame) as FrontRing<BlkRequest, BlkResponse>
        let ref = try rig.guest.grantAccess(to: rig.host.id, frame: frame, readOnly: false)
        let channel = try rig.guest.allocUnbound(remote: rig.host.id)
        let node = rig.backend.frontendPath
        rig.guestWrite(node + "/queue-0/ring-ref", "\(ref.rawValue)")
        rig.guestWrite(node + "/queue-0/event-channel", "\(channel.rawValue)")
        rig.guestWrite(node + "/multi-queue-num-queues", "2")
        rig.guestWrite(node + "/state", "\(XenbusBackendState.initialised)")
        try rig.waitForBackend(XenbusBackendState.closing)
        #expect(rig.backend.lastFailure?.contains("queue-1/ring-ref") == true)
        rig.shutdown()
        #expect(rig.guest.endAccess(ref), "queue 0's ring was unmapped")
    }
}
