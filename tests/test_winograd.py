"""The Winograd F(4x4, 3x3) kernel (``winograd.py``) against torch.nn.functional.conv2d, where it
applies, and a model that runs it."""
import dataclasses

import numpy as np
import pytest
import torch
import tvm
from hypothesis import event, given, settings
from hypothesis import strategies as st

import fscnn_tvm
from fscnn_tvm import winograd
from fscnn_tvm.geometry import ConvGeometry
from fscnn_tvm.layer import DenseConvLayer, _build
from fscnn_tvm.target import Caches, resolve_target
from test_ops import assert_matches, host_avx2, rng, torch_conv  # noqa: F401 - rng: fixture

TARGETS = [None] + ([{"kind": "llvm", "mcpu": "haswell"}] if host_avx2() else [])
ZEN4 = Caches(32 << 10, 1 << 20, 64, 2)


def run_kernel(x, weight, bias, activation, residual, target):
    """The Winograd kernel built for these arrays, whatever ``applies`` says of their shapes."""
    target = resolve_target(target)
    spec, arrays = winograd.winograd_inputs(weight, x.shape, bias, activation, target, padding=1)
    if residual is not None:
        spec = dataclasses.replace(spec, residual=True)
        arrays = arrays + [residual]
    func = _build(winograd.default_schedule(winograd.prim_func(spec), spec), target)
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(a, dev) for a in [x, *arrays]] + [tvm.runtime.empty(spec.out_shape, "float32", dev)]
    func(*args)
    return args[-1].numpy()


@settings(max_examples=25, deadline=None, database=None)
@given(n=st.integers(1, 3), c=st.integers(1, 24) | st.sampled_from([64, 65]), k=st.integers(1, 40),
       h=st.integers(1, 19), w=st.integers(1, 19), has_bias=st.booleans(), has_residual=st.booleans(),
       activation=st.sampled_from([None, "relu", "relu6"]), seed=st.integers(0, 2**32 - 1),
       target=st.sampled_from(TARGETS))
def test_winograd_property(n, c, k, h, w, has_bias, has_residual, activation, seed, target):
    """Any shape, blocked or not: tiles past the map's edge, channels past a register tile, the
    batch in the tiles."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    weight = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(k).astype(np.float32) if has_bias else None
    residual = rng.standard_normal((n, k, h, w)).astype(np.float32) if has_residual else None
    ref = torch_conv(x, weight, bias, 1, 1, 1, None)
    ref = ref + residual if residual is not None else ref
    ref = np.clip(ref, 0, 6 if activation == "relu6" else None) if activation else ref
    event(f"blocked: {winograd.blocked(ConvGeometry.create(x.shape, weight.shape, 1, 1, 1))}")
    assert_matches(run_kernel(x, weight, bias, activation, residual, target), ref)


@pytest.mark.parametrize("shape,weight,kwargs,expected", [
    ((1, 64, 56, 56), (64, 64, 3, 3), {"padding": 1}, True),
    ((1, 256, 14, 14), (256, 256, 3, 3), {"padding": 1}, True),  # 16 tiles
    ((1, 512, 7, 7), (512, 512, 3, 3), {"padding": 1}, False),  # 4 tiles
    ((8, 512, 7, 7), (512, 512, 3, 3), {"padding": 1}, True),  # the batch's 32
    ((1, 64, 224, 224), (64, 64, 3, 3), {"padding": 1}, True),  # blocked: 29 MB of transformed input
    ((1, 32, 56, 56), (64, 32, 3, 3), {"padding": 1}, False),  # few input channels
    ((1, 3, 224, 224), (64, 3, 3, 3), {"padding": 1}, False),  # a stem
    ((1, 64, 56, 56), (64, 64, 3, 3), {"padding": 1, "stride": 2}, False),
    ((1, 64, 56, 56), (64, 64, 3, 3), {"padding": 2, "dilation": 2}, False),
    ((1, 64, 56, 56), (64, 64, 3, 3), {"padding": 0}, False),
    ((1, 64, 56, 56), (64, 64, 1, 1), {}, False),
])
def test_where_it_applies(shape, weight, kwargs, expected):
    geo = ConvGeometry.create(shape, weight, kwargs.get("stride", 1), kwargs.get("padding", 0),
                              kwargs.get("dilation", 1))
    assert winograd.applies(geo, ZEN4) is expected


@pytest.mark.parametrize("shape,weight,expected", [
    ((1, 64, 224, 224), (64, 64, 3, 3), True),  # 0.6 MB of weights a block, 58 MB of tensors once
    ((1, 64, 112, 112), (128, 64, 3, 3), True),
    ((1, 64, 56, 56), (64, 64, 3, 3), False),
    ((1, 512, 28, 28), (512, 512, 3, 3), False),  # 38 MB of weights a block
    ((8, 128, 28, 28), (128, 128, 3, 3), False),
])
def test_blocks_where_weights_read_per_block_cost_less_than_the_tensors_between_stages(shape, weight, expected):
    geo = ConvGeometry.create(shape, weight, 1, 1, 1)
    assert winograd.blocked(geo) is expected
    spec = winograd.make_spec(shape, weight, False, None, resolve_target(None), padding=1)
    assert (spec.block_tiles is not None) is expected
    if expected:  # whole rows of tiles and whole register tiles
        assert spec.block_tiles % spec.tile_grid[1] == 0 and spec.block_tiles % spec.pixel_tile == 0


@pytest.mark.parametrize("tiles,most,expected", [(16, 14, 8), (49, 14, 7), (196, 14, 14), (3136, 14, 14),
                                                 (32, 14, 8), (18, 14, 9), (16, 6, 4), (49, 6, 5)])
def test_the_register_tile_pads_the_tiles_least_then_is_widest(tiles, most, expected):
    assert winograd._pixel_tile(tiles, most) == expected


def test_a_dense_layer_it_applies_to_runs_it_and_matches(rng):
    x = rng.standard_normal((1, 64, 20, 20)).astype(np.float32)
    weight = rng.standard_normal((80, 64, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(80).astype(np.float32)
    layer = DenseConvLayer(weight, x.shape, bias, "relu", padding=1)
    assert isinstance(layer.spec, winograd.WinogradSpec)
    assert_matches(layer(x), torch_conv(x, weight, bias, 1, 1, 1, "relu"))


def test_a_model_runs_it_with_its_residual_and_pool_apart():
    """A 3x3 conv that adds a residual (ResNet's basic block) and one followed by a max pool
    (VGG's): both on the Winograd kernel, the pool after it."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False)
            self.bn = torch.nn.BatchNorm2d(64)
            self.b = torch.nn.Conv2d(64, 64, 3, padding=1)
            self.pool = torch.nn.MaxPool2d(2)

        def forward(self, x):
            return self.pool(self.b(torch.relu(self.bn(self.a(x)) + x)))

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 64, 24, 24)
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    assert sorted(name.rsplit("_", 1)[0] for name in imported.kernels) == ["winograd_conv2d"] * 2
    with torch.no_grad():
        assert_matches(fscnn_tvm.compile(imported)(x), model(x).numpy().astype(np.float64))


def test_a_dynamic_batch_runs_the_direct_kernel():
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU()).eval()
    x = torch.randn(2, 64, 16, 16)
    imported = fscnn_tvm.import_torch(model, (x,), dynamic_batch=(1, 4), measure=False)
    assert [name.rsplit("_", 1)[0] for name in imported.kernels] == ["dense_conv2d"]
    compiled = fscnn_tvm.compile(imported)
    for batch in (1, 3):
        xb = torch.randn(batch, 64, 16, 16)
        with torch.no_grad():
            assert_matches(compiled(xb), model(xb).numpy().astype(np.float64))


def test_transform_matrices_reproduce_a_small_conv():
    """A^T [(G g G^T) * (B^T d B)] A is the 4x4 valid correlation of a 6x6 tile with a 3x3 filter."""
    a, b, g = winograd.matrices()
    rng = np.random.default_rng(1)
    d, f = rng.standard_normal((6, 6)), rng.standard_normal((3, 3))
    out = a.T @ ((g @ f @ g.T) * (b.T @ d @ b)) @ a
    direct = np.array([[np.sum(d[i:i + 3, j:j + 3] * f) for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(out, direct, rtol=1e-4, atol=1e-4)
