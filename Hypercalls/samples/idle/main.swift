// Sample: a guest that idles until the toolstack asks it to stop, the Xen way: it watches
// control/shutdown in its XenStore home, sleeps in the guest loop (halted, woken by upcalls)
// and on "poweroff" or "reboot" shuts down with that reason. vireod's end-to-end tests and `vireo bench density` run it.
import GuestKit
import VireoABI
import VireoHypercalls

let guest = PVHGuest()

func say(_ text: String) {
    try? guest.consoleIOWrite(Array(text.utf8))
}

func run() throws(GuestError) {
    try guest.mapSharedInfo()
    _ = try guest.enableUpcalls()
    let store = try XenStoreClient(guest: guest)
    let name = try store.read("name")
    say("idle: \(String(decoding: name, as: UTF8.self)) ready\n")
    try store.watch("control/shutdown", token: "control")
    while true {
        _ = try store.waitForWatchEvent()
        let request = (try? store.read("control/shutdown")) ?? []
        if request == Array("poweroff".utf8) {
            say("idle: powering off\n")
            guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_poweroff))
        } else if request == Array("reboot".utf8) {
            say("idle: rebooting\n")
            guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_reboot))
        }
    }
}

do {
    try run()
} catch {
    say("idle: FAIL error \(error.code)\n")
    guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_crash))
}
