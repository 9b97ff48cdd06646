"""Where tuning candidates are built and measured: meta_schedule's runner and a builder whose
worker processes live across batches, and the functions those workers run (module-level, so
they pickle by name).

TVM's LocalBuilder starts a fresh pool for every batch of candidates, and each worker's start
imports TVM and, through tvm_ffi, PyTorch: 5-6 s per batch on 2 cores, a third of a small job
and minutes of a long one. Our builder keeps its workers and replaces each after ``USES``
builds, which bounds the memory leak that made TVM restart them."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from functools import partial

import numpy as np
import tvm
from tvm.ir.utils import derived_object
from tvm.s_tir import meta_schedule as ms
from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

from . import _threads
from .lowering import lower_sparse
from .pipeline import PIPELINE
from .target import masked_stores

# Each repeat runs at least 10 ms (tiny kernels loop), a slow candidate only once per repeat: a
# stable median on a noisy 2-core machine without minutes per candidate on 224x224 layers.
EVALUATOR = ms.runner.EvaluatorConfig(number=1, repeat=5, min_repeat_ms=10, enable_cpu_cache_flush=False)
USES = 32  # builds per builder worker before it is replaced


def build_module(mod, target, _params):
    """Build one candidate without importing tvm.s_tir.tensor_intrin (40 s per worker start);
    a sparse kernel is lowered as ``compile`` will run it."""
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock
    masked = masked_stores(target)
    mod = tvm.IRModule({gv: lower_sparse(f, masked) if isinstance(f, tvm.tirx.PrimFunc) else f
                        for gv, f in mod.functions.items()})
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm.tirx.build(mod, target=target, pipeline=PIPELINE)


def args_key(args_info) -> str:
    return hashlib.sha1(json.dumps(args_info).encode()).hexdigest()[:20]


def _real_arguments(device, args_info, alloc_repeat, args_dir):
    path = os.path.join(args_dir, args_key(args_info) + ".npz")
    if not os.path.exists(path):  # a dense task: random data is fine
        from tvm.s_tir.meta_schedule.runner.local_runner import default_alloc_argument
        return default_alloc_argument(device, args_info, alloc_repeat)
    saved = np.load(path)
    rng = np.random.default_rng(0)
    args = []
    for i, (_, dtype, shape) in enumerate(args_info):
        value = saved[f"a{i}"] if f"a{i}" in saved else rng.standard_normal(shape).astype(dtype)
        args.append(tvm.runtime.tensor(value, device))
    return [args for _ in range(alloc_repeat)]


def alloc_local(device, args_info, alloc_repeat, args_dir):
    return _real_arguments(device, args_info, alloc_repeat, args_dir)


def alloc_rpc(session, device, args_info, alloc_repeat, args_dir):
    del session  # tensors are created on the remote device through it
    return _real_arguments(device, args_info, alloc_repeat, args_dir)


def _build_and_export(mod, target) -> str:
    from tvm.support.tar import tar
    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod." + tar.output_format)
    build_module(mod, target, None).export_library(path, fcompile=tar)
    return path


@derived_object
class PooledBuilder(ms.builder.PyBuilder):
    """Builds candidates (as LocalBuilder with ``build_module``) in workers kept across batches."""

    def __init__(self, timeout_sec: float = 120):
        super().__init__()
        self.timeout_sec = timeout_sec
        self.pool = PopenPoolExecutor(max_workers=_threads.cores(), timeout=timeout_sec,
                                      maximum_process_uses=USES)

    def build(self, build_inputs):
        results = []
        for done in self.pool.map_with_error_catching(lambda i: _build_and_export(i.mod, i.target), build_inputs):
            if done.status == StatusKind.COMPLETE:
                results.append(ms.builder.BuilderResult(done.value, None))
            elif done.status == StatusKind.TIMEOUT:
                results.append(ms.builder.BuilderResult(None, f"build timed out, killed after {self.timeout_sec} s"))
            else:
                results.append(ms.builder.BuilderResult(None, f"build failed: {done.value}"))
        return results


def make_runner(tracker, args_dir):
    if tracker is None:
        return ms.runner.LocalRunner(timeout_sec=60, evaluator_config=EVALUATOR,
                                     f_alloc_argument=partial(alloc_local, args_dir=args_dir))
    host, port, key = tracker
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key, session_timeout_sec=120)
    return ms.runner.RPCRunner(config, evaluator_config=EVALUATOR,
                               f_alloc_argument=partial(alloc_rpc, args_dir=args_dir))


class Pools:
    """The builder and runner. Each starts worker processes that import TVM (seconds apiece), so
    they are made on first use (a job with nothing left to measure should not pay for them) and
    kept for the process's later jobs, which take turns (``tuning.tune`` holds a lock: two jobs
    measuring at once would spoil each other's timings anyway)."""
    made: dict = {}

    def __init__(self, tracker, args_dir):
        self._tracker, self._args_dir = tracker, args_dir

    @classmethod
    def _shared(cls, key, make):
        if key not in cls.made:
            cls.made[key] = make()
        return cls.made[key]

    @property
    def builder(self):
        return self._shared("builder", PooledBuilder)

    @property
    def runner(self):
        runner = self._shared(("runner", self._tracker), lambda: make_runner(self._tracker, self._args_dir))
        # A shared runner's candidates run on this job's arrays (its log's args folder).
        runner._inst.f_alloc_argument = partial(alloc_local if self._tracker is None else alloc_rpc,
                                                args_dir=self._args_dir)
        return runner
