import Glibc

extension SharedRegion {
    /// An I/O vector over `count` bytes at `offset`, for one `preadv`/`pwritev` straight
    /// between a file and a mapped grant (Xen's blkback does its I/O on the mapped pages). The
    /// range is checked; the vector is valid only while the region's mapping is held (inside
    /// `GrantTable.withMappedPages`), and must not be used after.
    public func ioVector(offset: Int, count: Int) -> iovec {
        check(offset, count)
        return iovec(iov_base: base + offset, iov_len: count)
    }
}
