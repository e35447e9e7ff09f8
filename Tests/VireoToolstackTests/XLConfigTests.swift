import Testing
@testable import VireoToolstack

@Suite struct XLConfigTests {
    static let example = """
        # A Vireo domain, in xl.cfg(5) syntax.
        name = "web-1"
        type = "pvh"
        kernel = "/guests/netecho.elf"
        memory = 64
        vcpus = 0x2
        extra = "ip=10.0.0.2"
        root = '/dev/xvda'
        disk = [ 'format=raw, vdev=xvda, access=rw, target=/images/web.img',
                 "/images/data.img,raw,xvdb,ro",   # positional
                 'file:/images/old.img,xvdc,w', ]
        vif = [ 'mac=00:16:3E:01:02:03, bridge=br0, vifname=vif-web', 'switch=lan' ]
        on_crash = "preserve"; on_reboot = "destroy"
        engine = "soft"
        """

    @Test func readsAnXLConfigurationLikeXl() throws {
        let (spec, warnings) = try DomainSpec.parse(Self.example, file: "web.cfg")
        #expect(warnings.isEmpty, "\(warnings)")
        #expect(spec.name == "web-1" && spec.kernel == "/guests/netecho.elf")
        #expect(spec.memoryMiB == 64 && spec.vcpus == 2)
        #expect(spec.cmdline == "root=/dev/xvda ip=10.0.0.2", "root and extra combine as xl does")
        #expect(spec.disks == [
            .init(target: "/images/web.img", vdev: "xvda", device: 51712, readOnly: false),
            .init(target: "/images/data.img", vdev: "xvdb", device: 51728, readOnly: true),
            .init(target: "/images/old.img", vdev: "xvdc", device: 51744, readOnly: false),
        ])
        #expect(spec.vifs == [.init(mac: "00:16:3e:01:02:03", bridge: "br0", vifname: "vif-web"), .init(switchName: "lan")])
        #expect(spec.onPoweroff == .destroy && spec.onReboot == .destroy && spec.onCrash == .preserve)
        #expect(spec.engine == .soft)
    }

    @Test func defaultsAreXls() throws {
        let (spec, _) = try DomainSpec.parse("name = \"a\"\nkernel = \"k.elf\"\n", file: "a.cfg")
        #expect(spec == DomainSpec(name: "a", memoryMiB: 128, vcpus: 1, kernel: "k.elf", cmdline: "", onPoweroff: .destroy,
                                   onReboot: .restart, onCrash: .destroy, engine: .auto))
    }

    @Test func cpuWeightAndCapAreXlsCreditSchedulerKeys() throws {
        let (spec, warnings) = try DomainSpec.parse("name='n'\nkernel='k'\ncpu_weight = 512\ncap = 50\n", file: "s.cfg")
        #expect(warnings.isEmpty, "\(warnings)")
        #expect(spec.cpuWeight == 512 && spec.cap == 50)
        let (plain, _) = try DomainSpec.parse("name='n'\nkernel='k'\n", file: "s.cfg")
        #expect(plain.cpuWeight == nil && plain.cap == nil, "absent: the scheduler's defaults")
        let cases: [(String, String)] = [
            ("cpu_weight = 0", "s.cfg:3:14: 'cpu_weight' is 0 weight units; give 1 to 65535"),
            ("cpu_weight = 65536", "s.cfg:3:14: 'cpu_weight' is 65536 weight units; give 1 to 65535"),
            ("cap = 12801", "s.cfg:3:7: 'cap' is 12801 percent of one CPU; give 0 to 12800"),
            ("cap = 'half'", "s.cfg:3:7: 'cap' must be a number of percent of one CPU, not 'half'"),
        ]
        for (line, message) in cases {
            #expect(throws: ConfigError.self) { try DomainSpec.parse("name='n'\nkernel='k'\n\(line)\n", file: "s.cfg") }
            do {
                _ = try DomainSpec.parse("name='n'\nkernel='k'\n\(line)\n", file: "s.cfg")
            } catch {
                #expect("\(error)" == message)
            }
        }
    }

    @Test func stringsListsAndAppending() throws {
        let settings = try XLConfigParser.parse("a = \"x\\ty\\x41\\101\\\"\" ; b = [ ]\nc = [1, 'two',\n [3]]\nc += [4]\n", file: "f")
        #expect(settings.map(\.key) == ["a", "b", "c", "c"])
        guard case .string(let a, _) = settings[0].value else { Issue.record("a is not a string"); return }
        #expect(a == "x\tyAA\"")
        #expect(settings[3].appends)
        let (spec, _) = try DomainSpec.parse("name='n'\nkernel='k'\ncmdline = 'a'\ncmdline += ' b'\ndisk = ['/i,xvda']\ndisk += ['/j,xvdb,r']",
                                             file: "f")
        #expect(spec.cmdline == "a b" && spec.disks.map(\.vdev) == ["xvda", "xvdb"] && spec.disks[1].readOnly)
    }

    @Test func unknownAndIgnoredKeysAreWarnedAboutWithTheirPlace() throws {
        let (_, warnings) = try DomainSpec.parse("name='n'\nkernel='k'\n  colour = 'blue'\nmaxmem = 512\ncmdline='c'\nextra='e'", file: "w.cfg")
        #expect(warnings.map(\.description) == [
            "w.cfg:3:3: warning: 'colour' is not a key Vireo knows; ignored",
            "w.cfg:4:1: warning: 'maxmem' has no effect under Vireo and is ignored",
            "w.cfg:5:9: warning: 'cmdline' is given, so 'extra' is ignored (as xl does)",
        ])
    }

    /// Every error names the file, the line and the column of what is wrong.
    @Test(arguments: [
        ("name = \"n\nkernel='k'", "e.cfg:1:8: the string is not closed on its line"),
        ("name = 'n'\nkernel 'k'", "e.cfg:2:8: expected '=' after 'kernel', found '''"),
        ("name = 'n'\nkernel = k", "e.cfg:2:10: expected a value for 'kernel' (a quoted string, a number or a [list]), found 'k'"),
        ("name = 'n'\n\nkernel = 'k'\nmemory = 'lots'", "e.cfg:4:10: 'memory' must be a number of MiB, not 'lots'"),
        ("name = 'n'\nkernel = 'k'\nvcpus = 0", "e.cfg:3:9: 'vcpus' is 0 vCPUs; give 1 to 128"),
        ("name = 'n'\nkernel = 'k'\ndisk = [ '/i,xvda',\n  '/i,qcow2,xvdb,rw' ]", "e.cfg:4:3: disk '/i,qcow2,xvdb,rw': format 'qcow2' is not supported (Vireo serves raw images)"),
        ("name = 'n'\nkernel = 'k'\ndisk = [ '/i,hda9,w' ]", "e.cfg:3:10: disk '/i,hda9,w': vdev 'hda9' is not a Xen disk name (xvda, xvdb, ... or a number)"),
        ("name = 'n'\nkernel = 'k'\ndisk = [ '/a,xvda', '/b,xvda' ]", "e.cfg:3:21: disk '/b,xvda' is the same device as disk '/a,xvda'"),
        ("name = 'n'\nkernel = 'k'\nvif = [ 'mac=01:00:5e:00:00:01' ]", "e.cfg:3:9: vif 'mac=01:00:5e:00:00:01': mac '01:00:5e:00:00:01' is a multicast address"),
        ("name = 'n'\nkernel = 'k'\nvif = [ 'colour=red' ]", "e.cfg:3:9: vif 'colour=red': unknown parameter 'colour'"),
        ("name = 'n'\nkernel = 'k'\non_crash = 'explode'", "e.cfg:3:12: 'on_crash' is 'explode'; give one of destroy, restart, preserve, rename-restart, coredump-destroy, coredump-restart, soft-reset"),
        ("name = 'n'\nkernel = 'k'\nengine = 'tcg'", "e.cfg:3:10: 'engine' is 'tcg'; give kvm, soft or auto"),
        ("name = 'n'\nkernel = 'k'\ntype = 'hvm'", "e.cfg:3:8: 'type' is 'hvm'; Vireo runs PVH guests only (type = \"pvh\")"),
        ("name = 'n'\nkernel = 'k'\nramdisk = 'initrd'", "e.cfg:3:1: 'ramdisk' is not supported: Vireo boots PVH kernels without an initial ramdisk"),
        ("name = 'a b'\nkernel = 'k'", "e.cfg:1:8: 'name' must be 1 to 64 letters, digits, '_', '-' or '.', not 'a b'"),
        ("kernel = 'k'\n", "e.cfg:2:1: the configuration has no 'name'"),
        ("name = 'n'\nkernel = 'k'\ndisk = [ '/i,xvda'", "e.cfg:3:8: the list of 'disk' is not closed with ']'"),
        ("name = 'n' 'm'", "e.cfg:1:12: expected the end of the 'name' setting, found '''"),
        ("name = 'n'\nkernel = 'k'\nvcpus = 12ab", "e.cfg:3:9: '12ab' is not a number (decimal or 0x hex)"),
        ("name = 'n'\nkernel = 'k'\ncmdline = 'a'\ncmdline += [1]", "e.cfg:4:1: 'cmdline +=' needs the same kind as before (a string), not a list"),
        ("= 3", "e.cfg:1:1: expected a setting name, found '='"),
    ])
    func errorsNameTheFileLineAndColumn(text: String, message: String) {
        #expect(throws: ConfigError.self) { _ = try DomainSpec.parse(text, file: "e.cfg") }
        do {
            _ = try DomainSpec.parse(text, file: "e.cfg")
        } catch {
            #expect(error.description == message)
        }
    }

    @Test func xenDiskNumbers() {
        #expect(DomainSpec.Disk.deviceNumber("xvda") == 51712)
        #expect(DomainSpec.Disk.deviceNumber("xvdp") == 51952)
        #expect(DomainSpec.Disk.deviceNumber("xvdq") == 1 << 28 | 16 << 8, "the extended form from the 17th disk")
        #expect(DomainSpec.Disk.deviceNumber("xvdaa") == 1 << 28 | 26 << 8)
        #expect(DomainSpec.Disk.deviceNumber("51712") == 51712)
        #expect(DomainSpec.Disk.deviceNumber("sda") == nil && DomainSpec.Disk.deviceNumber("xvd") == nil)
    }
}
