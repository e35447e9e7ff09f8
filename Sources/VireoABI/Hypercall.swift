import VireoHypercalls

/// A hypercall number: Xen's full numbering (`__HYPERVISOR_*`), so a guest's number is never
/// misread. ``HypercallTable`` says which ones Vireo implements and how.
public enum Hypercall: UInt64, CaseIterable, Sendable, CustomStringConvertible {
    case setTrapTable = 0
    case mmuUpdate = 1
    case setGdt = 2
    case stackSwitch = 3
    case setCallbacks = 4
    case fpuTaskswitch = 5
    case schedOpCompat = 6
    case platformOp = 7
    case setDebugreg = 8
    case getDebugreg = 9
    case updateDescriptor = 10
    case memoryOp = 12
    case multicall = 13
    case updateVaMapping = 14
    case setTimerOp = 15
    case eventChannelOpCompat = 16
    case xenVersion = 17
    case consoleIo = 18
    case physdevOpCompat = 19
    case grantTableOp = 20
    case vmAssist = 21
    case updateVaMappingOtherdomain = 22
    case iret = 23
    case vcpuOp = 24
    case setSegmentBase = 25
    case mmuextOp = 26
    case xsmOp = 27
    case nmiOp = 28
    case schedOp = 29
    case callbackOp = 30
    case xenoprofOp = 31
    case eventChannelOp = 32
    case physdevOp = 33
    case hvmOp = 34
    case sysctl = 35
    case domctl = 36
    case kexecOp = 37
    case tmemOp = 38
    case argoOp = 39
    case xenpmuOp = 40
    case dmOp = 41
    case hypfsOp = 42
    case arch0 = 48
    case arch1 = 49
    case arch2 = 50
    case arch3 = 51
    case arch4 = 52
    case arch5 = 53
    case arch6 = 54
    case arch7 = 55

    /// Xen's name for the hypercall, as `__HYPERVISOR_<name>` spells it.
    public var xenName: String {
        switch self {
        case .setTrapTable: "set_trap_table"
        case .mmuUpdate: "mmu_update"
        case .setGdt: "set_gdt"
        case .stackSwitch: "stack_switch"
        case .setCallbacks: "set_callbacks"
        case .fpuTaskswitch: "fpu_taskswitch"
        case .schedOpCompat: "sched_op_compat"
        case .platformOp: "platform_op"
        case .setDebugreg: "set_debugreg"
        case .getDebugreg: "get_debugreg"
        case .updateDescriptor: "update_descriptor"
        case .memoryOp: "memory_op"
        case .multicall: "multicall"
        case .updateVaMapping: "update_va_mapping"
        case .setTimerOp: "set_timer_op"
        case .eventChannelOpCompat: "event_channel_op_compat"
        case .xenVersion: "xen_version"
        case .consoleIo: "console_io"
        case .physdevOpCompat: "physdev_op_compat"
        case .grantTableOp: "grant_table_op"
        case .vmAssist: "vm_assist"
        case .updateVaMappingOtherdomain: "update_va_mapping_otherdomain"
        case .iret: "iret"
        case .vcpuOp: "vcpu_op"
        case .setSegmentBase: "set_segment_base"
        case .mmuextOp: "mmuext_op"
        case .xsmOp: "xsm_op"
        case .nmiOp: "nmi_op"
        case .schedOp: "sched_op"
        case .callbackOp: "callback_op"
        case .xenoprofOp: "xenoprof_op"
        case .eventChannelOp: "event_channel_op"
        case .physdevOp: "physdev_op"
        case .hvmOp: "hvm_op"
        case .sysctl: "sysctl"
        case .domctl: "domctl"
        case .kexecOp: "kexec_op"
        case .tmemOp: "tmem_op"
        case .argoOp: "argo_op"
        case .xenpmuOp: "xenpmu_op"
        case .dmOp: "dm_op"
        case .hypfsOp: "hypfs_op"
        case .arch0: "arch_0"
        case .arch1: "arch_1"
        case .arch2: "arch_2"
        case .arch3: "arch_3"
        case .arch4: "arch_4"
        case .arch5: "arch_5"
        case .arch6: "arch_6"
        case .arch7: "arch_7"
        }
    }

    /// The number as the C header states it, to check the two agree.
    var headerValue: Int32 {
        switch self {
        case .setTrapTable: VIREO_HYPERVISOR_set_trap_table
        case .mmuUpdate: VIREO_HYPERVISOR_mmu_update
        case .setGdt: VIREO_HYPERVISOR_set_gdt
        case .stackSwitch: VIREO_HYPERVISOR_stack_switch
        case .setCallbacks: VIREO_HYPERVISOR_set_callbacks
        case .fpuTaskswitch: VIREO_HYPERVISOR_fpu_taskswitch
        case .schedOpCompat: VIREO_HYPERVISOR_sched_op_compat
        case .platformOp: VIREO_HYPERVISOR_platform_op
        case .setDebugreg: VIREO_HYPERVISOR_set_debugreg
        case .getDebugreg: VIREO_HYPERVISOR_get_debugreg
        case .updateDescriptor: VIREO_HYPERVISOR_update_descriptor
        case .memoryOp: VIREO_HYPERVISOR_memory_op
        case .multicall: VIREO_HYPERVISOR_multicall
        case .updateVaMapping: VIREO_HYPERVISOR_update_va_mapping
        case .setTimerOp: VIREO_HYPERVISOR_set_timer_op
        case .eventChannelOpCompat: VIREO_HYPERVISOR_event_channel_op_compat
        case .xenVersion: VIREO_HYPERVISOR_xen_version
        case .consoleIo: VIREO_HYPERVISOR_console_io
        case .physdevOpCompat: VIREO_HYPERVISOR_physdev_op_compat
        case .grantTableOp: VIREO_HYPERVISOR_grant_table_op
        case .vmAssist: VIREO_HYPERVISOR_vm_assist
        case .updateVaMappingOtherdomain: VIREO_HYPERVISOR_update_va_mapping_otherdomain
        case .iret: VIREO_HYPERVISOR_iret
        case .vcpuOp: VIREO_HYPERVISOR_vcpu_op
        case .setSegmentBase: VIREO_HYPERVISOR_set_segment_base
        case .mmuextOp: VIREO_HYPERVISOR_mmuext_op
        case .xsmOp: VIREO_HYPERVISOR_xsm_op
        case .nmiOp: VIREO_HYPERVISOR_nmi_op
        case .schedOp: VIREO_HYPERVISOR_sched_op
        case .callbackOp: VIREO_HYPERVISOR_callback_op
        case .xenoprofOp: VIREO_HYPERVISOR_xenoprof_op
        case .eventChannelOp: VIREO_HYPERVISOR_event_channel_op
        case .physdevOp: VIREO_HYPERVISOR_physdev_op
        case .hvmOp: VIREO_HYPERVISOR_hvm_op
        case .sysctl: VIREO_HYPERVISOR_sysctl
        case .domctl: VIREO_HYPERVISOR_domctl
        case .kexecOp: VIREO_HYPERVISOR_kexec_op
        case .tmemOp: VIREO_HYPERVISOR_tmem_op
        case .argoOp: VIREO_HYPERVISOR_argo_op
        case .xenpmuOp: VIREO_HYPERVISOR_xenpmu_op
        case .dmOp: VIREO_HYPERVISOR_dm_op
        case .hypfsOp: VIREO_HYPERVISOR_hypfs_op
        case .arch0: VIREO_HYPERVISOR_arch_0
        case .arch1: VIREO_HYPERVISOR_arch_1
        case .arch2: VIREO_HYPERVISOR_arch_2
        case .arch3: VIREO_HYPERVISOR_arch_3
        case .arch4: VIREO_HYPERVISOR_arch_4
        case .arch5: VIREO_HYPERVISOR_arch_5
        case .arch6: VIREO_HYPERVISOR_arch_6
        case .arch7: VIREO_HYPERVISOR_arch_7
        }
    }

    public var description: String { xenName }
}
