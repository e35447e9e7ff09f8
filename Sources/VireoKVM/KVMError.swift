import Glibc

/// Why a KVM operation failed. Every ioctl failure names the ioctl and carries its errno.
public enum KVMError: Error, Equatable, Sendable, CustomStringConvertible {
    /// An ioctl returned -1.
    case ioctl(name: String, errno: Int32)
    /// Another system call (open, mmap) failed.
    case system(call: String, errno: Int32)
    /// /dev/kvm speaks an API version other than the stable one (12).
    case unsupportedAPIVersion(Int32)
    /// A capability Vireo needs is absent on this host.
    case missingCapability(KVMCapability)
    /// An argument Vireo refused before asking the kernel.
    case invalidArgument(String)

    /// The errno, where the kernel gave one.
    public var errno: Int32? {
        switch self {
        case .ioctl(_, let e), .system(_, let e): e
        default: nil
        }
    }

    public var description: String {
        switch self {
        case .ioctl(let name, let e): "\(name) failed: \(String(cString: strerror(e))) (errno \(e))"
        case .system(let call, let e): "\(call) failed: \(String(cString: strerror(e))) (errno \(e))"
        case .unsupportedAPIVersion(let v): "KVM API version \(v), expected \(KVMSystem.requiredAPIVersion)"
        case .missingCapability(let cap): "KVM lacks \(cap.name), which Vireo requires"
        case .invalidArgument(let why): "invalid KVM argument: \(why)"
        }
    }
}
