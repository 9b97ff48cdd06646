"""The tuning jobs' builder and runner: workers kept across batches and jobs, failures reported
per candidate, each job's candidates run on its own arrays."""
import os

import pytest
import tvm
from tvm.s_tir import meta_schedule as ms

from fscnn_tvm import measure, records
from fscnn_tvm.kernels import default_schedule

pytestmark = pytest.mark.slow  # starts worker processes that import TVM


def _candidate(small_model):
    kernel = next(iter(small_model[2].kernels.values()))
    mod = records.workload(kernel.spec)
    return default_schedule(mod["main"], kernel.spec).mod


def test_the_builder_reports_a_failed_candidate_and_keeps_building(small_model):
    target = small_model[2].target
    good = _candidate(small_model)
    no_such_cpu = tvm.target.Target({"kind": "llvm", "mtriple": "nosuchcpu-unknown-none"})
    builder = measure.Pools(None, "unused").builder
    for _ in range(2):  # the same workers serve the second batch
        first, failed, again = builder.build([ms.builder.BuilderInput(good, t) for t in (target, no_such_cpu, target)])
        assert first.error_msg is None and os.path.exists(first.artifact_path)
        assert again.error_msg is None and os.path.exists(again.artifact_path)
        assert failed.artifact_path is None and "build failed" in failed.error_msg


def test_jobs_share_the_runner_and_each_runs_on_its_own_arrays(tmp_path):
    one, two = measure.Pools(None, str(tmp_path / "a")), measure.Pools(None, str(tmp_path / "b"))
    assert one.builder is two.builder
    runner = one.runner
    assert runner._inst.f_alloc_argument.keywords["args_dir"] == str(tmp_path / "a")
    assert two.runner is runner and runner._inst.f_alloc_argument.keywords["args_dir"] == str(tmp_path / "b")
