"""Schedules for the operators TVM lowers without one (residual add + ReLU, pooling, layout
copies, an untuned dense op): TVM has no default CPU schedule, so each would run as one serial
loop nest. Every such function gets its producers inlined and its outer spatial loops fused
into a parallel loop, the innermost left for LLVM to vectorise; a window reduction (max or
average pooling) gets its window loops outside a vectorised row of outputs."""
from __future__ import annotations

import contextlib
import logging

import tvm

from .target import vector_lanes

log = logging.getLogger("fscnn_tvm")

# Fewest output columns a vector of a pooling row takes: narrower vectors run no faster than
# the scalar loop with its window innermost.
MIN_WINDOW_LANES = 4


def parallelize(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Every PrimFunc of ``mod`` not yet scheduled, scheduled as the module docstring says
    (measured: a 56x56x256 residual add + ReLU 2.0x faster on 2 cores). A function the
    primitives do not fit is left as it is."""
    lanes = vector_lanes(target)
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, tvm.tirx.PrimFunc) or (func.attrs is not None and "tir.is_scheduled" in func.attrs):
            continue
        try:
            sch = tvm.s_tir.Schedule(func)
            if not _window_reduction(sch, lanes):
                sch = _last_inlined(func)
                _spatial(sch)
            mod[gv] = sch.mod["main"].with_attr("tir.is_scheduled", True)
        except tvm.s_tir.ScheduleError as err:
            log.debug("%s: left unscheduled (%s)", gv.name_hint, str(err).splitlines()[0])
    return mod


def _spatial_count(sch, block) -> int:
    """Leading data-parallel iteration variables of ``block``."""
    count = 0
    for iv in sch.get(block).iter_vars:
        if iv.iter_type != 0:
            break
        count += 1
    return count


def _last_inlined(func) -> tvm.s_tir.Schedule:
    """A schedule of ``func`` with its last block inlined into its producer where it can be: a
    reshape after a strided slice then runs in the slice's loops, not in a flattened output's
    with a div and mod per element (ResNet's subsampled 256x56x56 3.6x, 512x28x28 3.1x faster,
    1024x14x14 0.92x). Where it cannot (a consumer that is no bijection of its producer, or one
    TVM's inverse of its index map does not handle: an internal error), ``func`` as it is."""
    sch = tvm.s_tir.Schedule(func)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if len(blocks) > 1:
        try:
            sch.reverse_compute_inline(blocks[-1])
        except (tvm.s_tir.ScheduleError, tvm.error.InternalError):
            return tvm.s_tir.Schedule(func)
    return sch


def _spatial(sch) -> None:
    root = sch.get_sblock("root")
    for block in sch.get_child_blocks(root)[:-1]:
        with contextlib.suppress(tvm.s_tir.ScheduleError):  # reductions and the like stay
            sch.compute_inline(block)
    for block in sch.get_child_blocks(root):
        _parallel_outer(sch, block)


def _window_reduction(sch, lanes: int) -> bool:
    """Schedule a pooling function: a reduction block over a window (spatial loops, then the
    window's loops) fed by at most a padding block and followed by elementwise blocks. Its
    outer spatial loops but the last fuse into the parallel loop, the window's loops move
    outside the last (a row of outputs), which is split into vectors of the largest power of
    two that divides it (at most the native lanes, at least ``MIN_WINDOW_LANES``), and the
    padding runs per output row, on the rows it reads. A strided window read is then a vector
    load at a constant stride, which ``pipeline`` turns into contiguous loads and a shuffle.
    Measured on a Xeon (AVX-512, 2 threads), 3x3 stride-2 max pooling of 64x112x112
    (ResNet's): 562 -> 211 us with 8-lane vectors (a 56-wide row); 14-lane vectors 328 us, the
    padding inlined into the vector loop (a select of loads per lane) 762 us. Returns
    whether the function was one."""
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    reductions = [i for i, b in enumerate(blocks) if _spatial_count(sch, b) < len(sch.get(b).iter_vars)]
    if len(reductions) != 1 or reductions[0] > 1:
        return False
    index = reductions[0]
    block = blocks[index]
    loops = sch.get_loops(block)
    spatial = _spatial_count(sch, block)
    if len(loops) != len(sch.get(block).iter_vars) or spatial < 2:
        return False
    width = sch.get(loops[spatial - 1]).extent
    if not isinstance(width, tvm.tirx.IntImm):
        return False
    width = width.value
    vector = max((lanes >> i for i in range(lanes.bit_length()) if width % (lanes >> i) == 0), default=1)
    if vector < MIN_WINDOW_LANES:
        return False
    for consumer in blocks[index + 1:-1]:  # elementwise (an average's division): into the last
        with contextlib.suppress(tvm.s_tir.ScheduleError):
            sch.compute_inline(consumer)
    if index + 1 < len(blocks):
        _parallel_outer(sch, blocks[-1])
    column = loops[spatial - 1]
    sch.reorder(*loops[spatial:], column)
    fused = _parallel_outer(sch, block)
    for producer in blocks[:index]:
        sch.compute_at(producer, fused)
    _, inner = sch.split(column, [None, vector])
    sch.vectorize(inner)
    sch.decompose_reduction(block, loops[spatial])
    return True


def _parallel_outer(sch, block):
    """Fuse ``block``'s spatial loops but the innermost into one parallel loop; return it."""
    loops = sch.get_loops(block)
    outer = loops[:min(_spatial_count(sch, block), len(loops)) - 1]
    if not outer:
        return None
    fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(fused)
    return fused
