"""An expansion (MobileNet's 1x1 conv in front of a depthwise conv, whose output only that conv
reads) computed inside the depthwise kernel (``depthwise.py``): each task makes its channel(s)
of the expanded tensor from the input planes its row's nonzeros select, and the depthwise
stencil reads that plane while it is in L1/L2, so the block's largest tensor (6x its input) is
never written to memory nor read back.

The rows are an ELL table (``expansion_table``); each task's nonzero loop runs to its own row's
length (``e_length``, ``lowering.bound_rows``). Pixels accumulate in register tiles of up to
EXPANSION_VECTORS vectors (``expansion_layout``: tiles from the plane's start, a tail of whole
vectors ending at its end). Dense-ish rows expand EXPANSION_GROUP channels a task from the union
of their rows' columns, each loaded input vector feeding that many channels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from .decisions import ROW_BOUND
from .geometry import with_batch
from .ops import activate
from .layout_pass import split_at

# Vectors of expanded pixels a task accumulates in registers across its nonzero loop: each
# nonzero's weight is broadcast once for this many loads and FMAs.
EXPANSION_VECTORS = 4


@dataclass(frozen=True)
class Expansion:
    """A pointwise conv (1x1, stride 1, no padding) computed inside the depthwise kernel, in
    front of it: its output channel k is the depthwise conv's input channel k."""
    in_channels: int
    width: int  # ELL width: the most nonzeros of one output channel (at least 1)
    has_bias: bool
    activation: str | None
    lanes: int  # vector lanes of its pixel loop (the machine's)
    # Channels a task expands together from the union of their rows' columns: each input vector
    # loaded then feeds this many channels' FMAs (dense-ish rows; 1 for sparse ones).
    group: int = 1
    registers: int = 16  # vector registers (the register tile: group x vectors accumulators)


def expansion_table(weight: np.ndarray, group: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(columns, values, row lengths) of a (K, C, 1, 1) weight as an ELL table, one row per
    ``group`` output channels (the union of their nonzero columns; ``values[row, slot, i]`` is
    channel row * group + i's weight there), as wide as the longest row (at least 1); slots past
    a row's length hold column 0 and weight 0."""
    w = np.asarray(weight, np.float32).reshape(weight.shape[0] // group, group, -1)
    used = [np.flatnonzero(np.any(rows != 0, axis=0)) for rows in w]
    length = np.array([u.size for u in used], np.int32)
    width = max(1, int(length.max(initial=0)))
    cols, vals = np.zeros((len(w), width), np.int32), np.zeros((len(w), width, group), np.float32)
    for r, (rows, u) in enumerate(zip(w, used)):
        cols[r, :u.size], vals[r, :u.size] = u, rows[:, u].T
    return cols, vals, length


# Density (nonzeros / weights) from which an expansion's channels are expanded in groups of
# EXPANSION_GROUP. Measured on 96->576@14 (Zen 4, 2 threads, fused kernel alone, hot / flushed
# caches, us): groups of 4 against single channels at 50 % sparsity 169 / 157 against 320 / 205,
# at 60 % 158 / 182 against 264 / 172, at 70 % 179 against 123, at 80 % 174 against 116 (the
# union of 4 rows at density d holds 1 - (1 - d)^4 of the columns: 2.5x the FMAs at 70 %).
GROUP_DENSITY = 0.35
EXPANSION_GROUP = 4


def expansion_group(weight: np.ndarray) -> int:
    density = np.count_nonzero(weight) / weight.size
    return EXPANSION_GROUP if density >= GROUP_DENSITY and weight.shape[0] % EXPANSION_GROUP == 0 else 1


def expansion_layout(pixels: int, lanes: int) -> tuple[int, int, int, int]:
    """(lanes, vectors per tile, pixels in whole tiles, tail pixels) of an expanded plane: tiles
    of up to EXPANSION_VECTORS vectors from the plane's start, then the tail as whole vectors that
    end at the plane's end (overlapping the last tile: computed twice, read once, never a partial
    vector). Vectors no longer than the plane."""
    lanes = min(lanes, 1 << (pixels.bit_length() - 1))
    vectors = min(EXPANSION_VECTORS, pixels // lanes)
    tiled = pixels // (vectors * lanes) * vectors * lanes
    return lanes, vectors, tiled, -(-(pixels - tiled) // lanes) * lanes


def compute(spec, batch):
    """(its placeholders, padded(n, c, row, col): the expanded channel c, 0 outside the plane)
    of a fused expansion."""
    e, g = spec.expansion, spec.geo
    x = te.placeholder(with_batch(spec.x_shape, batch), "float32", name="x_nchw")
    rows = g.in_channels // e.group
    cols = te.placeholder((rows, e.width), "int32", name="e_cols")
    vals = te.placeholder((rows, e.width, e.group), "float32", name="e_vals")
    length = te.placeholder((rows,), "int32", name="e_length")  # read by lowering.bound_rows
    bias = te.placeholder((g.in_channels,), "float32", name="e_bias") if e.has_bias else None
    pixels = g.height * g.width
    _, _, tiled, tail = expansion_layout(pixels, e.lanes)

    def plane(name, count, first):  # the expanded pixels first .. first + count - 1
        j = te.reduce_axis((0, e.width), name="j")
        return te.compute((batch, g.in_channels, count), lambda n, k, p: te.sum(
            vals[k // e.group, j, k % e.group] * x[n, cols[k // e.group, j], 0, first + p], axis=j), name=name)
    mid = plane("mid", tiled, 0)
    mid_tail = plane("mid_tail", tail, pixels - tail) if tail else None

    inputs = [x, cols, vals, length] + ([bias] if bias is not None else [])
    zero = tvm.tirx.const(0.0, "float32")

    def finish(v, k):  # bias and activation
        return activate(v + bias[k] if bias is not None else v, e.activation)
    if mid_tail is None and g.stride[1] > 1:
        # The padded rows' copy applies them, its bias load unconditional (a conditional one
        # became a gather per vector in LLVM): no pass over the plane of its own. (Measured on
        # Zen 4: stride 2 at 112x112 and 56x56 1.07-1.12x; at stride 1, where the copy writes
        # the phase layout directly, 0.95x: there the pass stays.)
        def padded(n, c, row, col):
            inside = g.inside(row, col)
            return tvm.tirx.Select(inside, finish(te.if_then_else(inside, mid[n, c, row * g.width + col], zero), c),
                                   zero)
        return inputs, padded
    # Else bias and activation in a pass of their own, split where a tail begins (each part
    # reads one buffer in whole vectors).
    def summed(n, k, p):
        if mid_tail is None:
            return mid[n, k, p]
        return te.if_then_else(p < tiled, mid[n, k, tvm.tirx.min(p, tiled - 1)],
                               mid_tail[n, k, tvm.tirx.max(p - (pixels - tail), 0)])
    expanded = te.compute((batch, g.in_channels, pixels), lambda n, k, p: finish(summed(n, k, p), k), name="expanded")

    def padded(n, c, row, col):
        return te.if_then_else(g.inside(row, col), expanded[n, c, row * g.width + col], zero)
    return inputs, padded


def schedule(sch: tvm.s_tir.Schedule, spec, par) -> None:
    """The expanded plane computed in the task (``expansion_layout``): its tiles and its tail
    each held in registers across the nonzero loop (one broadcast weight, then a load and an FMA
    per vector), the loop bounded by the row's length (ROW_BOUND); then bias and activation in
    one pass (split where a tail begins, so each part reads one buffer in whole vectors), or, at
    stride 2 without a tail, in the padded rows' copy."""
    e, pixels = spec.expansion, spec.geo.height * spec.geo.width
    lanes, vectors, tiled, tail = expansion_layout(pixels, e.lanes)
    vectors = max(1, min(vectors, (e.registers - e.group - 1) // e.group))
    separate = not (tail == 0 and spec.geo.stride[1] > 1)  # (see compute)
    if separate:
        expanded = sch.get_sblock("expanded")
        sch.compute_at(expanded, par, preserve_unit_loops=True)
    for name, count in (("mid", tiled), ("mid_tail", tail)):
        if not count:
            continue
        block = sch.get_sblock(name)
        sch.compute_at(block, par, preserve_unit_loops=True)
        *_, ki, p, j = sch.get_loops(block)  # ki: the channel within the task's group
        p_o, p_r, p_v = sch.split(p, [None, min(vectors, count // lanes), lanes])
        sch.reorder(p_o, j, ki, p_r, p_v)
        sch.unroll(ki)
        sch.unroll(p_r)
        sch.vectorize(p_v)
        sch.annotate(j, ROW_BOUND, 1)
        init = sch.decompose_reduction(block, j)
        *_, i_k, i_r, i_v = sch.get_loops(init)
        sch.unroll(i_k)
        sch.unroll(i_r)
        sch.vectorize(i_v)
    if tail:
        split_at(sch, sch.get_loops(expanded)[-1], [tiled])
