"""Split reductions: the kernel that adds a split conv's partial outputs, and pointwise convs
after our depthwise kernel imported split, checked against PyTorch."""
import numpy as np
import pytest
import torch
import tvm

import fscnn_tvm
from fscnn_tvm import dense, ops, splitk
from fscnn_tvm import target as target_module
from fscnn_tvm.target import caches, resolve_target


@pytest.mark.parametrize("parts,shape,bias,activation,residual", [
    (2, (1, 5, 3, 7), True, None, True), (2, (1, 16, 4, 4), False, "relu6", False), (4, (1, 3, 2, 5), True, "relu", True)])
def test_sum_parts_adds_the_partial_outputs_bias_and_residual(parts, shape, bias, activation, residual):
    rng = np.random.default_rng(0)
    n, c, h, w = shape
    partial = rng.standard_normal((n, parts, c, h * w)).astype(np.float32) * 4
    b = rng.standard_normal(c).astype(np.float32)
    res = rng.standard_normal(shape).astype(np.float32)
    ref = partial.sum(1).reshape(shape) + (b[None, :, None, None] if bias else 0) + (res if residual else 0)
    ref = {None: ref, "relu": np.maximum(ref, 0), "relu6": np.clip(ref, 0, 6)}[activation]
    func = splitk.sum_parts(parts, shape, bias, activation, residual, 8).with_attr("global_symbol", "main")
    run = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    args = [partial] + ([b] if bias else []) + ([res] if residual else []) + [np.zeros(shape, np.float32)]
    args = [tvm.runtime.tensor(a) for a in args]
    run["main"](*args)
    np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-5, atol=1e-5)


class InvertedResidual(torch.nn.Module):
    """Expansion, depthwise conv, projection (pruned), with or without the residual add."""

    def __init__(self, channels, hidden, residual, keep=0.1):
        super().__init__()
        self.expand = torch.nn.Sequential(torch.nn.Conv2d(channels, hidden, 1, bias=False), torch.nn.BatchNorm2d(hidden),
                                          torch.nn.ReLU6())
        self.depthwise = torch.nn.Sequential(torch.nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden),
                                             torch.nn.ReLU6())
        self.project = torch.nn.Sequential(torch.nn.Conv2d(hidden, channels, 1, bias=False), torch.nn.BatchNorm2d(channels))
        self.residual = residual
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for conv in (self.expand[0], self.project[0]):
                conv.weight.mul_(torch.rand(conv.weight.shape, generator=generator) < keep)
            for bn in (self.expand[1], self.project[1]):
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2.0)
                bn.bias.uniform_(-1, 1)
        self.eval()

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


@pytest.mark.parametrize("residual", [True, False])
def test_a_projection_after_our_depthwise_kernel_sums_its_parts_and_matches(residual, monkeypatch):
    """MobileNetV2's 64->384->64 block at 14x14, 90 %: on a CPU of several cores the projection
    runs split, one part per core, and a second kernel adds the parts, the bias and the residual.
    The caches are a Zen 4's (1 MiB L2), where the projection's 301 KiB input runs chunked (a
    split kernel must; with 2 MiB it runs whole)."""
    monkeypatch.setattr(target_module, "sysfs_caches", lambda: (32 << 10, 1 << 20, 64))
    model = InvertedResidual(64, 384, residual)
    x = torch.randn(1, 64, 14, 14, generator=torch.Generator().manual_seed(2))
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    split = [k.spec for k in imported.kernels.values() if isinstance(k.spec, ops.KernelSpec) and k.spec.parts > 1]
    cores = caches(resolve_target(None)).cores
    assert len(split) == (1 if cores > 1 else 0)
    assert all(s.parts == cores and s.out_features == 64 * cores and s.chunk_channels for s in split)
    assert any("sum_parts" in gv.name_hint for gv in imported.mod.get_global_vars()) == (cores > 1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("residual", [True, False])
def test_a_dense_projection_after_our_depthwise_kernel_sums_its_parts_and_matches(residual):
    """The same block unpruned (the dense kernel, whose parts are its outermost tasks) and with
    odd channel counts: 96->576->96 at 7x7, 144 hidden channels -> 5 at 14x14."""
    cores = caches(resolve_target(None)).cores
    for channels, hidden, side in ((96, 576, 7), (5, 144, 14)):
        model = InvertedResidual(channels, hidden, residual and channels == 96, keep=1.0)
        x = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(2))
        imported = fscnn_tvm.import_torch(model, (x,), measure=False)
        split = [k.spec for k in imported.kernels.values() if isinstance(k.spec, dense.DenseConvSpec) and k.spec.parts > 1]
        assert [(s.parts, s.geo.out_channels) for s in split] == ([(cores, channels)] if cores > 1 else [])
        with torch.no_grad():
            ref = model(x).numpy()
        np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4)


def test_only_convs_whose_input_fits_the_cores_l2_and_a_single_image_run_split():
    """Where each core's share of the input exceeds half its L2 (the lines come back from L3
    whoever wrote them), or a batch spreads the depthwise tasks over images, nothing is split."""
    target = "llvm -mcpu=znver4 -num-cores=2"
    cache = caches(resolve_target(target))
    side = int(np.sqrt(cache.l2 // 2 * 2 // (384 * 4))) + 2  # each core's half of the input over L2 / 2
    for shape, keep in (((1, 64, side, side), 0.1), ((2, 64, 14, 14), 0.1), ((1, 64, side, side), 1.0)):
        imported = fscnn_tvm.import_torch(InvertedResidual(64, 384, True, keep), (torch.randn(shape),), measure=False,
                                          target=target)
        assert all(k.spec.parts == 1 for k in imported.kernels.values()
                   if isinstance(k.spec, (ops.KernelSpec, dense.DenseConvSpec)))


@pytest.mark.parametrize("out_channels", [5, 6])
def test_a_split_projection_to_an_odd_number_of_channels_keeps_each_table_row_in_one_part(out_channels):
    """Tables of two channels per row pair channels 2i and 2i+1: with an odd count per part a pair
    would span two parts, so such a conv keeps one channel per row."""
    model = torch.nn.Sequential(torch.nn.Conv2d(384, 384, 3, padding=1, groups=384), torch.nn.ReLU6(),
                                torch.nn.Conv2d(384, out_channels, 1)).eval()
    with torch.no_grad():
        model[2].weight.mul_(torch.rand(model[2].weight.shape, generator=torch.Generator().manual_seed(3)) > 0.9)
    x = torch.randn(1, 384, 14, 14, generator=torch.Generator().manual_seed(4))
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    for spec in (k.spec for k in imported.kernels.values() if isinstance(k.spec, ops.KernelSpec) and k.spec.parts > 1):
        assert spec.ell_shape[0] % spec.parts == 0 and (out_channels % 2 == 0 or spec.ell_shape[2] == 1)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4)
