// A guest written with GuestKit: it takes events as interrupts (the callback vector), reads its
// name from the XenStore over its ring, prints through console_io, arms a timer and sleeps in the
// guest loop until VIRQ_TIMER fires, prints a line through the console ring (ConsoleFrontend),
// then powers off.
import GuestKit
import VireoABI
import VireoHypercalls

let guest = PVHGuest()

func say(_ text: String) {
    try? guest.consoleIOWrite(Array(text.utf8))
}

func run() throws(GuestError) {
    try guest.mapSharedInfo()
    let interrupts = try guest.enableUpcalls()
    let version = try guest.xenVersion()
    say("hello-kit: hypervisor interface \(version.major).\(version.minor)\n")
    let store = try XenStoreClient(guest: guest)
    let name = try store.read("name")  // relative: under this domain's home
    say("hello-kit: my name is \(String(decoding: name, as: UTF8.self))\n")
    let timer = try guest.bindVirq(UInt32(VIREO_VIRQ_TIMER))
    var fired = false
    guest.setHandler(for: timer) { _ in fired = true }
    let start = guest.systemTime()
    try guest.setTimer(deadline: start + 10_000_000)
    guest.run { fired }
    say("hello-kit: timer fired after \((guest.systemTime() - start) / 1_000_000) ms\n")
    if interrupts { say("hello-kit: events arrived as \(guest.upcalls) upcalls at vector \(guest.upcallVector ?? 0)\n") }
    // The console ring (HVM_PARAM_CONSOLE_PFN/EVTCHN), served by the host's console backend.
    let console = try ConsoleFrontend(guest: guest)
    try console.write("hello-kit: through the console ring\n")
}

do {
    try run()
    say("hello-kit: done\n")
    guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_poweroff))
} catch {
    say("hello-kit: FAIL error \(error.code)\n")
    guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_crash))
}
