"""One compiled module for every batch size in a declared range (``dynamic_batch``): every
kernel kind built for a symbolic batch, each batch in range equal to PyTorch, the range's
edges clear errors, records of batch-1 kernels replayed on their dynamic twins."""
import logging

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fscnn_tvm
from fscnn_tvm import depthwise, dense, kernels, ops, prune
from fscnn_tvm.formats import to_csr
from fscnn_tvm.geometry import DYNAMIC
from fscnn_tvm.layer import _build
from test_ops import _uneven_rows, banded


def _model():
    """Every kind of layer the importer rewrites: dense stem, sparse 3x3 (stride 2), depthwise,
    a subsampling 1x1, a flattened 1x1, pooling and a sparse linear."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1, groups=32), torch.nn.ReLU6(),
        torch.nn.Conv2d(32, 64, 1, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()
    prune.prune_magnitude(model, 0.8)
    return model


@pytest.fixture(scope="module")
def dynamic():
    model = _model()
    imported = fscnn_tvm.import_torch(model, (torch.randn(1, 3, 20, 12),), dynamic_batch=(1, 9), measure=False)
    return model, imported, fscnn_tvm.compile(imported)


def _close(out, ref):
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def test_every_batch_in_range_matches_pytorch(dynamic):
    model, imported, compiled = dynamic
    assert imported.input_shapes == [(None, 3, 20, 12)] and imported.batch_range == (1, 9)
    assert {type(k.spec).__name__ for k in imported.kernels.values()} == {"KernelSpec", "DenseConvSpec",
                                                                          "DepthwiseSpec"}
    assert all(kernels.tuned_as(k.spec) != k.spec for k in imported.kernels.values())  # all built for any batch
    for batch in range(1, 10):
        x = torch.randn(batch, 3, 20, 12)
        _close(compiled(x), model(x).detach().numpy())


@pytest.mark.parametrize("shape,match", [
    ((10, 3, 20, 12), r"batch 10 is outside the range .* \(1 to 9\); import it with dynamic_batch=\(1, 10\)"),
    ((0, 3, 20, 12), "batch 0 is outside"), ((2, 3, 20, 13), r"compiled for \(batch, 3, 20, 12\)"),
    ((3, 20, 12), r"compiled for \(batch, 3, 20, 12\)")])
def test_out_of_range_and_wrong_shapes_are_clear_errors(dynamic, shape, match):
    with pytest.raises(ValueError, match=match):
        dynamic[2](np.zeros(shape, np.float32))


def test_export_and_load_keep_the_range(dynamic, tmp_path):
    model, _, compiled = dynamic
    compiled.export_library(str(tmp_path / "m.so"))
    loaded = fscnn_tvm.load(str(tmp_path / "m.so"))
    x = torch.randn(4, 3, 20, 12)
    _close(loaded(x), model(x).detach().numpy())
    with pytest.raises(ValueError, match="outside the range"):
        loaded(np.zeros((10, 3, 20, 12), np.float32))


@pytest.mark.parametrize("value", [(0, 4), (4, 4), (5, 2), (1.0, 4), "yes", (1, 2, 3), 7])
def test_bad_ranges_are_clear_errors(value):
    with pytest.raises(ValueError, match="dynamic_batch"):
        fscnn_tvm.import_torch(torch.nn.Conv2d(3, 4, 1), (torch.randn(1, 3, 4, 4),), dynamic_batch=value)


def test_a_model_that_fixes_its_batch_says_so():
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.reshape(2, -1)
    with pytest.raises(ValueError, match="fixes its batch size"):
        fscnn_tvm.import_torch(Fixed(), (torch.randn(2, 3, 4, 4),), dynamic_batch=(1, 8))


def test_a_program_exported_with_a_dynamic_batch_keeps_it():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    batch = torch.export.Dim("batch", min=2, max=5)
    program = torch.export.export(model, (torch.randn(3, 3, 9, 9),), dynamic_shapes=({0: batch},))
    imported = fscnn_tvm.import_torch(program, measure=False)
    assert imported.batch_range == (2, 5) and imported.input_shapes == [(None, 3, 9, 9)]
    x = torch.randn(5, 3, 9, 9)
    _close(fscnn_tvm.compile(imported)(x), model(x).detach().numpy())
    with pytest.raises(ValueError, match="fixed when it is exported"):
        fscnn_tvm.import_torch(program, dynamic_batch=(1, 4))


def test_batch_one_records_apply_to_the_dynamic_kernels(small_model, default_log, caplog):
    """The records of a batch-1 import (here: each kernel's default schedule) are replayed on
    the dynamic module's kernels: no kernel is reported untuned."""
    model, x, _ = small_model
    imported = fscnn_tvm.import_torch(model, (x,), fmt="csr", measure=False, dynamic_batch=(1, 4))
    with caplog.at_level(logging.WARNING):
        compiled = fscnn_tvm.compile(imported, tuning_log=default_log)
    assert "no tuned record" not in caplog.text
    xs = torch.randn(3, *x.shape[1:])
    _close(compiled(xs), model(xs).detach().numpy())


@settings(max_examples=12, deadline=None, database=None)
@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["csr", "banded", "linear", "dense", "depthwise"]),
       stride=st.integers(1, 2))
def test_dynamic_kernels_match_pytorch(seed, kind, stride):
    """Each kernel kind built for a symbolic batch, run at several batch sizes."""
    rng = np.random.default_rng(seed)
    target = fscnn_tvm.resolve_target(None)
    c, k, hw = 6, 10, 13
    if kind == "linear":
        w = _uneven_rows(rng, (k, 20))
        spec, arrays = ops.kernel_inputs("linear", to_csr(w), (1, 20), None, "relu", target)
    elif kind == "depthwise":
        w = rng.standard_normal((c, 1, 3, 3)).astype(np.float32)
        spec, arrays = depthwise.depthwise_inputs(w, (1, c, hw, hw), None, "relu", target, stride=stride, padding=1)
    elif kind == "dense":
        w = rng.standard_normal((k, c, 3, 3)).astype(np.float32)
        spec, arrays = dense.dense_inputs(w, (1, c, hw, hw), None, "relu", target, stride=stride, padding=1)
    else:
        w = _uneven_rows(rng, (k, c, 3, 3))
        with pytest.MonkeyPatch.context() as patch:
            if kind == "banded":
                patch.setattr(ops, "band_rows_for", lambda layout, cache, *_: banded(layout.geo, seed))
            spec, arrays = ops.kernel_inputs("conv2d", to_csr(w), (1, c, hw, hw), None, "relu", target,
                                             stride=stride, padding=1)
    spec = kernels.batched(spec, DYNAMIC)
    func = _build(kernels.default_schedule(kernels.prim_func(spec), spec), target)
    import tvm
    for batch in (1, 3):
        x = rng.standard_normal((batch,) + tuple(spec.x_shape[1:])).astype(np.float32)
        out = tvm.runtime.empty((batch,) + tuple(spec.out_shape[1:]), "float32")
        func(tvm.runtime.tensor(x), *[tvm.runtime.tensor(a) for a in arrays], out)
        if kind == "linear":
            ref = np.maximum(x @ w.T, 0)
        else:
            groups = c if kind == "depthwise" else 1
            ref = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride,
                                                        padding=1, groups=groups)).numpy()
        _close(out.numpy().reshape(ref.shape), ref)


def test_tuning_tasks_are_the_batch_one_twins(small_model, tmp_path):
    """A tuning job on a dynamic-batch model measures each kernel's batch-1 twin (concrete
    arrays to run on; its record then serves every batch, as above)."""
    from fscnn_tvm import records, tuning
    model, x, static = small_model
    imported = fscnn_tvm.import_torch(model, (x,), fmt="csr", measure=False, dynamic_batch=(1, 4))
    tasks = tuning.extract_tasks(imported, str(tmp_path / "args"))
    assert sorted(t.name for t in tasks) == sorted(imported.kernels)
    static_workloads = [records.workload(k.spec) for k in static.kernels.values()]
    import tvm_ffi
    for task in tasks:
        assert any(tvm_ffi.structural_equal(task.mod, w) for w in static_workloads)
