import VireoABI
import VireoBench
import VireoCore

/// `vireo bench grant`: grant map+unmap pairs per second, and grant copy bandwidth beside a
/// plain memory copy of the same bytes between the same buffers, in the same run.
public struct GrantBenchmark: Benchmark {
    public let name = "grant"
    public let summary = "grant map+unmap pairs/s; grant copy bandwidth beside memcpy of the same bytes"

    public init() {}

    public func run(_ options: BenchmarkOptions) async throws -> BenchmarkResult {
        let pages = 1024
        let guestID = DomainID(1)
        let memory = try GuestMemory(ramBytes: UInt64(pages + 16) * 4096, specialFrames: 8)
        let table = try GrantTable(domain: guestID, memory: memory, firstSpecialFrame: 0, maxFrames: 8, initialFrames: 8)
        let tables = GrantTables()
        try tables.add(table)
        var guest = GuestGrantTable(frames: try (0..<8).map { try table.frameRegion($0) })
        var refs: [GrantRef] = []
        for page in 0..<pages {
            let frame = GuestFrame(UInt64(16 + page))
            try memory.write([UInt8](repeating: UInt8(truncatingIfNeeded: page), count: 64), at: frame.address!)
            guard let ref = guest.grantAccess(to: .zero, frame: frame, readOnly: false) else {
                throw BenchmarkError.unavailable(name: name, reason: "grant table full")
            }
            refs.append(ref)
        }
        let sources = try (0..<pages).map { try memory.region(frame: GuestFrame(UInt64(16 + $0))) }
        let bufferBytes = pages * 4096
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: bufferBytes, alignment: 4096)
        defer { buffer.deallocate() }
        let local = SharedRegion.unsafe(buffer, count: bufferBytes)
        local.fill(0, at: 0, count: bufferBytes)

        let seconds = options.phaseSeconds
        let rounds = options.quick ? 1 : 3

        // Map + unmap pairs, cycling over the granted references.
        options.log("grant: map+unmap pairs over \(pages) grants")
        var mapRates: [Measure.Rate] = []
        for _ in 0..<rounds {
            mapRates.append(try Measure.rate(seconds: seconds) {
                for ref in refs {
                    let mapping = try table.map(ref, by: .zero, readOnly: false)
                    mapping.unmap()
                }
                return UInt64(refs.count)
            })
        }
        let mapRate = Measure.median(mapRates)

        // Grant copy of whole pages into the local buffer, beside memcpy of the same pages.
        func copyPhase(segmentBytes: Int) throws -> (grant: Measure.Rate, memcpy: Measure.Rate) {
            let segments = refs.enumerated().map { i, ref in
                GrantCopySegment(source: .grant(guestID, ref, offset: 0), dest: .local(local, offset: i * 4096), length: segmentBytes)
            }
            var statuses: [GrantStatus] = []
            statuses.reserveCapacity(GrantTables.copyBatchLimit)
            var grantRates: [Measure.Rate] = [], copyRates: [Measure.Rate] = []
            for _ in 0..<rounds {
                grantRates.append(try Measure.rate(seconds: seconds) {
                    var start = 0
                    while start < segments.count {
                        statuses.removeAll(keepingCapacity: true)
                        start += tables.copy(segments[start...], by: .zero, statuses: &statuses)
                        guard statuses.allSatisfy({ $0 == .okay }) else {
                            throw BenchmarkError.unavailable(name: name, reason: "grant copy failed: \(statuses.first { $0 != .okay }!)")
                        }
                    }
                    return UInt64(segments.count * segmentBytes)
                })
                copyRates.append(Measure.rate(seconds: seconds) {
                    for (i, source) in sources.enumerated() {
                        local.copyBytes(from: source, offset: 0, to: i * 4096, count: segmentBytes)
                    }
                    return UInt64(sources.count * segmentBytes)
                })
            }
            return (Measure.median(grantRates), Measure.median(copyRates))
        }
        // One segment per call, as netback copies each fragment: the fixed cost of a call (table
        // lookup, pin, unpin) over 64 bytes, beside memcpy of the same 64 bytes.
        func singlePhase(segmentBytes: Int) -> (grant: Measure.Rate, memcpy: Measure.Rate) {
            let segments = refs.enumerated().map { i, ref in
                GrantCopySegment(source: .grant(guestID, ref, offset: 0), dest: .local(local, offset: i * 4096), length: segmentBytes)
            }
            var grantRates: [Measure.Rate] = [], copyRates: [Measure.Rate] = []
            var failures = 0
            for _ in 0..<rounds {
                grantRates.append(Measure.rate(seconds: seconds) {
                    for segment in segments where tables.copy(segment, by: .zero) != .okay { failures += 1 }
                    return UInt64(segments.count)
                })
                copyRates.append(Measure.rate(seconds: seconds) {
                    for (i, source) in sources.enumerated() {
                        local.copyBytes(from: source, offset: 0, to: i * 4096, count: segmentBytes)
                    }
                    return UInt64(sources.count)
                })
            }
            precondition(failures == 0, "single-segment grant copies failed")
            return (Measure.median(grantRates), Measure.median(copyRates))
        }
        options.log("grant: one 64-byte segment per call")
        let single = singlePhase(segmentBytes: 64)

        options.log("grant: copy 4096-byte segments")
        let page = try copyPhase(segmentBytes: 4096)
        options.log("grant: copy 1500-byte segments")
        let packet = try copyPhase(segmentBytes: 1500)

        let gb = 1e9
        return BenchmarkResult(
            bench: name, value: page.grant.perSecond / gb, unit: "GB/s",
            baseline: page.memcpy.perSecond / gb, baselineName: "memcpy of the same 4 KiB pages",
            goal: "grant copy near memcpy (ratio -> 1)",
            extra: [
                ("map_unmap_pairs_per_s", .number(mapRate.perSecond.rounded())),
                ("map_unmap_ns", .number((mapRate.nanosecondsPerOperation * 10).rounded() / 10)),
                ("copy_1500B_GBps", .number(packet.grant.perSecond / gb)),
                ("memcpy_1500B_GBps", .number(packet.memcpy.perSecond / gb)),
                ("copy_1500B_ratio", .number(packet.grant.perSecond / packet.memcpy.perSecond)),
                ("copy_64B_single_ns", .number((single.grant.nanosecondsPerOperation * 10).rounded() / 10)),
                ("memcpy_64B_ns", .number((single.memcpy.nanosecondsPerOperation * 10).rounded() / 10)),
                ("grants", .integer(Int64(pages))),
            ])
    }
}
