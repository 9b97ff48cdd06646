"""The sparse conv's input layout pass: the input padded and split into stride phases
(``geometry.InputLayout``), the TE compute of ``x_flat`` (what) and its schedule (how): split
along (plane, row, column) so the index decode simplifies away, one plane per parallel task, or
a band per task of a banded layout; at a column stride, each channel's padded rows first
(``InputLayout.rows_first``)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import tvm
from tvm import te

from .geometry import InputLayout

if TYPE_CHECKING:
    from .ops import KernelSpec


def conv2d_layout_compute(x_nchw: te.Tensor, layout: InputLayout, tail: int) -> te.Tensor:
    """Pad and phase-split the input into ``x_flat`` (N, layout.size + tail); the zero tail lets
    the kernel compute whole vectors past the last output column without reading out of bounds.
    With ``layout.band_rows``: (N, bands, layout.size + tail), each band of output rows with its
    own layout of the phase rows it reads (halo rows repeated), so the kernel can lay out one
    band at a time, just before the band's tiles read it from cache. (The unbanded form keeps its
    own expressions, here and in ``sparse_accumulate_compute``, so its workloads stay
    structurally identical and the tuning records shipped for them still match.)"""
    geo, band_rows = layout.geo, layout.band_rows
    sh, sw = geo.stride
    pt, pl = geo.pad[0], geo.pad[1]
    hq, wq, q_n = layout.rows, layout.width, geo.phases
    size = layout.size

    def value(n, band, f):
        c = f // (q_n * hq * wq)
        q = f // (hq * wq) % q_n
        phase_row = f // wq % hq if band is None else band * band_rows + f // wq % hq
        row = phase_row * sh + q // sw - pt
        col = layout.phase_column(f % wq) * sw + q % sw - pl
        inside = tvm.tirx.all(f < size, row >= 0, row < geo.height, col >= 0, col < geo.width)
        return te.if_then_else(inside, x_nchw[n, c, row, col], tvm.tirx.const(0.0, "float32"))

    batch = x_nchw.shape[0]
    if layout.rows_first:  # (its zero tail in whole channels: every vector of the pass whole)
        channel = geo.phases * hq * wq
        return te.compute((batch, size + -(-tail // channel) * channel), _phases_from_rows(x_nchw, layout),
                          name="x_flat")
    if band_rows is None:
        return te.compute((batch, size + tail), lambda n, f: value(n, None, f), name="x_flat")
    return te.compute((batch, geo.out_height // band_rows, size + tail), value, name="x_flat")


def _phases_from_rows(x_nchw: te.Tensor, layout: InputLayout):
    """``x_flat``'s value at a column stride: each channel's padded rows first (``x_rows``, split
    by row phase only: a unit-stride copy whose column loop splits at the padding, which LLVM
    vectorises), then every column phase picked from them in whole vectors, without conditions
    (strided loads ``pipeline`` turns into contiguous loads and shuffles). Picked straight from
    the input, each vector load at the stride carried the padding condition per lane and TVM
    scalarised it: one load and insert per float, 17 % of a 128->128 3x3 stride-2 conv at 56x56
    at 90 %. Past the layout (the zero tail) the channel index is clamped, so ``x_rows`` is
    only ever read inside its extent."""
    geo = layout.geo
    (sh, sw), (pt, pl) = geo.stride, geo.pad[:2]
    hq, wq, q_n = layout.rows, layout.width, geo.phases
    x_rows = te.compute((x_nchw.shape[0], geo.in_channels, sh, hq, wq * sw),
                        lambda n, c, qr, i, col: te.if_then_else(
                            geo.inside(i * sh + qr - pt, col - pl), x_nchw[n, c, i * sh + qr - pt, col - pl],
                            tvm.tirx.const(0.0, "float32")), name="x_rows")

    def value(n, f):
        plane = f // (hq * wq)
        c, q = tvm.tirx.min(plane // q_n, geo.in_channels - 1), plane % q_n
        return te.if_then_else(plane < geo.in_channels * q_n,
                               x_rows[n, c, q // sw, f // wq % hq, f % wq * sw + q % sw], tvm.tirx.const(0.0, "float32"))
    return value


def schedule_layout(sch: tvm.s_tir.Schedule, spec: KernelSpec):
    """Split the flat axis along (channel-phase plane, row, column) so the index decode
    simplifies away, columns vectorised; one plane per parallel task (banded: each band is
    laid out inside the parallel loop, by the task that reads it)."""
    if spec.in_place:
        return
    layout = spec.layout
    *outer, f = sch.get_loops(sch.get_sblock("x_flat"))
    if layout.rows_first:
        _layout_from_rows(sch, spec, outer, f)
        return
    rows, width = layout.rows, layout.width
    planes = layout.size // (rows * width) + -(-spec.tail // (rows * width))  # extra planes cover the zero tail
    plane, row, col = sch.split(f, [planes, rows, width])
    if not spec.band_rows:
        sch.parallel(sch.fuse(*outer, plane))
    if layout.interleave:
        # An interleaved row is the input row transposed (lane i of vector j: column j + i *
        # interleave): every element at a constant place, which LLVM turns into vector loads and
        # permutes. Vectorised along the lanes instead (strided loads) it took 15 % of a 64->128
        # 3x3@112 kernel's time, unrolled 9 %.
        vector, lane = sch.split(col, [None, spec.lanes])
        sch.reorder(lane, vector)
        sch.unroll(lane)
        sch.unroll(vector)
        return
    sch.vectorize(col)


def _layout_from_rows(sch: tvm.s_tir.Schedule, spec: KernelSpec, outer, f):
    """A task per channel (its zero tail in whole channels): the channel's padded rows into a
    buffer of the task's own (in L1), rows inside the image and columns inside them copied
    without conditions (LLVM vectorises the copy), then its column phases picked from them in
    whole vectors."""
    layout, geo = spec.layout, spec.geo
    channels = int(sch.get(f).extent) // (geo.phases * layout.rows * layout.width)
    channel, _, _, col = sch.split(f, [channels, geo.phases, layout.rows, layout.width])
    task = sch.fuse(*outer, channel)
    sch.parallel(task)
    sch.vectorize(col)
    x_rows = sch.get_sblock("x_rows")
    sch.compute_at(x_rows, task, preserve_unit_loops=True)
    (sh, _), pt, pl = geo.stride, geo.pad[0], geo.pad[1]
    inside = [-(-pt // sh), (geo.height + pt - sh) // sh + 1]  # phase rows inside for every row phase
    for rows in split_at(sch, sch.get_loops(x_rows)[-2], inside):
        for block in sch.get_child_blocks(rows):
            split_at(sch, sch.get_loops(block)[-1], [pl, pl + geo.width])


def split_at(sch: tvm.s_tir.Schedule, loop, points: list[int]) -> list:
    """``loop`` as consecutive loops split at ``points`` (those inside its range)."""
    extent = int(sch.get(loop).extent)
    bounds = sorted({p for p in points if 0 < p < extent})
    if not bounds:
        return [loop]
    return sch.loop_partition(loop, [b - a for a, b in zip([0] + bounds, bounds)] + [None])
