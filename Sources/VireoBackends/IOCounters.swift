import Synchronization

/// One domain's I/O through its backends, for the toolstack's metrics: every blkback and
/// netback of the domain is given the same object and adds to it with relaxed atomics (no lock
/// on a request's path; blkback adds once per batch of requests and once per transfer, netback
/// once per pass of its loop). The toolstack keeps it across the domain's runs and devices.
public final class IOCounters: Sendable {
    /// Ring requests served: blkback requests answered, netback frames sent and received.
    public let requests = Atomic<Int>(0)
    /// Bytes blkback read from and wrote to the disk images for the guest.
    public let blockReadBytes = Atomic<Int>(0)
    public let blockWrittenBytes = Atomic<Int>(0)
    /// Bytes of the frames the guest transmitted (taken by the host side) and received.
    public let netTransmitBytes = Atomic<Int>(0)
    public let netReceiveBytes = Atomic<Int>(0)
    /// Error responses (blkback's BLKIF_RSP_ERROR/EOPNOTSUPP, netback's NETIF_RSP_ERROR) and
    /// frames dropped or refused (NETIF_RSP_DROPPED, a full or disconnected receive queue).
    public let errors = Atomic<Int>(0)

    public init() {}
}
