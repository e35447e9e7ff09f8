// A guest whose Swift code traps (an array index out of range): the runtime's exception
// table must report the fault and shut the domain down as a crash, not triple-fault.
import VireoGuestRuntime

print("about to index out of range")
let values = [1, 2, 3]
// From the command line's length, so the compiler cannot see the index.
let index = values.count + Int(strlen(vireo_guest_cmdline()))
print("unreachable: \(values[index])")
