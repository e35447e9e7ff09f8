/// A token bucket in bytes, as Xen's vif `rate=` option limits what a guest transmits: credit
/// accrues at `bytesPerSecond` up to `burstBytes`, and a packet goes out only when the credit
/// covers it. The clock is injected (nanoseconds, monotonic) so tests step time by hand.
public struct TokenBucket: Sendable {
    public let bytesPerSecond: UInt64
    public let burstBytes: UInt64
    private var credit: UInt64
    private var last: UInt64

    /// Xen's default replenish window: `rate=R` means R per second handed out every 50 ms.
    public static let defaultWindowNanoseconds: UInt64 = 50_000_000

    /// A bucket that starts full. `burstBytes` defaults as Xen's netback computes it: the
    /// credit of one 50 ms window, but never under 128 KiB, so that the largest packet
    /// (64 KiB) always fits.
    public init(bytesPerSecond: UInt64, burstBytes: UInt64? = nil, now: UInt64) {
        precondition(bytesPerSecond > 0, "a rate limit needs a positive rate")
        self.bytesPerSecond = bytesPerSecond
        let window = bytesPerSecond.multipliedReportingOverflow(by: Self.defaultWindowNanoseconds)
        let windowBytes = window.overflow ? UInt64.max : window.partialValue / 1_000_000_000
        self.burstBytes = max(burstBytes ?? windowBytes, 131_072)
        credit = self.burstBytes
        last = now
    }

    private mutating func refill(now: UInt64) {
        guard now > last else { return }
        let elapsed = now - last
        let (product, overflow) = elapsed.multipliedReportingOverflow(by: bytesPerSecond)
        let earned = overflow ? UInt64.max : product / 1_000_000_000
        guard earned > 0 else { return }  // keep `last` so fractions of a byte accumulate
        credit = min(burstBytes, credit &+ earned < credit ? UInt64.max : credit + earned)
        last = now
    }

    /// Takes `bytes` of credit and returns 0, or takes nothing and returns the nanoseconds to
    /// wait until the credit covers them.
    public mutating func take(_ bytes: UInt64, now: UInt64) -> UInt64 {
        refill(now: now)
        let needed = min(bytes, burstBytes)
        if credit >= needed {
            credit -= needed
            return 0
        }
        let missing = needed - credit
        return max(1, (missing * 1_000_000_000 + bytesPerSecond - 1) / bytesPerSecond)
    }
}
