// blkcheck: the end-to-end virtual disk check. It connects GuestKit's BlockFrontend to the
// disk `vireo run --disk PATH` serves as xvda and, by `--cmdline`:
//   all      the same over the whole disk
//   N        (default 64) writes a pattern over the first N 512-byte sectors (rounded down to
//            whole logical sectors on a 4096-byte-sector disk; several requests in
//            flight, up to 32 pages each: indirect requests when the backend offers them), flushes
//            (a write barrier when offered, else FLUSH_DISKCACHE), reads them back, compares,
//            prints "blkcheck: N sectors ok" (or the mismatches) and powers off; a mismatch or
//            an error crashes the domain (a non-zero exit of `vireo run`).
//   bench N  writes then reads the first N sectors in 64 KiB requests, 8 in flight, without
//            touching the data, and prints the guest-timed throughput:
//            "blkcheck: bench write W KiB/s read R KiB/s (N sectors)".
// With a network (`vireo run --net ...`), it also connects vif 0 after the disk check and
// announces itself with a gratuitous ARP for 10.0.2.15, printing "blkcheck: vif0 connected, mac
// M, announced 10.0.2.15": the README's demo (a disk and a network) in one guest.
// This host's KVM emulates about 2 M instructions/s: keep N small there.
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

/// The command line: "all", or an optional "bench" word and a sector count (default 64).
func arguments() -> (bench: Bool, sectors: UInt64) {
    let text = Array(String(cString: vireo_guest_cmdline()).utf8)
    var value: UInt64 = 0
    var digits = 0
    for byte in text where byte >= 48 && byte <= 57 {
        value = value &* 10 &+ UInt64(byte - 48)
        digits += 1
    }
    var bench = false
    if text.count >= 3 {
        for start in 0...(text.count - 3) where text[start] == 97 && text[start + 1] == 108 && text[start + 2] == 108 {
            return (false, UInt64.max)  // "all": clamped to the disk's size
        }
    }
    if text.count >= 5 {
        for start in 0...(text.count - 5) where text[start] == 98 && text[start + 1] == 101 && text[start + 2] == 110
            && text[start + 3] == 99 && text[start + 4] == 104 { bench = true }  // "bench"
    }
    return (bench, digits > 0 ? value : 64)
}

/// Runs `total` sectors from sector 0 through the disk in requests of up to `pagesPerRequest`
/// pages, `inFlight` at a time, from/into `pages` (a request's pages are its batch's slice).
/// `fill` prepares a request's pages before a write, `check` examines them after a read.
func sweep(_ disk: BlockFrontend<PVHPlatform>, operation: Int32, total: UInt64, pages: [UInt64], pagesPerRequest: Int,
           inFlight: Int, fill: (UInt64, Int, Int) -> Void, check: (UInt64, Int, Int) -> Void) throws(GuestError) {
    var sector: UInt64 = 0
    let perRequest = UInt64(pagesPerRequest * 8)
    while sector < total {
        var ids: [UInt64] = []
        var starts: [UInt64] = []
        var counts: [Int] = []
        var batch = 0
        while batch < inFlight && sector < total {
            let count = total - sector < perRequest ? Int(total - sector) : Int(perRequest)
            if operation != VIREO_BLKIF_OP_READ { fill(sector, batch, count) }
            var frames: [GuestFrame] = []
            for p in 0..<((count + 7) / 8) { frames.append(GuestFrame(pages[batch * pagesPerRequest + p] >> 12)) }
            ids.append(try disk.submit(operation, sector: sector, frames: frames, count: count))
            starts.append(sector)
            counts.append(count)
            sector += UInt64(count)
            batch += 1
        }
        for (b, id) in ids.enumerated() {
            if try disk.wait(id) != Int16(VIREO_BLKIF_RSP_OKAY) { throw GuestError.EIO }
            if operation == VIREO_BLKIF_OP_READ { check(starts[b], b, counts[b]) }
        }
    }
}

func run() throws(GuestError) -> Bool {
    try guest.mapSharedInfo()
    let store = try XenStoreClient(guest: guest)
    let disk = try BlockFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest))
    try disk.connect()
    say("blkcheck: xvda connected, \(disk.sectors) sectors\(disk.readOnly ? " (read-only)" : ""), sector-size \(disk.sectorSize), "
        + "\(disk.maxSegments) segments per request\(disk.canBarrier ? ", barrier" : "")\(disk.canDiscard ? ", discard" : "")\n")
    let (bench, requested) = arguments()
    var total = requested
    if total > disk.sectors { total = disk.sectors }
    total -= total % (disk.sectorSize / 512)  // whole logical sectors: the backend refuses less
    let pagesPerRequest = bench ? 16 : (disk.maxSegments < 32 ? disk.maxSegments : 32)
    let inFlight = bench ? 8 : 4
    var pages: [UInt64] = []
    for _ in 0..<(pagesPerRequest * inFlight) { pages.append(guest.platform.allocatePage()) }

    if bench {
        let start = guest.systemTime()
        try sweep(disk, operation: VIREO_BLKIF_OP_WRITE, total: total, pages: pages, pagesPerRequest: pagesPerRequest,
                  inFlight: inFlight, fill: { _, _, _ in }, check: { _, _, _ in })
        if disk.canFlush { try disk.flush() }
        let written = guest.systemTime()
        try sweep(disk, operation: VIREO_BLKIF_OP_READ, total: total, pages: pages, pagesPerRequest: pagesPerRequest,
                  inFlight: inFlight, fill: { _, _, _ in }, check: { _, _, _ in })
        let read = guest.systemTime()
        let kib = total / 2
        func rate(_ nanoseconds: UInt64) -> UInt64 { nanoseconds == 0 ? 0 : kib &* 1_000_000_000 / nanoseconds }
        say("blkcheck: bench write \(rate(written - start)) KiB/s read \(rate(read - written)) KiB/s (\(total) sectors)\n")
        try disk.disconnect()
        return true
    }

    // Write: fill each request's pages with the pattern of the sectors they carry.
    try sweep(disk, operation: VIREO_BLKIF_OP_WRITE, total: total, pages: pages, pagesPerRequest: pagesPerRequest,
              inFlight: inFlight, fill: { first, batch, count in
                  for s in 0..<count {
                      let page = guest.platform.memory(at: pages[batch * pagesPerRequest + s / 8], count: 4096)
                      page.withUnsafeMutableBytes(offset: (s % 8) * 512, count: 512) { bytes in
                          for i in 0..<512 { bytes[i] = pattern(first + UInt64(s), i) }
                      }
                  }
              }, check: { _, _, _ in })
    // Durable before reading back: a pure barrier when offered, else a flush.
    if disk.canBarrier {
        try disk.writeBarrier(sector: 0, count: 0, from: [])
    } else if disk.canFlush {
        try disk.flush()
    }

    // Read back into cleared pages and compare.
    for address in pages {
        guest.platform.memory(at: address, count: 4096).withUnsafeMutableBytes(offset: 0, count: 4096) { bytes in
            for i in 0..<4096 { bytes[i] = 0 }
        }
    }
    var mismatches: UInt64 = 0
    try sweep(disk, operation: VIREO_BLKIF_OP_READ, total: total, pages: pages, pagesPerRequest: pagesPerRequest,
              inFlight: inFlight, fill: { _, _, _ in }, check: { first, batch, count in
                  for s in 0..<count {
                      let page = guest.platform.memory(at: pages[batch * pagesPerRequest + s / 8], count: 4096)
                      var bad = false
                      page.withUnsafeMutableBytes(offset: (s % 8) * 512, count: 512) { bytes in
                          for i in 0..<512 where bytes[i] != pattern(first + UInt64(s), i) { bad = true }
                          for i in 0..<512 { bytes[i] = 0 }  // cleared for the next sweep
                      }
                      if bad {
                          mismatches += 1
                          if mismatches <= 4 { say("blkcheck: sector \(first + UInt64(s)) mismatch\n") }
                      }
                  }
              })
    if mismatches == 0 {
        say("blkcheck: \(total) sectors ok\n")
    } else {
        say("blkcheck: \(mismatches) of \(total) sectors mismatched\n")
    }
    try disk.disconnect()
    try announce(store)
    return mismatches == 0
}

/// With a vif: connect it and send a gratuitous ARP, waiting until netback has taken it.
func announce(_ store: XenStoreClient<PVHPlatform>) throws(GuestError) {
    let net: NetFrontend<PVHPlatform>
    do {
        net = try NetFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest), transmitSlots: 4,
                              receiveBuffers: 4)
    } catch {
        if error == .ENOENT { return }  // no network: a disk-only run
        throw error
    }
    try net.connect()
    let address = IPv4Address(10, 0, 2, 15)
    _ = try net.send(Packets.arpRequest(from: net.mac, ip: address, asking: address))
    while net.transmitsInFlight > 0 {
        try net.waitForEvents()
        _ = try net.freeTransmitSlots()
    }
    say("blkcheck: vif0 connected, mac \(String(decoding: net.mac.text, as: UTF8.self)), announced \(String(decoding: address.text, as: UTF8.self))\n")
    try net.disconnect()
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
