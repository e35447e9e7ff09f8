import VireoABI
import VireoCore
import VireoHypercalls

/// What the engine does after a hypercall.
public enum HypercallOutcome: Equatable, Sendable {
    /// Write this to RAX and resume.
    case result(Int64)
    /// Let other vCPUs run, then resume with RAX = 0.
    case yield
    /// Sleep until an event is pending for this vCPU, then resume with RAX = 0.
    case block
    /// Sleep until one of `ports` is pending or `deadline` (system time) passes, then resume
    /// with RAX = 0.
    case poll(ports: [EventPort], deadline: UInt64?)
    /// The domain shut down; the vCPU stops.
    case shutdown(ShutdownReason)
    /// A long operation made progress and continues: set the argument registers to these
    /// values and execute the same hypercall again (Xen's continuation).
    case restart(arguments: [UInt64])
}

/// Runs a domain's hypercalls: the supported subset of HypercallTable, everything else -ENOSYS.
/// Arguments come straight from guest registers; every pointer is guest-virtual and goes
/// through ``GuestAddressSpace`` (a bad one is -EFAULT), every count is bounded.
public struct HypercallDispatcher: Sendable {
    public let domain: Domain

    public init(domain: Domain) { self.domain = domain }

    /// Longest console_io write accepted in one call.
    public static let maxConsoleWrite = 1 << 20
    /// Grant copy segments handled before a continuation.
    public static let grantCopyBatch = GrantTables.copyBatchLimit
    /// SCHEDOP_poll's port limit (Xen's).
    public static let maxPollPorts = 128

    /// Runs hypercall `number` for `vcpu` with `arguments` (RDI, RSI, RDX, R10, R8).
    public func dispatch(_ number: UInt64, _ arguments: [UInt64], vcpu: Int, space: GuestAddressSpace) -> HypercallOutcome {
        domain.countHypercall()
        let a = arguments + Array(repeating: 0, count: max(0, 5 - arguments.count))
        do {
            switch Hypercall(rawValue: number) {
            case .consoleIo: return .result(try consoleIO(a[0], a[1], a[2], space))
            case .xenVersion: return .result(try xenVersion(a[0], a[1], space))
            case .memoryOp: return .result(try memoryOp(a[0], a[1], space))
            case .grantTableOp: return try grantTableOp(a[0], a[1], a[2], space)
            case .eventChannelOp: return .result(try eventChannelOp(a[0], a[1], space))
            case .schedOp: return try schedOp(a[0], a[1], space)
            case .setTimerOp:
                domain.setTimer(vcpu: vcpu, deadline: a[0] == 0 ? nil : a[0])
                return .result(0)
            case .vcpuOp: return .result(try vcpuOp(a[0], a[1], a[2], space, caller: vcpu))
            case .hvmOp: return .result(try hvmOp(a[0], a[1], space))
            default: return .result(HypercallTable.unsupportedResult.hypercallResult)
            }
        } catch {
            return .result(error.hypercallResult)
        }
    }

    private func own(_ domid: UInt16) throws(XenError) {
        guard domid == DomainID.calling.rawValue || domid == domain.id.rawValue else { throw .EPERM }
    }

    // MARK: console_io

    private func consoleIO(_ cmd: UInt64, _ count: UInt64, _ buffer: UInt64, _ space: GuestAddressSpace) throws(XenError) -> Int64 {
        switch Int32(truncatingIfNeeded: cmd) {
        case VIREO_CONSOLEIO_write:
            guard count <= UInt64(Self.maxConsoleWrite) else { throw .EINVAL }
            domain.writeConsole(try space.read(GuestVirtualAddress(buffer), count: Int(count)))
            return 0
        case VIREO_CONSOLEIO_read:
            return 0
        default:
            throw .ENOSYS
        }
    }

    // MARK: xen_version

    static let interfaceVersion: Int64 = 4 << 16 | 14

    private func xenVersion(_ cmd: UInt64, _ arg: UInt64, _ space: GuestAddressSpace) throws(XenError) -> Int64 {
        let at = GuestVirtualAddress(arg)
        func string(_ s: String, length: Int) -> [UInt8] {
            Array(Array(s.utf8).prefix(length - 1) + [UInt8](repeating: 0, count: length - min(s.utf8.count, length - 1)))
        }
        switch Int32(truncatingIfNeeded: cmd) {
        case VIREO_XENVER_version: return Self.interfaceVersion
        case VIREO_XENVER_extraversion:
            try space.write(string("-vireo", length: Int(VIREO_XEN_EXTRAVERSION_LEN)), to: at)
        case VIREO_XENVER_compile_info:
            try space.write(string("swiftc", length: 64) + string("vireo", length: 16) + string("vireo", length: 32)
                            + string("", length: 32), to: at)
        case VIREO_XENVER_capabilities:
            try space.write(string("hvm-3.0-x86_64", length: Int(VIREO_XEN_CAPABILITIES_INFO_LEN)), to: at)
        case VIREO_XENVER_changeset:
            try space.write(string("vireo", length: Int(VIREO_XEN_CHANGESET_INFO_LEN)), to: at)
        case VIREO_XENVER_platform_parameters:
            try space.store(UInt64(0xFFFF_8000_0000_0000), at: at)
        case VIREO_XENVER_get_features:
            var info = try space.load(vireo_xen_feature_info.self, at: at)
            guard info.submap_idx < UInt32(VIREO_XENFEAT_NR_SUBMAPS) else { throw .EINVAL }
            info.submap = Self.features
            try space.store(info, at: at)
        case VIREO_XENVER_pagesize: return Int64(guestPageSize)
        case VIREO_XENVER_guest_handle:
            try space.write([UInt8](repeating: 0, count: 14) + [UInt8(domain.id.rawValue >> 8), UInt8(truncatingIfNeeded: domain.id.rawValue)], to: at)
        default: throw .ENOSYS
        }
        return 0
    }

    /// XENFEAT bits of submap 0 Vireo offers an HVM/PVH guest.
    static let features: UInt32 = [
        VIREO_XENFEAT_writable_page_tables, VIREO_XENFEAT_writable_descriptor_tables, VIREO_XENFEAT_auto_translated_physmap,
        VIREO_XENFEAT_supervisor_mode_kernel, VIREO_XENFEAT_hvm_callback_vector, VIREO_XENFEAT_hvm_safe_pvclock,
    ].reduce(0) { $0 | 1 << UInt32($1) }

    // MARK: memory_op

    private func memoryOp(_ cmd: UInt64, _ arg: UInt64, _ space: GuestAddressSpace) throws(XenError) -> Int64 {
        let at = GuestVirtualAddress(arg)
        switch Int32(truncatingIfNeeded: cmd) {
        case VIREO_XENMEM_current_reservation:
            try own(try space.load(UInt16.self, at: at))
            return Int64(domain.memory.ramFrames)
        case VIREO_XENMEM_memory_map:
            var map = try space.load(vireo_xen_memory_map.self, at: at)
            let entries = PVHLoader.memoryMap(ramSize: domain.memory.ramSize, reserved: domain.reservedRanges)
            guard map.nr_entries >= UInt32(entries.count) else { throw .EINVAL }
            var bytes: [UInt8] = []
            for e in entries {  // E820 layout: addr, size (u64), type (u32), packed: 20 bytes
                bytes += withUnsafeBytes(of: e.addr.littleEndian) { Array($0) }
                bytes += withUnsafeBytes(of: e.size.littleEndian) { Array($0) }
                bytes += withUnsafeBytes(of: e.type.littleEndian) { Array($0) }
            }
            try space.write(bytes, to: GuestVirtualAddress(map.buffer))
            map.nr_entries = UInt32(entries.count)
            try space.store(map, at: at)
            return 0
        case VIREO_XENMEM_add_to_physmap:
            let request = try space.load(vireo_xen_add_to_physmap.self, at: at)
            try own(request.domid)
            switch Int32(bitPattern: request.space) {
            case VIREO_XENMAPSPACE_shared_info:
                guard request.idx == 0 else { throw .EINVAL }
                try domain.placeSpecialFrame(Domain.sharedInfoSpecialFrame, at: GuestFrame(request.gpfn))
            case VIREO_XENMAPSPACE_grant_table:
                // Bit 31 of idx selects v2 status frames: v1 only.
                guard request.idx < UInt64(domain.grantTable.maxFrames) else { throw .EINVAL }
                try domain.placeGrantFrame(Int(request.idx), at: GuestFrame(request.gpfn))
            default:
                throw .ENOSYS
            }
            return 0
        default:
            throw .ENOSYS
        }
    }

    // MARK: grant_table_op

    private func grantTableOp(_ cmd: UInt64, _ uop: UInt64, _ count: UInt64, _ space: GuestAddressSpace) throws(XenError) -> HypercallOutcome {
        let at = GuestVirtualAddress(uop)
        switch Int32(truncatingIfNeeded: cmd) {
        case VIREO_GNTTABOP_setup_table:
            guard count == 1 else { throw .EINVAL }
            var op = try space.load(vireo_gnttab_setup_table.self, at: at)
            if op.dom != DomainID.calling.rawValue && op.dom != domain.id.rawValue {
                op.status = GrantStatus.badDomain.rawValue
            } else if let frames = try? domain.grantTable.setUp(frames: Int(op.nr_frames)) {
                let list = frames.map { $0?.rawValue ?? UInt64.max }
                try space.write(list.flatMap { v in withUnsafeBytes(of: v) { Array($0) } }, to: GuestVirtualAddress(op.frame_list))
                op.status = GrantStatus.okay.rawValue
            } else {
                op.status = GrantStatus.generalError.rawValue
            }
            try space.store(op, at: at)
            return .result(0)
        case VIREO_GNTTABOP_query_size:
            guard count == 1 else { throw .EINVAL }
            var op = try space.load(vireo_gnttab_query_size.self, at: at)
            if op.dom != DomainID.calling.rawValue && op.dom != domain.id.rawValue {
                op.status = GrantStatus.badDomain.rawValue
            } else {
                let size = domain.grantTable.size
                op.nr_frames = UInt32(size.frames)
                op.max_nr_frames = UInt32(size.maxFrames)
                op.status = GrantStatus.okay.rawValue
            }
            try space.store(op, at: at)
            return .result(0)
        case VIREO_GNTTABOP_copy:
            guard count <= UInt64(Int32.max) else { throw .EINVAL }
            let size = UInt64(MemoryLayout<vireo_gnttab_copy>.size)
            let batch = min(Int(count), Self.grantCopyBatch)
            var bytes = try space.read(at, count: batch * Int(size))
            for i in 0..<batch {
                let base = i * Int(size)
                let op = bytes.withUnsafeBytes { raw -> vireo_gnttab_copy in
                    var op = vireo_gnttab_copy()
                    withUnsafeMutableBytes(of: &op) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[base..<(base + Int(size))])) }
                    return op
                }
                let status = copy(op).rawValue
                // status is at offset 36 (vireo/grant_table.h)
                withUnsafeBytes(of: status.littleEndian) { for j in 0..<2 { bytes[base + 36 + j] = $0[j] } }
            }
            try space.write(bytes, to: at)
            if UInt64(batch) < count {
                return .restart(arguments: [UInt64(bitPattern: Int64(VIREO_GNTTABOP_copy)), uop + UInt64(batch) * size, count - UInt64(batch)])
            }
            return .result(0)
        default:  // map/unmap included: Vireo's backends map grants in the host, not in a guest
            throw .ENOSYS
        }
    }

    /// One GNTTABOP_copy segment on behalf of this domain: grant references or, for the
    /// caller's own side, a frame of its own RAM.
    private func copy(_ op: vireo_gnttab_copy) -> GrantStatus {
        func endpoint(_ ptr: vireo_gnttab_copy_ptr, isGrant: Bool) -> GrantCopyEndpoint? {
            if isGrant { return .grant(DomainID(ptr.domid), GrantRef(ptr.u.ref), offset: Int(ptr.offset)) }
            guard ptr.domid == DomainID.calling.rawValue || ptr.domid == domain.id.rawValue,
                  domain.memory.isRAM(GuestFrame(ptr.u.gmfn)),
                  let page = try? domain.memory.region(frame: GuestFrame(ptr.u.gmfn)) else { return nil }
            return .local(page, offset: Int(ptr.offset))
        }
        let flags = Int32(op.flags)
        guard let source = endpoint(op.source, isGrant: flags & VIREO_GNTCOPY_source_gref != 0) else { return .badPage }
        guard let dest = endpoint(op.dest, isGrant: flags & VIREO_GNTCOPY_dest_gref != 0) else { return .badPage }
        return domain.grantTables.copy(GrantCopySegment(source: source, dest: dest, length: Int(op.len)), by: domain.id)
    }

    // MARK: event_channel_op

    private func eventChannelOp(_ cmd: UInt64, _ arg: UInt64, _ space: GuestAddressSpace) throws(XenError) -> Int64 {
        let at = GuestVirtualAddress(arg)
        let hub = domain.hub, me = domain.id
        switch Int32(truncatingIfNeeded: cmd) {
        case VIREO_EVTCHNOP_alloc_unbound:
            var op = try space.load(vireo_evtchn_alloc_unbound.self, at: at)
            op.port = try hub.allocUnbound(caller: me, in: DomainID(op.dom), remote: DomainID(op.remote_dom)).rawValue
            try space.store(op, at: at)
        case VIREO_EVTCHNOP_bind_interdomain:
            var op = try space.load(vireo_evtchn_bind_interdomain.self, at: at)
            op.local_port = try hub.bindInterdomain(caller: me, remoteDomain: DomainID(op.remote_dom),
                                                    remotePort: EventPort(op.remote_port)).rawValue
            try space.store(op, at: at)
        case VIREO_EVTCHNOP_bind_virq:
            var op = try space.load(vireo_evtchn_bind_virq.self, at: at)
            op.port = try hub.bindVirq(caller: me, virq: VirtualIRQ(op.virq), vcpu: op.vcpu).rawValue
            try space.store(op, at: at)
        case VIREO_EVTCHNOP_bind_ipi:
            var op = try space.load(vireo_evtchn_bind_ipi.self, at: at)
            op.port = try hub.bindIPI(caller: me, vcpu: op.vcpu).rawValue
            try space.store(op, at: at)
        case VIREO_EVTCHNOP_close:
            let op = try space.load(vireo_evtchn_close.self, at: at)
            try hub.close(caller: me, port: EventPort(op.port))
        case VIREO_EVTCHNOP_send:
            let op = try space.load(vireo_evtchn_send.self, at: at)
            try hub.send(caller: me, port: EventPort(op.port))
        case VIREO_EVTCHNOP_status:
            // dom at 0, port at 4 (vireo/event_channel.h); the whole record is written back.
            let dom = DomainID(try space.load(UInt16.self, at: at))
            let port = EventPort(try space.load(UInt32.self, at: GuestVirtualAddress(arg &+ 4)))
            let record = try hub.status(caller: me, domain: dom, port: port).record(dom: dom, port: port)
            try space.write(withUnsafeBytes(of: record) { Array($0) }, to: at)
        case VIREO_EVTCHNOP_unmask:
            let op = try space.load(vireo_evtchn_unmask.self, at: at)
            try hub.unmask(caller: me, port: EventPort(op.port))
        case VIREO_EVTCHNOP_bind_vcpu:
            let op = try space.load(vireo_evtchn_bind_vcpu.self, at: at)
            try hub.bindVcpu(caller: me, port: EventPort(op.port), vcpu: op.vcpu)
        default:
            throw .ENOSYS
        }
        return 0
    }

    // MARK: sched_op

    private func schedOp(_ cmd: UInt64, _ arg: UInt64, _ space: GuestAddressSpace) throws(XenError) -> HypercallOutcome {
        let at = GuestVirtualAddress(arg)
        switch Int32(truncatingIfNeeded: cmd) {
        case VIREO_SCHEDOP_yield: return .yield
        case VIREO_SCHEDOP_block: return .block
        case VIREO_SCHEDOP_shutdown:
            let op = try space.load(vireo_sched_shutdown.self, at: at)
            let reason = ShutdownReason(xenReason: op.reason)
            if case .unknown = reason { throw .EINVAL }
            domain.shutDown(reason)
            return .shutdown(reason)
        case VIREO_SCHEDOP_poll:
            let op = try space.load(vireo_sched_poll.self, at: at)
            guard op.nr_ports <= UInt32(Self.maxPollPorts) else { throw .EINVAL }
            let raw = try space.loadArray(UInt32.self, at: GuestVirtualAddress(op.ports), count: Int(op.nr_ports))
            let events = GuestEventState(sharedInfo: try sharedInfo())
            var ports: [EventPort] = []
            for port in raw {
                guard port > 0, port < UInt32(domain.config.portLimit) else { throw .EINVAL }
                if events.isPending(EventPort(port)) { return .result(0) }
                ports.append(EventPort(port))
            }
            return .poll(ports: ports, deadline: op.timeout == 0 ? nil : op.timeout)
        default:
            throw .ENOSYS
        }
    }

    private func sharedInfo() throws(XenError) -> SharedRegion {
        do { return try domain.memory.specialRegion(Domain.sharedInfoSpecialFrame) } catch { throw error.xenError }
    }

    // MARK: vcpu_op

    private func vcpuOp(_ cmd: UInt64, _ target: UInt64, _ arg: UInt64, _ space: GuestAddressSpace, caller: Int) throws(XenError) -> Int64 {
        guard target < UInt64(domain.config.vcpus) else { throw .ENOENT }
        let vcpu = Int(target)
        let at = GuestVirtualAddress(arg)
        switch Int32(truncatingIfNeeded: cmd) {
        case VIREO_VCPUOP_initialise:
            try domain.initialiseVCPU(vcpu, try VCPUStart(context: try space.read(at, count: MemoryLayout<vireo_vcpu_hvm_context>.size)))
        case VIREO_VCPUOP_up:
            try domain.bringUpVCPU(vcpu)
        case VIREO_VCPUOP_is_up:
            return domain.isOnline(vcpu) ? 1 : 0
        case VIREO_VCPUOP_register_vcpu_info:
            let op = try space.load(vireo_vcpu_register_vcpu_info.self, at: at)
            guard op.offset <= UInt32(guestPageSize - MemoryLayout<vireo_vcpu_info>.size), domain.memory.isRAM(GuestFrame(op.mfn)) else {
                throw .EINVAL
            }
            let page: SharedRegion
            do { page = try domain.memory.region(frame: GuestFrame(op.mfn)) } catch { throw error.xenError }
            let region = page.slice(offset: Int(op.offset), count: MemoryLayout<vireo_vcpu_info>.size)
            try domain.hub.registerVcpuInfo(domain: domain.id, vcpu: vcpu, region: region)
            domain.noteVcpuInfo(vcpu, region)
        case VIREO_VCPUOP_set_singleshot_timer:
            let op = try space.load(vireo_vcpu_set_singleshot_timer.self, at: at)
            if op.flags & UInt32(VIREO_VCPU_SSHOTTMR_future) != 0 && op.timeout_abs_ns < domain.systemTime() { throw .ETIME }
            domain.setTimer(vcpu: vcpu, deadline: op.timeout_abs_ns)
        case VIREO_VCPUOP_stop_singleshot_timer:
            domain.setTimer(vcpu: vcpu, deadline: nil)
        case VIREO_VCPUOP_stop_periodic_timer:
            break  // no periodic timer ever runs
        default:
            throw .ENOSYS
        }
        return 0
    }

    // MARK: hvm_op

    private func hvmOp(_ cmd: UInt64, _ arg: UInt64, _ space: GuestAddressSpace) throws(XenError) -> Int64 {
        let at = GuestVirtualAddress(arg)
        var op = try space.load(vireo_xen_hvm_param.self, at: at)
        try own(op.domid)
        guard op.index < UInt32(VIREO_HVM_NR_PARAMS) else { throw .EINVAL }
        switch Int32(truncatingIfNeeded: cmd) {
        case VIREO_HVMOP_set_param:
            guard Int32(op.index) == VIREO_HVM_PARAM_CALLBACK_IRQ else { throw .EPERM }
            let type = op.value >> 56
            guard op.value == 0 || type == UInt64(VIREO_HVM_PARAM_CALLBACK_TYPE_VECTOR) else { throw .EINVAL }
            guard op.value == 0 || (0x10...0xFF).contains(op.value & 0xFF) else { throw .EINVAL }
            domain.setParam(VIREO_HVM_PARAM_CALLBACK_IRQ, op.value)
        case VIREO_HVMOP_get_param:
            op.value = domain.param(Int32(op.index))
            try space.store(op, at: at)
        default:
            throw .ENOSYS
        }
        return 0
    }
}
