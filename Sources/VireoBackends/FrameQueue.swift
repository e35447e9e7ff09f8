import Synchronization
import VireoCore

/// The bounded queue of frames waiting for one vif's receive ring: at most `maxFrames` frames
/// and `capacityBytes` bytes, both fixed when the vif is made. The bytes live in one buffer
/// allocated up front (frames are placed contiguously, wrapping to the start when the end is
/// too short), so queueing a frame allocates nothing. A frame that does not fit is refused and
/// the caller counts the drop: what a guest makes the host hold stays bounded.
///
/// Any thread may ``push(_:checksum:)``; one consumer (the vif's service loop) reads the
/// oldest frame in place with ``oldest()`` and then ``removeOldest()``s it. The producer never
/// writes into bytes of a frame still queued, so the consumer reads them without the lock.
final class FrameQueue: @unchecked Sendable {  // the buffer's live bytes are guarded as described
    struct Frame {
        var start: Int
        var length: Int
        var checksum: FrameChecksum
    }

    let maxFrames: Int
    let capacityBytes: Int
    private let storage: UnsafeMutableRawPointer
    /// The queue's bytes, as the source of grant copies into the guest's pages.
    let region: SharedRegion

    private struct State {
        var frames: [Frame]
        var head = 0
        var count = 0
        var tailEnd = 0  // one past the newest frame's last byte
    }
    private let state: Mutex<State>
    /// `State.count`, stored under the lock and readable without it (``isEmpty``).
    private let size = Atomic<Int>(0)

    init(maxFrames: Int, capacityBytes: Int) {
        precondition(maxFrames > 0 && capacityBytes >= 65536, "a frame queue holds at least one frame of 64 KiB")
        self.maxFrames = maxFrames
        self.capacityBytes = capacityBytes
        storage = UnsafeMutableRawPointer.allocate(byteCount: capacityBytes, alignment: 64)
        storage.initializeMemory(as: UInt8.self, repeating: 0, count: capacityBytes)
        region = .unsafe(storage, count: capacityBytes)
        state = Mutex(State(frames: Array(repeating: Frame(start: 0, length: 0, checksum: .unknown), count: maxFrames)))
    }

    deinit { storage.deallocate() }

    enum PushResult { case queued(wasEmpty: Bool), full }

    /// Copies `frame` in; `.full` (nothing copied) when either bound would be passed.
    func push(_ frame: UnsafeRawBufferPointer, checksum: FrameChecksum) -> PushResult {
        let length = frame.count
        guard length > 0, length <= capacityBytes else { return .full }
        return state.withLock { s in
            guard s.count < maxFrames else { return .full }
            let start: Int
            if s.count == 0 {
                start = 0
            } else {
                let headStart = s.frames[s.head].start
                if s.tailEnd > headStart {  // live bytes are [headStart, tailEnd): try the end, then the start
                    if capacityBytes - s.tailEnd >= length { start = s.tailEnd }
                    else if headStart >= length { start = 0 }
                    else { return .full }
                } else {  // wrapped: free bytes are [tailEnd, headStart)
                    guard headStart - s.tailEnd >= length else { return .full }
                    start = s.tailEnd
                }
            }
            (storage + start).copyMemory(from: frame.baseAddress!, byteCount: length)
            s.frames[(s.head + s.count) % maxFrames] = Frame(start: start, length: length, checksum: checksum)
            s.count += 1
            size.store(s.count, ordering: .releasing)
            s.tailEnd = start + length
            return .queued(wasEmpty: s.count == 1)
        }
    }

    /// The oldest frame and its bytes (writable: the consumer may fill in a checksum), or nil.
    func oldest() -> (start: Int, bytes: UnsafeMutableRawBufferPointer, checksum: FrameChecksum)? {
        let frame = state.withLock { s in s.count == 0 ? nil : s.frames[s.head] }
        guard let frame else { return nil }
        return (frame.start, UnsafeMutableRawBufferPointer(start: storage + frame.start, count: frame.length), frame.checksum)
    }

    func removeOldest() {
        state.withLock { s in
            guard s.count > 0 else { return }
            s.head = (s.head + 1) % maxFrames
            s.count -= 1
            size.store(s.count, ordering: .releasing)
            if s.count == 0 { s.tailEnd = 0 }
        }
    }

    /// Drops every queued frame; returns how many.
    @discardableResult
    func removeAll() -> Int {
        state.withLock { s in
            let n = s.count
            s.head = 0
            s.count = 0
            size.store(0, ordering: .releasing)
            s.tailEnd = 0
            return n
        }
    }

    var count: Int { state.withLock { $0.count } }
    /// Whether no frame is queued, without the lock: a frame pushed by this thread before is
    /// seen; one another thread is pushing meanwhile may not be.
    var isEmpty: Bool { size.load(ordering: .acquiring) == 0 }
    var isFull: Bool { state.withLock { $0.count >= maxFrames } }
}
