import Foundation
import Synchronization
import Testing
import VireoABI
import VireoCore
import VireoHypercalls
import VireoKVM

@Suite(requiresKVM) struct KVMSystemTests {
    @Test func opensWithStableAPIAndRequiredCapabilities() throws {
        let kvm = try KVMSystem()
        #expect(try kvm.apiVersion() == 12)
        for cap in KVMCapability.required {
            let present = kvm.has(cap)
            #expect(present, "\(cap) is required")
        }
        try kvm.requireCapabilities()
        #expect(try kvm.vcpuMmapSize() >= 4096)
        let unknown = kvm.has(KVMCapability(rawValue: 100_000))
        #expect(!unknown, "an unknown capability is absent")
    }

    @Test func supportedCPUIDHasLongMode() throws {
        let cpuid = try KVMSystem().supportedCPUID()
        #expect(cpuid.contains { $0.function == 0 })
        let extended = try #require(cpuid.first { $0.function == 0x8000_0001 })
        #expect(extended.edx & (1 << 29) != 0, "long mode (CPUID.80000001:EDX.LM)")
    }

    @Test func guestCPUIDReplacesKVMLeavesWithXens() throws {
        let supported = try KVMSystem().supportedCPUID()
        let guest = XenCPUID.guestCPUID(supported: supported, vcpu: 3, domain: DomainID(7))
        let hypervisorLeaves = guest.filter { $0.function >= 0x4000_0000 && $0.function <= 0x4FFF_FFFF }
        #expect(hypervisorLeaves == XenCPUID.leaves(vcpu: 3, domain: DomainID(7)))
        let leaf1 = try #require(guest.first { $0.function == 1 })
        #expect(leaf1.ecx & XenCPUID.hypervisorPresentBit != 0)
        #expect(leaf1.ebx >> 24 == 3)
        #expect(XenCPUID.version == 0x0004_000E, "Xen 4.14, the interface version of Vireo's headers")
    }

    @Test func missingDeviceIsAReasonNotACrash() {
        let reason = KVMSystem.unavailableReason(path: "/nonexistent/kvm")
        #expect(reason?.contains("does not exist") == true)
        #expect(throws: KVMError.self) { _ = try KVMSystem(path: "/nonexistent/kvm") }
    }
}

@Suite(requiresKVM) struct KVMVirtualMachineTests {
    /// Guest stores reach the GuestMemory the VM was made from: slot 0 is its mapping.
    @Test func ramSlotIsTheGuestMemory() throws {
        let code = X86.movEAX(0xC0FF_EE01) + X86.storeEAX(0x2000) + X86.hlt
        try withGuest(code: code) { memory, _, vcpu throws in
            try memory.store(UInt32(0), at: GuestPhysicalAddress(0x2000))
            #expect(try nextExit(vcpu) == .halt)
            #expect(try memory.load(UInt32.self, at: GuestPhysicalAddress(0x2000)) == 0xC0FF_EE01)
        }
    }

    /// A special frame mapped above RAM as its own slot: the guest writes, the host reads it
    /// through the GuestMemory's special pool.
    @Test func specialFrameSlotAboveRAM() throws {
        let frameAddress: UInt32 = 0x10_0000  // 1 MiB, above the 64 KiB of RAM
        let code = X86.movEAX(0x5EC1_A100) + X86.storeEAX(frameAddress + 8) + X86.hlt
        try withGuest(code: code, specialFrames: 2) { memory, vm, vcpu throws in
            try vm.mapSpecialFrame(1, at: GuestFrame(UInt64(frameAddress) / 4096), slot: 1)
            #expect(try nextExit(vcpu) == .halt)
            #expect(try memory.specialRegion(1).load(UInt32.self, at: 8) == 0x5EC1_A100)
            try vm.removeMemoryRegion(slot: 1)
        }
    }

    /// Failures name the ioctl and carry errno: KVM refuses a slot overlapping RAM.
    @Test func errorsNameTheIoctl() throws {
        try withGuest(code: X86.hlt) { memory, vm, _ throws in
            #expect(throws: KVMError.ioctl(name: "KVM_SET_USER_MEMORY_REGION", errno: EEXIST)) {
                try vm.setMemoryRegion(slot: 2, guestPhysical: GuestPhysicalAddress(0x1000), size: 4096,
                                       host: memory.hostBase)
            }
            #expect(throws: KVMError.self) { try vm.mapSpecialFrame(0, at: GuestFrame(1), slot: 3) }
        }
    }

    @Test func traceSeesEveryIoctl() throws {
        let seen = Mutex<[String]>([])
        KVMTrace.install { event in seen.withLock { $0.append(event.request.name) } }
        defer { KVMTrace.install(nil) }
        try withGuest(code: X86.hlt) { _, _, vcpu in _ = try nextExit(vcpu) }
        let names = seen.withLock { $0 }
        for name in ["KVM_CREATE_VM", "KVM_SET_USER_MEMORY_REGION", "KVM_X86_SET_MSR_FILTER", "KVM_CREATE_VCPU",
                     "KVM_SET_CPUID2", "KVM_SET_SREGS", "KVM_RUN"] {
            #expect(names.contains(name), "\(name) was traced")
        }
    }
}

@Suite(requiresKVM) struct KVMRunTests {
    @Test func pvhEntryState() throws {
        try withGuest(code: X86.hlt) { _, _, vcpu throws in
            let s = try vcpu.specialRegisters()
            #expect(s.cr0 == 0x11, "CR0 = PE | ET")
            #expect(s.cr3 == 0 && s.cr4 == 0 && s.efer == 0)
            #expect(s.cs.base == 0 && s.cs.limit == 0xFFFF_FFFF && s.cs.defaultSize32 && s.cs.type == 0xB)
            for seg in [s.ds, s.es, s.ss] {
                #expect(seg.base == 0 && seg.limit == 0xFFFF_FFFF && seg.defaultSize32 && seg.type == 0x3)
            }
            #expect(s.tr.present && s.tr.limit == 0x67 && s.tr.type == 0xB)
            let r = vcpu.registers
            #expect(r.rip == UInt64(codeAddress))
            #expect(r.rbx == startInfoAddress.rawValue)
            #expect(r.rflags == 0x2)
            // Registers written through the run area reach KVM at the next entry.
            #expect(try nextExit(vcpu) == .halt)
            #expect(try vcpu.registersByIoctl() == vcpu.registers, "the run area and KVM_GET_REGS agree")
        }
    }

    /// mov $0x1234, %eax; out %eax, $0x80; hlt
    @Test func outThenHalt() throws {
        let code = X86.movEAX(0x1234) + X86.outEAX(0x80) + X86.hlt
        try withGuest(code: code) { _, _, vcpu throws in
            #expect(try nextExit(vcpu) == .port(KVMPortAccess(direction: .output, port: 0x80, size: 4, value: 0x1234)))
            #expect(try nextExit(vcpu) == .halt)
            let r = vcpu.registers  // through sync regs, no ioctl
            #expect(r.rax == 0x1234)
            #expect(r.rip == UInt64(codeAddress) + UInt64(code.count))
            #expect(r.rbx == startInfoAddress.rawValue)
        }
    }

    /// in $0x71, %eax answered by the host; then the value goes back out.
    @Test func inputIsAnswered() throws {
        let code = X86.inEAX(0x71) + X86.outEAX(0x72) + X86.hlt
        try withGuest(code: code) { _, _, vcpu throws in
            #expect(try nextExit(vcpu) == .port(KVMPortAccess(direction: .input, port: 0x71, size: 4)))
            vcpu.completeInput(0xA1B2_C3D4)
            #expect(try nextExit(vcpu) == .port(KVMPortAccess(direction: .output, port: 0x72, size: 4, value: 0xA1B2_C3D4)))
        }
    }

    /// Registers written through the run area are loaded at the next entry.
    @Test func registersWrittenThroughRunArea() throws {
        try withGuest(code: X86.outEAX(0x80) + X86.hlt) { _, _, vcpu throws in
            vcpu.registers.rax = 0x7777
            #expect(try nextExit(vcpu) == .port(KVMPortAccess(direction: .output, port: 0x80, size: 4, value: 0x7777)))
        }
    }

    /// wrmsr and rdmsr of Xen's hypercall-page MSR exit to Vireo; an ordinary MSR (SYSENTER_CS)
    /// is KVM's business and makes no exit.
    @Test func hypercallPageMSRExitsOthersDoNot() throws {
        let msr = VIREO_ABI_HYPERCALL_PAGE_MSR
        let code = X86.movECX(msr) + X86.movEAX(0x2000) + X86.movEDX(0x1) + X86.wrmsr
            + X86.rdmsr + X86.outEAX(0x80) + X86.movEAXfromEDX + X86.outEAX(0x81)
            + X86.movECX(0x174) + X86.movEAX(0x8) + X86.xorEDX + X86.wrmsr + X86.xorEAX + X86.rdmsr
            + X86.outEAX(0x82) + X86.hlt
        try withGuest(code: code) { _, _, vcpu throws in
            #expect(try nextExit(vcpu) == .writeMSR(index: msr, value: 0x1_0000_2000, reason: .filter))
            #expect(try nextExit(vcpu) == .readMSR(index: msr, reason: .filter))
            vcpu.completeMSRRead(0xDEAD_BEEF_0000_1234)
            #expect(try nextExit(vcpu) == .port(KVMPortAccess(direction: .output, port: 0x80, size: 4, value: 0x1234)))
            #expect(try nextExit(vcpu) == .port(KVMPortAccess(direction: .output, port: 0x81, size: 4, value: 0xDEAD_BEEF)))
            #expect(try nextExit(vcpu) == .port(KVMPortAccess(direction: .output, port: 0x82, size: 4, value: 0x8)))
            #expect(try nextExit(vcpu) == .halt)
        }
    }

    /// Refusing the MSR write injects #GP; with no IDT the guest triple-faults: shutdown.
    @Test func refusedMSRWriteFaults() throws {
        let code = X86.movECX(VIREO_ABI_HYPERCALL_PAGE_MSR) + X86.xorEAX + X86.xorEDX + X86.wrmsr + X86.hlt
        try withGuest(code: code) { _, _, vcpu throws in
            guard case .writeMSR = try nextExit(vcpu) else { Issue.record("no MSR exit"); return }
            vcpu.failMSRAccess()
            #expect(try nextExit(vcpu) == .shutdown)
        }
    }

    /// `cpuid` in the guest sees Xen's leaves.
    @Test func cpuidShowsXen() throws {
        try withGuest(code: X86.cpuid + X86.hlt, vcpuID: 0) { _, _, vcpu throws in
            func cpuid(_ leaf: UInt32) throws -> (UInt32, UInt32, UInt32, UInt32) {
                var r = vcpu.registers
                r.rip = UInt64(codeAddress)
                r.rax = UInt64(leaf)
                r.rcx = 0
                vcpu.registers = r
                #expect(try nextExit(vcpu) == .halt)
                let out = vcpu.registers
                return (UInt32(truncatingIfNeeded: out.rax), UInt32(truncatingIfNeeded: out.rbx),
                        UInt32(truncatingIfNeeded: out.rcx), UInt32(truncatingIfNeeded: out.rdx))
            }
            let (maxLeaf, b, c, d) = try cpuid(0x4000_0000)
            let signature = String(decoding: X86.le32(b) + X86.le32(c) + X86.le32(d), as: UTF8.self)
            #expect(signature == "XenVMMXenVMM")
            #expect(maxLeaf == 0x4000_0004)
            #expect(try cpuid(0x4000_0001).0 == 0x0004_000E)
            let hypercall = try cpuid(0x4000_0002)
            #expect(hypercall.0 == 1 && hypercall.1 == 0x4000_0000)
            let hvm = try cpuid(0x4000_0004)
            #expect(hvm.0 == UInt32(VIREO_XEN_HVM_CPUID_VCPU_ID_PRESENT | VIREO_XEN_HVM_CPUID_DOMID_PRESENT))
            #expect(hvm.1 == 0 && hvm.2 == 1, "vCPU 0 of domain 1")
            #expect(try cpuid(1).2 & XenCPUID.hypervisorPresentBit != 0)
        }
    }

    /// A 64-bit guest with an IDT does `sti; hlt`; Vireo injects vector 0xF3; the handler
    /// outputs a marker and IRETs (no EOI: callback-vector semantics); the guest carries on
    /// after its hlt. Long mode, because this host's KVM emulator cannot IRET in 32-bit
    /// protected mode (see `protectedModeIRETIsNotEmulatedHere`).
    @Test func injectedInterruptReachesHandler() throws {
        let handler: UInt64 = 0x1100, vector = 0xF3
        let code = X86.sti + X86.hlt + X86.movEAX(1) + X86.outEAX(0x84) + X86.hlt
        try withGuest(code: code) { memory, _, vcpu throws in
            try memory.write(X86.movEAX(0xF3) + X86.outEAX(0x83) + X86.iretq, at: GuestPhysicalAddress(handler))
            try enterLongMode(memory, vcpu, rip: UInt64(codeAddress), idt: [(UInt8(vector), handler)])

            #expect(try nextExit(vcpu) == .halt)
            // Xen's callback vector with no in-kernel irqchip: inject when KVM says the guest
            // can take it; otherwise ask for the window and inject when it opens.
            if !vcpu.readyForInterruptInjection {
                vcpu.requestInterruptWindow = true
                #expect(try nextExit(vcpu) == .interruptWindowOpen)
                vcpu.requestInterruptWindow = false
            }
            #expect(vcpu.readyForInterruptInjection && vcpu.interruptFlag)
            try vcpu.injectInterrupt(vector: UInt8(vector))
            #expect(try nextExit(vcpu) == .port(KVMPortAccess(direction: .output, port: 0x83, size: 4, value: 0xF3)))
            #expect(try nextExit(vcpu) == .port(KVMPortAccess(direction: .output, port: 0x84, size: 4, value: 1)))
            #expect(try nextExit(vcpu) == .halt)
            #expect(vcpu.registers.rsp == 0x8000, "IRETQ popped the whole frame")
        }
    }

    /// The interrupt window exit: with IF clear the guest cannot take the interrupt; after
    /// `sti`, KVM reports the window open.
    @Test func interruptWindowOpensAfterSti() throws {
        // hlt (IF clear); then sti; nop; out — the window opens after sti's shadow.
        let code = X86.hlt + X86.sti + [0x90] + X86.movEAX(2) + X86.outEAX(0x85) + X86.hlt
        try withGuest(code: code) { _, _, vcpu throws in
            #expect(try nextExit(vcpu) == .halt)
            #expect(!vcpu.readyForInterruptInjection, "IF is clear")
            vcpu.requestInterruptWindow = true
            let exit = try nextExit(vcpu)
            #expect(exit == .interruptWindowOpen || exit == .port(KVMPortAccess(direction: .output, port: 0x85, size: 4, value: 2)))
            #expect(vcpu.readyForInterruptInjection && vcpu.interruptFlag)
            print("interrupt window: first exit after sti with the window requested: \(exit)")
        }
    }

    /// A guest that enables interrupts and then spins without exiting: the requested window
    /// must still bring the vCPU back (or, failing that, a kick does). Records which.
    @Test func interruptWindowWhileSpinning() throws {
        try withGuest(code: X86.hlt + X86.sti + X86.spin) { _, _, vcpu throws in
            #expect(try nextExit(vcpu) == .halt)
            vcpu.requestInterruptWindow = true
            let done = DispatchSemaphore(value: 0)
            let exit = Mutex<KVMExit?>(nil)
            let runner = Thread {
                let e = try? vcpu.run()
                exit.withLock { $0 = e }
                done.signal()
            }
            runner.start()
            var kicked = false
            if done.wait(timeout: .now() + 0.5) == .timedOut {
                kicked = true
                vcpu.kick()
                #expect(done.wait(timeout: .now() + 5) == .success)
            }
            let e = exit.withLock { $0 }
            print("window while spinning: \(String(describing: e)), kicked: \(kicked), ready: \(vcpu.readyForInterruptInjection)")
            #expect(!kicked, "the window exit came without a kick")
            #expect(e == .interruptWindowOpen)
            #expect(vcpu.readyForInterruptInjection)
        }
    }

    /// A fact of this host (kvm_pvm): 32-bit protected-mode IRET ends in an emulation
    /// failure, so 32-bit guests cannot return from interrupts. Recorded, not required.
    @Test func protectedModeIRETIsNotEmulatedHere() throws {
        let gdt: UInt32 = 0x3000
        // push flags/cs/eip by hand and IRET to the next instruction.
        let code: [UInt8] = [0x9C, 0x6A, 0x08, 0x68] + X86.le32(codeAddress + 9) + X86.iret + X86.outEAX(0x86) + X86.hlt
        try withGuest(code: code) { memory, _, vcpu throws in
            try memory.write(X86.le64(0) + X86.le64(0x00CF_9A00_0000_FFFF) + X86.le64(0x00CF_9200_0000_FFFF),
                             at: GuestPhysicalAddress(UInt64(gdt)))
            var s = try vcpu.specialRegisters()
            s.gdt = X86DescriptorTable(base: UInt64(gdt), limit: 23)
            try vcpu.setSpecialRegisters(s)
            vcpu.registers.rsp = 0x8000
            let exit = try nextExit(vcpu)
            print("32-bit protected-mode IRET on this host: \(exit)")
            switch exit {
            case .port(let access): #expect(access.port == 0x86)
            case .internalError(let suberror, _): #expect(suberror == 1, "emulation failure")
            default: Issue.record("unexpected exit \(exit)")
            }
        }
    }

    /// A vCPU spinning in `jmp .` comes back from KVM_RUN when another thread kicks it.
    @Test func kickStopsASpinningVCPU() throws {
        try withGuest(code: X86.spin) { _, _, vcpu throws in
            let done = DispatchSemaphore(value: 0)
            let result = Mutex<(exit: KVMExit?, returnedAt: UInt64)>((nil, 0))
            let runner = Thread {
                let exit = try? vcpu.run()
                result.withLock { $0 = (exit, clockNanoseconds()) }
                done.signal()
            }
            runner.start()
            Thread.sleep(forTimeInterval: 0.1)  // let it enter the guest
            #expect(result.withLock { $0.exit } == nil, "the spinning guest has not exited by itself")
            let kickedAt = clockNanoseconds()
            vcpu.kick()
            #expect(done.wait(timeout: .now() + 5) == .success, "KVM_RUN returned after the kick")
            let (exit, returnedAt) = result.withLock { $0 }
            #expect(exit == .interrupted)
            let latency = Double(returnedAt &- kickedAt) / 1e6
            print("kick latency: \(latency) ms")
            #expect(latency < 1000)
        }
    }

    /// A kick while the vCPU is outside KVM_RUN is not lost: the next run returns at once, and
    /// the one after runs the guest normally.
    @Test func kickBeforeRunIsKept() throws {
        try withGuest(code: X86.hlt) { _, _, vcpu throws in
            vcpu.kick()
            #expect(try vcpu.run() == .interrupted)
            #expect(try vcpu.run() == .halt)
        }
    }
}

func clockNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
