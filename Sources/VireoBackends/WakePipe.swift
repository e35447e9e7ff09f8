import Glibc
import Synchronization

/// The wake-up every backend's service loop sleeps on: a non-blocking pipe that event handlers,
/// XenStore watches and `stop()` write a byte to, and `wait` polls with a timeout and drains.
/// (This toolchain's Glibc module exposes no eventfd, so a pipe it is.)
final class WakePipe: Sendable {
    let readEnd: Int32
    let writeEnd: Int32
    /// A kick the loop has not taken yet: further kicks until it does write nothing (a frontend
    /// notifying a busy backend, whose handler runs on the frontend's thread, makes no system
    /// call). Taken with an acquiring exchange after the drain, so the loop's next pass sees
    /// what every kick before it published.
    private let kicked = Atomic<Bool>(false)

    init(for owner: String) throws(BackendError) {
        var ends: [Int32] = [0, 0]
        guard pipe(&ends) == 0 else { throw BackendError("cannot create the \(owner)'s wake pipe") }
        for end in ends {
            _ = fcntl(end, F_SETFL, O_NONBLOCK)
            _ = fcntl(end, F_SETFD, FD_CLOEXEC)
        }
        readEnd = ends[0]
        writeEnd = ends[1]
    }

    deinit {
        close(readEnd)
        close(writeEnd)
    }

    /// Wakes the loop (a full pipe already means "awake": the byte is not needed).
    func kick() {
        guard !kicked.exchange(true, ordering: .acquiringAndReleasing) else { return }
        var one: UInt8 = 1
        _ = Glibc.write(writeEnd, &one, 1)
    }

    /// Sleeps until kicked or `milliseconds` pass, then drains the pipe. Returns whether it
    /// was kicked (false on a timeout).
    @discardableResult
    func wait(milliseconds: Int32) -> Bool {
        var poller = pollfd(fd: readEnd, events: Int16(POLLIN), revents: 0)
        let ready = poll(&poller, 1, milliseconds) > 0
        // Nothing to read after a timeout: a kick that comes now leaves its byte for the next wait.
        if ready { drain() }
        return ready
    }

    /// Sleeps until kicked, `descriptor` is readable (when it is not negative) or
    /// `milliseconds` pass, then drains the pipe: a service loop that also reads a device (a
    /// TAP) sleeps on both.
    func wait(milliseconds: Int32, alsoReadable descriptor: Int32) {
        guard descriptor >= 0 else {
            wait(milliseconds: milliseconds)
            return
        }
        var pollers = [pollfd(fd: readEnd, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: descriptor, events: Int16(POLLIN), revents: 0)]
        _ = poll(&pollers, 2, milliseconds)
        if pollers[0].revents != 0 { drain() }
    }

    /// Reads what the pipe holds: one byte, since a kick writes only while none is untaken (a
    /// read that fills the buffer reads again, so a full buffer cannot leave bytes behind),
    /// so a wake-up costs one read, not a second one that finds the pipe empty.
    private func drain() {
        var bytes: (UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64, UInt64) = (0, 0, 0, 0, 0, 0, 0, 0)
        let size = MemoryLayout.size(ofValue: bytes)
        while withUnsafeMutableBytes(of: &bytes, { Glibc.read(readEnd, $0.baseAddress, $0.count) }) == size {}
        // After the drain: a kick from here on writes a byte again, and the next wait sees it.
        _ = kicked.exchange(false, ordering: .acquiringAndReleasing)
    }
}
