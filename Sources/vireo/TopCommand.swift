import ArgumentParser
import Foundation
import Glibc
import VireoDaemon

/// `vireo top`: a live per-domain view like xentop: CPU seconds and percent, memory, vCPUs,
/// exits and exits per second, console bytes, refreshed every --delay seconds.
struct TopCommand: DaemonVerb {
    static let configuration = CommandConfiguration(
        commandName: "top",
        abstract: "A live per-domain view (like xentop): CPU, exits, console bytes; Ctrl-C quits.")
    @OptionGroup var daemon: DaemonOptions
    @Option(name: .shortAndLong, help: "Seconds between refreshes.") var delay: Double = 1
    @Option(name: .shortAndLong, help: "Stop after this many refreshes (0: never).") var iterations: Int = 0
    @Flag(name: .shortAndLong, help: "Batch mode: print each refresh below the last instead of redrawing the screen.") var batch = false

    func validate() throws {
        guard delay >= 0.1 && delay <= 3600 else { throw ValidationError("--delay \(delay): give 0.1 to 3600 seconds") }
        guard iterations >= 0 else { throw ValidationError("--iterations: give 0 or more") }
    }

    func run() throws {
        let redraw = !batch && isatty(STDOUT_FILENO) == 1
        var previous: [UInt16: DomainInfo] = [:]
        var previousAt = Date()
        var done = 0
        while iterations == 0 || done < iterations {
            let now = Date()
            let domains = try decode([DomainInfo].self, try call("GET", "/v1/domains"))
            let elapsed = max(now.timeIntervalSince(previousAt), 0.001)
            var out = redraw ? "\u{1B}[H\u{1B}[2J" : ""
            out += Self.table(domains, previous: previous, elapsed: elapsed, first: done == 0)
            FileHandle.standardOutput.write(Data(out.utf8))
            previous = Dictionary(uniqueKeysWithValues: domains.map { ($0.id, $0) })
            previousAt = now
            done += 1
            if iterations == 0 || done < iterations { usleep(useconds_t(delay * 1e6)) }
        }
    }

    /// One refresh: rates come from the difference with the previous one (blank on the first).
    static func table(_ domains: [DomainInfo], previous: [UInt16: DomainInfo], elapsed: Double, first: Bool) -> String {
        func pad(_ s: String, _ w: Int, left: Bool = false) -> String {
            s.count >= w ? s : (left ? s + String(repeating: " ", count: w - s.count) : String(repeating: " ", count: w - s.count) + s)
        }
        let nameWidth = max(12, (domains.map(\.name.count).max() ?? 0) + 1)
        var out = pad("NAME", nameWidth, left: true) + pad("ID", 5) + "  " + pad("STATE", 9, left: true) + pad("CPU(sec)", 9) + pad("CPU(%)", 8)
            + pad("MEM(MiB)", 9) + pad("VCPUS", 6) + pad("EXITS", 10) + pad("EXITS/s", 9) + pad("CONSOLE(B)", 11) + pad("RESTARTS", 9) + "\n"
        for d in domains {
            let before = first ? nil : previous[d.id]
            let cpuPercent = before.map { String(format: "%.1f", max(0, d.cpuSeconds - $0.cpuSeconds) / elapsed * 100) } ?? "-"
            let exitRate = before.map { String(format: "%.0f", Double(max(0, d.exits - $0.exits)) / elapsed) } ?? "-"
            out += pad(d.name, nameWidth, left: true) + pad("\(d.id)", 5) + "  " + pad(d.state.rawValue, 9, left: true)
                + pad(String(format: "%.1f", d.cpuSeconds), 9) + pad(cpuPercent, 8) + pad("\(d.memoryMiB)", 9) + pad("\(d.vcpus)", 6)
                + pad("\(d.exits)", 10) + pad(exitRate, 9) + pad("\(d.consoleBytes)", 11) + pad("\(d.restarts)", 9) + "\n"
        }
        return out
    }
}
