import Foundation
import Glibc
import Synchronization
import VireoABI
import VireoBackends
import VireoBench
import VireoCore
import VireoHypercalls
import VireoStore

/// `vireo bench block`: the real blkback (`BlockBackend`) over a raw file in the page cache,
/// driven by a simulated frontend (a SimulatedGuest with a blkif FrontRing, a ring's worth of
/// requests in flight), beside `pread`/`pwrite` of the same sizes on the same file in the same
/// run. Sequential: the whole file written then read in 64 KiB I/Os, each one BLKIF_OP_INDIRECT
/// request of 16 segments (what a frontend does when the backend offers
/// feature-max-indirect-segments, as Vireo's does); the same I/Os as two direct requests each
/// (11 + 5 segments, a frontend without indirect segments) are the `seq_direct_*` fields;
/// random: 4 KiB reads and writes, alternating, at 4 KiB-aligned offsets from a fixed seed.
/// `value` is sequential MB/s, `ratio` the sequential ratio; the others are extra fields.
public struct BlockBenchmark: Benchmark {
    public let name = "block"
    public let summary = "blkback sequential 64 KiB MB/s (indirect and direct requests) and random 4 KiB IOPS beside pread/pwrite on the same file"

    public init() {}

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        let fileBytes = (options.quick ? 8 : 64) << 20
        let path = NSTemporaryDirectory() + "vireo-bench-block-\(getpid())-\(UInt64.random(in: 0...UInt64.max)).img"
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw BenchmarkError.unavailable(name: name, reason: "cannot create \(path)") }
        defer {
            close(fd)
            unlink(path)
        }
        guard ftruncate(fd, off_t(fileBytes)) == 0 else { throw BenchmarkError.unavailable(name: name, reason: "cannot size \(path)") }

        let rig = try BlockBenchRig(path: path, benchmark: name)
        defer { rig.shutdown() }
        try rig.connect()

        // The operations, the same list for blkback and for the host baseline.
        let sequential: [BlockBenchRig.Operation] = [false, true].flatMap { read in
            stride(from: 0, to: fileBytes, by: 65536).map { BlockBenchRig.Operation(read: read, offset: $0, bytes: 65536) }
        }
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        let randomCount = options.quick ? 2048 : 16384
        let random: [BlockBenchRig.Operation] = (0..<randomCount).map { i in
            state ^= state << 13
            state ^= state >> 7
            state ^= state << 17
            return BlockBenchRig.Operation(read: i % 2 == 0, offset: Int(state % UInt64(fileBytes / 4096)) * 4096, bytes: 4096)
        }
        let host = HostIO(fd: fd)
        defer { host.buffer.deallocate() }
        let seconds = options.phaseSeconds
        let rounds = options.quick ? 1 : 3

        options.log("block: sequential 64 KiB over \(fileBytes >> 20) MiB, blkback and pread/pwrite")
        var seqBack: [Measure.Rate] = [], seqDirect: [Measure.Rate] = [], seqHost: [Measure.Rate] = []
        for _ in 0..<rounds {
            seqBack.append(try Measure.rate(seconds: seconds) { try rig.drive(sequential, indirect: true); return UInt64(fileBytes * 2) })
            seqHost.append(try Measure.rate(seconds: seconds) { try host.run(sequential, benchmark: name); return UInt64(fileBytes * 2) })
            seqDirect.append(try Measure.rate(seconds: seconds) { try rig.drive(sequential, indirect: false); return UInt64(fileBytes * 2) })
        }
        options.log("block: random 4 KiB, \(randomCount) per pass, half reads")
        var randBack: [Measure.Rate] = [], randHost: [Measure.Rate] = []
        for _ in 0..<rounds {
            randBack.append(try Measure.rate(seconds: seconds) { try rig.drive(random, indirect: true); return UInt64(random.count) })
            randHost.append(try Measure.rate(seconds: seconds) { try host.run(random, benchmark: name); return UInt64(random.count) })
        }
        let mb = 1e6
        let seq = Measure.median(seqBack).perSecond / mb, seqBase = Measure.median(seqHost).perSecond / mb
        let seqDirectValue = Measure.median(seqDirect).perSecond / mb
        let rand = Measure.median(randBack).perSecond, randBase = Measure.median(randHost).perSecond
        return BenchmarkResult(
            bench: name, value: seq, unit: "MB/s", baseline: seqBase,
            baselineName: "pread/pwrite of 64 KiB on the same file (blkback: one indirect request of 16 segments per I/O)",
            goal: "sequential ratio >= 0.8; random 4 KiB IOPS ratio >= 0.5",
            extra: [
                ("seq_goal", .number(0.8)),
                ("seq_direct_MBps", .number(seqDirectValue)),
                ("seq_direct_ratio", .number(seqBase == 0 ? 0 : seqDirectValue / seqBase)),
                ("seq_direct_name", .string("the same I/Os as two direct requests each (11 + 5 segments)")),
                ("rand4k_iops", .number(rand.rounded())),
                ("rand4k_baseline_iops", .number(randBase.rounded())),
                ("rand4k_baseline_name", .string("pread/pwrite of 4 KiB on the same file")),
                ("rand4k_ratio", .number(randBase == 0 ? 0 : rand / randBase)),
                ("rand4k_goal", .number(0.5)),
                ("file_MiB", .integer(Int64(fileBytes >> 20))),
                ("in_flight", .integer(Int64(rig.slots))),
                ("backend_requests", .integer(Int64(rig.backend.statistics.requests))),
                ("backend_indirect_requests", .integer(Int64(rig.backend.statistics.indirect))),
                ("backend_batches", .integer(Int64(rig.backend.statistics.batches))),
                ("backend_notifications", .integer(Int64(rig.backend.statistics.notifications))),
            ])
    }
}

/// The host baseline: the same operations with pread/pwrite on the same file.
private struct HostIO {
    let fd: Int32
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 4096)

    init(fd: Int32) {
        self.fd = fd
        buffer.initializeMemory(as: UInt8.self, repeating: 0x5A, count: 65536)
    }

    func run(_ operations: [BlockBenchRig.Operation], benchmark: String) throws {
        for op in operations {
            let n = op.read ? pread(fd, buffer, op.bytes, off_t(op.offset)) : pwrite(fd, buffer, op.bytes, off_t(op.offset))
            guard n == op.bytes else { throw BenchmarkError.unavailable(name: benchmark, reason: "host I/O failed") }
        }
    }
}

/// The real BlockBackend, the real XenStore and the host's event domain, with a SimulatedGuest
/// frontend: Xen's handshake, then a ring's worth of requests in flight. Each slot owns 11 data
/// pages granted once (the frontend's grant cost is not what this measures; the backend's grant
/// copies are).
final class BlockBenchRig {
    struct Operation {
        var read: Bool
        var offset: Int
        var bytes: Int
    }

    let hub = EventChannels()
    let grants = GrantTables()
    let store = XenStore()
    let guest: SimulatedGuest
    let host: HostEventDomain
    let backend: BlockBackend
    let benchmark: String
    private var front: FrontRing<vireo_blkif_request, vireo_blkif_response>?
    private var port = EventPort(0)
    private var slotRefs: [[GrantRef]] = []
    /// Per slot, a page of indirect segment descriptors granted read-only (one I/O's list).
    private var slotIndirect: [(frame: GuestFrame, ref: GrantRef)] = []
    private var free: [Int] = []
    let slots = Int(VIREO_ABI_BLKIF_RING_SIZE)
    private static let segmentsPerRequest = Int(VIREO_BLKIF_MAX_SEGMENTS_PER_REQUEST)
    /// Data pages per slot: a 64 KiB I/O in one indirect request.
    private static let pagesPerSlot = 16

    private var dispatcher: HostEventDispatcher?
    private var threads: [Thread] = []

    init(path: String, benchmark: String) throws {
        self.benchmark = benchmark
        let slots = Int(VIREO_ABI_BLKIF_RING_SIZE)
        guest = try SimulatedGuest(id: DomainID(1), ramPages: slots * (Self.pagesPerSlot + 1) + 64, hub: hub, grantTables: grants)
        host = try HostEventDomain(hub: hub)
        try store.introduceDomain(guest.id)
        backend = try BlockBackend(path: path, readOnly: false, frontend: guest.id, store: store, grants: grants, host: host)
        try backend.create()
        let backend = self.backend
        dispatcher = HostEventDispatcher(host, name: "bench-dom0-events")
        threads = [Thread { backend.run() }]
        threads[0].name = "bench-blkback"
        for t in threads { t.start() }
    }

    func shutdown() {
        backend.stop()
        dispatcher?.stop()
        while threads.contains(where: { !$0.isFinished }) { usleep(1000) }
        guest.destroy()
    }

    private func fail(_ reason: String) -> BenchmarkError { .unavailable(name: benchmark, reason: reason) }

    /// The frontend's half of Xen's handshake over the XenStore.
    func connect() throws {
        let session = store.connect(domain: guest.id)
        defer { store.disconnect(session) }
        func read(_ path: String) -> String? {
            guard let reply = store.request(XenStoreMessage(.read, path), from: session), reply.type == .read else { return nil }
            return String(decoding: reply.payload, as: UTF8.self)
        }
        func write(_ path: String, _ value: String) throws {
            let reply = store.request(XenStoreMessage(type: .write, payload: Array(path.utf8) + [0] + Array(value.utf8)), from: session)
            guard reply?.type == .write else { throw fail("XenStore refused \(path)") }
        }
        func wait(for state: UInt32) throws {
            let deadline = ContinuousClock.now.advanced(by: .seconds(10))
            while read(backend.backendPath + "/state") != "\(state)" {
                guard ContinuousClock.now < deadline else { throw fail("blkback never reached state \(state): \(backend.lastFailure ?? "-")") }
                usleep(1000)
            }
        }
        try wait(for: XenbusBackendState.initWait)
        let ringFrame = try guest.allocatePage()
        front = try guest.frontRing(on: ringFrame)
        let ringRef = try guest.grantAccess(to: host.id, frame: ringFrame, readOnly: false)
        port = try guest.allocUnbound(remote: host.id)
        for _ in 0..<slots {
            var refs: [GrantRef] = []
            for _ in 0..<Self.pagesPerSlot {
                let page = try guest.allocatePage()
                try guest.page(page).fill(0xA5, at: 0, count: 4096)
                refs.append(try guest.grantAccess(to: host.id, frame: page, readOnly: false))
            }
            slotRefs.append(refs)
            let list = try guest.allocatePage()
            slotIndirect.append((list, try guest.grantAccess(to: host.id, frame: list, readOnly: true)))
        }
        free = Array((0..<slots).reversed())
        let node = backend.frontendPath
        try write(node + "/ring-ref", "\(ringRef.rawValue)")
        try write(node + "/event-channel", "\(port.rawValue)")
        try write(node + "/protocol", "x86_64-abi")
        try write(node + "/state", "\(XenbusBackendState.initialised)")
        try wait(for: XenbusBackendState.connected)
    }

    /// Runs every operation through the ring, as many in flight as the ring holds. An I/O larger
    /// than 11 pages is one indirect request (its descriptors written into the slot's indirect
    /// page) when `indirect`, else several direct requests.
    func drive(_ operations: [Operation], indirect: Bool) throws {
        guard var ring = front else { throw fail("not connected") }
        defer { front = ring }
        var next = 0, pieceOffset = 0, outstanding = 0
        while next < operations.count || outstanding > 0 {
            var produced = false
            while next < operations.count, let slot = free.last {
                let op = operations[next]
                let wanted = (op.bytes - pieceOffset) / 4096
                if indirect && wanted > Self.segmentsPerRequest && wanted <= Self.pagesPerSlot {
                    let refs = slotRefs[slot]
                    let list = try guest.page(slotIndirect[slot].frame)
                    for i in 0..<wanted {
                        var segment = vireo_blkif_request_segment()
                        segment.gref = refs[i].rawValue
                        segment.first_sect = 0
                        segment.last_sect = 7
                        list.store(segment, at: i * 8)
                    }
                    var request = vireo_blkif_request_indirect()
                    request.operation = UInt8(VIREO_BLKIF_OP_INDIRECT)
                    request.indirect_op = UInt8(op.read ? VIREO_BLKIF_OP_READ : VIREO_BLKIF_OP_WRITE)
                    request.nr_segments = UInt16(wanted)
                    request.id = UInt64(slot)
                    request.sector_number = UInt64((op.offset + pieceOffset) / 512)
                    request.indirect_grefs.0 = slotIndirect[slot].ref.rawValue
                    var slotRequest = vireo_blkif_request()
                    withUnsafeMutableBytes(of: &slotRequest) { $0.storeBytes(of: request, as: vireo_blkif_request_indirect.self) }
                    try ring.produceRequest(slotRequest)
                    free.removeLast()
                    outstanding += 1
                    produced = true
                    pieceOffset = 0
                    next += 1
                    continue
                }
                let pages = min(wanted, Self.segmentsPerRequest)
                var request = vireo_blkif_request()
                request.operation = UInt8(op.read ? VIREO_BLKIF_OP_READ : VIREO_BLKIF_OP_WRITE)
                request.nr_segments = UInt8(pages)
                request.id = UInt64(slot)
                request.sector_number = UInt64((op.offset + pieceOffset) / 512)
                let refs = slotRefs[slot]
                for i in 0..<pages {
                    request.setSegment(i, gref: refs[i].rawValue, firstSector: 0, lastSector: 7)
                }
                try ring.produceRequest(request)
                free.removeLast()
                outstanding += 1
                produced = true
                pieceOffset += pages * 4096
                if pieceOffset == op.bytes {
                    pieceOffset = 0
                    next += 1
                }
            }
            if produced, ring.pushRequestsAndCheckNotify() { try guest.notify(port) }
            var consumed = false
            while let response = try ring.consumeResponse() {
                guard response.status == Int16(VIREO_BLKIF_RSP_OKAY) else { throw fail("blkback answered \(response.status)") }
                free.append(Int(response.id))
                outstanding -= 1
                consumed = true
            }
            if consumed || outstanding == 0 { continue }
            if try ring.finalCheckForResponses() { continue }
            try waitForEvent()
        }
    }

    /// Waits for the backend's notification as a guest vCPU would: a short spin (200 yields),
    /// then 20 µs sleeps. (It used to spin 10 000 yields, which on this shared 2-core machine took
    /// a core from the backend's own thread.)
    private func waitForEvent() throws {
        let deadline = Measure.now() + 10_000_000_000
        var spins = 0
        while guest.takePendingEvents().isEmpty {
            spins += 1
            if spins < 200 { sched_yield() } else { usleep(20) }
            if spins & 1023 == 0, Measure.now() > deadline { throw fail("no response from blkback: \(backend.lastFailure ?? "-")") }
        }
    }
}
