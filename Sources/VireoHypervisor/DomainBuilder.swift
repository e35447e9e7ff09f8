import VireoABI
import VireoCore
import VireoHypercalls

/// A domain ready to start: loaded, with its console and XenStore rings set up the way Xen's
/// toolstack sets them up before a guest runs.
public struct BuiltDomain: Sendable {
    public let domain: Domain
    public let boot: PVHBootState
    /// The console page (xencons_interface) and XenStore page, at the top of RAM, reserved in
    /// the memory map, granted to the backend domain under the reserved references 0 and 1.
    public let consoleFrame: GuestFrame
    public let storeFrame: GuestFrame
    /// The guest's ends of the console and XenStore event channels (unbound, waiting for the
    /// backend domain to bind them); the guest reads them from HVM_PARAM_*_EVTCHN.
    public let consolePort: EventPort
    public let storePort: EventPort
}

/// Builds a domain from a PVH kernel: Xen's domain builder and toolstack steps, in order.
public enum DomainBuilder {
    public enum Failure: Error, CustomStringConvertible {
        case image(BootImageError)
        case setup(String)
        public var description: String {
            switch self {
            case .image(let e): "cannot boot the kernel: \(e)"
            case .setup(let why): "cannot set the domain up: \(why)"
            }
        }
    }

    /// 1. reserves the console and XenStore pages at the top of RAM; 2. creates the domain
    /// (memory, grant table, event channels); 3. loads the kernel and writes hvm_start_info;
    /// 4. grants the two pages to `backend` (references 0 and 1, as Xen's toolstack does);
    /// 5. allocates the guest's console and XenStore event channels for `backend` (which must be
    /// a privileged domain registered with `hub`); 6. sets the HVM params the guest reads to
    /// find them; 7. publishes the wallclock.
    public static func build(
        config: DomainConfig, kernel: [UInt8], commandLine: String = "", modules: [BootModule] = [],
        hub: EventChannels, grantTables: GrantTables, backend: DomainID = .zero,
        console: @escaping @Sendable ([UInt8]) -> Void, upcall: @escaping @Sendable (Int) -> Void
    ) throws(Failure) -> BuiltDomain {
        let image: ELFImage
        do { image = try ELFImage(kernel) } catch { throw .image(error) }
        let page = UInt64(guestPageSize)
        guard config.memoryBytes >= 2 << 20, config.memoryBytes % page == 0 else {
            throw .setup("memory must be a multiple of 4 KiB and at least 2 MiB (got \(config.memoryBytes) bytes)")
        }
        let frames = config.memoryBytes / page
        let consoleFrame = GuestFrame(frames - 2), storeFrame = GuestFrame(frames - 1)
        let reserved = [PVHLoader.ReservedRange(start: consoleFrame.rawValue * page, size: 2 * page)]
        let domain: Domain
        do {
            domain = try Domain(config: config, hub: hub, grantTables: grantTables, reserved: reserved,
                                console: console, upcall: upcall)
        } catch {
            throw .setup("\(error)")
        }
        do {
            let boot: PVHBootState
            do {
                boot = try PVHLoader.load(image, fileBytes: kernel, into: domain.memory, commandLine: commandLine,
                                          modules: modules, reserved: reserved)
            } catch {
                throw Failure.image(error)
            }
            guard boot.bootDataEnd <= consoleFrame.rawValue * page else {
                throw Failure.setup("the kernel and its boot data reach the console page: give the domain more memory")
            }
            let table = GuestGrantTable(frames: [try domain.grantTable.frameRegion(0)], reserved: 0)
            table.write(GrantRef(UInt32(VIREO_GNTTAB_RESERVED_CONSOLE)), to: backend, frame: consoleFrame, readOnly: false)
            table.write(GrantRef(UInt32(VIREO_GNTTAB_RESERVED_XENSTORE)), to: backend, frame: storeFrame, readOnly: false)
            try domain.memory.fill(0, at: consoleFrame.address!, count: 2 * guestPageSize)
            let consolePort = try hub.allocUnbound(caller: backend, in: domain.id, remote: backend)
            let storePort = try hub.allocUnbound(caller: backend, in: domain.id, remote: backend)
            domain.setParam(VIREO_HVM_PARAM_CONSOLE_PFN, consoleFrame.rawValue)
            domain.setParam(VIREO_HVM_PARAM_CONSOLE_EVTCHN, UInt64(consolePort.rawValue))
            domain.setParam(VIREO_HVM_PARAM_STORE_PFN, storeFrame.rawValue)
            domain.setParam(VIREO_HVM_PARAM_STORE_EVTCHN, UInt64(storePort.rawValue))
            domain.publishWallclock()
            return BuiltDomain(domain: domain, boot: boot, consoleFrame: consoleFrame, storeFrame: storeFrame,
                               consolePort: consolePort, storePort: storePort)
        } catch let failure as Failure {
            domain.destroy()
            throw failure
        } catch {
            domain.destroy()
            throw .setup("\(error)")
        }
    }
}
