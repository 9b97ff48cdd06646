"""Importer: PyTorch -> Relax -> sparse rewrite, compared with PyTorch end to end."""
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import fscnn_tvm
from fscnn_tvm import prune
from fscnn_tvm.importer import choose_format


def _prune_(module, sparsity, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and getattr(m, "groups", 1) == 1:
                m.weight[torch.rand(m.weight.shape, generator=gen) < sparsity] = 0.0
    return module


class Mixed(torch.nn.Module):
    """Every case the rewrite has to get right, in one graph."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(16)
        self.down = torch.nn.Conv2d(16, 24, 3, stride=2, padding=0, bias=False)
        self.grouped = torch.nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.depthwise = torch.nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.pointwise = torch.nn.Conv2d(24, 24, 1)
        self.dense_one = torch.nn.Conv2d(24, 24, 3, padding=1)  # left dense: below threshold
        self.fc = torch.nn.Linear(24, 7)
        self.input_weight = torch.nn.Parameter(torch.randn(24, 24, 1, 1))
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.bn.weight.uniform_(0.5, 2.0)
            self.bn.bias.uniform_(-1, 1)

    def forward(self, x, w_in):
        y = torch.relu(self.bn(self.stem(x)))
        y = torch.relu(self.down(y))
        y = self.grouped(y) + y  # residual add
        y = self.depthwise(y)
        y = torch.relu(self.pointwise(y)) + y
        y = torch.nn.functional.conv2d(y, w_in)  # weight is a graph input
        y = self.dense_one(y)
        y = torch.nn.functional.adaptive_avg_pool2d(y, 1).flatten(1)
        return self.fc(y)


def _mixed():
    torch.manual_seed(0)
    model = _prune_(Mixed().eval(), 0.9)
    with torch.no_grad():
        model.dense_one.weight.copy_(torch.randn_like(model.dense_one.weight))
    return model


def test_the_report_names_a_conv_that_runs_on_shared_rows():
    """A 70 % 3x3 conv on an AVX-512 target (32 registers) whose rows are not interleaved (14
    pixels: one vector) runs its CSR weights as rows of 3 channels (``tiles.shared_channels``);
    the report says so. Only the spec is built (no run)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(512, 512, 3, padding=1), torch.nn.ReLU()).eval()
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(model[0].weight.shape, generator=torch.Generator().manual_seed(0)) > 0.7)
    imported = fscnn_tvm.import_torch(model, (torch.randn(1, 512, 14, 14),), measure=False,
                                      target="llvm -mcpu=znver4 -num-cores=2")
    assert imported.report[0].fmt == "csr (3 channels per row)"
    assert "csr (3 channels per row)" in str(imported)


@pytest.mark.parametrize("batch", [1, 2])
def test_mixed_model_rewrites_where_it_should(batch):
    model = _mixed()
    # 33x13 input: "down" gives 16x6 maps, which the pointwise conv runs on flattened.
    x, w_in = torch.randn(batch, 3, 33, 13), torch.randn(24, 24, 1, 1)
    imported = fscnn_tvm.import_torch(model, (x, w_in), measure=False)
    rows = {r.name: r for r in imported.report}
    assert [k.spec.flat_hw for k in imported.kernels.values() if "pointwise" in k.layers] == [(16, 6)]
    assert rows["stem"].rewritten and rows["stem"].fused == ["bias", "bn", "relu"]
    assert rows["down"].rewritten and rows["down"].fused == ["relu"]
    assert rows["pointwise"].rewritten and rows["fc"].rewritten
    assert not rows["grouped"].rewritten and "groups=4" in rows["grouped"].reason
    assert not rows["depthwise"].rewritten and "groups=24" in rows["depthwise"].reason
    assert not rows["dense_one"].rewritten and "threshold" in rows["dense_one"].reason
    inputs = [r for r in imported.report if "graph input" in r.reason]
    assert len(inputs) == 1
    assert "sparse" in str(imported) and "stem" in str(imported)
    compiled = fscnn_tvm.compile(imported)
    ref = model(x, w_in).detach().numpy()
    out = compiled(x, w_in)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("sparse_ms,dense_ms,runs_sparse", [(2.0, 1.0, False), (1.0, 2.0, True)])
def test_measured_choice_keeps_the_faster_kernel(monkeypatch, sparse_ms, dense_ms, runs_sparse):
    """The choice follows the timings (stubbed here: tests do not assert speed); either way the
    output matches and a dense choice says why."""
    from fscnn_tvm import pick
    calls = []
    monkeypatch.setattr(pick, "time_conv", lambda *a, **k: calls.append(a) or (sparse_ms, dense_ms))
    model = _mixed()
    x, w_in = torch.randn(1, 3, 9, 9), torch.randn(24, 24, 1, 1)
    imported = fscnn_tvm.import_torch(model, (x, w_in))
    rows = {r.name: r for r in imported.report}
    assert len(calls) == 3  # stem, down, pointwise: the convs over the threshold; not fc, grouped, dense_one
    for name in ("stem", "down", "pointwise"):
        assert rows[name].rewritten == runs_sparse
        assert runs_sparse or "dense kernel faster here: 1 ms vs 2 ms sparse" == rows[name].reason
    assert rows["fc"].rewritten
    ref = model(x, w_in).detach().numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x, w_in), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


class _DensePointwise(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pointwise = torch.nn.Conv2d(8, 32, 1)
        self.shortcut = torch.nn.Conv2d(32, 16, 1, stride=2, bias=False)  # subsampled: a stride-1 1x1 conv
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.conv(self.shortcut(torch.relu(self.pointwise(x))))


@pytest.mark.parametrize("sparse_ms,dense_ms,runs_csr", [(2.0, 1.0, False), (1.0, 2.0, True)])
def test_dense_pointwise_convs_race_the_csr_kernel(monkeypatch, sparse_ms, dense_ms, runs_csr):
    """Pointwise convs under the threshold (dense weights) run the CSR kernel where it times
    faster, and say so; the 3x3 conv is not raced; without timing all stay dense."""
    from fscnn_tvm import pick
    calls = []
    monkeypatch.setattr(pick, "time_conv", lambda *a, **k: calls.append(a[0].shape) or (sparse_ms, dense_ms))
    torch.manual_seed(0)
    model, x = _DensePointwise().eval(), torch.randn(1, 8, 10, 10)
    ref = model(x).detach().numpy()
    imported = fscnn_tvm.import_torch(model, (x,))
    rows = {r.name: r for r in imported.report}
    assert calls == [(32, 8, 1, 1), (16, 32, 1, 1)]
    for name in ("pointwise", "shortcut"):
        assert rows[name].rewritten == runs_csr and "threshold" in rows[name].reason
        assert ("but the CSR kernel is faster here: 1 ms vs 2 ms dense" in rows[name].reason) == runs_csr
    assert not rows["conv"].rewritten
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    unmeasured = fscnn_tvm.import_torch(model, (x,), measure=False)
    assert len(calls) == 2 and not any(r.rewritten for r in unmeasured.report)


def test_measured_choice_times_real_kernels_built_ahead():
    from fscnn_tvm import layer, pick
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8, 3, 3)).astype(np.float32) * (rng.random((16, 8, 3, 3)) > 0.8)
    conv_args = {"stride": 1, "padding": (1, 1, 1, 1), "dilation": 1}
    target = fscnn_tvm.resolve_target(None)
    pick.prebuild([(w, (1, 8, 12, 12), None, "relu", "csr", None, conv_args)], target)
    built = layer._compiled.cache_info().misses
    sparse_ms, dense_ms = pick.time_conv(w, (1, 8, 12, 12), None, "relu", "csr", None, target, **conv_args)
    assert 0 < sparse_ms < 1e3 and 0 < dense_ms < 1e3
    assert layer._compiled.cache_info().misses == built  # both kernels were built ahead


def test_no_timing_for_another_cpu(monkeypatch):
    from fscnn_tvm import pick
    monkeypatch.setattr(pick, "time_conv", lambda *a, **k: pytest.fail("timed a kernel for another CPU"))
    model = _mixed()
    imported = fscnn_tvm.import_torch(model, (torch.randn(1, 3, 9, 9), torch.randn(24, 24, 1, 1)),
                                      target={"kind": "llvm", "mcpu": "x86-64"})
    assert {r.name for r in imported.report if r.rewritten} >= {"stem", "down", "pointwise"}


def test_threshold_one_keeps_everything_dense_and_still_matches():
    model = _mixed()
    x, w_in = torch.randn(1, 3, 9, 9), torch.randn(24, 24, 1, 1)
    imported = fscnn_tvm.import_torch(model, (x, w_in), sparsity_threshold=1.0)
    # Only a pointwise conv may run the CSR kernel under the threshold, where it timed faster.
    assert all(r.weight_shape[2:] == (1, 1) and "but the CSR kernel is faster here" in r.reason
               for r in imported.report if r.rewritten)
    assert not any(r.rewritten for r in fscnn_tvm.import_torch(model, (x, w_in), sparsity_threshold=1.0,
                                                                measure=False).report)
    ref = model(x, w_in).detach().numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x, w_in), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_several_outputs_return_a_tuple():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 4)

        def forward(self, x):
            y = self.a(x)
            return y, torch.relu(y)

    model = _prune_(Two().eval(), 0.8)
    x = torch.randn(3, 8)
    out = fscnn_tvm.compile(fscnn_tvm.import_torch(model, (x,), sparsity_threshold=0.0))(x)
    assert isinstance(out, tuple) and len(out) == 2
    for got, ref in zip(out, model(x)):
        np.testing.assert_allclose(got, ref.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_auto_format_picks_bsr_for_block_pruned_weights():
    w = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    blocks = np.random.default_rng(1).random((4, 64)) < 0.9
    w[np.repeat(blocks, 8, axis=0)] = 0.0
    assert choose_format(w, "auto", None) == ("bsr", (8, 1))
    w2 = np.random.default_rng(2).standard_normal((32, 64)).astype(np.float32)
    w2[np.random.default_rng(3).random(w2.shape) < 0.9] = 0.0
    assert choose_format(w2, "auto", None) == ("csr", None)


def test_export_and_load_in_a_fresh_process_without_torch(tmp_path):
    model = _mixed()
    x, w_in = torch.randn(1, 3, 11, 11), torch.randn(24, 24, 1, 1)
    compiled = fscnn_tvm.compile(fscnn_tvm.import_torch(model, (x, w_in), measure=False))
    lib = tmp_path / "mixed.so"
    compiled.export_library(lib)
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "w.npy", w_in.numpy())
    np.save(tmp_path / "ref.npy", compiled(x, w_in))
    code = (
        "import sys; sys.modules['torch'] = None\n"  # torch must not be needed to run
        "import numpy as np, fscnn_tvm\n"
        f"d = {str(tmp_path)!r}\n"
        "m = fscnn_tvm.load(d + '/mixed.so')\n"
        "out = m(np.load(d + '/x.npy'), np.load(d + '/w.npy'))\n"
        "assert np.array_equal(out, np.load(d + '/ref.npy')), 'outputs differ'\n"
        "print('same')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "same" in proc.stdout


def test_compiled_model_rejects_wrong_input_shape():
    model = _prune_(torch.nn.Sequential(torch.nn.Linear(6, 5)).eval(), 0.8)
    compiled = fscnn_tvm.compile(fscnn_tvm.import_torch(model, (torch.randn(2, 6),), sparsity_threshold=0.0))
    with pytest.raises(ValueError, match="compiled for"):
        compiled(np.zeros((3, 6), np.float32))


def test_bad_inputs_give_clear_errors(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fscnn_tvm.import_torch("not a model", (torch.randn(1, 3, 8, 8),))
    with pytest.raises(ValueError, match="does not run on example inputs"):
        fscnn_tvm.import_torch(model, (torch.randn(1, 5, 8, 8),))
    for bad in (-0.1, 1.5, "0.5", None):
        with pytest.raises(ValueError, match="sparsity_threshold"):
            fscnn_tvm.import_torch(model, (torch.randn(1, 3, 8, 8),), sparsity_threshold=bad)
    with pytest.raises(ValueError, match="fmt"):
        fscnn_tvm.import_torch(model, (torch.randn(1, 3, 8, 8),), fmt="coo")
    from fscnn_tvm.torch_export import load_program
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_program(tmp_path / "missing.pt2")
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"this is not a program")
    with pytest.raises(ValueError, match="not a torch.export program"):
        load_program(junk)
    with pytest.raises(FileNotFoundError):
        fscnn_tvm.load(tmp_path / "missing.so")
    with pytest.raises(ValueError, match="not a compiled"):
        fscnn_tvm.load(junk)


def test_import_leaves_the_models_training_flags_as_they_were():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Dropout(0.5)).train()
    model[2].eval()  # flags differ per module: each is put back
    flags = lambda: [m.training for m in model.modules()]  # noqa: E731
    before = flags()
    imported = fscnn_tvm.import_torch(model, (torch.randn(1, 3, 8, 8),), measure=False)
    assert flags() == before
    assert "training mode" in str(imported) and "BatchNorm folded with its running statistics" in str(imported)
    with pytest.raises(ValueError, match="does not run on example inputs"):  # restored on errors too
        fscnn_tvm.import_torch(model, (torch.randn(1, 5, 8, 8),))
    assert flags() == before
    assert "training mode" not in str(fscnn_tvm.import_torch(model.eval(), (torch.randn(1, 3, 8, 8),), measure=False))


def test_a_module_without_example_inputs_is_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    with pytest.raises(TypeError, match="example_inputs: a torch.nn.Module is traced on example inputs"):
        fscnn_tvm.import_torch(model)
    for bad in (5, "x", (torch.randn(1, 3, 8, 8), 2)):
        with pytest.raises(TypeError, match="example_inputs: expected a tensor or a tuple of tensors"):
            fscnn_tvm.import_torch(model, bad)


def test_import_shows_no_torch_deprecation_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fscnn_tvm.import_torch(_small_float_model(), (torch.randn(1, 3, 8, 8),), measure=False)
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


def _small_float_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(8 * 6 * 6, 4)).eval()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")  # torch.ao.quantization's
def test_half_precision_and_quantized_models_are_refused_up_front():
    x = torch.randn(1, 3, 8, 8)
    half = _small_float_model().half()
    for model in (half, torch.export.export(half, (x.half(),))):
        with pytest.raises(ValueError, match=r"only float32 models are supported, 0.weight is torch.float16 "
                                             r".*model.float\(\)"):
            fscnn_tvm.import_torch(model, (x.half(),), measure=False)
    quantized = torch.ao.quantization.quantize_dynamic(_small_float_model(), {torch.nn.Linear}, dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"quantized modules \(3, 3._packed_params\) are not supported; "
                                         r".* prune the float model instead of quantizing it"):
        fscnn_tvm.import_torch(quantized, (x,), measure=False)
    fscnn_tvm.import_torch(half.float(), (x,), measure=False)  # converted back: imports


class _AddsAfterLayers(torch.nn.Module):
    """Constants that have as many elements as output channels but broadcast along other axes."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.fc = torch.nn.Linear(8 * 8 * 8, 4, bias=False)
        self.register_buffer("row", torch.randn(8))            # (K,) on NCHW runs along the width (W == K)
        self.register_buffer("wide", torch.randn(1, 1, 1, 8))  # along the width, 4-d
        self.register_buffer("column", torch.randn(4, 1))      # along the batch of the linear (N == K)

    def forward(self, x):
        y = self.conv(x) + self.row
        y = self.conv(y[:, :3]) + self.wide
        return self.fc(y.flatten(1)) + self.column


@pytest.mark.parametrize("sparse", [True, False])
def test_constants_that_are_not_per_channel_are_not_folded_into_the_bias(sparse):
    model = _prune_(_AddsAfterLayers().eval(), 0.8)
    x = torch.randn(4, 3, 8, 8)
    imported = fscnn_tvm.import_torch(model, (x,), sparse=sparse, measure=False)
    assert not any("bias" in r.fused for r in imported.report)
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("threshold", [0.5, 1.0])  # sparse kernel, dense kernel
def test_subsampling_pointwise_convs_run_on_the_subsampled_input(threshold):
    """ResNet's downsample shortcut (1x1, stride 2, no padding) and an odd one (stride (2, 3) on
    odd sizes): each runs as a stride-1 conv on the input subsampled before the kernel."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, stride=2), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 12, 1, stride=(2, 3), bias=False)).eval()
    prune.prune_magnitude(model, 0.8, keep_first_conv_dense=False)
    x = torch.randn(2, 8, 29, 23)
    imported = fscnn_tvm.import_torch(model, (x,), sparsity_threshold=threshold, measure=False)
    pixels = sorted((k.spec.geo.in_channels, k.spec.geo.height * k.spec.geo.width) for k in imported.kernels.values())
    assert pixels == [(8, 15 * 12), (16, 8 * 4)]  # (flattened or not, read in place or not)
    assert all(k.spec.geo.stride == (1, 1) for k in imported.kernels.values())
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


class _Residual(torch.nn.Module):
    """A 3x3 conv + BN + residual + ReLU (ResNet's), then a 1x1 conv + bias + residual (MobileNetV2's)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)) + x)
        return self.b(y) + y


@pytest.mark.parametrize("threshold", [0.5, 1.0])  # sparse kernels, dense kernels
def test_a_residual_add_is_read_in_the_producing_convs_epilogue(threshold):
    torch.manual_seed(0)
    model = _Residual()
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.1)
        model.bn.running_var.uniform_(0.5, 1.5)
    prune.prune_magnitude(model, 0.8, keep_first_conv_dense=False)
    x = torch.randn(2, 8, 16, 6)  # the 1x1 conv runs on its image flattened to one row of 96 pixels
    imported = fscnn_tvm.import_torch(model.eval(), (x,), sparsity_threshold=threshold, measure=False)
    rows = {r.name: r for r in imported.report}
    assert rows["a"].fused == ["bias", "bn", "add", "relu"] and rows["b"].fused == ["bias", "add"]
    assert all(k.spec.residual for k in imported.kernels.values()) and len(imported.kernels) == 2
    assert [r.rewritten for r in imported.report] == [threshold < 1] * 2
    assert "relax.add" not in imported.mod["main"].script()
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_an_add_the_epilogue_cannot_take_stays_an_add():
    class Broadcast(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x, y):
            return torch.relu(self.conv(x) + y)  # y broadcasts along the rows: not the output's shape
    model = Broadcast().eval()
    prune.prune_magnitude(model, 0.8, keep_first_conv_dense=False)
    x, y = torch.randn(1, 4, 6, 6), torch.randn(1, 4, 1, 6)
    imported = fscnn_tvm.import_torch(model, (x, y), measure=False)
    assert imported.report[0].fused == ["bias"] and not any(k.spec.residual for k in imported.kernels.values())
    ref = model(x, y).detach().numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x, y), ref, rtol=1e-4, atol=1e-4)


def test_a_ragged_pointwise_conv_reads_in_place_unless_our_depthwise_kernel_wrote_its_input():
    """On AVX-512 a 90 % pointwise conv on a 14x14 map reads its input where it lies after an
    elementwise op, and keeps its layout pass after our depthwise kernel (each core wrote half of
    the channels every task of the pointwise conv reads). Only the specs are built (no run)."""
    from fscnn_tvm import ops
    generator = torch.Generator().manual_seed(0)
    after_relu = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(96, 24, 1)).eval()
    after_depthwise = torch.nn.Sequential(torch.nn.Conv2d(96, 96, 3, padding=1, groups=96), torch.nn.ReLU6(),
                                          torch.nn.Conv2d(96, 24, 1)).eval()
    for model, in_place in ((after_relu, True), (after_depthwise, False)):
        with torch.no_grad():
            model[-1].weight.mul_(torch.rand(model[-1].weight.shape, generator=generator) > 0.9)
        imported = fscnn_tvm.import_torch(model, (torch.randn(1, 96, 14, 14),), measure=False,
                                          target="llvm -mcpu=znver4 -num-cores=2")
        [spec] = [k.spec for k in imported.kernels.values() if isinstance(k.spec, ops.KernelSpec)]
        assert spec.masked_row == in_place
        assert not in_place or spec.flat_hw == (14, 14)


def test_a_sparse_convs_pool_runs_in_its_chunked_kernel():
    """VGG's conv, ReLU, 2x2 max pool: the pool in the sparse kernel's tasks where it runs chunked
    (``tiles.with_pool``), after it otherwise (the small second conv), both matching PyTorch."""
    model = torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Conv2d(32, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2)).eval()
    torch.manual_seed(3)
    prune.prune_magnitude(model, 0.9, keep_first_conv_dense=False)
    x = torch.randn(1, 32, 64, 64)
    imported = fscnn_tvm.import_torch(model, (x,), measure=False)
    pools = [getattr(k.spec, "pool", 0) for k in imported.kernels.values()]
    assert pools == [2, 0] and [r.fused for r in imported.report] == [["bias", "relu", "max_pool2d"]] * 2
    assert imported.mod["main"].script().count("max_pool2d") == 1
    ref = model(x).detach().numpy()
    np.testing.assert_allclose(fscnn_tvm.compile(imported)(x), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
