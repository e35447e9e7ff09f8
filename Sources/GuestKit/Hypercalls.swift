#if canImport(VireoCore)
import VireoCore
#endif
import VireoABI
import VireoHypercalls

/// Typed hypercalls. Argument structures go through one scratch page of the guest's RAM (the
/// hypervisor reads pointers as guest addresses), so these are not reentrant: GuestKit makes
/// hypercalls from its loop, never from an interrupt handler.
extension Guest {
    /// Stores `argument` in the scratch page, makes the call with its address in the slot
    /// `cmd` leaves free, and reads it back (OUT fields).
    @inline(__always)
    func call<T: BitwiseCopyable>(_ number: Int32, _ cmd: Int32, _ argument: inout T) -> Int64 {
        precondition(MemoryLayout<T>.size <= guestPageSize)
        scratch.store(argument, at: 0)
        let result = platform.hypercall(UInt64(number), UInt64(UInt32(bitPattern: cmd)), scratchAddress, 0, 0, 0)
        argument = scratch.load(T.self, at: 0)
        return result
    }

    @inline(__always)
    func check(_ result: Int64) throws(GuestError) {
        if result < 0 { throw GuestError(result: result) }
    }

    // MARK: console_io

    /// Writes bytes to the hypervisor's console (CONSOLEIO_write), a page at a time.
    public func consoleIOWrite(_ bytes: UnsafeRawBufferPointer) throws(GuestError) {
        var done = 0
        while done < bytes.count {
            let chunk = min(bytes.count - done, guestPageSize)
            scratch.copyBytes(from: UnsafeRawBufferPointer(rebasing: bytes[done..<(done + chunk)]), to: 0)
            try check(platform.hypercall(UInt64(VIREO_HYPERVISOR_console_io), UInt64(VIREO_CONSOLEIO_write),
                                         UInt64(chunk), scratchAddress, 0, 0))
            done += chunk
        }
    }

    public func consoleIOWrite(_ bytes: [UInt8]) throws(GuestError) {
        var failure: GuestError?
        bytes.withUnsafeBytes { raw in
            do throws(GuestError) { try consoleIOWrite(raw) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    // MARK: xen_version

    /// The interface version (major, minor) XENVER_version reports.
    public func xenVersion() throws(GuestError) -> (major: Int, minor: Int) {
        let result = platform.hypercall(UInt64(VIREO_HYPERVISOR_xen_version), UInt64(VIREO_XENVER_version), 0, 0, 0, 0)
        try check(result)
        return (Int(result >> 16), Int(result & 0xFFFF))
    }

    // MARK: memory_op

    /// The domain's RAM in pages (XENMEM_current_reservation).
    public func currentReservation() throws(GuestError) -> UInt64 {
        var domid = UInt16(VIREO_DOMID_SELF)
        let result = call(VIREO_HYPERVISOR_memory_op, VIREO_XENMEM_current_reservation, &domid)
        try check(result)
        return UInt64(result)
    }

    /// Places page `index` of `space` (VIREO_XENMAPSPACE_shared_info or _grant_table) at `frame`.
    public func addToPhysmap(space: Int32, index: UInt64, at frame: GuestFrame) throws(GuestError) {
        var op = vireo_xen_add_to_physmap()
        op.domid = UInt16(VIREO_DOMID_SELF)
        op.space = UInt32(bitPattern: space)
        op.idx = index
        op.gpfn = frame.rawValue
        try check(call(VIREO_HYPERVISOR_memory_op, VIREO_XENMEM_add_to_physmap, &op))
    }

    // MARK: event_channel_op

    /// A new port that `remote` may bind to (EVTCHNOP_alloc_unbound).
    public func allocUnbound(remote: DomainID) throws(GuestError) -> EventPort {
        var op = vireo_evtchn_alloc_unbound()
        op.dom = UInt16(VIREO_DOMID_SELF)
        op.remote_dom = remote.rawValue
        try check(call(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_alloc_unbound, &op))
        return EventPort(op.port)
    }

    /// A port for virtual IRQ `virq` (VIREO_VIRQ_TIMER, ...) on `vcpu` (EVTCHNOP_bind_virq).
    public func bindVirq(_ virq: UInt32, vcpu: UInt32 = 0) throws(GuestError) -> EventPort {
        var op = vireo_evtchn_bind_virq()
        op.virq = virq
        op.vcpu = vcpu
        try check(call(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_bind_virq, &op))
        return EventPort(op.port)
    }

    /// Notifies the other end of `port` (EVTCHNOP_send).
    public func send(_ port: EventPort) throws(GuestError) {
        var op = vireo_evtchn_send()
        op.port = port.rawValue
        try check(call(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_send, &op))
    }

    /// Asks the hypervisor to unmask `port` and re-raise it if pending (EVTCHNOP_unmask).
    public func unmaskHypercall(_ port: EventPort) throws(GuestError) {
        var op = vireo_evtchn_unmask()
        op.port = port.rawValue
        try check(call(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_unmask, &op))
    }

    /// Closes `port` (EVTCHNOP_close); its handler is dropped.
    public func close(_ port: EventPort) throws(GuestError) {
        var op = vireo_evtchn_close()
        op.port = port.rawValue
        try check(call(VIREO_HYPERVISOR_event_channel_op, VIREO_EVTCHNOP_close, &op))
        removeHandler(for: port)
    }

    // MARK: sched_op

    /// Lets other vCPUs run (SCHEDOP_yield).
    public func yield() {
        _ = platform.hypercall(UInt64(VIREO_HYPERVISOR_sched_op), UInt64(VIREO_SCHEDOP_yield), 0, 0, 0, 0)
    }

    /// Sleeps until an event is pending for this vCPU (SCHEDOP_block).
    public func block() {
        _ = platform.hypercall(UInt64(VIREO_HYPERVISOR_sched_op), UInt64(VIREO_SCHEDOP_block), 0, 0, 0, 0)
    }

    /// Stops the domain with a VIREO_SHUTDOWN_* reason (SCHEDOP_shutdown). On a real guest it
    /// does not return; the result is the hypervisor's when it refuses.
    @discardableResult
    public func shutdown(reason: UInt32) -> Int64 {
        var op = vireo_sched_shutdown()
        op.reason = reason
        return call(VIREO_HYPERVISOR_sched_op, VIREO_SCHEDOP_shutdown, &op)
    }

    // MARK: set_timer_op

    /// Arms this vCPU's one-shot timer for system time `deadline` (ns); nil cancels. It fires
    /// VIRQ_TIMER.
    public func setTimer(deadline: UInt64?) throws(GuestError) {
        try check(platform.hypercall(UInt64(VIREO_HYPERVISOR_set_timer_op), deadline ?? 0, 0, 0, 0, 0))
    }

    // MARK: hvm_op

    /// An HVM parameter (VIREO_HVM_PARAM_STORE_PFN, ...).
    public func hvmParam(_ index: Int32) throws(GuestError) -> UInt64 {
        var op = vireo_xen_hvm_param()
        op.domid = UInt16(VIREO_DOMID_SELF)
        op.index = UInt32(bitPattern: index)
        try check(call(VIREO_HYPERVISOR_hvm_op, VIREO_HVMOP_get_param, &op))
        return op.value
    }

    /// A ring page the toolstack set up and its event channel, from the two HVM params that
    /// name them (STORE_PFN/STORE_EVTCHN, CONSOLE_PFN/CONSOLE_EVTCHN). ENOENT when there is none.
    public func toolstackRing(page pageParam: Int32, port portParam: Int32) throws(GuestError) -> (SharedRegion, EventPort) {
        let frame = try hvmParam(pageParam)
        let port = try hvmParam(portParam)
        guard frame != 0 else { throw GuestError.ENOENT }
        return (platform.memory(at: frame << guestPageShift, count: guestPageSize), EventPort(UInt32(truncatingIfNeeded: port)))
    }

    public func setHVMParam(_ index: Int32, _ value: UInt64) throws(GuestError) {
        var op = vireo_xen_hvm_param()
        op.domid = UInt16(VIREO_DOMID_SELF)
        op.index = UInt32(bitPattern: index)
        op.value = value
        try check(call(VIREO_HYPERVISOR_hvm_op, VIREO_HVMOP_set_param, &op))
    }

    // MARK: grant_table_op

    /// The grant table's current and maximum size in frames (GNTTABOP_query_size).
    public func grantTableSize() throws(GuestError) -> (frames: Int, maxFrames: Int) {
        var op = vireo_gnttab_query_size()
        op.dom = UInt16(VIREO_DOMID_SELF)
        try check(platformGrantOp(VIREO_GNTTABOP_query_size, &op))
        guard op.status == 0 else { throw GuestError.EINVAL }
        return (Int(op.nr_frames), Int(op.max_nr_frames))
    }

    /// Grows the grant table to `frames` frames (GNTTABOP_setup_table); the frame numbers.
    public func setUpGrantTable(frames: Int) throws(GuestError) -> [UInt64] {
        precondition(frames > 0 && frames <= 256)
        var op = vireo_gnttab_setup_table()
        op.dom = UInt16(VIREO_DOMID_SELF)
        op.nr_frames = UInt32(frames)
        // The frame list follows the operation in the scratch page.
        op.frame_list = scratchAddress + 256
        try check(platformGrantOp(VIREO_GNTTABOP_setup_table, &op))
        guard op.status == 0 else { throw GuestError.EINVAL }
        return (0..<frames).map { scratch.load(UInt64.self, at: 256 + $0 * 8) }
    }

    /// grant_table_op takes (cmd, uop, count): count 1.
    private func platformGrantOp<T: BitwiseCopyable>(_ cmd: Int32, _ op: inout T) -> Int64 {
        scratch.store(op, at: 0)
        let result = platform.hypercall(UInt64(VIREO_HYPERVISOR_grant_table_op), UInt64(UInt32(bitPattern: cmd)),
                                        scratchAddress, 1, 0, 0)
        op = scratch.load(T.self, at: 0)
        return result
    }
}
