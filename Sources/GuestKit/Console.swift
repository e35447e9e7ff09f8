#if canImport(VireoCore)
import VireoCore
#endif
import VireoABI
import VireoHypercalls

/// The console frontend: the guest writes into the console page's `out` ring and notifies the
/// console event channel; the backend reads. The page and port come from the HVM params
/// CONSOLE_PFN/CONSOLE_EVTCHN.
public struct ConsoleFrontend<Platform: GuestPlatform> {
    public let guest: Guest<Platform>
    public let port: EventPort
    let output: ByteRing
    let input: ByteRing

    public init(guest: Guest<Platform>) throws(GuestError) {
        let (page, port) = try guest.toolstackRing(page: VIREO_HVM_PARAM_CONSOLE_PFN, port: VIREO_HVM_PARAM_CONSOLE_EVTCHN)
        self.init(guest: guest, page: page, port: port)
    }

    public init(guest: Guest<Platform>, page: SharedRegion, port: EventPort) {
        self.guest = guest
        self.port = port
        output = ByteRing.consoleOutput(page)
        input = ByteRing.consoleInput(page)
        guest.setHandler(for: port) { _ in }
    }

    /// Writes all of `bytes`, notifying the backend after each piece and running the loop
    /// while the ring is full.
    public func write(_ bytes: UnsafeRawBufferPointer) throws(GuestError) {
        var done = 0
        while done < bytes.count {
            let wrote: Int
            do { wrote = try output.write(UnsafeRawBufferPointer(rebasing: bytes[done...])) } catch { throw GuestError.EIO }
            if wrote > 0 {
                try guest.send(port)
                done += wrote
            } else {
                guest.runOnce()
            }
        }
    }

    public func write(_ bytes: [UInt8]) throws(GuestError) {
        var failure: GuestError?
        bytes.withUnsafeBytes { raw in
            do throws(GuestError) { try write(raw) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    public func write(_ text: String) throws(GuestError) {
        try write(Array(text.utf8))
    }

    /// One line of input: bytes up to and including a newline, or `maxLength` bytes, or what
    /// came before the backend's input ended; waits in the loop for more.
    public func readLine(maxLength: Int = 256) throws(GuestError) -> [UInt8] {
        var line: [UInt8] = []
        var byte: UInt8 = 0
        while line.count < maxLength && line.last != 10 {
            let count = try withUnsafeMutableBytes(of: &byte) { (raw) throws(GuestError) -> Int in try read(into: raw) }
            if count == 1 { line.append(byte) } else { guest.runOnce() }
        }
        return line
    }

    /// Input the backend has sent, up to `buffer.count` bytes; how many.
    public func read(into buffer: UnsafeMutableRawBufferPointer) throws(GuestError) -> Int {
        let count: Int
        do { count = try input.read(into: buffer) } catch { throw GuestError.EIO }
        if count > 0 { try guest.send(port) }
        return count
    }
}
