"""Tuning records: the workload a kernel is tuned and looked up as, its best record in a
database, the module with every kernel scheduled from them, and the record sets shipped in the
package (``fscnn_tvm/schedules/``, one folder per model, sparsity and SIMD width).

The shipped sets are package data read through ``importlib.resources``, so they load the same
from an installed wheel, a zip or a source checkout, and they are only ever read: their lines go
through ``tuning_log``'s checks into an in-memory database. Logs given by the user are opened
read-only too; only a tuning job opens one to write.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from importlib import resources

import tvm
from tvm.s_tir import meta_schedule as ms

from . import kernels
from .ops import KernelSpec
from .schedule import schedule_pool
from .target import caches, mcpu_lanes
from .tuning_log import RECORDS, WORKLOADS, copy_records, load_lines, open_database

log = logging.getLogger("fscnn_tvm.records")
SHIPPED = resources.files(__package__) / "schedules"
TARGET_FILE = "target.json"


def workload(spec) -> tvm.IRModule:
    """The module a kernel is tuned as; a record applies to a kernel whose module is
    structurally equal."""
    return tvm.IRModule({"main": kernels.prim_func(spec)})


def workload_records(db, mod) -> list:
    """Every record of workload ``mod`` in ``db``, fastest first."""
    return db.get_top_k(db.commit_workload(mod), 10**6) if db.has_workload(mod) else []


def has_trace(db, mod, trace) -> bool:
    text = str(trace)
    return any(str(r.trace) == text for r in workload_records(db, mod))


def width_class(spec):
    """The workload a sparse kernel's records are shared under by every pattern of its shapes:
    the ELL table's width (the longest row, which changes with the pattern) rounded up to a
    power of two. A record replays on any width of its class (``retarget``): each tile's
    nonzero loop stops at its own longest row, so the width is an extent, not the work. A chunked
    kernel's widest chunk is rounded the same way."""
    if not isinstance(spec, KernelSpec):
        return spec
    n_kb, width, bo, bi = spec.ell_shape
    return dataclasses.replace(spec, ell_shape=(n_kb, _width_class(width), bo, bi),
                               chunk_width=_width_class(spec.chunk_width) if spec.chunk_channels else 0)


def _width_class(width: int) -> int:
    return max(4, 1 << (width - 1).bit_length())


def retarget(trace, from_width: int, to_width: int):
    """``trace`` of a sparse kernel of ELL width ``from_width`` for one of ``to_width``: the
    nonzero loop's split (the schedule's first sampled tile) keeps its inner factor where it
    divides the new width (1, 2 and 4 divide every width, a multiple of
    ``ops.ELL_WIDTH_MULTIPLE``; a 3 becomes a 2) and takes the rest. No other decision depends
    on the width."""
    if from_width == to_width:
        return trace
    for inst in trace.insts:
        if inst.kind.name == "SamplePerfectTile":
            decision = [int(d) for d in trace.decisions[inst]]
            if len(decision) != 2 or decision[0] * decision[1] != from_width:
                raise ValueError(f"not a sparse kernel's trace of width {from_width}: first tile {decision}")
            inner = max(d for d in range(1, decision[1] + 1) if to_width % d == 0)
            return trace.with_decision(inst, [to_width // inner, inner], remove_postproc=False)
    return trace  # the default schedule's: its splits leave the outer extent to the loop


def _retarget_spec(trace, source, spec):
    """``trace`` of a kernel of ``source`` for one of ``spec`` (another width of the same class);
    a chunked kernel's schedule has no decision on the width, so its trace replays as is."""
    if not isinstance(source, KernelSpec) or source.chunk_channels:
        return trace
    return retarget(trace, source.ell_shape[1], spec.ell_shape[1])


def _best_trace(db, spec):
    """The best record's trace for ``spec`` in ``db`` (its own workload's, else its width
    class's, retargeted to ``spec``); or None."""
    for source in dict.fromkeys((spec, width_class(spec))):
        found = workload_records(db, workload(source))[:1]
        if found:
            return _retarget_spec(found[0].trace, source, spec)
    return None


def best_schedule(spec, db=None):
    """(schedule, tuned): the best record in ``db`` when there is one, else the default. A
    kernel takes the record of its own workload, else of its width class (another pattern of
    its shapes, ``width_class``); a dynamic-batch kernel the record of its batch-1 twin
    (``kernels.tuned_as``: the schedules never split the batch loop). The trace is replayed on
    the kernel."""
    twin = kernels.tuned_as(spec)
    trace = _best_trace(db, twin) if db is not None else None
    func = kernels.prim_func(spec)
    if trace is None:
        return kernels.default_schedule(func, spec), False
    sch = tvm.s_tir.Schedule(func)
    trace.apply_to_schedule(sch, remove_postproc=False)
    if isinstance(spec, KernelSpec) and spec.pool:
        schedule_pool(sch, spec)
    return sch, True


def add_width_classes(db, specs, target) -> int:
    """Commit the best record of each sparse kernel in ``specs`` under its width class too (the
    class's first record, or a faster one than it holds), so other patterns of the same shapes
    find it; returns how many were committed."""
    added = 0
    for spec in {kernels.tuned_as(s) for s in specs if isinstance(s, KernelSpec)}:
        cls = width_class(spec)
        best = workload_records(db, workload(spec))[:1]
        if cls == spec or not best:
            continue
        mod = workload(cls)
        held = workload_records(db, mod)[:1]
        if held and _seconds(held[0]) <= _seconds(best[0]):
            continue
        trace = _retarget_spec(best[0].trace, spec, cls)
        db.commit_tuning_record(ms.database.TuningRecord(
            trace, db.commit_workload(mod), best[0].run_secs, target, ms.arg_info.ArgInfo.from_prim_func(mod["main"])))
        added += 1
    return added


def _seconds(record) -> float:
    secs = [float(t) for t in record.run_secs or []]
    return sum(secs) / len(secs) if secs else float("inf")


def schedule_kernels(imported, db=None):
    """The module with every kernel of ours scheduled: the best record in ``db`` when there
    is one, else the default schedule. Returns (module, names of kernels left untuned)."""
    mod = imported.mod.clone() if hasattr(imported.mod, "clone") else tvm.IRModule(dict(imported.mod.functions))
    untuned = []
    for name, kernel in imported.kernels.items():
        sch, tuned = best_schedule(kernel.spec, db)
        if not tuned:
            untuned.append(name)
        # Opaque and scheduled: Relax must neither fuse it with neighbours nor reschedule it.
        func = kernels.lower(sch, imported.target).with_attr("global_symbol", name) \
            .with_attr("op_pattern", kernels.OPAQUE).with_attr("tir.is_scheduled", True)
        mod[mod.get_global_var(name)] = func
    return mod, untuned


def sparse_kernels(imported) -> list[str]:
    """Names of the imported model's sparse kernels (the others are dense kernels of ours)."""
    return [name for name, kernel in imported.kernels.items() if isinstance(kernel.spec, KernelSpec)]


def ship(log_dir: str, dest: str, target, tuned_on: str = "") -> int:
    """Write the best record of each workload in ``log_dir`` to ``dest`` with the CPU they were
    tuned on and the ``fscnn-tvm tune`` arguments of the model (``target.json``), the form the
    shipped sets take; returns the record count."""
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    open_database(log_dir).dump_pruned(ms.database.JSONDatabase(work_dir=dest))
    with open(os.path.join(dest, TARGET_FILE), "w") as f:
        json.dump({"mcpu": str(target.attrs.get("mcpu", "")), "target": str(target), "tuned_on": tuned_on,
                   "caches": list(dataclasses.astuple(caches(target))[:3])}, f,
                  indent=1)
    with open(os.path.join(dest, RECORDS)) as f:
        return sum(1 for line in f if line.strip())


@dataclass(frozen=True)
class ShippedSet:
    name: str
    mcpu: str  # the CPU the records were tuned on
    lanes: int  # its float32 SIMD lanes: the set serves every CPU with as many
    tuned_on: str  # the `fscnn-tvm tune` arguments of the pruned model
    records: int
    target: str = ""  # the TVM target (JSON) the records were tuned for
    caches: tuple = ()  # (L1d, L2, line) its kernels' policies were read from (``target.caches``)


def shipped_sets(directory=SHIPPED) -> list[ShippedSet]:
    """The record sets in ``directory`` (a path or an importlib.resources Traversable): every
    folder with a ``target.json``."""
    found = []
    for folder in sorted(directory.iterdir(), key=lambda f: f.name) if directory.is_dir() else []:
        if not (folder / TARGET_FILE).is_file():
            continue
        meta = json.loads((folder / TARGET_FILE).read_text())
        mcpu = meta.get("mcpu", "")
        found.append(ShippedSet(folder.name, mcpu, mcpu_lanes(mcpu), meta.get("tuned_on", ""),
                                sum(1 for line in _lines(folder / RECORDS) if line.strip()), meta.get("target", ""),
                                tuple(meta.get("caches", ()))))
    return found


def _lines(resource) -> list:
    return resource.read_text().splitlines(keepends=True) if resource.is_file() else []


def shipped_database(target, directory=SHIPPED):
    return _shipped(str(target.attrs.get("mcpu", "")), directory)


@functools.lru_cache(maxsize=4)
def _shipped(mcpu, directory):
    """The shipped records for this target's vector ISA, merged, or None. A set applies to
    every CPU with the SIMD width of the CPU it was tuned for (its tiles assume that many
    lanes, and its kernels are built for that width); the others are skipped."""
    merged, used, ignored = ms.database.MemoryDatabase(), [], []
    for shipped in shipped_sets(directory):
        if shipped.lanes != mcpu_lanes(mcpu):
            ignored.append(f"{shipped.name} (tuned for {shipped.mcpu})")
            continue
        folder = directory / shipped.name
        copy_records(load_lines(f"shipped schedules {shipped.name}", _lines(folder / WORKLOADS),
                                _lines(folder / RECORDS)), merged)
        used.append(shipped.name)
    if ignored and not used:
        log.warning("shipped schedules %s were tuned for other SIMD widths than this target's (%s, %d float32 lanes): "
                    "ignored, default schedules run; `fscnn-tvm tune` tunes for this CPU", ", ".join(ignored),
                    mcpu or "?", mcpu_lanes(mcpu))
    elif ignored:
        log.info("shipped schedules in use: %s; ignored (other SIMD widths): %s", ", ".join(used), ", ".join(ignored))
    return merged if used else None


def resolve_database(tuning_log, target):
    """(database or None, label) for a tuning log directory, or the shipped records when None."""
    if tuning_log is None:
        db = shipped_database(target)
        return db, ("shipped schedules" if db is not None else "none (default schedules)")
    if not isinstance(tuning_log, (str, os.PathLike)):  # an open meta_schedule database
        return tuning_log, "the given database"
    if not os.path.isdir(tuning_log):
        raise FileNotFoundError(f"tuning_log: {tuning_log} is not a directory written by a tuning job")
    return open_database(str(tuning_log)), str(tuning_log)
