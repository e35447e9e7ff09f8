import Glibc

/// Timing helpers shared by benchmarks: a monotonic clock and a loop that repeats a batch of
/// work until it has run long enough to be measured.
public enum Measure {
    /// Nanoseconds on a monotonic clock.
    @inline(__always)
    public static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }

    /// One sample of a repeated operation.
    public struct Rate: Sendable, Equatable {
        public var operations: UInt64
        public var nanoseconds: UInt64
        public init(operations: UInt64, nanoseconds: UInt64) {
            self.operations = operations
            self.nanoseconds = nanoseconds
        }
        public var perSecond: Double {
            nanoseconds == 0 ? 0 : Double(operations) * 1e9 / Double(nanoseconds)
        }
        public var nanosecondsPerOperation: Double {
            operations == 0 ? 0 : Double(nanoseconds) / Double(operations)
        }
    }

    /// Runs `batch` (which performs and returns some number of operations) repeatedly for at
    /// least `seconds`, and returns the rate. A first batch warms caches and is not counted.
    public static func rate(seconds: Double, _ batch: () throws -> UInt64) rethrows -> Rate {
        _ = try batch()
        let budget = UInt64(max(seconds, 0) * 1e9)
        var operations: UInt64 = 0
        let start = now()
        var elapsed: UInt64 = 0
        repeat {
            operations &+= try batch()
            elapsed = now() &- start
        } while elapsed < budget
        return Rate(operations: operations, nanoseconds: elapsed)
    }

    /// The median of several rates: robust against one disturbed phase on a shared machine.
    public static func median(_ rates: [Rate]) -> Rate {
        precondition(!rates.isEmpty, "median of no samples")
        return rates.sorted { $0.perSecond < $1.perSecond }[rates.count / 2]
    }
}
