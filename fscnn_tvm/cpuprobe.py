"""What this machine's CPU does that its feature flags do not say, measured once per process.

``half_width_cost``: what a vector op of half the native width costs against a native one, for the
same FLOPs. Where the native units are full width (Xeons with two 512-bit FMA units) half-width
vectors take twice the ops for the same work, so a row padded to native vectors wins even with
some padding; where 512-bit ops run as two 256-bit halves (Zen 4) both widths do the same FLOPs
a cycle, and the width that pads the row least wins (``tiles.choose_lanes``). LLVM's features
cannot tell the two apart (Zen 4 and Sapphire Rapids both have avx512f), so a probe times the
sparse kernel's own inner loop (a broadcast weight times input vectors from L1 into register
accumulators) at both widths.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import tvm
from tvm import te

from . import target as target_module  # (on_host looked up there: the staleness test and tune_shipped.sh turn it off)
from .target import vector_lanes

# Half-width ops cost this many times a native op's time per FLOP where the probe finds them
# over SLOWER times slower; otherwise the same. Two values, not the measured ratio, so a noisy
# probe does not move a layer's lanes from run to run. Measured by the probe, one thread: a
# Sapphire Rapids class Xeon 1.43x (84 against 59 GFLOP/s). There 7-wide rows ran 0.63x at 16
# lanes (a cost of 2 would have chosen 16 there), 56-wide 1.05-1.35x (``tiles.choose_lanes``).
HALF_RATE = 1.5
FULL_RATE = 1.0
SLOWER = 1.25
# Independent probes whose median ratio decides: on a shared Zen 4 (true ratio 0.97-1.07) one probe
# of five alternating rounds read over 1.25 about once in a few processes, and a model compiled
# then ran 16 lanes on 56-wide rows.
PROBES = 3
_ACCUMULATOR_FLOATS = 128  # 8 native AVX-512 vectors / 16 half ones: within 32 registers
_STEPS = 64  # nonzeros a pass: 64 x 128 floats of input (32 KiB) stay in L1
_PASSES = 64  # passes a call (~260 K FLOPs: a call's own overhead is small beside it)


def _probe_func(target: tvm.target.Target, lanes: int):
    """out[j] = sum over passes and steps k of w[k] * x[k, j]: each step one broadcast weight
    times a vector of input per accumulator, the accumulators in registers, as in the sparse
    kernel's slot loop."""
    vectors = _ACCUMULATOR_FLOATS // lanes
    x = te.placeholder((_STEPS, vectors, lanes), "float32", name="x")
    w = te.placeholder((_STEPS,), "float32", name="w")
    p, k = te.reduce_axis((0, _PASSES), "p"), te.reduce_axis((0, _STEPS), "k")
    out = te.compute((vectors, lanes), lambda j, i: te.sum(w[k] * x[k, j, i], axis=[p, k]), name="out")
    sch = tvm.s_tir.Schedule(te.create_prim_func([x, w, out]))
    block = sch.get_sblock("out")
    j, i, p, k = sch.get_loops(block)
    sch.reorder(p, k, j, i)
    acc = sch.cache_write(block, 0, "local")
    sch.unroll(j)
    sch.vectorize(i)
    init = sch.decompose_reduction(block, p)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(acc)[-1])
    return tvm.compile(sch.mod, target=target)


def half_width_cost(target: tvm.target.Target) -> float:
    """What a half-width vector op costs per FLOP against a native one on ``target``'s CPU:
    measured where the target is this machine's CPU and its native vectors are 16 floats (below
    that ``tiles.choose_lanes`` takes no half width); FULL_RATE (the padding decides) elsewhere."""
    native = vector_lanes(target)
    return _measure(str(target), native) if native >= 16 and target_module.on_host(target) else FULL_RATE


@functools.lru_cache(maxsize=4)
def _measure(target_json: str, native: int) -> float:
    target = tvm.target.Target(target_json)
    dev = tvm.cpu()
    runs = {}
    for lanes in (native, native // 2):
        func = _probe_func(target, lanes)
        vectors = _ACCUMULATOR_FLOATS // lanes
        args = [tvm.runtime.tensor(np.random.default_rng(0).standard_normal(shape).astype("float32"), dev)
                for shape in ((_STEPS, vectors, lanes), (_STEPS,))] + \
            [tvm.runtime.empty((vectors, lanes), "float32", dev)]
        runs[lanes] = (func, args)
    ratios = []
    for _ in range(PROBES):
        best = {lanes: float("inf") for lanes in runs}
        for _ in range(5):  # alternating, best of each: a neighbour's burst hits both
            for lanes, (func, args) in runs.items():
                start = time.perf_counter()
                for _ in range(50):
                    func(*args)
                best[lanes] = min(best[lanes], time.perf_counter() - start)
        ratios.append(best[native // 2] / best[native])
    return rate(ratios)


def rate(ratios: list[float]) -> float:
    """The half-width cost from probes' time ratios (half-width over native): their median
    against ``SLOWER``, so one probe a neighbour disturbed does not decide."""
    return HALF_RATE if sorted(ratios)[len(ratios) // 2] > SLOWER else FULL_RATE
