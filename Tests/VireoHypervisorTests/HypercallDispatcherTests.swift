import Synchronization
import Testing
import VireoABI
import VireoCore
import VireoHypercalls
@testable import VireoHypervisor

/// A domain whose hypercalls run through the dispatcher with paging off (pointers are
/// guest-physical), as in the PVH entry state; arguments are structs written into its memory.
final class DispatchFixture: @unchecked Sendable {
    let hub = EventChannels()
    let grants = GrantTables()
    let domain: Domain
    let dispatcher: HypercallDispatcher
    let space: GuestAddressSpace
    let consoleBox = ConsoleBox()
    var consoleBytes: [UInt8] { consoleBox.bytes.withLock { $0 } }

    init(consoleRate: Int = 1 << 20) throws {
        let console = consoleBox, upcalls = UpcallBox()
        domain = try Domain(config: DomainConfig(id: DomainID(3), name: "test", memoryBytes: 4 << 20, vcpus: 2,
                                                 maxGrantFrames: 4, consoleBytesPerSecond: consoleRate),
                            hub: hub, grantTables: grants,
                            console: { bytes in console.bytes.withLock { $0 += bytes } },
                            upcall: { _ in upcalls.count.add(1, ordering: .relaxed) })
        dispatcher = HypercallDispatcher(domain: domain)
        space = GuestAddressSpace(memory: domain.memory, mode: .off)
    }

    final class UpcallBox: Sendable { let count = Atomic<Int>(0) }
    final class ConsoleBox: Sendable { let bytes = Mutex<[UInt8]>([]) }

    /// Writes `value` at guest-physical `at` and returns `at` as the pointer argument.
    func put<T: BitwiseCopyable>(_ value: T, at: UInt64) throws -> UInt64 {
        try domain.memory.store(value, at: GuestPhysicalAddress(at))
        return at
    }

    func get<T: BitwiseCopyable>(_ type: T.Type, at: UInt64) throws -> T {
        try domain.memory.load(T.self, at: GuestPhysicalAddress(at))
    }

    /// For C structs with unions (not BitwiseCopyable in Swift): raw bytes.
    func putRaw<T>(_ value: T, at: UInt64) throws {
        try domain.memory.write(withUnsafeBytes(of: value) { Array($0) }, at: GuestPhysicalAddress(at))
    }

    func getRaw<T>(_ value: inout T, at: UInt64) throws {
        let bytes = try domain.memory.bytes(at: GuestPhysicalAddress(at), count: MemoryLayout<T>.size)
        withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: bytes) }
    }

    func call(_ nr: Int32, _ args: UInt64..., vcpu: Int = 0) -> HypercallOutcome {
        dispatcher.dispatch(UInt64(nr), args, vcpu: vcpu, space: space)
    }

    func result(_ nr: Int32, _ args: UInt64...) -> Int64? {
        if case .result(let r) = dispatcher.dispatch(UInt64(nr), args, vcpu: 0, space: space) { return r }
        return nil
    }
}

let EFAULT = XenError.EFAULT.hypercallResult, EINVAL = XenError.EINVAL.hypercallResult
let ENOSYS = XenError.ENOSYS.hypercallResult

@Suite struct HypercallDispatcherTests {
    @Test func consoleWritesReachTheConsoleAndBadArgumentsAreRefused() throws {
        let f = try DispatchFixture()
        try f.domain.memory.write(Array("hello\n".utf8), at: GuestPhysicalAddress(0x5000))
        #expect(f.result(VIREO_HYPERVISOR_console_io, UInt64(VIREO_CONSOLEIO_write), 6, 0x5000) == 0)
        #expect(f.consoleBytes == Array("hello\n".utf8))
        #expect(f.result(VIREO_HYPERVISOR_console_io, UInt64(VIREO_CONSOLEIO_write), 6, 0x7fff_0000) == EFAULT)
        #expect(f.result(VIREO_HYPERVISOR_console_io, UInt64(VIREO_CONSOLEIO_write), UInt64.max, 0x5000) == EINVAL)
        #expect(f.result(VIREO_HYPERVISOR_console_io, UInt64(VIREO_CONSOLEIO_read), 16, 0x5000) == 0)
        #expect(f.result(VIREO_HYPERVISOR_console_io, 7, 1, 0x5000) == ENOSYS)
    }

    /// SECURITY.md 19: a guest cannot make the host hold unbounded console output.
    @Test func consoleOutputIsRateLimited() throws {
        let f = try DispatchFixture(consoleRate: 1000)
        try f.domain.memory.fill(0x41, at: GuestPhysicalAddress(0x5000), count: 4096)
        for _ in 0..<10 { _ = f.result(VIREO_HYPERVISOR_console_io, UInt64(VIREO_CONSOLEIO_write), 4096, 0x5000) }
        #expect(f.consoleBytes.count <= 1100)
        #expect(f.domain.consoleDropped >= 40_960 - 1100)
    }

    @Test func versionAndFeatures() throws {
        let f = try DispatchFixture()
        #expect(f.result(VIREO_HYPERVISOR_xen_version, UInt64(VIREO_XENVER_version), 0) == 0x4_000e)
        #expect(f.result(VIREO_HYPERVISOR_xen_version, UInt64(VIREO_XENVER_pagesize), 0) == 4096)
        #expect(f.result(VIREO_HYPERVISOR_xen_version, UInt64(VIREO_XENVER_capabilities), 0x6000) == 0)
        #expect(try f.domain.memory.bytes(at: GuestPhysicalAddress(0x6000), count: 15) == Array("hvm-3.0-x86_64\0".utf8))
        let at = try f.put(vireo_xen_feature_info(submap_idx: 0, submap: 0), at: 0x7000)
        #expect(f.result(VIREO_HYPERVISOR_xen_version, UInt64(VIREO_XENVER_get_features), at) == 0)
        let features = try f.get(vireo_xen_feature_info.self, at: at).submap
        #expect(features & (1 << UInt32(VIREO_XENFEAT_hvm_callback_vector)) != 0)
        _ = try f.put(vireo_xen_feature_info(submap_idx: 9, submap: 0), at: 0x7000)
        #expect(f.result(VIREO_HYPERVISOR_xen_version, UInt64(VIREO_XENVER_get_features), at) == EINVAL)
    }

    @Test func memoryOps() throws {
        let f = try DispatchFixture()
        let domid = try f.put(UInt16(VIREO_DOMID_SELF), at: 0x5000)
        #expect(f.result(VIREO_HYPERVISOR_memory_op, UInt64(VIREO_XENMEM_current_reservation), domid) == 1024)
        let map = try f.put(vireo_xen_memory_map(nr_entries: 8, buffer: 0x6000), at: 0x5100)
        #expect(f.result(VIREO_HYPERVISOR_memory_op, UInt64(VIREO_XENMEM_memory_map), map) == 0)
        #expect(try f.get(vireo_xen_memory_map.self, at: map).nr_entries == 3)
        #expect(try f.get(UInt32.self, at: 0x6000 + 2 * 20 + 16) == 1, "third E820 entry is RAM")
        // Map shared_info at frame 0x300 and see the hypervisor's page there.
        let add = try f.put(vireo_xen_add_to_physmap(domid: UInt16(VIREO_DOMID_SELF), size: 0, space: UInt32(VIREO_XENMAPSPACE_shared_info),
                                                     idx: 0, gpfn: 0x300), at: 0x5200)
        #expect(f.result(VIREO_HYPERVISOR_memory_op, UInt64(VIREO_XENMEM_add_to_physmap), add) == 0)
        try f.domain.memory.specialRegion(0).store(UInt32(0x5151), at: 3072)  // wc_version
        #expect(try f.get(UInt32.self, at: 0x30_0000 + 3072) == 0x5151)
        // Grant frame 1 at 0x400; frame 9 is beyond the maximum; other spaces are not offered.
        _ = try f.put(vireo_xen_add_to_physmap(domid: UInt16(VIREO_DOMID_SELF), size: 0, space: UInt32(VIREO_XENMAPSPACE_grant_table),
                                               idx: 1, gpfn: 0x400), at: 0x5200)
        #expect(f.result(VIREO_HYPERVISOR_memory_op, UInt64(VIREO_XENMEM_add_to_physmap), add) == 0)
        #expect(f.domain.grantTable.size.frames == 2)
        _ = try f.put(vireo_xen_add_to_physmap(domid: UInt16(VIREO_DOMID_SELF), size: 0, space: UInt32(VIREO_XENMAPSPACE_grant_table),
                                               idx: 9, gpfn: 0x400), at: 0x5200)
        #expect(f.result(VIREO_HYPERVISOR_memory_op, UInt64(VIREO_XENMEM_add_to_physmap), add) == EINVAL)
        _ = try f.put(vireo_xen_add_to_physmap(domid: 7, size: 0, space: UInt32(VIREO_XENMAPSPACE_shared_info), idx: 0, gpfn: 1), at: 0x5200)
        #expect(f.result(VIREO_HYPERVISOR_memory_op, UInt64(VIREO_XENMEM_add_to_physmap), add) == XenError.EPERM.hypercallResult)
        #expect(f.result(VIREO_HYPERVISOR_memory_op, UInt64(VIREO_XENMEM_populate_physmap), add) == ENOSYS)
    }

    @Test func eventChannelsThroughHypercalls() throws {
        let f = try DispatchFixture()
        let peer = try SimulatedGuest(id: DomainID(4), ramPages: 64, hub: f.hub, grantTables: f.grants)
        let peerPort = try peer.allocUnbound(remote: f.domain.id)
        var bind = vireo_evtchn_bind_interdomain()
        bind.remote_dom = peer.id.rawValue
        bind.remote_port = peerPort.rawValue
        let at = try f.put(bind, at: 0x5000)
        #expect(f.result(VIREO_HYPERVISOR_event_channel_op, UInt64(VIREO_EVTCHNOP_bind_interdomain), at) == 0)
        let local = try f.get(vireo_evtchn_bind_interdomain.self, at: at).local_port
        #expect(local > 0)
        let send = try f.put(vireo_evtchn_send(port: local), at: 0x5100)
        #expect(f.result(VIREO_HYPERVISOR_event_channel_op, UInt64(VIREO_EVTCHNOP_send), send) == 0)
        #expect(peer.takePendingEvents() == [peerPort])
        // status of our own port
        _ = try f.put(UInt16(VIREO_DOMID_SELF), at: 0x5200)
        _ = try f.put(local, at: 0x5204)
        #expect(f.result(VIREO_HYPERVISOR_event_channel_op, UInt64(VIREO_EVTCHNOP_status), 0x5200) == 0)
        #expect(try f.get(UInt32.self, at: 0x5208) == UInt32(VIREO_EVTCHNSTAT_interdomain))
        // Hostile: bad ports, a wild pointer, an unknown sub-op.
        _ = try f.put(vireo_evtchn_send(port: 5000), at: 0x5100)
        #expect(f.result(VIREO_HYPERVISOR_event_channel_op, UInt64(VIREO_EVTCHNOP_send), send) == EINVAL)
        #expect(f.result(VIREO_HYPERVISOR_event_channel_op, UInt64(VIREO_EVTCHNOP_send), 0xdead_0000) == EFAULT)
        #expect(f.result(VIREO_HYPERVISOR_event_channel_op, 99, send) == ENOSYS)
    }

    @Test func grantOps() throws {
        let f = try DispatchFixture()
        var query = vireo_gnttab_query_size()
        query.dom = UInt16(VIREO_DOMID_SELF)
        let q = try f.put(query, at: 0x5000)
        #expect(f.result(VIREO_HYPERVISOR_grant_table_op, UInt64(VIREO_GNTTABOP_query_size), q, 1) == 0)
        let got = try f.get(vireo_gnttab_query_size.self, at: q)
        #expect(got.nr_frames == 1 && got.max_nr_frames == 4 && got.status == 0)
        #expect(f.result(VIREO_HYPERVISOR_grant_table_op, UInt64(VIREO_GNTTABOP_query_size), q, 2) == EINVAL)
        // Copy from a peer's grant into our own frame 0x10.
        let peer = try SimulatedGuest(id: DomainID(4), ramPages: 64, hub: f.hub, grantTables: f.grants)
        let page = try peer.allocatePage()
        try peer.page(page).store(UInt64(0x1122_3344), at: 8)
        let ref = try peer.grantAccess(to: f.domain.id, frame: page, readOnly: true)
        var op = vireo_gnttab_copy()
        op.source.u.ref = ref.rawValue
        op.source.domid = peer.id.rawValue
        op.source.offset = 8
        op.dest.u.gmfn = 0x10
        op.dest.domid = UInt16(VIREO_DOMID_SELF)
        op.dest.offset = 16
        op.len = 8
        op.flags = UInt16(VIREO_GNTCOPY_source_gref)
        var bad = op
        bad.dest.u.gmfn = 0x9_0000  // not our RAM
        try f.putRaw(op, at: 0x6000)
        try f.putRaw(bad, at: 0x6000 + 40)
        #expect(f.result(VIREO_HYPERVISOR_grant_table_op, UInt64(VIREO_GNTTABOP_copy), 0x6000, 2) == 0)
        #expect(try f.get(UInt64.self, at: 0x10_010) == 0x1122_3344)
        var first = vireo_gnttab_copy(), second = vireo_gnttab_copy()
        try f.getRaw(&first, at: 0x6000)
        try f.getRaw(&second, at: 0x6000 + 40)
        #expect(first.status == GrantStatus.okay.rawValue)
        #expect(second.status == GrantStatus.badPage.rawValue)
        #expect(f.result(VIREO_HYPERVISOR_grant_table_op, UInt64(VIREO_GNTTABOP_map_grant_ref), 0x6000, 1) == ENOSYS)
    }

    /// SECURITY.md 10 at the hypercall: a huge grant copy is processed in bounded batches, each
    /// ending in a continuation that the engine re-issues.
    @Test func hugeGrantCopiesContinue() throws {
        let f = try DispatchFixture()
        let outcome = f.call(VIREO_HYPERVISOR_grant_table_op, UInt64(VIREO_GNTTABOP_copy), 0x10_0000, 100_000)
        #expect(outcome == .restart(arguments: [UInt64(VIREO_GNTTABOP_copy), 0x10_0000 + 512 * 40, 100_000 - 512]))
        #expect(f.call(VIREO_HYPERVISOR_grant_table_op, UInt64(VIREO_GNTTABOP_copy), 0x10_0000, UInt64.max) == .result(EINVAL))
    }

    @Test func schedOps() throws {
        let f = try DispatchFixture()
        #expect(f.call(VIREO_HYPERVISOR_sched_op, UInt64(VIREO_SCHEDOP_yield), 0) == .yield)
        #expect(f.call(VIREO_HYPERVISOR_sched_op, UInt64(VIREO_SCHEDOP_block), 0) == .block)
        let poll = try f.put(vireo_sched_poll(ports: 0x5100, nr_ports: 200, timeout: 0), at: 0x5000)
        #expect(f.call(VIREO_HYPERVISOR_sched_op, UInt64(VIREO_SCHEDOP_poll), poll) == .result(EINVAL))
        let ipi = try f.put(vireo_evtchn_bind_ipi(vcpu: 0, port: 0), at: 0x5300)
        #expect(f.result(VIREO_HYPERVISOR_event_channel_op, UInt64(VIREO_EVTCHNOP_bind_ipi), ipi) == 0)
        let port = try f.get(vireo_evtchn_bind_ipi.self, at: ipi).port
        _ = try f.put(port, at: 0x5100)
        _ = try f.put(vireo_sched_poll(ports: 0x5100, nr_ports: 1, timeout: 99), at: 0x5000)
        #expect(f.call(VIREO_HYPERVISOR_sched_op, UInt64(VIREO_SCHEDOP_poll), poll) == .poll(ports: [EventPort(port)], deadline: 99))
        try f.hub.send(caller: f.domain.id, port: EventPort(port))
        #expect(f.call(VIREO_HYPERVISOR_sched_op, UInt64(VIREO_SCHEDOP_poll), poll) == .result(0), "already pending")
        let down = try f.put(vireo_sched_shutdown(reason: 77), at: 0x5200)
        #expect(f.call(VIREO_HYPERVISOR_sched_op, UInt64(VIREO_SCHEDOP_shutdown), down) == .result(EINVAL))
        _ = try f.put(vireo_sched_shutdown(reason: UInt32(VIREO_SHUTDOWN_poweroff)), at: 0x5200)
        #expect(f.call(VIREO_HYPERVISOR_sched_op, UInt64(VIREO_SCHEDOP_shutdown), down) == .shutdown(.poweroff))
        #expect(f.domain.shutdownReason == .poweroff)
    }

    @Test func timersFireVIRQTimer() throws {
        let f = try DispatchFixture()
        let bind = try f.put(vireo_evtchn_bind_virq(virq: UInt32(VIREO_VIRQ_TIMER), vcpu: 1, port: 0), at: 0x5000)
        #expect(f.result(VIREO_HYPERVISOR_event_channel_op, UInt64(VIREO_EVTCHNOP_bind_virq), bind) == 0)
        let port = EventPort(try f.get(vireo_evtchn_bind_virq.self, at: bind).port)
        let past = try f.put(vireo_vcpu_set_singleshot_timer(timeout_abs_ns: 1, flags: UInt32(VIREO_VCPU_SSHOTTMR_future)), at: 0x5100)
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_set_singleshot_timer), 1, past) == XenError.ETIME.hypercallResult)
        _ = try f.put(vireo_vcpu_set_singleshot_timer(timeout_abs_ns: f.domain.systemTime() + 1_000_000, flags: 0), at: 0x5100)
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_set_singleshot_timer), 1, past) == 0)
        #expect(f.domain.fireDueTimers() != nil, "not due yet")
        while f.domain.timer(vcpu: 1) != nil { _ = f.domain.fireDueTimers() }
        let events = GuestEventState(sharedInfo: try f.domain.memory.specialRegion(0))
        #expect(events.isPending(port))
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_stop_singleshot_timer), 9, 0) == XenError.ENOENT.hypercallResult)
        #expect(f.result(VIREO_HYPERVISOR_set_timer_op, 0) == 0)
    }

    @Test func secondaryVCPUContextsAreValidated() throws {
        let f = try DispatchFixture()
        var ctx = [UInt8](repeating: 0, count: 128)
        func put64(_ v: UInt64, _ at: Int) { for i in 0..<8 { ctx[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        ctx[0] = 1  // 64-bit mode, but paging off: refused
        try f.domain.memory.write(ctx, at: GuestPhysicalAddress(0x5000))
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_initialise), 1, 0x5000) == EINVAL)
        put64(0x8000_0011, 8 + 80); put64(0x1000, 8 + 88); put64(1 << 5, 8 + 96); put64(0x500, 8 + 104); put64(0x10_0000, 8 + 64)
        try f.domain.memory.write(ctx, at: GuestPhysicalAddress(0x5000))
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_up), 1, 0) == EINVAL, "not initialised yet")
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_initialise), 1, 0x5000) == 0)
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_initialise), 1, 0x5000) == XenError.EEXIST.hypercallResult)
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_initialise), 0, 0x5000) == EINVAL, "vCPU 0 runs already")
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_is_up), 1, 0) == 0)
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_up), 1, 0) == 0)
        #expect(f.result(VIREO_HYPERVISOR_vcpu_op, UInt64(VIREO_VCPUOP_is_up), 1, 0) == 1)
        ctx[0] = 7
        try f.domain.memory.write(ctx, at: GuestPhysicalAddress(0x5000))
        #expect(throws: XenError.EINVAL) { try VCPUStart(context: ctx) }
    }

    @Test func hvmParams() throws {
        let f = try DispatchFixture()
        f.domain.setParam(VIREO_HVM_PARAM_STORE_PFN, 0x3fe)
        let at = try f.put(vireo_xen_hvm_param(domid: UInt16(VIREO_DOMID_SELF), pad: 0, index: UInt32(VIREO_HVM_PARAM_STORE_PFN), value: 0), at: 0x5000)
        #expect(f.result(VIREO_HYPERVISOR_hvm_op, UInt64(VIREO_HVMOP_get_param), at) == 0)
        #expect(try f.get(vireo_xen_hvm_param.self, at: at).value == 0x3fe)
        #expect(f.result(VIREO_HYPERVISOR_hvm_op, UInt64(VIREO_HVMOP_set_param), at) == XenError.EPERM.hypercallResult)
        _ = try f.put(vireo_xen_hvm_param(domid: UInt16(VIREO_DOMID_SELF), pad: 0, index: UInt32(VIREO_HVM_PARAM_CALLBACK_IRQ),
                                          value: 2 << 56 | 0xf3), at: 0x5000)
        #expect(f.result(VIREO_HYPERVISOR_hvm_op, UInt64(VIREO_HVMOP_set_param), at) == 0)
        #expect(f.domain.callbackVector == 0xf3)
        _ = try f.put(vireo_xen_hvm_param(domid: UInt16(VIREO_DOMID_SELF), pad: 0, index: 5000, value: 0), at: 0x5000)
        #expect(f.result(VIREO_HYPERVISOR_hvm_op, UInt64(VIREO_HVMOP_get_param), at) == EINVAL)
    }

    @Test func unsupportedHypercallsReturnENOSYS() throws {
        let f = try DispatchFixture()
        for call in Hypercall.allCases where !HypercallTable.entry(call).support.isSupported {
            #expect(f.result(Int32(call.rawValue), 0, 0, 0) == ENOSYS, "\(call)")
        }
        #expect(f.dispatcher.dispatch(4000, [], vcpu: 0, space: f.space) == .result(ENOSYS))
        #expect(f.domain.hypercallCount > 0)
    }
}

@Suite struct TimeTests {
    /// The guest's pvclock formula, as vireo/xen.h states it.
    static func guestNanoseconds(delta: UInt64, mul: UInt32, shift: Int8) -> UInt64 {
        let shifted = shift >= 0 ? delta << UInt64(shift) : delta >> UInt64(-shift)
        return UInt64((UInt128(shifted) * UInt128(mul)) >> 32)
    }

    @Test(arguments: [1_000_000, 999_999_999, 1_000_000_000, 2_100_000_000, 3_000_000_000, 10_000_000_000] as [UInt64])
    func pvclockScaleConvertsTicksToNanoseconds(hz: UInt64) {
        let (mul, shift) = Domain.pvclockScale(tscHz: hz)
        let oneSecond = Self.guestNanoseconds(delta: hz, mul: mul, shift: shift)
        #expect(oneSecond > 999_999_000 && oneSecond <= 1_000_000_000, "\(hz) Hz: \(oneSecond) ns")
    }

    @Test func pvclockRecordIsPublishedWithAnEvenVersion() throws {
        let f = try DispatchFixture()
        f.domain.publishTime(vcpu: 1, guestTSC: 12345, tscHz: 2_000_000_000)
        f.domain.publishTime(vcpu: 1, guestTSC: 22345, tscHz: 2_000_000_000)
        let info = try #require(f.domain.vcpuInfoRegion(1))
        let time = info.load(vireo_vcpu_time_info.self, at: 32)
        #expect(time.version % 2 == 0 && time.version >= 4)
        #expect(time.tsc_timestamp == 22345)
        #expect(time.tsc_to_system_mul != 0)
        f.domain.publishWallclock()
        let shared = try f.domain.memory.specialRegion(0)
        #expect(shared.load(UInt32.self, at: 3072) % 2 == 0)
        #expect(shared.load(UInt32.self, at: 3076) > 1_700_000_000, "seconds since the epoch")
    }
}
