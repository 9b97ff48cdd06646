"""Shared by the tests: a small pruned model and a tuning log made
without a tuning job."""
import os

import pytest
import torch
from tvm.s_tir import meta_schedule as ms

import fscnn_tvm
from fscnn_tvm import kernels, prune, records


@pytest.fixture(scope="session")
def small_model():
    """(model, input, imported with three sparse kernels: two convs and the linear)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 5 * 5, 10)).eval()
    prune.prune_magnitude(model, 0.85, keep_first_conv_dense=False)
    x = torch.randn(1, 8, 10, 10)
    return model, x, fscnn_tvm.import_torch(model, (x,), fmt="csr", measure=False)


@pytest.fixture
def default_log(small_model, tmp_path) -> str:
    """A tuning log holding each of the small model's kernels' default schedule as its one record."""
    imported, log_dir = small_model[2], str(tmp_path / "log")
    os.makedirs(log_dir)
    db = ms.database.JSONDatabase(work_dir=log_dir)
    for kernel in imported.kernels.values():
        mod = records.workload(kernel.spec)
        sch = kernels.default_schedule(mod["main"], kernel.spec)
        args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, db.commit_workload(mod), [1e-3], imported.target,
                                                         args))
    return log_dir
