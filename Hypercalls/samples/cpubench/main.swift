// cpubench: an integer compute loop for CPU speed (no Float/Double: kvm_pvm hosts cannot run
// x87 or SSE). `--cmdline N` sets the iterations (default 100000); it prints the checksum,
// so the loop cannot be optimized away, and powers off.
import VireoGuestRuntime

var iterations: UInt64 = 100_000
let commandLine = Array(String(cString: vireo_guest_cmdline()).utf8)
var parsed: UInt64 = 0
var digits = 0
for byte in commandLine where byte >= 48 && byte <= 57 {
    parsed = parsed &* 10 &+ UInt64(byte - 48)
    digits += 1
}
if digits > 0 { iterations = parsed }

// xorshift64 mixed with a multiply-accumulate: data-dependent, branch-light integer work.
var state: UInt64 = 0x9E37_79B9_7F4A_7C15
var sum: UInt64 = 0
var i: UInt64 = 0
while i < iterations {
    state ^= state << 13
    state ^= state >> 7
    state ^= state << 17
    sum = sum &* 31 &+ (state >> 11)
    i += 1
}
print("cpubench: \(iterations) iterations, checksum \(sum)")
