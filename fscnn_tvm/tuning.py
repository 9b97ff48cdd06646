"""Autotuning jobs: meta_schedule over the sparse kernels' design spaces (and TVM's default
rules for the dense ops), XGBoost cost model, JSON tuning logs that TVM's tools read.

Three traps each turn a tuning run into "0 valid trials" without an error (see README):
the stock LocalBuilder imports tensor intrinsics for ~40 s per batch and times out, so we
build with our own builder (``measure``); the stock runner feeds random index buffers that
gather out of bounds, so each candidate is measured on its layer's real arrays, saved next to
the log and looked up by the argument shapes; and the default design space cannot sample the
sparse block, so each kernel brings its own (``schedule.schedule_sparse`` with sampled decisions).
"""
from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np
import tvm
from tvm.ir.utils import derived_object
from tvm.rpc import base as rpc_base
from tvm.s_tir import meta_schedule as ms

from . import kernels
from .intrinsics import import_cpu_intrinsics
from .measure import Pools, args_key
from .records import (add_width_classes, best_schedule, has_trace, schedule_kernels, shipped_database, workload,
                      workload_records)
from .target import resolve_target
from .tuning_log import open_database

log = logging.getLogger("fscnn_tvm.tuning")
ARGS_DIR = "args"


class TuningError(RuntimeError):
    """A tuning job that produced nothing usable."""


# ----------------------------------------------------------------------------- tasks

@dataclass
class Task:
    name: str
    mod: tvm.IRModule
    weight: float
    space: object  # a SpaceGenerator or "post-order-apply"
    layers: list
    spec: object = None  # our kernels only (ops.KernelSpec or dense.DenseConvSpec)


def kernel_space(spec):
    """Design spaces of one of our kernels: one per structural variant, tiles and unrolling
    sampled within each."""
    return ms.space_generator.ScheduleFn(lambda sch: kernels.design_spaces(sch.mod["main"], spec))


def extract_tasks(imported, args_dir: str, dense: bool = True, target=None) -> list[Task]:
    """One task per sparse kernel (measured on its first layer's real arrays) and, with
    ``dense``, one per fused dense conv/matmul function of the module (TVM's default rules)."""
    import_cpu_intrinsics(imported.target if target is None else target)  # before meta_schedule imports all of TVM's
    os.makedirs(args_dir, exist_ok=True)
    tasks = []
    for name, kernel in imported.kernels.items():
        spec = kernels.tuned_as(kernel.spec)
        mod = workload(spec)
        info = [a.as_json() for a in ms.arg_info.ArgInfo.from_prim_func(mod["main"])]
        # Real weights, offsets and bias; x and the output are filled at random.
        arrays = {f"a{i + 1}": a for i, a in enumerate(kernel.arrays)}
        np.savez(os.path.join(args_dir, args_key(info) + ".npz"), **arrays)
        tasks.append(Task(name, mod, float(len(kernel.layers)), kernel_space(spec), kernel.layers, spec))
    if dense and imported.batch_range is not None:
        log.info("dynamic batch: TVM's own ops (dense matmuls) are not tuned; every conv is a kernel of ours")
    elif dense:
        from tvm.s_tir.meta_schedule.relax_integration import extract_tasks as relax_tasks
        from tvm import relax

        mod, _ = schedule_kernels(imported)
        # The same fusion compile_relax applies, so the tuned workloads match at compile time.
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FoldConstant(), relax.transform.FuseOps(),
                                        relax.transform.FuseTIR()])(mod)
        for t in relax_tasks(mod, imported.target):
            if t.task_name not in imported.kernels and any(k in t.task_name for k in ("conv2d", "matmul")):
                tasks.append(Task(t.task_name, t.dispatched[0], float(t.weight), "post-order-apply", []))
    return tasks


# ----------------------------------------------------------------------------- the job

def _median_secs(run_secs) -> float:
    return float(np.median([float(t) for t in run_secs])) if run_secs else float("inf")


@derived_object
class Progress(ms.measure_callback.PyMeasureCallback):
    """One line per measured batch: trials done, best time per task, ETA; failed candidates
    are logged (first line of the error) and skipped."""

    def __init__(self, names, total, out=None):
        super().__init__()
        self.names, self.total, self.out = names, total, out
        self.done, self.failed, self.best, self.start = 0, 0, {}, time.time()

    def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
        name = self.names[task_id]
        for b, r in zip(builder_results, runner_results):
            self.done += 1
            error = b.error_msg or r.error_msg
            if error:
                self.failed += 1
                log.warning("%s: candidate failed, skipped: %s", name, str(error).strip().splitlines()[-1][:200])
            elif r.run_secs:
                self.best[name] = min(self.best.get(name, float("inf")), _median_secs(r.run_secs) * 1e3)
        elapsed = time.time() - self.start
        eta = elapsed / self.done * max(0, self.total - self.done)
        width = 24
        filled = int(width * min(self.done, self.total) / self.total)
        best = f"{self.best[name]:.3f} ms" if name in self.best else "n/a"
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} trials, "
                f"{self.failed} failed, {name} best {best}, elapsed {elapsed:.0f} s, ETA {eta:.0f} s")
        if self.out is not None:
            print(line, file=self.out, flush=True)
        else:
            log.info(line)


# A task stops once this many of its candidates in a row have not beaten its best time by
# CONVERGED_GAIN (the defaults and shipped records it started from count as its best): its
# search has converged, and the job's remaining trials go to the other tasks.
PATIENCE_TRIALS = 64
CONVERGED_GAIN = 0.01


class Convergence:
    """A task's best time and how many candidates since have not improved on it."""

    def __init__(self, best: float = float("inf")):
        self.best, self.stale = best, 0

    def update(self, seconds) -> None:
        """``seconds``: each measured candidate's time (inf for one that failed)."""
        for t in seconds:
            if t < self.best * (1 - CONVERGED_GAIN):
                self.best, self.stale = t, 0
            else:
                self.stale += 1

    @property
    def converged(self) -> bool:
        return self.stale >= PATIENCE_TRIALS


@derived_object
class Budgeted(ms.search_strategy.PySearchStrategy):
    """A search whose batches stop at the job's budget, or once the task has converged
    (``Convergence``). The task scheduler checks its trial count only before asking a task for
    a batch and then measures the whole batch, so a job overshot by up to a batch (8 trials
    asked, 10 measured)."""

    def __init__(self, search, budget: list):
        super().__init__()
        self.search, self.budget = search, budget
        self.mod, self.name, self.progress = None, "", Convergence()

    def _initialize_with_tune_context(self, context):
        self.mod, self.name = context.mod, context.task_name
        self.search._initialize_with_tune_context(context)

    def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None):
        best = workload_records(database, self.mod)[:1] if database is not None and self.mod is not None else []
        self.progress = Convergence(_median_secs(best[0].run_secs) if best else float("inf"))
        self.search.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

    def post_tuning(self):
        self.search.post_tuning()

    def generate_measure_candidates(self):
        if self.progress.converged:
            log.info("%s: converged (%d candidates without a %.0f %% gain); its trials go to the other tasks",
                     self.name, self.progress.stale, CONVERGED_GAIN * 100)
            return None
        candidates = self.search.generate_measure_candidates() if self.budget[0] > 0 else None
        if candidates is None:
            return None
        candidates = list(candidates)[:self.budget[0]]
        self.budget[0] -= len(candidates)
        return candidates

    def notify_runner_results(self, measure_candidates, results):
        self.progress.update([float("inf") if r.error_msg else _median_secs(r.run_secs) for r in results])
        self.search.notify_runner_results(measure_candidates, results)

    def clone(self):
        return Budgeted(self.search.clone(), self.budget)


def tune(imported, trials: int = 64, log_dir: str = "tuning_logs/default", target=None, rpc=None,
         dense: bool = True, trials_per_iter: int = 16, seed: int | None = 0, progress=None) -> "TuneResult":
    """Tune ``imported``'s sparse kernels (and its dense conv/matmul ops with ``dense``) with
    the XGBoost cost model, ``trials`` measured candidates in all, spread over the tasks by
    meta_schedule's gradient task scheduler (by each task's share of the run time). Records
    go to ``log_dir`` as they are measured, so a killed job keeps them; a job on an existing
    log tunes only the trials still missing. ``rpc=("host:port", key)`` measures on devices
    registered with a TVM RPC tracker. ``progress``: a stream for the progress lines."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials: must be a positive int, got {trials!r}")
    _check_log_dir(log_dir)
    tracker = _tracker(rpc) if rpc is not None else None
    target = resolve_target(target) if target is not None else imported.target
    with _JOB:
        return _tune(imported, trials, log_dir, target, tracker, dense, trials_per_iter, seed, progress)


_JOB = threading.Lock()


def _tune(imported, trials, log_dir, target, tracker, dense, trials_per_iter, seed, progress):
    db = open_database(log_dir, write=True)
    args_dir = os.path.join(log_dir, ARGS_DIR)
    tasks = extract_tasks(imported, args_dir, dense, target)
    if not tasks:
        raise TuningError("nothing to tune: the module has no sparse kernel and no dense conv/matmul")
    pools = Pools(tracker, args_dir)
    _record_starts([t for t in tasks if t.spec is not None], target, pools, db)
    before = {t.name: len(workload_records(db, t.mod)) for t in tasks}
    remaining = trials - sum(before.values())
    result = TuneResult(log_dir, tasks, before, dict(before))
    if remaining <= 0:
        log.info("%s already holds %d records for %d tasks; nothing to tune", log_dir, sum(before.values()), len(tasks))
        add_width_classes(db, [t.spec for t in tasks], target)
        return result
    budget = [remaining]  # shared by the tasks' searches
    contexts = [ms.TuneContext(mod=t.mod, target=target, space_generator=t.space,
                               search_strategy=Budgeted(ms.search_strategy.EvolutionarySearch(
                                   population_size=128, genetic_num_iters=2, init_min_unmeasured=32), budget),
                               task_name=t.name, rand_state=-1 if seed is None else seed + i, num_threads="physical")
                for i, t in enumerate(tasks)]
    # Small budgets over many tasks: smaller batches, so every task gets measured at all.
    per_iter = max(4, min(trials_per_iter, remaining // len(tasks)))
    callbacks = ms.measure_callback.MeasureCallback.create("default") + \
        [Progress([t.name for t in tasks], remaining, progress)]
    start = time.time()
    ms.tune_tasks(tasks=contexts, task_weights=[t.weight for t in tasks], work_dir=log_dir,
                  max_trials_global=remaining, num_trials_per_iter=min(per_iter, remaining),
                  builder=pools.builder, runner=pools.runner, database=db, cost_model="xgb",
                  measure_callbacks=callbacks)
    result.records = {t.name: len(workload_records(db, t.mod)) for t in tasks}
    if sum(result.records.values()) <= sum(before.values()):
        raise TuningError(f"tuning recorded 0 valid trials in {time.time() - start:.0f} s: every candidate "
                          "failed to build or run (see the warnings above)")
    # The best records serve other pruning patterns of the same shapes too.
    add_width_classes(db, [t.spec for t in tasks], target)
    return result


def _check_log_dir(log_dir):
    if not isinstance(log_dir, (str, os.PathLike)) or not str(log_dir):
        raise ValueError(f"log_dir: must be a directory path for the tuning log, got {log_dir!r}")
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise ValueError(f"log_dir: {log_dir} is a file; give a directory for the tuning log (it is created "
                         "if missing)")


@dataclass
class TuneResult:
    log_dir: str
    tasks: list
    records_before: dict
    records: dict

    def summary(self, target) -> list[dict]:
        """One row per task: records and the best measured time."""
        db = open_database(self.log_dir)
        rows = []
        for t in self.tasks:
            best = workload_records(db, t.mod)[:1]
            secs = [float(x) for x in best[0].run_secs] if best and best[0].run_secs else []
            rows.append({"task": t.name, "layers": ", ".join(t.layers) or "(dense)",
                         "new_trials": self.records[t.name] - self.records_before[t.name],
                         "records": self.records[t.name],
                         "best_ms": float(np.median(secs)) * 1e3 if secs else float("nan")})
        return rows


def _record_starts(tasks, target, pools, db):
    """Measure where each sparse task's search starts, unless the log has it, and record it like
    any candidate: its default schedule, and the shipped record ``compile`` runs it with when no
    log is given (its own pattern's or its width class's, ``records.best_schedule``). The
    evolutionary search seeds its population from the database's best records, so a task starts
    from the shipped schedule (a warm start on a pattern never tuned), and its best record is
    never slower than what ``compile`` runs without this log, even when a small budget over many
    tasks leaves a task only a few candidates."""
    shipped = shipped_database(target)
    starts = []  # (task, schedule)
    for t in tasks:
        schedules = [kernels.default_schedule(t.mod["main"], t.spec)]
        if shipped is not None:
            try:
                sch, tuned = best_schedule(t.spec, shipped)
            except Exception as err:  # a shipped record that no longer replays: start without it
                log.warning("%s: the shipped record does not replay (%s); its search starts from the default",
                            t.name, str(err).strip().splitlines()[-1][:200] if str(err).strip() else type(err).__name__)
                tuned = False
            if tuned and str(sch.trace) != str(schedules[0].trace):
                schedules.append(sch)
        starts += [(t, sch) for sch in schedules if not has_trace(db, t.mod, sch.trace)]
    if not starts:
        return
    built = pools.builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in starts])
    args = [ms.arg_info.ArgInfo.from_prim_func(t.mod["main"]) for t, _ in starts]
    ok = [i for i, b in enumerate(built) if b.error_msg is None]
    futures = pools.runner.run([ms.runner.RunnerInput(built[i].artifact_path, "cpu", args[i]) for i in ok])
    for i, future in zip(ok, futures):
        result = future.result()
        if result.error_msg is None:
            task, sch = starts[i]
            db.commit_tuning_record(ms.database.TuningRecord(
                sch.trace, db.commit_workload(task.mod), [float(v) for v in result.run_secs], target, args[i]))
    failed = sorted({t.name for t, sch in starts if not has_trace(db, t.mod, sch.trace)})
    if failed:
        log.warning("the default or shipped schedule of %s failed to build or run; their search starts without it",
                    ", ".join(failed))


def _tracker(rpc, timeout_s: float = 5.0):
    """(host, port, key) of ``rpc=("host:port", key)``, once a tracker has answered there: an
    unreachable one would otherwise fail every candidate, one timeout after another."""
    if isinstance(rpc, (str, bytes)) or not isinstance(rpc, (tuple, list)) or len(rpc) != 2:
        raise ValueError(f"rpc: expected a (\"host:port\", key) pair, e.g. (\"127.0.0.1:9190\", \"fscnn\"), "
                         f"got {rpc!r}")
    address, key = rpc
    host, _, port = str(address).rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"rpc: the tracker address must be host:port with a port in 1-65535, got {address!r}")
    port = int(port)
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.settimeout(timeout_s)
            sock.sendall(struct.pack("<i", rpc_base.RPC_TRACKER_MAGIC))
            answer = rpc_base.recvall(sock, 4)
    except OSError as err:
        raise TuningError(f"rpc: no TVM RPC tracker answers at {host}:{port} ({err}); start one with "
                          "python -m tvm.exec.rpc_tracker or check the address") from None
    if struct.unpack("<i", answer)[0] != rpc_base.RPC_TRACKER_MAGIC:
        raise TuningError(f"rpc: {host}:{port} answers but is not a TVM RPC tracker")
    return host, port, str(key)
