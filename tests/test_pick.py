"""The sparse/dense race: runs alternate, so a burst on the machine slows both kernels alike."""
import time

from fscnn_tvm import pick


def test_the_race_alternates_single_runs_and_stops_on_a_clear_winner():
    calls = []

    def kernel(name, seconds):
        def run():
            calls.append(name)
            time.sleep(seconds)
        return run

    fast_ms, slow_ms = pick._race(kernel("a", 0.001), kernel("b", 0.004))
    assert calls[:6] == ["a", "b"] * 3 and calls.count("a") == calls.count("b")
    assert fast_ms < slow_ms and slow_ms >= pick.CLEAR * fast_ms
    assert len(calls) <= 2 * (2 * pick.BUDGET_S / 0.005 + 2)  # one round: a clear winner ends the race


def test_a_burst_through_one_kernels_turn_does_not_decide_the_race():
    """The first kernel is faster; the machine is busy (everything 5x slower) for a stretch as
    long as a whole block of the first kernel's runs would have been."""
    start = time.perf_counter()

    def slowed(seconds):
        def run():
            busy = time.perf_counter() - start < pick.BUDGET_S
            time.sleep(seconds * (5 if busy else 1))
        return run

    first_ms, second_ms = pick._race(slowed(0.001), slowed(0.002))
    assert first_ms < second_ms
