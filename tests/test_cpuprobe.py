"""The CPU probe: what it times computes what it says, and its answer is one of two costs."""
import numpy as np
import pytest
import tvm

from fscnn_tvm import cpuprobe, tiles
from fscnn_tvm.target import resolve_target, vector_lanes


@pytest.mark.parametrize("lanes", [8, 16])
def test_the_probe_loop_is_the_kernels_inner_loop_and_computes_it(lanes):
    target = resolve_target("llvm -mcpu=skylake-avx512" if lanes == 16 else "llvm -mcpu=haswell")
    if lanes == 16 and vector_lanes(resolve_target(None)) < 16:
        pytest.skip("this CPU has no AVX-512")
    func = cpuprobe._probe_func(target, lanes)
    vectors = cpuprobe._ACCUMULATOR_FLOATS // lanes
    rng = np.random.default_rng(0)
    x = rng.standard_normal((cpuprobe._STEPS, vectors, lanes)).astype("float32")
    w = rng.standard_normal(cpuprobe._STEPS).astype("float32")
    out = tvm.runtime.empty((vectors, lanes), "float32")
    func(tvm.runtime.tensor(x), tvm.runtime.tensor(w), out)
    np.testing.assert_allclose(out.numpy(), cpuprobe._PASSES * np.einsum("k,kji->ji", w, x), rtol=1e-4, atol=1e-3)


def test_half_width_cost_is_measured_on_this_cpu_only():
    host = resolve_target(None)
    assert cpuprobe.half_width_cost(host) in (cpuprobe.FULL_RATE, cpuprobe.HALF_RATE)
    other = "znver4" if host.attrs.get("mcpu") != "znver4" else "skylake-avx512"
    assert cpuprobe.half_width_cost(resolve_target(f"llvm -mcpu={other}")) == cpuprobe.FULL_RATE
    assert cpuprobe.half_width_cost(resolve_target("llvm -mcpu=haswell")) == cpuprobe.FULL_RATE


@pytest.mark.parametrize("width,lanes_full,lanes_half", [
    (56, 8, 16), (49, 8, 16), (196, 8, 16), (24, 8, 16),  # half pads less, but not 1.5x less
    (7, 8, 8),  # 16 lanes would pad 9 of 16 columns
    (14, 16, 16), (28, 16, 16), (224, 16, 16),  # native pads as little
])
def test_choose_lanes_weighs_padding_against_what_half_width_ops_cost(width, lanes_full, lanes_half):
    assert tiles.choose_lanes(width, 16, cpuprobe.FULL_RATE) == lanes_full
    assert tiles.choose_lanes(width, 16, cpuprobe.HALF_RATE) == lanes_half


def test_one_disturbed_probe_does_not_decide_the_rate():
    assert cpuprobe.rate([1.02, 1.41, 0.99]) == cpuprobe.FULL_RATE
    assert cpuprobe.rate([1.44, 1.02, 1.39]) == cpuprobe.HALF_RATE
    assert cpuprobe.rate([1.30]) == cpuprobe.HALF_RATE
