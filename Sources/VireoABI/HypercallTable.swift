import VireoHypercalls

/// What Vireo does with each hypercall and sub-operation: the contract the hypervisor's
/// dispatcher follows, printed by `vireo abi` and documented in Docs/ABI.md.
/// Numbers come from the C headers (Hypercalls/), so the table cannot drift from them.
public enum HypercallTable {
    public enum Support: Sendable, Equatable {
        /// Implemented; the note says how (limits, what the result is).
        case supported(String)
        /// Not implemented: the call returns ``result`` (always `-ENOSYS` today).
        case unsupported(String)

        public var isSupported: Bool {
            if case .supported = self { return true }
            return false
        }
        public var note: String {
            switch self {
            case .supported(let note), .unsupported(let note): note
            }
        }
    }

    /// What an unsupported hypercall or sub-op returns.
    public static let unsupportedResult = XenError.ENOSYS

    public struct SubOp: Sendable {
        /// Xen's constant name, e.g. `EVTCHNOP_send`.
        public let name: String
        public let number: Int
        public let support: Support
    }

    public struct Entry: Sendable {
        public let hypercall: Hypercall
        public let support: Support
        /// The sub-operations, for hypercalls whose first argument selects one.
        public let subOps: [SubOp]

        public func subOp(_ number: Int) -> SubOp? { subOps.first { $0.number == number } }
    }

    public static func entry(_ call: Hypercall) -> Entry {
        entries.first { $0.hypercall == call }!
    }

    private static func yes(_ name: String, _ number: Int32, _ note: String = "") -> SubOp {
        SubOp(name: name, number: Int(number), support: .supported(note))
    }
    private static func no(_ name: String, _ number: Int32, _ note: String = "") -> SubOp {
        SubOp(name: name, number: Int(number), support: .unsupported(note))
    }

    public static let entries: [Entry] = Hypercall.allCases.map { call in
        switch call {
        case .consoleIo:
            Entry(hypercall: call, support: .supported("debug console of the domain"), subOps: [
                yes("CONSOLEIO_write", VIREO_CONSOLEIO_write, "bytes go to the domain's console log, rate-limited"),
                yes("CONSOLEIO_read", VIREO_CONSOLEIO_read, "returns 0 bytes: there is no hypervisor console input"),
            ])
        case .xenVersion:
            Entry(hypercall: call, support: .supported("version and feature queries"), subOps: [
                yes("XENVER_version", VIREO_XENVER_version, "(major << 16) | minor of the Xen interface stated"),
                yes("XENVER_extraversion", VIREO_XENVER_extraversion),
                yes("XENVER_compile_info", VIREO_XENVER_compile_info),
                yes("XENVER_capabilities", VIREO_XENVER_capabilities, "\"hvm-3.0-x86_64\""),
                yes("XENVER_changeset", VIREO_XENVER_changeset),
                yes("XENVER_platform_parameters", VIREO_XENVER_platform_parameters),
                yes("XENVER_get_features", VIREO_XENVER_get_features, "submap 0 only"),
                yes("XENVER_pagesize", VIREO_XENVER_pagesize, "4096"),
                yes("XENVER_guest_handle", VIREO_XENVER_guest_handle, "the domain's UUID handle"),
                no("XENVER_commandline", VIREO_XENVER_commandline, "no hypervisor command line"),
                no("XENVER_build_id", VIREO_XENVER_build_id),
            ])
        case .memoryOp:
            Entry(hypercall: call, support: .supported("the HVM/PVH subset"), subOps: [
                no("XENMEM_increase_reservation", VIREO_XENMEM_increase_reservation, "PV-MMU only; use populate_physmap"),
                no("XENMEM_decrease_reservation", VIREO_XENMEM_decrease_reservation, "no ballooning yet"),
                no("XENMEM_maximum_ram_page", VIREO_XENMEM_maximum_ram_page),
                yes("XENMEM_current_reservation", VIREO_XENMEM_current_reservation, "DOMID_SELF only: pages the domain holds"),
                no("XENMEM_maximum_reservation", VIREO_XENMEM_maximum_reservation),
                no("XENMEM_populate_physmap", VIREO_XENMEM_populate_physmap, "no ballooning yet: RAM is fixed at creation"),
                yes("XENMEM_add_to_physmap", VIREO_XENMEM_add_to_physmap, "spaces shared_info and grant_table"),
                yes("XENMEM_memory_map", VIREO_XENMEM_memory_map, "the domain's E820 map (20-byte entries)"),
                no("XENMEM_machine_memory_map", VIREO_XENMEM_machine_memory_map, "privileged"),
                no("XENMEM_maximum_gpfn", VIREO_XENMEM_maximum_gpfn),
                no("XENMEM_machphys_mfn_list", VIREO_XENMEM_machphys_mfn_list, "PV-MMU only"),
                no("XENMEM_exchange", VIREO_XENMEM_exchange, "PV-MMU only"),
                no("XENMEM_machphys_mapping", VIREO_XENMEM_machphys_mapping, "PV-MMU only"),
                no("XENMEM_set_memory_map", VIREO_XENMEM_set_memory_map, "privileged"),
                no("XENMEM_remove_from_physmap", VIREO_XENMEM_remove_from_physmap),
                no("XENMEM_set_pod_target", VIREO_XENMEM_set_pod_target, "privileged"),
                no("XENMEM_get_pod_target", VIREO_XENMEM_get_pod_target, "privileged"),
                no("XENMEM_add_to_physmap_batch", VIREO_XENMEM_add_to_physmap_batch),
                no("XENMEM_machphys_compat_mfn_list", VIREO_XENMEM_machphys_compat_mfn_list, "PV-MMU only"),
                no("XENMEM_get_vnumainfo", VIREO_XENMEM_get_vnumainfo, "no NUMA topology"),
                no("XENMEM_acquire_resource", VIREO_XENMEM_acquire_resource, "privileged"),
            ])
        case .setTimerOp:
            Entry(hypercall: call, support: .supported("one-shot timer at an absolute system time; fires VIRQ_TIMER"), subOps: [])
        case .grantTableOp:
            Entry(hypercall: call, support: .supported("grant table v1"), subOps: [
                no("GNTTABOP_map_grant_ref", VIREO_GNTTABOP_map_grant_ref, "Vireo's backends map grants in the host, not in a guest"),
                no("GNTTABOP_unmap_grant_ref", VIREO_GNTTABOP_unmap_grant_ref, "as map_grant_ref"),
                yes("GNTTABOP_setup_table", VIREO_GNTTABOP_setup_table, "up to the domain's maximum grant frames"),
                no("GNTTABOP_dump_table", VIREO_GNTTABOP_dump_table),
                no("GNTTABOP_transfer", VIREO_GNTTABOP_transfer, "page flipping is not supported"),
                yes("GNTTABOP_copy", VIREO_GNTTABOP_copy, "per-segment status; 512 segments per continuation"),
                yes("GNTTABOP_query_size", VIREO_GNTTABOP_query_size),
                no("GNTTABOP_unmap_and_replace", VIREO_GNTTABOP_unmap_and_replace, "PV-MMU only"),
                no("GNTTABOP_set_version", VIREO_GNTTABOP_set_version, "v1 only"),
                no("GNTTABOP_get_status_frames", VIREO_GNTTABOP_get_status_frames, "v2 only"),
                no("GNTTABOP_get_version", VIREO_GNTTABOP_get_version, "v1 only"),
                no("GNTTABOP_swap_grant_ref", VIREO_GNTTABOP_swap_grant_ref),
                no("GNTTABOP_cache_flush", VIREO_GNTTABOP_cache_flush, "Arm only"),
            ])
        case .vcpuOp:
            Entry(hypercall: call, support: .supported("secondary vCPUs, timers and vcpu_info"), subOps: [
                yes("VCPUOP_initialise", VIREO_VCPUOP_initialise, "vcpu_hvm_context, 64-bit or flat 32-bit; once per vCPU"),
                yes("VCPUOP_up", VIREO_VCPUOP_up, "starts an initialised secondary vCPU"),
                no("VCPUOP_down", VIREO_VCPUOP_down),
                yes("VCPUOP_is_up", VIREO_VCPUOP_is_up),
                no("VCPUOP_get_runstate_info", VIREO_VCPUOP_get_runstate_info),
                no("VCPUOP_register_runstate_memory_area", VIREO_VCPUOP_register_runstate_memory_area),
                no("VCPUOP_set_periodic_timer", VIREO_VCPUOP_set_periodic_timer, "use the single-shot timer"),
                yes("VCPUOP_stop_periodic_timer", VIREO_VCPUOP_stop_periodic_timer, "no periodic timer runs; succeeds"),
                yes("VCPUOP_set_singleshot_timer", VIREO_VCPUOP_set_singleshot_timer, "fires VIRQ_TIMER; VCPU_SSHOTTMR_future honoured"),
                yes("VCPUOP_stop_singleshot_timer", VIREO_VCPUOP_stop_singleshot_timer),
                yes("VCPUOP_register_vcpu_info", VIREO_VCPUOP_register_vcpu_info, "moves vcpu_info into a guest page"),
                no("VCPUOP_send_nmi", VIREO_VCPUOP_send_nmi),
                no("VCPUOP_get_physid", VIREO_VCPUOP_get_physid),
                no("VCPUOP_register_vcpu_time_memory_area", VIREO_VCPUOP_register_vcpu_time_memory_area),
            ])
        case .schedOp:
            Entry(hypercall: call, support: .supported("scheduling and shutdown"), subOps: [
                yes("SCHEDOP_yield", VIREO_SCHEDOP_yield),
                yes("SCHEDOP_block", VIREO_SCHEDOP_block, "sleeps until an event is pending for the vCPU"),
                yes("SCHEDOP_shutdown", VIREO_SCHEDOP_shutdown, "poweroff, reboot, suspend, crash, watchdog, soft_reset"),
                yes("SCHEDOP_poll", VIREO_SCHEDOP_poll, "waits on up to 128 local ports with a timeout"),
                no("SCHEDOP_remote_shutdown", VIREO_SCHEDOP_remote_shutdown, "privileged"),
                no("SCHEDOP_shutdown_code", VIREO_SCHEDOP_shutdown_code),
                no("SCHEDOP_watchdog", VIREO_SCHEDOP_watchdog),
                no("SCHEDOP_pin_override", VIREO_SCHEDOP_pin_override, "privileged"),
            ])
        case .eventChannelOp:
            Entry(hypercall: call, support: .supported("2-level event channels"), subOps: [
                yes("EVTCHNOP_bind_interdomain", VIREO_EVTCHNOP_bind_interdomain),
                yes("EVTCHNOP_bind_virq", VIREO_EVTCHNOP_bind_virq, "VIRQ_TIMER, VIRQ_DEBUG, VIRQ_CONSOLE"),
                no("EVTCHNOP_bind_pirq", VIREO_EVTCHNOP_bind_pirq, "no physical interrupts"),
                yes("EVTCHNOP_close", VIREO_EVTCHNOP_close),
                yes("EVTCHNOP_send", VIREO_EVTCHNOP_send),
                yes("EVTCHNOP_status", VIREO_EVTCHNOP_status),
                yes("EVTCHNOP_alloc_unbound", VIREO_EVTCHNOP_alloc_unbound, "up to the domain's port limit"),
                yes("EVTCHNOP_bind_ipi", VIREO_EVTCHNOP_bind_ipi),
                yes("EVTCHNOP_bind_vcpu", VIREO_EVTCHNOP_bind_vcpu),
                yes("EVTCHNOP_unmask", VIREO_EVTCHNOP_unmask),
                no("EVTCHNOP_reset", VIREO_EVTCHNOP_reset),
                no("EVTCHNOP_init_control", VIREO_EVTCHNOP_init_control, "FIFO ABI: 2-level only"),
                no("EVTCHNOP_expand_array", VIREO_EVTCHNOP_expand_array, "FIFO ABI: 2-level only"),
                no("EVTCHNOP_set_priority", VIREO_EVTCHNOP_set_priority, "FIFO ABI: 2-level only"),
            ])
        case .hvmOp:
            Entry(hypercall: call, support: .supported("HVM parameters"), subOps: [
                yes("HVMOP_set_param", VIREO_HVMOP_set_param, "CALLBACK_IRQ (vector type) for the domain itself"),
                yes("HVMOP_get_param", VIREO_HVMOP_get_param, "STORE_PFN/EVTCHN, CONSOLE_PFN/EVTCHN, CALLBACK_IRQ"),
                no("HVMOP_flush_tlbs", VIREO_HVMOP_flush_tlbs),
                no("HVMOP_pagetable_dying", VIREO_HVMOP_pagetable_dying),
                no("HVMOP_get_time", VIREO_HVMOP_get_time, "use the pvclock in vcpu_info"),
                no("HVMOP_xentrace", VIREO_HVMOP_xentrace),
                no("HVMOP_get_mem_type", VIREO_HVMOP_get_mem_type),
                no("HVMOP_set_evtchn_upcall_vector", VIREO_HVMOP_set_evtchn_upcall_vector, "use HVM_PARAM_CALLBACK_IRQ"),
                no("HVMOP_guest_request_vm_event", VIREO_HVMOP_guest_request_vm_event),
                no("HVMOP_altp2m", VIREO_HVMOP_altp2m),
            ])
        case .setTrapTable, .mmuUpdate, .setGdt, .stackSwitch, .setCallbacks, .fpuTaskswitch,
             .updateDescriptor, .updateVaMapping, .updateVaMappingOtherdomain, .iret,
             .setSegmentBase, .mmuextOp, .callbackOp:
            Entry(hypercall: call, support: .unsupported("PV-MMU guests only"), subOps: [])
        case .platformOp, .sysctl, .domctl:
            Entry(hypercall: call, support: .unsupported("Xen's toolstack ABI: Vireo's toolstack talks to vireod"), subOps: [])
        case .schedOpCompat, .eventChannelOpCompat, .physdevOpCompat:
            Entry(hypercall: call, support: .unsupported("obsolete compat number; use the current one"), subOps: [])
        default:
            Entry(hypercall: call, support: .unsupported("not part of Vireo's subset"), subOps: [])
        }
    }
}
