// The frontend of Docs/writing-a-driver.md's device, "vrng": a guest asks the host for random bytes.
import GuestKit
import VireoABI
import VireoHypercalls

/// The ring's two entries, declared exactly as the backend declares them.
struct RandomRequest { var id: UInt32; var gref: UInt32; var length: UInt32; var reserved: UInt32 }
struct RandomResponse { var id: UInt32; var status: Int32 }

let guest = PVHGuest()

func say(_ text: String) { try? guest.consoleIOWrite(Array(text.utf8)) }

func hex(_ page: UInt64, count: Int) -> String {
    let digits = Bytes.of("0123456789abcdef"), bytes = guest.platform.memory(at: page, count: count)
    var text: [UInt8] = []
    for i in 0..<count {
        let byte = bytes.load(UInt8.self, at: i)
        text += [digits[Int(byte >> 4)], digits[Int(byte & 15)]]
    }
    return String(decoding: text, as: UTF8.self)
}

func run() throws(GuestError) {
    try guest.mapSharedInfo()
    let store = try XenStoreClient(guest: guest)
    var grants = try GuestGrants(guest: guest)
    let bus = try XenbusFrontend(store: store, node: "device/vrng/0")
    var channel: FrontendChannel<RandomRequest, RandomResponse> = try bus.connect(guest: guest, grants: &grants)
    say("vrng: connected to \(bus.backend)\n")
    let page = guest.platform.allocatePage()
    guard let ref = grants.grantAccess(to: bus.backendDomain, frame: GuestFrame(page >> 12), readOnly: false) else {
        throw GuestError.ENOSPC
    }
    for id: UInt32 in 1...2 {
        try channel.send(RandomRequest(id: id, gref: ref.rawValue, length: 16, reserved: 0), in: guest)
        let response = try channel.receive(in: guest)  // sleeps in the guest's loop until it comes
        guard response.id == id, response.status == 16 else { throw GuestError.EIO }
        say("vrng: \(response.status) bytes: \(hex(page, count: 16))\n")
    }
    _ = grants.endAccess(ref)
}

do {
    try run()
    say("vrng: done\n")
    _ = guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_poweroff))
} catch {
    say("vrng: FAIL error \(error.code)\n")
    _ = guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_crash))
}
