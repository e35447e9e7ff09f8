// A GuestKit guest that reads its console: it prints "console-echo: ready" through the console
// ring, reads one line from the ring's input side (what `vireo run` forwards from stdin) and
// prints it back, then powers off.
import GuestKit
import VireoABI
import VireoHypercalls

let guest = PVHGuest()

func run() throws(GuestError) {
    try guest.mapSharedInfo()
    _ = try guest.enableUpcalls()
    let console = try ConsoleFrontend(guest: guest)
    try console.write("console-echo: ready\n")
    let line = try console.readLine()
    try console.write("console-echo: got '" + String(decoding: line.filter { $0 != 10 }, as: UTF8.self) + "'\n")
}

do {
    try run()
    _ = guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_poweroff))
} catch {
    try? guest.consoleIOWrite(Array("console-echo: FAIL error \(error.code)\n".utf8))
    _ = guest.shutdown(reason: UInt32(VIREO_SHUTDOWN_crash))
}
