"""The depthwise kernel (groups = input channels) against torch.nn.functional.conv2d, and its
place in an imported model."""
import numpy as np
import pytest
import torch
import tvm
import torch.nn.functional as TF
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fscnn_tvm
from fscnn_tvm import dense_conv2d, depthwise
from test_ops import activated, assert_matches, host_avx2, out_size, pad4, pair

two_ints = lambda lo, hi: st.tuples(st.integers(lo, hi), st.integers(lo, hi))  # noqa: E731
TARGETS = [None, {"kind": "llvm"}] + (["llvm -mcpu=haswell"] if host_avx2() else [])


def torch_depthwise(x, w, b, stride, padding, dilation, activation):
    top, left, bottom, right = pad4(padding)
    xt = TF.pad(torch.as_tensor(x, dtype=torch.float64), (left, right, top, bottom))
    y = TF.conv2d(xt, torch.as_tensor(w, dtype=torch.float64), None if b is None else torch.as_tensor(b, dtype=torch.float64),
                  stride=pair(stride), dilation=pair(dilation), groups=x.shape[1])
    return activated(y, activation).numpy()


@settings(max_examples=40, deadline=None, database=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 24) | st.sampled_from([32, 33]), mult=st.sampled_from([1, 1, 2, 3]),
    h=st.integers(1, 30), w=st.integers(1, 40), kh=st.integers(1, 5), kw=st.integers(1, 5),
    stride=st.integers(1, 3) | two_ints(1, 3),
    padding=st.integers(0, 3) | two_ints(0, 3) | st.tuples(*[st.integers(0, 3)] * 4),
    dilation=st.integers(1, 2) | two_ints(1, 2),
    has_bias=st.booleans(), activation=st.sampled_from([None, "relu", "relu6"]),
    seed=st.integers(0, 2**32 - 1), target=st.sampled_from(TARGETS),
)
def test_depthwise_property(n, c, mult, h, w, kh, kw, stride, padding, dilation, has_bias, activation, seed, target):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((c * mult, 1, kh, kw)).astype(np.float32)
    bias = rng.standard_normal(c * mult).astype(np.float32) if has_bias else None
    (sh, sw), (dh, dw), (pt, pl, pb, pr) = pair(stride), pair(dilation), pad4(padding)
    if out_size(h, pt, pb, kh, sh, dh) < 1 or out_size(w, pl, pr, kw, sw, dw) < 1:
        event("empty output")
        with pytest.raises(ValueError, match="output would be empty"):
            dense_conv2d(x, weight, bias, stride, padding, dilation, activation, target, groups=c)
        return
    spec = depthwise.make_depthwise_spec(x.shape, weight.shape, has_bias, activation, tvm.target.Target(
        {"kind": "llvm", "mcpu": "haswell"} if target else {"kind": "llvm"}), stride, padding, dilation)
    event(f"tile {spec.rows} rows x {spec.vectors} vectors")
    out = dense_conv2d(x, weight, bias, stride, padding, dilation, activation, target, groups=c)
    assert_matches(out, torch_depthwise(x, weight, bias, stride, padding, dilation, activation))


@pytest.mark.parametrize("c,hw,stride", [(32, 112, 1), (96, 112, 2), (144, 56, 2), (192, 28, 1), (960, 7, 1)])
def test_mobilenet_shapes(c, hw, stride):
    """MobileNetV2's depthwise convs: whole-vector rows, ragged rows (28 and 7 wide), stride 2."""
    rng = np.random.default_rng(c)
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    weight, bias = rng.standard_normal((c, 1, 3, 3)).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    out = dense_conv2d(x, weight, bias, stride, 1, activation="relu6", groups=c)
    assert_matches(out, torch_depthwise(x, weight, bias, stride, 1, 1, "relu6"))


@pytest.mark.parametrize("groups,weight_shape,match", [
    (4, (8, 2, 3, 3), "other groupings"), (8, (8, 2, 3, 3), "other groupings"), (0, (8, 1, 3, 3), "positive int"),
    (2.0, (8, 1, 3, 3), "positive int")])
def test_groups_it_does_not_run_are_clear_errors(groups, weight_shape, match):
    x = np.zeros((1, 8, 6, 6), np.float32)
    with pytest.raises((ValueError, NotImplementedError), match=match):
        dense_conv2d(x, np.ones(weight_shape, np.float32), groups=groups)


def test_register_tile_fits_the_registers():
    for registers, lanes in ((16, 8), (32, 16)):
        for width in (1, 7, 14, 28, 56, 112, 300):
            vectors, rows = depthwise.register_tile(width, width, lanes, registers, 9)
            assert 1 <= vectors <= -(-width // lanes) and rows >= 1
            # taps' weights kept in at most half the registers, one for the input vector
            assert vectors * rows + min(9, registers // 2) + 1 <= registers


def test_imported_depthwise_runs_the_depthwise_kernel():
    """An inverted-residual block: the depthwise conv (BN and ReLU6 fused) runs our kernel."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 24, 1, bias=False), torch.nn.BatchNorm2d(24), torch.nn.ReLU6(),
        torch.nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False), torch.nn.BatchNorm2d(24),
        torch.nn.ReLU6(), torch.nn.Conv2d(24, 48, 3, padding=1, groups=24))  # multiplier 2
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(2, 8, 19, 23)
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    kinds = sorted(k.spec.kind for k in imported.kernels.values())
    assert kinds == ["depthwise_conv2d", "depthwise_conv2d"]  # the 8->24 expansion computed inside the first
    assert sum("depthwise kernel" in r.reason for r in imported.report) == 3
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@settings(max_examples=6, deadline=None, database=None)
@given(seed=st.integers(1, 2**30), stride=st.integers(1, 2))
def test_sampled_schedules_match_pytorch(seed, stride):
    """Any point of the tuner's design space computes the layer."""
    from fscnn_tvm import kernels, layer
    from fscnn_tvm.decisions import SampledDecisions
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 6, 17, 19)).astype(np.float32)
    weight, bias = rng.standard_normal((12, 1, 3, 3)).astype(np.float32), rng.standard_normal(12).astype(np.float32)
    target = fscnn_tvm.resolve_target(None)
    spec, arrays = depthwise.depthwise_inputs(weight, x.shape, bias, "relu", target, stride=stride, padding=1)
    (space,) = kernels.design_spaces(depthwise.prim_func(spec), spec)
    assert space.trace.decisions  # the unroll limit is sampled
    sch = depthwise.schedule_depthwise(depthwise.prim_func(spec), spec, SampledDecisions(), seed)
    tensors = [tvm.runtime.tensor(a) for a in [x, *arrays, np.zeros(spec.out_shape, np.float32)]]
    layer._build(sch, target)(*tensors)
    assert_matches(tensors[-1].numpy(), torch_depthwise(x, weight, bias, stride, 1, 1, "relu"))


@pytest.mark.parametrize("width,lanes,expected", [(7, 16, 8), (14, 16, 16), (28, 16, 16), (56, 16, 8),
                                                  (112, 16, 16), (3, 8, 8), (28, 8, 8), (3, 16, 8), (3, 4, 4)])
def test_row_lanes_halve_the_vector_only_where_that_pads_less_and_stay_256_bits(width, lanes, expected):
    assert depthwise.row_lanes(width, lanes) == expected
