"""An expansion computed inside the depthwise kernel (``fscnn_tvm.expansion``) against PyTorch
(the 1x1 conv, then the depthwise conv), its tables, and the importer's fusion of MobileNet's
blocks."""
import numpy as np
import pytest
import torch
import tvm
import torch.nn.functional as TF
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fscnn_tvm
from fscnn_tvm import depthwise, expansion
from test_depthwise import TARGETS, torch_depthwise, two_ints
from test_ops import activated, assert_matches, out_size, pair


def torch_expanded(x, e_weight, e_bias, e_activation):
    y = TF.conv2d(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(e_weight, dtype=torch.float64),
                  None if e_bias is None else torch.as_tensor(e_bias, dtype=torch.float64))
    return activated(y, e_activation).numpy()


@settings(max_examples=40, deadline=None, database=None)
@given(
    n=st.integers(1, 3), c=st.integers(1, 40), k=st.integers(1, 40), h=st.integers(1, 20), w=st.integers(1, 40),
    kh=st.integers(1, 3), stride=st.integers(1, 2) | two_ints(1, 2), padding=st.integers(0, 2),
    dilation=st.integers(1, 2), sparsity=st.sampled_from([0.0, 0.5, 0.9, 1.0]) | st.floats(0, 1),
    e_bias=st.booleans(), has_bias=st.booleans(), e_activation=st.sampled_from([None, "relu", "relu6"]),
    activation=st.sampled_from([None, "relu", "relu6"]), seed=st.integers(0, 2**32 - 1),
    target=st.sampled_from(TARGETS),
)
def test_expansion_property(n, c, k, h, w, kh, stride, padding, dilation, sparsity, e_bias, has_bias, e_activation,
                            activation, seed, target):
    """A pointwise conv computed inside the depthwise kernel (``Expansion``): any pruning (rows
    of every length, none at all), maps of any size (pixels in register tiles, whole vectors and
    single pixels), any stride, padding, dilation and batch."""
    from fscnn_tvm import kernels, layer
    rng = np.random.default_rng(seed)
    (sh, sw), (dh, dw) = pair(stride), pair(dilation)
    if out_size(h, padding, padding, kh, sh, dh) < 1 or out_size(w, padding, padding, kh, sw, dw) < 1:
        return
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    e_weight = rng.standard_normal((k, c, 1, 1)).astype(np.float32) * (rng.random((k, c, 1, 1)) >= sparsity)
    eb = rng.standard_normal(k).astype(np.float32) if e_bias else None
    weight = rng.standard_normal((k, 1, kh, kh)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32) if has_bias else None
    tgt = fscnn_tvm.resolve_target(target)
    spec, arrays = depthwise.depthwise_inputs(weight, (n, k, h, w), bias, activation, tgt,
                                              expand=(e_weight, eb, e_activation), stride=stride, padding=padding,
                                              dilation=dilation)
    event(f"group {spec.expansion.group}; tail: {bool(expansion.expansion_layout(h * w, spec.expansion.lanes)[3])}")
    tensors = [tvm.runtime.tensor(a) for a in [x.reshape(spec.x_shape), *arrays, np.zeros(spec.out_shape, np.float32)]]
    layer._build(kernels.default_schedule(kernels.prim_func(spec), spec), tgt)(*tensors)
    ref = torch_depthwise(torch_expanded(x, e_weight, eb, e_activation), weight, bias, stride, padding, dilation,
                          activation)
    assert_matches(tensors[-1].numpy(), ref)


def test_grouped_expansion_table_holds_the_union_of_its_channels_columns():
    weight = np.zeros((4, 5, 1, 1), np.float32)
    weight[0, 1, 0, 0], weight[1, 3, 0, 0], weight[1, 1, 0, 0] = 1.0, 2.0, 3.0
    cols, vals, length = expansion.expansion_table(weight, group=2)
    assert cols.shape == (2, 2) and vals.shape == (2, 2, 2) and list(length) == [2, 0]
    assert list(cols[0]) == [1, 3] and vals[0].tolist() == [[1.0, 3.0], [0.0, 2.0]]


def test_expansion_table_holds_each_row_and_pads_with_zeros():
    weight = np.zeros((4, 6, 1, 1), np.float32)
    weight[0, [1, 4], 0, 0], weight[2, :, 0, 0] = [2.0, -3.0], np.arange(1, 7)
    cols, vals, length = expansion.expansion_table(weight)
    assert cols.shape == (4, 6) and vals.shape == (4, 6, 1) and list(length) == [2, 0, 6, 0]
    dense = np.zeros((4, 6), np.float32)
    for r in range(4):
        dense[r, cols[r, :length[r]]] = vals[r, :length[r], 0]
        assert not vals[r, length[r]:].any()
    np.testing.assert_array_equal(dense, weight.reshape(4, 6))
    assert expansion.expansion_table(np.zeros((3, 2, 1, 1), np.float32))[0].shape == (3, 1)  # never 0 wide


def test_an_expansion_needs_a_pointwise_weight_and_depth_multiplier_1():
    target = fscnn_tvm.resolve_target(None)
    with pytest.raises(ValueError, match="pointwise weight"):
        depthwise.depthwise_inputs(np.ones((8, 1, 3, 3), np.float32), (1, 8, 6, 6), None, None, target,
                                   expand=(np.ones((8, 4, 3, 3), np.float32), None, None), padding=1)
    with pytest.raises(ValueError, match="multiplier 1"):
        depthwise.depthwise_inputs(np.ones((16, 1, 3, 3), np.float32), (1, 8, 6, 6), None, None, target,
                                   expand=(np.ones((8, 4, 1, 1), np.float32), None, None), padding=1)


def test_sampled_schedules_with_an_expansion_match_pytorch():
    from fscnn_tvm import kernels, layer
    from fscnn_tvm.decisions import SampledDecisions
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 10, 15, 13)).astype(np.float32)
    e_weight = rng.standard_normal((24, 10, 1, 1)).astype(np.float32) * (rng.random((24, 10, 1, 1)) > 0.8)
    weight, bias = rng.standard_normal((24, 1, 3, 3)).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    target = fscnn_tvm.resolve_target(None)
    spec, arrays = depthwise.depthwise_inputs(weight, (1, 24, 15, 13), bias, "relu", target,
                                              expand=(e_weight, None, "relu6"), stride=2, padding=1)
    (space,) = kernels.design_spaces(depthwise.prim_func(spec), spec)
    for seed in (1, 2):
        sch = depthwise.schedule_depthwise(depthwise.prim_func(spec), spec, SampledDecisions(), seed)
        tensors = [tvm.runtime.tensor(a) for a in [x.reshape(spec.x_shape), *arrays, np.zeros(spec.out_shape, np.float32)]]
        layer._build(sch, target)(*tensors)
        assert_matches(tensors[-1].numpy(), torch_depthwise(torch_expanded(x, e_weight, None, "relu6"), weight, bias,
                                                            2, 1, 1, "relu"))


class Inverted(torch.nn.Module):
    """Expansion (pruned to ``sparsity``), depthwise conv, projection; ``tap``: the expansion's
    output read a second time (added to the output), so it cannot be computed inside the kernel."""

    def __init__(self, sparsity, tap=False, stride=1):
        super().__init__()
        self.expand = torch.nn.Sequential(torch.nn.Conv2d(16, 96, 1, bias=False), torch.nn.BatchNorm2d(96),
                                          torch.nn.ReLU6())
        self.depthwise = torch.nn.Sequential(torch.nn.Conv2d(96, 96, 3, stride, 1, groups=96, bias=False),
                                             torch.nn.BatchNorm2d(96), torch.nn.ReLU6())
        self.project = torch.nn.Conv2d(96, 24, 1)
        self.tap = tap
        with torch.no_grad():
            w = self.expand[0].weight
            w.mul_(torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) >= sparsity)
            for bn in (self.expand[1], self.depthwise[1]):
                bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
        self.eval()

    def forward(self, x):
        e = self.expand(x)
        y = self.project(self.depthwise(e))
        return y + e.mean() if self.tap else y


@pytest.mark.parametrize("batch,dynamic", [(1, False), (3, False), (2, True)])
def test_a_pruned_expansion_runs_inside_the_depthwise_kernel_and_matches(batch, dynamic):
    """Fused at any static batch; with a symbolic batch the two kernels run (see fused_expansions)."""
    model = Inverted(0.9, stride=2)
    x = torch.randn(batch, 16, 22, 22, generator=torch.Generator().manual_seed(3))
    imported = fscnn_tvm.import_torch(model, (x,), measure=False, dynamic_batch=(1, 4) if dynamic else None)
    row = next(r for r in imported.report if r.weight_shape == (96, 16, 1, 1))
    (spec,) = [k.spec for k in imported.kernels.values() if isinstance(k.spec, depthwise.DepthwiseSpec)]
    if dynamic:
        assert spec.expansion is None and row.fmt != "ell (fused)"
    else:
        assert row.fmt == "ell (fused)" and "depthwise kernel" in row.reason and row.rewritten
        assert spec.expansion is not None and spec.expansion.in_channels == 16
    assert dynamic or not any(k.spec.kind.startswith("sparse") and k.spec.out_features == 96
                              for k in imported.kernels.values())
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("sparsity,sparse,group", [(0.5, True, 4), (0.0, True, 4), (0.9, False, 1)])
def test_dense_and_half_pruned_expansions_run_inside_in_groups_and_match(sparsity, sparse, group):
    """Rows of density over GROUP_DENSITY expand 4 channels a task from their rows' union; the
    dense baseline (``sparse=False``) fuses too, its row saying it runs dense."""
    model = Inverted(sparsity)
    x = torch.randn(1, 16, 14, 14, generator=torch.Generator().manual_seed(4))
    imported = fscnn_tvm.import_torch(model, (x,), measure=False, sparse=sparse)
    row = next(r for r in imported.report if r.weight_shape == (96, 16, 1, 1))
    assert row.fmt == ("ell (fused)" if sparse and sparsity >= 0.5 else "dense (fused)")
    assert row.rewritten == (sparse and sparsity >= 0.5)
    (spec,) = [k.spec for k in imported.kernels.values() if isinstance(k.spec, depthwise.DepthwiseSpec)]
    assert spec.expansion.group == group
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_an_expansion_read_twice_stays_a_kernel_of_its_own():
    model = Inverted(0.9, tap=True)
    x = torch.randn(1, 16, 14, 14, generator=torch.Generator().manual_seed(4))
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    assert not any("fused" in r.fmt for r in imported.report)
    assert all(k.spec.expansion is None for k in imported.kernels.values() if isinstance(k.spec, depthwise.DepthwiseSpec))
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
