import Testing
import VireoCore

/// The halt-polling window of Vireo's sleepers (dom0's dispatcher, vCPUs): it grows while
/// wake-ups come soon after a sleep starts, shrinks to nothing when they do not, and stays at
/// nothing on a one-CPU host. Waits are given as durations, so no test depends on timing.
@Suite struct WakeSpinTests {
    @Test func quickWakeUpsGrowTheWindowToItsBound() {
        let spin = WakeSpin()
        #expect(spin.windowNanoseconds == 0)  // a new sleeper sleeps at once
        spin.record(waitedNanoseconds: 5_000, slept: true)
        guard WakeSpin.enabled else {
            #expect(spin.windowNanoseconds == 0)  // one CPU: never spins
            return
        }
        #expect(spin.windowNanoseconds == WakeSpin.startNanoseconds)
        spin.record(waitedNanoseconds: 5_000, slept: true)
        #expect(spin.windowNanoseconds == 2 * WakeSpin.startNanoseconds)
        for _ in 0..<20 { spin.record(waitedNanoseconds: 5_000, slept: true) }
        #expect(spin.windowNanoseconds == WakeSpin.maximumNanoseconds)
        // A wake-up the spin caught leaves the window as it is.
        spin.record(waitedNanoseconds: 1_000, slept: false)
        #expect(spin.windowNanoseconds == WakeSpin.maximumNanoseconds)
    }

    @Test func longSleepsShrinkTheWindowToNothing() {
        let spin = WakeSpin()
        for _ in 0..<20 { spin.record(waitedNanoseconds: 1_000, slept: true) }
        let long = WakeSpin.maximumNanoseconds + 1
        for _ in 0..<20 { spin.record(waitedNanoseconds: long, slept: true) }
        #expect(spin.windowNanoseconds == 0)  // an idle sleeper spends no CPU spinning
    }

    @Test func aSpinReturnsWhenTheConditionHoldsAndGivesUpAfterItsWindow() {
        let spin = WakeSpin()
        #expect(spin.spin(from: WakeSpin.now()) { true })
        // Window 0: one look, no spinning.
        var looks = 0
        #expect(!spin.spin(from: WakeSpin.now()) { looks += 1; return false })
        #expect(looks == 1)
        guard WakeSpin.enabled else { return }
        for _ in 0..<20 { spin.record(waitedNanoseconds: 1_000, slept: true) }
        looks = 0
        let start = WakeSpin.now()
        #expect(!spin.spin(from: start) { looks += 1; return false })
        #expect(WakeSpin.now() - start >= WakeSpin.maximumNanoseconds)  // it spun its whole window
        #expect(looks > 1)
        looks = 0
        #expect(spin.spin(from: WakeSpin.now()) { looks += 1; return looks == 3 })
    }
}
