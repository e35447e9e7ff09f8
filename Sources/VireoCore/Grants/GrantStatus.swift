import VireoHypercalls

/// A grant operation's outcome, as Xen reports it per operation (`GNTST_*`).
public enum GrantStatus: Int16, Error, Sendable, CustomStringConvertible {
    case okay = 0
    case generalError = -1
    case badDomain = -2
    case badGntref = -3
    case badHandle = -4
    case badVirtAddr = -5
    case badDevAddr = -6
    case noDeviceSpace = -7
    case permissionDenied = -8
    case badPage = -9
    case badCopyArg = -10
    case addressTooBig = -11
    case eagain = -12
    case noSpace = -13

    /// The status as the header states it, so tests can check the two agree.
    static let headerValues: [(GrantStatus, Int32)] = [
        (.okay, VIREO_GNTST_okay), (.generalError, VIREO_GNTST_general_error),
        (.badDomain, VIREO_GNTST_bad_domain), (.badGntref, VIREO_GNTST_bad_gntref),
        (.badHandle, VIREO_GNTST_bad_handle), (.badVirtAddr, VIREO_GNTST_bad_virt_addr),
        (.badDevAddr, VIREO_GNTST_bad_dev_addr), (.noDeviceSpace, VIREO_GNTST_no_device_space),
        (.permissionDenied, VIREO_GNTST_permission_denied), (.badPage, VIREO_GNTST_bad_page),
        (.badCopyArg, VIREO_GNTST_bad_copy_arg), (.addressTooBig, VIREO_GNTST_address_too_big),
        (.eagain, VIREO_GNTST_eagain), (.noSpace, VIREO_GNTST_no_space),
    ]

    public var description: String {
        switch self {
        case .okay: "GNTST_okay"
        case .generalError: "GNTST_general_error"
        case .badDomain: "GNTST_bad_domain"
        case .badGntref: "GNTST_bad_gntref"
        case .badHandle: "GNTST_bad_handle"
        case .badVirtAddr: "GNTST_bad_virt_addr"
        case .badDevAddr: "GNTST_bad_dev_addr"
        case .noDeviceSpace: "GNTST_no_device_space"
        case .permissionDenied: "GNTST_permission_denied"
        case .badPage: "GNTST_bad_page"
        case .badCopyArg: "GNTST_bad_copy_arg"
        case .addressTooBig: "GNTST_address_too_big"
        case .eagain: "GNTST_eagain"
        case .noSpace: "GNTST_no_space"
        }
    }
}
