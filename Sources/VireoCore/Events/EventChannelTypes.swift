import Synchronization
import VireoABI
import VireoHypercalls

/// A virtual IRQ: an event source the host raises itself (`VIREO_VIRQ_*`).
///
/// Per-vCPU VIRQs (timer, debug, xenoprof, xenpmu) are bound separately on each vCPU and stay
/// there; every other VIRQ is global: bound once per domain, on vCPU 0, and movable with
/// `EVTCHNOP_bind_vcpu` (Xen's rule; on x86 the architecture VIRQs are global too).
public struct VirtualIRQ: RawRepresentable, Hashable, Sendable, CustomStringConvertible {
    public var rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public init(_ rawValue: UInt32) { self.rawValue = rawValue }

    public static let timer = VirtualIRQ(UInt32(VIREO_VIRQ_TIMER))
    public static let debug = VirtualIRQ(UInt32(VIREO_VIRQ_DEBUG))
    public static let console = VirtualIRQ(UInt32(VIREO_VIRQ_CONSOLE))
    public static let domainException = VirtualIRQ(UInt32(VIREO_VIRQ_DOM_EXC))
    public static let traceBuffer = VirtualIRQ(UInt32(VIREO_VIRQ_TBUF))
    public static let debugger = VirtualIRQ(UInt32(VIREO_VIRQ_DEBUGGER))
    public static let xenoprof = VirtualIRQ(UInt32(VIREO_VIRQ_XENOPROF))
    public static let consoleRing = VirtualIRQ(UInt32(VIREO_VIRQ_CON_RING))
    public static let pcpuState = VirtualIRQ(UInt32(VIREO_VIRQ_PCPU_STATE))
    public static let memoryEvent = VirtualIRQ(UInt32(VIREO_VIRQ_MEM_EVENT))
    public static let argo = VirtualIRQ(UInt32(VIREO_VIRQ_ARGO))
    public static let lowMemory = VirtualIRQ(UInt32(VIREO_VIRQ_ENOMEM))
    public static let xenpmu = VirtualIRQ(UInt32(VIREO_VIRQ_XENPMU))

    /// VIRQ numbers are below this (`VIREO_NR_VIRQS`).
    public static let count = Int(VIREO_NR_VIRQS)

    /// Whether the number names a VIRQ slot at all (unassigned numbers below the count are
    /// accepted, as Xen accepts them: nothing ever raises them).
    public var isValid: Bool { rawValue < UInt32(Self.count) }

    /// Whether the VIRQ is bound per vCPU rather than once per domain.
    public var isPerVcpu: Bool {
        self == .timer || self == .debug || self == .xenoprof || self == .xenpmu
    }

    public var description: String { "VIRQ \(rawValue)" }
}

/// What `EVTCHNOP_status` reports for a port: Xen's `evtchn_status` as a Swift value.
public struct EventChannelStatus: Hashable, Sendable, CustomStringConvertible {
    /// What the port is bound to.
    public enum Binding: Hashable, Sendable {
        /// Free (and port 0, which is reserved and never handed out).
        case closed
        /// Allocated, waiting for `remote` to bind to it.
        case unbound(remote: DomainID)
        /// Connected to `port` of `remote`.
        case interdomain(remote: DomainID, port: EventPort)
        /// Rung by the host when the VIRQ fires.
        case virq(VirtualIRQ)
        /// An IPI port of the domain.
        case ipi
    }

    public var binding: Binding
    /// The vCPU the port notifies.
    public var vcpu: UInt32

    public init(binding: Binding, vcpu: UInt32) {
        self.binding = binding
        self.vcpu = vcpu
    }

    /// `VIREO_EVTCHNSTAT_*` for the binding.
    public var status: UInt32 {
        switch binding {
        case .closed: UInt32(VIREO_EVTCHNSTAT_closed)
        case .unbound: UInt32(VIREO_EVTCHNSTAT_unbound)
        case .interdomain: UInt32(VIREO_EVTCHNSTAT_interdomain)
        case .virq: UInt32(VIREO_EVTCHNSTAT_virq)
        case .ipi: UInt32(VIREO_EVTCHNSTAT_ipi)
        }
    }

    /// The ABI record to copy back to the guest: the IN fields echoed, the OUT fields filled,
    /// every other byte (the unused part of the union included) zero, so nothing of the host's
    /// leaks into guest memory (SECURITY.md item 3).
    public func record(dom: DomainID, port: EventPort) -> vireo_evtchn_status {
        var record = vireo_evtchn_status()
        record.dom = dom.rawValue
        record.port = port.rawValue
        record.status = status
        record.vcpu = vcpu
        switch binding {
        case .closed, .ipi:
            break
        case .unbound(let remote):
            record.u.unbound.dom = remote.rawValue
        case .interdomain(let remote, let remotePort):
            record.u.interdomain.dom = remote.rawValue
            record.u.interdomain.port = remotePort.rawValue
        case .virq(let virq):
            record.u.virq = virq.rawValue
        }
        return record
    }

    public var description: String {
        let what = switch binding {
        case .closed: "closed"
        case .unbound(let remote): "unbound for \(remote)"
        case .interdomain(let remote, let port): "interdomain to \(remote) \(port)"
        case .virq(let virq): "bound to \(virq)"
        case .ipi: "IPI"
        }
        return "\(what), vCPU \(vcpu)"
    }
}

/// One domain's event-channel traffic (EVTCHNOP_send and the host's sends alike), counted with
/// relaxed atomics on the send path: `sent` counts sends the domain made that succeeded
/// (on any port kind, an unbound one included), `received` the sends that marked one of its
/// ports pending (from a peer, or its own IPI or loopback).
public final class EventCounters: Sendable {
    public let sent = Atomic<Int>(0)
    public let received = Atomic<Int>(0)
    public init() {}
}
