"""Timing methodology shared by every benchmark: one place, so every engine is timed alike.

Warm-up runs first, then repeated runs until both a minimum count and a time budget are met;
we report the median with min and max. Thread counts are set for every engine before timing,
and callers check outputs agree before anything is timed.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from . import _threads


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int


def set_threads(threads: int | None) -> int:
    """Use ``threads`` for PyTorch and TVM alike. TVM reads its count when its pool first runs,
    so call this before running any TVM code."""
    import torch
    n = _threads.configure(threads)
    torch.set_num_threads(n)
    return n


def measure(fn, warmup: int = 3, min_runs: int = 10, budget_s: float = 1.0, max_runs: int = 1000) -> Timing:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < budget_s and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), max(times), len(times))


def measure_interleaved(fns: dict, rounds: int = 5, budget_s: float = 1.0, min_runs: int = 10) -> dict:
    """``measure`` every callable in ``fns`` in ``rounds`` alternating rounds (each gets
    ``budget_s`` in all); median = the median of the rounds' medians. On a shared machine a
    neighbour's burst then hits a round of every engine instead of all of one engine's runs."""
    samples = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():  # after the first round one warm-up run refills the caches
            samples[name].append(measure(fn, warmup=3 if r == 0 else 1, budget_s=budget_s / rounds,
                                         min_runs=max(1, min_runs // rounds)))
    return {name: Timing(statistics.median(t.median_ms for t in ts), min(t.min_ms for t in ts),
                         max(t.max_ms for t in ts), sum(t.runs for t in ts)) for name, ts in samples.items()}


class OutputMismatch(AssertionError):
    """Two engines disagree: nothing is timed."""


def check_close(name: str, got, ref, rtol: float = 1e-4) -> float:
    """Relative max error of ``got`` against ``ref``; raises OutputMismatch over ``rtol``."""
    got = np.asarray(got, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    if got.shape != ref.shape:
        raise OutputMismatch(f"{name}: output shape {got.shape} != reference {ref.shape}")
    err = float(np.max(np.abs(got - ref))) / max(1.0, float(np.max(np.abs(ref))))
    if not np.isfinite(err) or err > rtol:
        raise OutputMismatch(f"{name}: relative error {err:.3g} > {rtol:g} against the reference; not timing")
    return err


def machine_info(threads: int) -> dict:
    import torch
    import tvm
    from .target import cpu_info, isa, resolve_target
    info = cpu_info()
    return {
        "cpu": info["model"], "isa": isa(info["flags"]), "cores": _threads.cores(), "threads": threads,
        "target": str(resolve_target()), "python": platform.python_version(),
        "tvm": tvm.__version__, "torch": torch.__version__, "numpy": np.__version__,
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
    }


def table(rows: list[dict], columns: list[str]) -> str:
    """Plain-text table, columns right-aligned except the first."""
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = []
    for j, row in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(row, widths))))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """The same rows as a Markdown table."""
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def dump_json(path: str, payload: dict):
    with open(path, "w") as f:
        json.dump(payload, f, indent=2, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
