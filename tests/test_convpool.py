"""convpool: the dense conv kernel with a max pool fused, against torch's conv and max_pool2d, the
bands policy, and the importer fusing a stem's pool (or emitting it after a kernel that cannot)."""
import numpy as np
import pytest
import torch
import tvm
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fscnn_tvm
from fscnn_tvm import convpool, dense, kernels, prune
from fscnn_tvm.geometry import DYNAMIC
from fscnn_tvm.layer import _build
from fscnn_tvm.target import Caches, resolve_target
from test_ops import host_avx2, out_size, torch_conv

ZEN4 = Caches(32 << 10, 1 << 20, 64, 2)
XEON = Caches(48 << 10, 2 << 20, 64, 2)


def run_pooled(spec, arrays, x, target):
    func = _build(kernels.default_schedule(kernels.prim_func(spec), spec), target)
    dev = tvm.cpu()
    batch = x.shape[0]
    out = tvm.runtime.empty((batch,) + spec.out_shape[1:], "float32", dev)
    func(tvm.runtime.tensor(x, dev), *[tvm.runtime.tensor(a, dev) for a in arrays], out)
    return out.numpy()


def torch_pooled(x, w, bias, stride, padding, activation, pool):
    y = torch.as_tensor(torch_conv(x, w, bias, stride, padding, 1, activation))
    return torch.nn.functional.max_pool2d(y, *pool).numpy()


@settings(max_examples=40, deadline=None, database=None)
@given(n=st.integers(1, 3), c=st.integers(1, 20) | st.just(3), k=st.integers(1, 40) | st.sampled_from([32, 64]),
       h=st.integers(2, 30), w=st.integers(2, 30), kh=st.integers(1, 7), stride=st.integers(1, 2),
       padding=st.integers(0, 3), pool_k=st.integers(2, 4), pool_s=st.integers(1, 3), pool_p=st.integers(0, 2),
       has_bias=st.booleans(), activation=st.sampled_from([None, "relu", "relu6"]),
       seed=st.integers(0, 2**32 - 1), avx2=st.booleans())
def test_pooled_conv_property(n, c, k, h, w, kh, stride, padding, pool_k, pool_s, pool_p, has_bias, activation,
                              seed, avx2):
    """Any conv our dense kernel runs unblocked, any square max pool PyTorch takes (padding up
    to half the window; -inf padding, so no activation too): the fused kernel matches."""
    pool_p = min(pool_p, pool_k // 2)
    oh, ow = out_size(h, padding, padding, kh, stride, 1), out_size(w, padding, padding, kh, stride, 1)
    if min(oh, ow) < 1 or min(oh, ow) + 2 * pool_p < pool_k:
        event("empty output")
        return
    target = resolve_target("llvm -mcpu=haswell" if avx2 and host_avx2() else None)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((k, c, kh, kh)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32) if has_bias else None
    spec, arrays = dense.dense_inputs(weight, x.shape, bias, activation, target, stride=stride, padding=padding)
    pooled = convpool.pooled_spec(spec, pool_k, pool_s, pool_p, ZEN4)
    event(f"fused: {pooled is not None}")
    if pooled is None:
        assert spec.cb_chunk is not None or spec.flat_hw or spec.reg_n < 2 or c * kh * kh < 2 or pool_s > pool_k \
            or ow < 2
        return
    expected = torch_pooled(x, weight, bias, stride, padding, activation, (pool_k, pool_s, pool_p))
    assert pooled.out_shape == expected.shape
    np.testing.assert_allclose(run_pooled(pooled, arrays, x, target), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("h,w,kh,stride", [(2, 2, 1, 2), (3, 3, 3, 1), (4, 2, 1, 2)])
def test_a_conv_of_one_output_column_keeps_its_pool_apart_and_the_model_matches(h, w, kh, stride, monkeypatch):
    """A pool of 2 with padding 1 after a one-column conv: every window reads that column. The
    weights are packed once, for the unfused kernel."""
    weight = np.random.default_rng(0).standard_normal((64, 3, kh, kh)).astype(np.float32)
    spec, _ = dense.dense_inputs(weight, (1, 3, h, w), None, None, resolve_target(None), stride=stride)
    assert convpool.pooled_spec(spec, 2, 1, 1, ZEN4) is None
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, kh, stride), torch.nn.ReLU(), torch.nn.MaxPool2d(2, 1, 1)).eval()
    x = torch.randn(1, 3, h, w)
    packs, pack = [], dense.pack_weight
    monkeypatch.setattr(dense, "pack_weight", lambda *args: packs.append(args[0]) or pack(*args))
    compiled = fscnn_tvm.compile(fscnn_tvm.import_torch(model, (x,), measure=False))  # (no race's own layers)
    assert len(packs) == 1 and packs[0].pool is None
    with torch.no_grad():
        np.testing.assert_allclose(compiled(x), model(x).numpy(), rtol=1e-4, atol=1e-4)


def test_a_pooled_kernel_built_for_every_batch_size():
    target = resolve_target(None)
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((32, 3, 7, 7)).astype(np.float32)
    spec, arrays = dense.dense_inputs(weight, (1, 3, 40, 40), None, "relu", target, stride=2, padding=3)
    spec = kernels.batched(convpool.pooled_spec(spec, 3, 2, 1, ZEN4), DYNAMIC)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 40, 40)).astype(np.float32)
        np.testing.assert_allclose(run_pooled(spec, arrays, x, target),
                                   torch_pooled(x, weight, None, 2, 3, "relu", (3, 2, 1)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,cache,band", [(1, ZEN4, 8), (8, ZEN4, 8), (1, XEON, 14), (8, XEON, 14)])
def test_bands_fill_a_quarter_of_the_l2_with_four_tasks_a_core(batch, cache, band):
    """ResNet's stem (64 channels in two blocks of 32, 112-wide rows: 14 KiB a conv row) and
    its 56 pool rows: a band of B rows buffers 2B + 1 conv rows."""
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    spec = dense.make_dense_spec((batch, 3, 224, 224), (64, 3, 7, 7), True, "relu", target, 2, 3)
    pooled = convpool.pooled_spec(spec, 3, 2, 1, cache)
    assert pooled.pool.band == band and pooled.out_shape == (batch, 64, 56, 56)
    assert pooled.geo.pad == (5, 3, 3, 3) and pooled.geo.out_height == 113  # one conv row above, for the padding


def test_kernels_that_do_not_fuse_a_pool():
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "num-cores": 2})
    blocked = dense.make_dense_spec((1, 256, 14, 14), (256, 256, 3, 3), False, None, target, 1, 1)
    pointwise = dense.make_dense_spec((1, 16, 14, 14), (32, 16, 1, 1), False, None, target)
    stem = dense.make_dense_spec((1, 3, 32, 32), (16, 3, 3, 3), False, None, target, 1, 1)
    assert blocked.cb_chunk is not None and convpool.pooled_spec(blocked, 3, 2, 1, ZEN4) is None
    assert pointwise.flat_hw and convpool.pooled_spec(pointwise, 2, 2, 0, ZEN4) is None
    assert convpool.pooled_spec(stem, 3, 2, 2, ZEN4) is None  # padding over half the window: PyTorch refuses it


class _Stem(torch.nn.Module):
    def __init__(self, ceil_mode=False):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 7, 2, 3, bias=False)
        self.bn = torch.nn.BatchNorm2d(16)
        self.pool = torch.nn.MaxPool2d(3, 2, 1, ceil_mode=ceil_mode)
        self.head = torch.nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.pool(torch.relu(self.bn(self.conv(x)))))


@pytest.mark.parametrize("ceil_mode,stem_sparsity,fused", [(False, 0.0, True), (True, 0.0, False),
                                                           (False, 0.9, False)])
def test_the_importer_fuses_a_stems_max_pool_into_its_dense_kernel(ceil_mode, stem_sparsity, fused):
    """A dense stem's pool runs in its kernel; a pool that does not fuse (ceil mode) or a stem that
    runs sparse gets the pool after its kernel, as imported."""
    torch.manual_seed(0)
    model = _Stem(ceil_mode)
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
        model.conv.weight[torch.rand(model.conv.weight.shape) < stem_sparsity] = 0.0
    prune.prune_magnitude(model, 0.9)  # (the first conv kept as it is)
    model.eval()
    x = torch.randn(2, 3, 37, 30)
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    assert imported.report[0].fused == ["bn", "relu"] + (["max_pool2d"] if not ceil_mode else [])
    assert ("max_pool2d" in imported.mod["main"].script()) != fused
    assert any(getattr(k.spec, "pool", None) for k in imported.kernels.values()) == fused
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_a_fused_stem_pool_with_a_dynamic_batch():
    torch.manual_seed(1)
    model = _Stem().eval()
    imported = fscnn_tvm.import_torch(model, (torch.randn(1, 3, 24, 24),), dynamic_batch=(1, 4), measure=False)
    assert any(getattr(k.spec, "pool", None) for k in imported.kernels.values())
    assert "max_pool2d" not in imported.mod["main"].script()
    compiled = fscnn_tvm.compile(imported)
    for batch in (1, 4):
        x = torch.randn(batch, 3, 24, 24)
        ref = model(x).detach().numpy()
        np.testing.assert_allclose(compiled(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_a_pointwise_conv_pooled_before_a_depthwise_conv():
    """A pool between the two convs the depthwise kernel could otherwise compute as one (its
    expansion): the pointwise conv (flattened: no fused pool) and the pool run before it."""
    class PoolBetween(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = torch.nn.Conv2d(8, 16, 1)
            self.pool = torch.nn.MaxPool2d(2)
            self.depthwise = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16)

        def forward(self, x):
            return self.depthwise(self.pool(torch.relu(self.expand(x))))
    torch.manual_seed(2)
    model = PoolBetween().eval()
    x = torch.randn(1, 8, 12, 12)
    imported = fscnn_tvm.import_torch(model, (x,), sparse=False, measure=False)
    assert imported.report[0].fused == ["bias", "relu", "max_pool2d"]
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
