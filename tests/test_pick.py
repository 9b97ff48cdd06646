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


def _kernel(calls, name, seconds, slow_until=0.0, factor=1):
    """A fake kernel: ``seconds`` a run, ``factor`` times that until ``slow_until`` (perf_counter)."""
    def run():
        calls.append(name)
        time.sleep(seconds * (factor if time.perf_counter() < slow_until else 1))
    return run


def test_a_default_that_wins_its_race_runs_no_second_one():
    calls = []
    default_ms, other_ms = pick._confirmed_race(_kernel(calls, "d", 0.001), _kernel(calls, "o", 0.003))
    assert default_ms < other_ms
    assert len(calls) <= 2 * (2 * pick.BUDGET_S / 0.004 + 2)  # one round of one race


def test_a_burst_through_the_first_race_does_not_replace_the_default():
    """The default kernel is 2x faster, but the host holds a vCPU through the whole first race
    and slows the default's runs 20x (only its runs: the case an interleaved race cannot even
    out); the second race, after the pause, sees the truth."""
    calls = []
    until = time.perf_counter() + 2 * pick.BUDGET_S * pick.ROUNDS + 0.05
    default_ms, other_ms = pick._confirmed_race(_kernel(calls, "d", 0.001, until, 20), _kernel(calls, "o", 0.002))
    assert default_ms < other_ms
    assert calls.count("d") == calls.count("o") > 2 * (2 * pick.BUDGET_S / 0.003)  # two races ran


def test_a_kernel_faster_in_both_races_replaces_the_default():
    calls = []
    default_ms, other_ms = pick._confirmed_race(_kernel(calls, "d", 0.003), _kernel(calls, "o", 0.001))
    assert other_ms < default_ms


def test_time_conv_names_its_default():
    import numpy as np
    import pytest
    w = np.ones((4, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match="default"):
        pick.time_conv(w, (1, 4, 8, 8), None, None, "csr", None, None, "fastest")
