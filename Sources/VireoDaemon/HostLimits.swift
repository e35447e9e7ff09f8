import Glibc

/// The process limits a daemon holding many domains needs raised.
public enum HostLimits {
    /// Raises the soft limit on open files to the hard limit (each live domain holds a few
    /// descriptors: its guest memory, its console's wake pipe and input pipe, its console log,
    /// its event channels' wake pipes). Returns the soft limit now in force.
    @discardableResult
    public static func raiseOpenFiles() -> UInt64 {
        var limit = rlimit()
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 else { return 0 }
        if limit.rlim_cur < limit.rlim_max {
            var raised = limit
            raised.rlim_cur = limit.rlim_max
            if setrlimit(Int32(RLIMIT_NOFILE.rawValue), &raised) == 0 { return UInt64(raised.rlim_cur) }
        }
        return UInt64(limit.rlim_cur)
    }
}
