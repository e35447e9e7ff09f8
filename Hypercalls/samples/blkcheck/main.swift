// blkcheck: the first end-to-end virtual disk. It connects GuestKit's BlockFrontend to the
// disk `vireo run --disk PATH` serves as xvda, writes a pattern over the first N sectors
// (`--cmdline N`, default 64; this host's KVM emulates about 2 M instructions/s), flushes,
// reads them back, compares, prints "blkcheck: N sectors ok" (or the mismatches) and powers
// off, or crashes (a non-zero exit) on a mismatch or an error.
import GuestKit
import VireoABI
import VireoGuestRuntime
import VireoHypercalls

let guest = PVHGuest()

func say(_ text: String) {
    try? guest.consoleIOWrite(Array(text.utf8))
}

/// The byte the guest writes at `offset` of sector `sector`: distinct per sector and offset.
@inline(__always)
func pattern(_ sector: UInt64, _ offset: Int) -> UInt8 {
    UInt8(truncatingIfNeeded: sector &* 37 &+ UInt64(offset) &+ (sector >> 3))
}

func requestedSectors() -> UInt64 {
    var value: UInt64 = 0
    var digits = 0
    for byte in Array(String(cString: vireo_guest_cmdline()).utf8) where byte >= 48 && byte <= 57 {
        value = value &* 10 &+ UInt64(byte - 48)
        digits += 1
    }
    return digits > 0 ? value : 64
}

func run() throws(GuestError) -> Bool {
    try guest.mapSharedInfo()
    let store = try XenStoreClient(guest: guest)
    let disk = try BlockFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest))
    try disk.connect()
    say("blkcheck: xvda connected, \(disk.sectors) sectors\(disk.readOnly ? " (read-only)" : "")\n")
    var total = requestedSectors()
    if total > disk.sectors { total = disk.sectors }
    // Up to 8 pages per request (64 sectors), several requests in flight.
    let pagesPerRequest = 8
    let inFlight = 4
    var pages: [UInt64] = []
    for _ in 0..<(pagesPerRequest * inFlight) { pages.append(guest.platform.allocatePage()) }

    func frames(_ batch: Int) -> [GuestFrame] {
        var list: [GuestFrame] = []
        for p in 0..<pagesPerRequest { list.append(GuestFrame(pages[batch * pagesPerRequest + p] >> 12)) }
        return list
    }

    // Write: fill each batch's pages with the pattern of the sectors they carry.
    var sector: UInt64 = 0
    while sector < total {
        var ids: [UInt64] = []
        var batch = 0
        while batch < inFlight && sector < total {
            let count = total - sector < UInt64(pagesPerRequest * 8) ? Int(total - sector) : pagesPerRequest * 8
            for s in 0..<count {
                let page = guest.platform.memory(at: pages[batch * pagesPerRequest + s / 8], count: 4096)
                page.withUnsafeMutableBytes(offset: (s % 8) * 512, count: 512) { bytes in
                    for i in 0..<512 { bytes[i] = pattern(sector + UInt64(s), i) }
                }
            }
            let used = (count + 7) / 8
            var list = frames(batch)
            list.removeLast(pagesPerRequest - used)
            ids.append(try disk.submit(VIREO_BLKIF_OP_WRITE, sector: sector, frames: list, count: count))
            sector += UInt64(count)
            batch += 1
        }
        for id in ids where try disk.wait(id) != Int16(VIREO_BLKIF_RSP_OKAY) { throw GuestError.EIO }
    }
    if disk.canFlush { try disk.flush() }

    // Read back into cleared pages and compare.
    var mismatches: UInt64 = 0
    sector = 0
    while sector < total {
        for address in pages {
            guest.platform.memory(at: address, count: 4096).withUnsafeMutableBytes(offset: 0, count: 4096) { bytes in
                for i in 0..<4096 { bytes[i] = 0 }
            }
        }
        var ids: [UInt64] = []
        var starts: [UInt64] = []
        var counts: [Int] = []
        var batch = 0
        while batch < inFlight && sector < total {
            let count = total - sector < UInt64(pagesPerRequest * 8) ? Int(total - sector) : pagesPerRequest * 8
            var list = frames(batch)
            list.removeLast(pagesPerRequest - (count + 7) / 8)
            ids.append(try disk.submit(VIREO_BLKIF_OP_READ, sector: sector, frames: list, count: count))
            starts.append(sector)
            counts.append(count)
            sector += UInt64(count)
            batch += 1
        }
        for (b, id) in ids.enumerated() {
            if try disk.wait(id) != Int16(VIREO_BLKIF_RSP_OKAY) { throw GuestError.EIO }
            for s in 0..<counts[b] {
                let page = guest.platform.memory(at: pages[b * pagesPerRequest + s / 8], count: 4096)
                var bad = false
                page.withUnsafeMutableBytes(offset: (s % 8) * 512, count: 512) { bytes in
                    for i in 0..<512 where bytes[i] != pattern(starts[b] + UInt64(s), i) { bad = true }
                }
                if bad {
                    mismatches += 1
                    if mismatches <= 4 { say("blkcheck: sector \(starts[b] + UInt64(s)) mismatch\n") }
                }
            }
        }
    }
    if mismatches == 0 {
        say("blkcheck: \(total) sectors ok\n")
    } else {
        say("blkcheck: \(mismatches) of \(total) sectors mismatched\n")
    }
    try disk.disconnect()
    return mismatches == 0
}

do {
    if try run() {
        guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_poweroff))
    } else {
        guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_crash))
    }
} catch {
    say("blkcheck: FAIL error \(error.code)\n")
    guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_crash))
}
