"""runtime: calls from several threads; the profile of a call;
exported libraries, their checksum and their sidecar."""
import json
import os
import re
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

import fscnn_tvm
from fscnn_tvm import runtime
from fscnn_tvm.records import sparse_kernels
from fscnn_tvm.target import resolve_target
from test_chunks import BIG, Block, _pruned
from test_unscheduled import ResidualAndPool


def test_one_compiled_model_called_from_many_threads_at_once():
    model = runtime.CompiledModel(runtime.compile_module(ResidualAndPool, resolve_target(None)))
    rng = np.random.default_rng(0)
    inputs = [tuple(rng.standard_normal((1, 8, 12, 12)).astype(np.float32) for _ in range(2)) for _ in range(8)]
    expected = [model(*xy) for xy in inputs]  # one thread
    start, results, errors = threading.Barrier(8), {}, []

    def work(i):
        try:
            start.wait()
            run = model.runner(*inputs[i])
            results[i] = [model(*inputs[i]) for _ in range(10)]
            run()
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for i in range(8):
        for out in results[i]:
            np.testing.assert_array_equal(out, expected[i])


def _exported(tmp_path):
    """ResidualAndPool compiled and exported as model.so, with its inputs and outputs."""
    model = runtime.CompiledModel(runtime.compile_module(ResidualAndPool, resolve_target(None)),
                                  [(1, 8, 12, 12), (1, 8, 12, 12)])
    x, y = (np.random.default_rng(i).standard_normal((1, 8, 12, 12)).astype(np.float32) for i in range(2))
    lib = str(tmp_path / "model.so")
    model.export_library(lib)
    return lib, (x, y), model(x, y)


def test_the_profile_names_each_kernel_once_a_call_and_adds_up_to_the_call(small_model):
    model, x, imported = small_model
    compiled = fscnn_tvm.compile(imported)
    rows = compiled.profile(x, runs=3)
    calls = {name: n for name, n, _ in rows}
    assert {name for name in calls if name.startswith("sparse_")} == set(sparse_kernels(imported))
    assert all(calls[name] == 1 for name in sparse_kernels(imported))
    assert all(ms >= 0 for _, _, ms in rows) and [ms for *_, ms in rows] == sorted((ms for *_, ms in rows), reverse=True)
    with pytest.raises(ValueError, match="runs"):
        compiled.profile(x, runs=0)
    with pytest.raises(ValueError, match="shape"):
        compiled.profile(np.zeros((2, 8, 10, 10), np.float32))


def test_a_batch_chunks_time_is_its_own_not_its_kernels():
    """A batch run in chunks calls each chunk function several times, and it calls the kernels:
    a chunk's row holds only its own time (views, the VM's calls), less than its kernels'."""
    torch.manual_seed(1)
    model = _pruned(torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), Block(16),
                                        torch.nn.MaxPool2d(4), torch.nn.Flatten()))
    x = torch.randn(*BIG)
    compiled = fscnn_tvm.compile(fscnn_tvm.import_torch(model, (x,), measure=False))
    rows = compiled.profile(x, runs=3)
    chunks = [(calls, ms) for name, calls, ms in rows if name.startswith("chunk")]
    kernels = sum(ms for name, _, ms in rows if name.startswith(("sparse_", "dense_")))
    assert chunks and all(calls > 1 for calls, _ in chunks)
    assert sum(ms for _, ms in chunks) < kernels


def test_export_writes_a_checksum_and_load_refuses_a_damaged_library(tmp_path):
    lib, inputs, expected = _exported(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model.so", "model.so.inputs"]  # no temporary files left
    with open(lib + ".inputs") as f:
        assert len(json.load(f)["sha256"]) == 64
    np.testing.assert_array_equal(runtime.load(lib)(*inputs), expected)
    # Truncated as by a full disk or an interrupted copy: loading it used to die of SIGBUS,
    # so it is loaded in a child process.
    damaged = str(tmp_path / "damaged.so")
    with open(lib, "rb") as f:
        data = f.read()
    with open(damaged, "wb") as f:
        f.write(data[: len(data) // 2])
    shutil.copy(lib + ".inputs", damaged + ".inputs")
    code = f"import fscnn_tvm\nfscnn_tvm.load({damaged!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"ValueError: {damaged} is damaged or changed since export" in proc.stderr and "re-export it" in proc.stderr


def test_libraries_without_a_checksum_load_and_a_damaged_sidecar_is_named(tmp_path):
    lib, inputs, expected = _exported(tmp_path)
    with open(lib + ".inputs", "w") as f:  # what earlier versions wrote: only the input shapes
        json.dump([[1, 8, 12, 12], [1, 8, 12, 12]], f)
    model = runtime.load(lib)
    np.testing.assert_array_equal(model(*inputs), expected)
    with pytest.raises(ValueError, match="compiled for"):
        model(inputs[0][:, :4], inputs[1])
    os.remove(lib + ".inputs")
    bare = runtime.load(lib)
    np.testing.assert_array_equal(bare(*inputs), expected)
    # Without the sidecar the VM checks the inputs itself: its check failures become the same errors.
    with pytest.raises(ValueError, match=re.escape("shape (1, 4, 12, 12), but the model was compiled for (1, 8, 12, 12)")):
        bare(inputs[0][:, :4], inputs[1])
    with pytest.raises(ValueError, match="expected 2 input"):
        bare(inputs[0])
    for junk in ("{not json", '{"input_shapes": 5}'):
        with open(lib + ".inputs", "w") as f:
            f.write(junk)
        with pytest.raises(ValueError, match=re.escape(f"{lib}.inputs (the input shapes and checksum of {lib}) is "
                                                       "damaged")):
            runtime.load(lib)


def test_export_errors_are_clear_and_a_failed_export_leaves_nothing(tmp_path, monkeypatch):
    model = runtime.CompiledModel(runtime.compile_module(ResidualAndPool, resolve_target(None)))
    with pytest.raises(ValueError, match="must end in .so"):
        model.export_library(tmp_path / "model.lib")
    missing = tmp_path / "no" / "such"
    with pytest.raises(FileNotFoundError, match=f"directory {missing} does not exist"):
        model.export_library(missing / "model.so")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime.json, "dump", disk_full)  # the sidecar write fails
    with pytest.raises(OSError, match="No space left"):
        model.export_library(tmp_path / "model.so")
    assert os.listdir(tmp_path) == []
