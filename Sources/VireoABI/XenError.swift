import VireoHypercalls

/// A Xen errno value, as hypercalls return it negated (`-EINVAL`) and as Vireo's host-side
/// operations throw it. The numbers are Xen's (xen/errno.h), not the host libc's.
public struct XenError: Error, RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    /// The positive errno value.
    public var rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }

    /// The value a hypercall returns in RAX for this error: `-errno`, sign-extended.
    public var hypercallResult: Int64 { -Int64(rawValue) }

    /// The error a hypercall result denotes, or nil for a success (result >= 0).
    public init?(hypercallResult result: Int64) {
        guard result < 0, result >= -Int64(Int32.max) else { return nil }
        self.rawValue = Int32(-result)
    }

    public static let EPERM = XenError(rawValue: VIREO_XEN_EPERM)
    public static let ENOENT = XenError(rawValue: VIREO_XEN_ENOENT)
    public static let ESRCH = XenError(rawValue: VIREO_XEN_ESRCH)
    public static let EIO = XenError(rawValue: VIREO_XEN_EIO)
    public static let ENXIO = XenError(rawValue: VIREO_XEN_ENXIO)
    public static let E2BIG = XenError(rawValue: VIREO_XEN_E2BIG)
    public static let ENOEXEC = XenError(rawValue: VIREO_XEN_ENOEXEC)
    public static let EBADF = XenError(rawValue: VIREO_XEN_EBADF)
    public static let ECHILD = XenError(rawValue: VIREO_XEN_ECHILD)
    public static let EAGAIN = XenError(rawValue: VIREO_XEN_EAGAIN)
    public static let EWOULDBLOCK = XenError(rawValue: VIREO_XEN_EWOULDBLOCK)
    public static let ENOMEM = XenError(rawValue: VIREO_XEN_ENOMEM)
    public static let EACCES = XenError(rawValue: VIREO_XEN_EACCES)
    public static let EFAULT = XenError(rawValue: VIREO_XEN_EFAULT)
    public static let EBUSY = XenError(rawValue: VIREO_XEN_EBUSY)
    public static let EEXIST = XenError(rawValue: VIREO_XEN_EEXIST)
    public static let EXDEV = XenError(rawValue: VIREO_XEN_EXDEV)
    public static let ENODEV = XenError(rawValue: VIREO_XEN_ENODEV)
    public static let ENOTDIR = XenError(rawValue: VIREO_XEN_ENOTDIR)
    public static let EISDIR = XenError(rawValue: VIREO_XEN_EISDIR)
    public static let EINVAL = XenError(rawValue: VIREO_XEN_EINVAL)
    public static let ENFILE = XenError(rawValue: VIREO_XEN_ENFILE)
    public static let EMFILE = XenError(rawValue: VIREO_XEN_EMFILE)
    public static let ENOSPC = XenError(rawValue: VIREO_XEN_ENOSPC)
    public static let EROFS = XenError(rawValue: VIREO_XEN_EROFS)
    public static let EMLINK = XenError(rawValue: VIREO_XEN_EMLINK)
    public static let EDOM = XenError(rawValue: VIREO_XEN_EDOM)
    public static let ERANGE = XenError(rawValue: VIREO_XEN_ERANGE)
    public static let EDEADLK = XenError(rawValue: VIREO_XEN_EDEADLK)
    public static let EDEADLOCK = XenError(rawValue: VIREO_XEN_EDEADLOCK)
    public static let ENAMETOOLONG = XenError(rawValue: VIREO_XEN_ENAMETOOLONG)
    public static let ENOLCK = XenError(rawValue: VIREO_XEN_ENOLCK)
    public static let ENOSYS = XenError(rawValue: VIREO_XEN_ENOSYS)
    public static let ENOTEMPTY = XenError(rawValue: VIREO_XEN_ENOTEMPTY)
    public static let ENODATA = XenError(rawValue: VIREO_XEN_ENODATA)
    public static let ETIME = XenError(rawValue: VIREO_XEN_ETIME)
    public static let EBADMSG = XenError(rawValue: VIREO_XEN_EBADMSG)
    public static let EOVERFLOW = XenError(rawValue: VIREO_XEN_EOVERFLOW)
    public static let EILSEQ = XenError(rawValue: VIREO_XEN_EILSEQ)
    public static let ENOTSOCK = XenError(rawValue: VIREO_XEN_ENOTSOCK)
    public static let EMSGSIZE = XenError(rawValue: VIREO_XEN_EMSGSIZE)
    public static let EOPNOTSUPP = XenError(rawValue: VIREO_XEN_EOPNOTSUPP)
    public static let EADDRINUSE = XenError(rawValue: VIREO_XEN_EADDRINUSE)
    public static let EADDRNOTAVAIL = XenError(rawValue: VIREO_XEN_EADDRNOTAVAIL)
    public static let ENOBUFS = XenError(rawValue: VIREO_XEN_ENOBUFS)
    public static let EISCONN = XenError(rawValue: VIREO_XEN_EISCONN)
    public static let ENOTCONN = XenError(rawValue: VIREO_XEN_ENOTCONN)
    public static let ETIMEDOUT = XenError(rawValue: VIREO_XEN_ETIMEDOUT)
    public static let ECONNREFUSED = XenError(rawValue: VIREO_XEN_ECONNREFUSED)

    /// Every distinct errno Vireo states, with its Xen name (aliases left out).
    public static let all: [(name: String, error: XenError)] = [
        ("EPERM", .EPERM),
        ("ENOENT", .ENOENT),
        ("ESRCH", .ESRCH),
        ("EIO", .EIO),
        ("ENXIO", .ENXIO),
        ("E2BIG", .E2BIG),
        ("ENOEXEC", .ENOEXEC),
        ("EBADF", .EBADF),
        ("ECHILD", .ECHILD),
        ("EAGAIN", .EAGAIN),
        ("ENOMEM", .ENOMEM),
        ("EACCES", .EACCES),
        ("EFAULT", .EFAULT),
        ("EBUSY", .EBUSY),
        ("EEXIST", .EEXIST),
        ("EXDEV", .EXDEV),
        ("ENODEV", .ENODEV),
        ("ENOTDIR", .ENOTDIR),
        ("EISDIR", .EISDIR),
        ("EINVAL", .EINVAL),
        ("ENFILE", .ENFILE),
        ("EMFILE", .EMFILE),
        ("ENOSPC", .ENOSPC),
        ("EROFS", .EROFS),
        ("EMLINK", .EMLINK),
        ("EDOM", .EDOM),
        ("ERANGE", .ERANGE),
        ("EDEADLK", .EDEADLK),
        ("ENAMETOOLONG", .ENAMETOOLONG),
        ("ENOLCK", .ENOLCK),
        ("ENOSYS", .ENOSYS),
        ("ENOTEMPTY", .ENOTEMPTY),
        ("ENODATA", .ENODATA),
        ("ETIME", .ETIME),
        ("EBADMSG", .EBADMSG),
        ("EOVERFLOW", .EOVERFLOW),
        ("EILSEQ", .EILSEQ),
        ("ENOTSOCK", .ENOTSOCK),
        ("EMSGSIZE", .EMSGSIZE),
        ("EOPNOTSUPP", .EOPNOTSUPP),
        ("EADDRINUSE", .EADDRINUSE),
        ("EADDRNOTAVAIL", .EADDRNOTAVAIL),
        ("ENOBUFS", .ENOBUFS),
        ("EISCONN", .EISCONN),
        ("ENOTCONN", .ENOTCONN),
        ("ETIMEDOUT", .ETIMEDOUT),
        ("ECONNREFUSED", .ECONNREFUSED),
    ]

    /// Xen's name for the value (`EINVAL`), or `E<number>` for one Xen does not name.
    public var name: String {
        Self.all.first { $0.error == self }?.name ?? "E\(rawValue)"
    }

    public var description: String { "-\(name) (\(-Int(rawValue)))" }
}
