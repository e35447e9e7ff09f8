// netecho: an echo host on the paravirtual network. It connects GuestKit's NetFrontend to vif 0
// and answers ARP requests for its IPv4 address, ICMP echo requests and UDP datagrams (echoed
// back to the sender, on any port or on `port=N` only), with correct checksums.
//
// Command line (space-separated, all optional):
//   ip=10.0.0.2        its IPv4 address (default 10.0.0.2)
//   mac=aa:bb:..:ff    its MAC address (default: the vif's `mac` from the XenStore)
//   port=N             echo UDP on port N only (default: every port)
//   count=N            power off after answering N requests (ARP, ICMP and UDP alike) and
//                      printing a summary; without it, it runs until the domain is destroyed
//
// It prints "netecho: vif0 connected, mac M, ip A" once connected, a counter line every 16
// packets received, and "netecho: done, ..." before a count= exit.
import GuestKit
import VireoABI
import VireoGuestRuntime
import VireoHypercalls

let guest = PVHGuest()

func say(_ text: String) {
    try? guest.consoleIOWrite(Array(text.utf8))
}

func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

/// The command line's `key=value` words.
struct Options {
    var ip = IPv4Address(10, 0, 0, 2)
    var mac: MACAddress?
    var port: UInt16?
    var count: UInt64?
    var bad: [UInt8]?

    init(_ line: [UInt8]) {
        var word: [UInt8] = []
        for byte in line + [32] {
            if byte == 32 || byte == 9 || byte == 10 {
                if !word.isEmpty { take(word) }
                word = []
            } else {
                word.append(byte)
            }
        }
    }

    static func value(_ word: [UInt8], _ key: StaticString) -> [UInt8]? {
        let name = Bytes.of(key)
        guard word.count > name.count, word[name.count] == 61, Bytes.equal(Array(word[0..<name.count]), key) else { return nil }
        return Array(word[(name.count + 1)...])
    }

    mutating func take(_ word: [UInt8]) {
        if let v = Self.value(word, "ip"), let address = IPv4Address(text: v) {
            ip = address
        } else if let v = Self.value(word, "mac"), let address = MACAddress(text: v) {
            mac = address
        } else if let v = Self.value(word, "port"), let n = Bytes.decimal(v), n <= 65535 {
            port = UInt16(n)
        } else if let v = Self.value(word, "count"), let n = Bytes.decimal(v) {
            count = n
        } else {
            bad = word
        }
    }
}

func run() throws(GuestError) {
    var options = Options(Array(String(cString: vireo_guest_cmdline()).utf8))
    if let bad = options.bad {
        say("netecho: ignoring '\(text(bad))' (give ip=A.B.C.D mac=M port=N count=N)\n")
    }
    try guest.mapSharedInfo()
    let store = try XenStoreClient(guest: guest)
    let net: NetFrontend<PVHPlatform>
    do {
        net = try NetFrontend(guest: guest, store: store, grants: try GuestGrants(guest: guest))
    } catch {
        if error == .ENOENT { say("netecho: no network device (device/vif/0 is missing)\n") }
        throw error
    }
    try net.connect()
    let mac = options.mac ?? net.mac
    options.mac = mac
    say("netecho: vif0 connected, mac \(text(mac.text)), ip \(text(options.ip.text))\n")

    var answered: UInt64 = 0, arp: UInt64 = 0, icmp: UInt64 = 0, udp: UInt64 = 0, ignored: UInt64 = 0
    var received: UInt64 = 0
    func counters() -> String {
        "rx \(received) tx \(net.packetsSent) arp \(arp) icmp \(icmp) udp \(udp) ignored \(ignored) errors \(net.receiveErrors + net.transmitErrors)"
    }
    var replies: [[UInt8]] = []
    while true {
        let got = try net.poll { packet in
            received += 1
            if let (reply, kind) = Packets.echoReply(to: packet.bytes, mac: mac, ip: options.ip, udpPort: options.port,
                                                     checksumBlank: packet.checksumBlank) {
                replies.append(reply)
                switch kind {
                case .arp: arp += 1
                case .icmp: icmp += 1
                case .udp: udp += 1
                }
            } else {
                ignored += 1
            }
            if received % 16 == 0 { say("netecho: \(counters())\n") }
        }
        // Replies go out after the receive pass, never from inside it.
        for reply in replies {
            try net.send(reply)
            answered += 1
            if let count = options.count, answered >= count { break }
        }
        replies = []
        if let count = options.count, answered >= count { break }
        if got == 0 { try net.waitForEvents() }
    }
    // Let the last replies leave (their slots answered) before powering off.
    while net.transmitsInFlight > 0 {
        try net.waitForEvents()
        _ = try net.freeTransmitSlots()
    }
    say("netecho: done, \(counters())\n")
}

do {
    try run()
    guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_poweroff))
} catch {
    say("netecho: FAIL error \(error.code)\n")
    guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_crash))
}
