"""Depthwise convolution (groups = input channels, any depth multiplier): the kernel for
MobileNet-style 3x3 convs, NCHW in and out, bias and activation fused.

A depthwise conv has no input reuse across output channels, so neither the sparse kernel (one
offset load per tap) nor a GEMM-like tile fits it. Each task of the parallel loop takes one output
channel: it lays its input plane out padded and split into stride phases (``x_phase``: a few
tens of KiB, in L1/L2 while the channel runs; every tap then reads a contiguous run of the row,
so stride 2 needs no gathers; with column phases, the padded rows are copied first, ``x_rows``,
and each phase picked from them in whole vectors), then computes a register tile of ``rows``
output rows x ``vectors`` vectors along the row, taps unrolled: each tap's weight is one
broadcast, and rows of the tile share the input rows their windows overlap (the same loads).
Columns past the row's end (a row that is not whole vectors) are computed on zeros and cropped
by the epilogue.

With an ``Expansion`` (``expansion.py``), the task computes its channel of a pointwise conv in
front of it where it would copy its input plane.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from . import expansion as E
from .decisions import FixedDecisions
from .dense import conv_epilogue
from .geometry import ConvGeometry, NCHWShapes, batch_extent, with_batch
from .ops import ACTIVATIONS
from .layout_pass import split_at
from .target import vector_lanes, vector_registers


@dataclass(frozen=True)
class DepthwiseSpec(NCHWShapes):
    """The shape facts a compiled depthwise kernel is specialised on, and its register tile."""
    geo: ConvGeometry  # out_channels = in_channels x the depth multiplier
    has_bias: bool
    activation: str | None
    lanes: int
    vectors: int  # register tile: vectors along an output row
    rows: int  # register tile: output rows
    expansion: E.Expansion | None = None
    kind: str = "depthwise_conv2d"

    @property
    def multiplier(self):
        return self.geo.out_channels // self.geo.in_channels

    @property
    def x_shape(self):
        """The kernel's input: the expansion's input with each plane flattened, where it has one."""
        g = self.geo
        if self.expansion is not None:
            return (g.batch, self.expansion.in_channels, 1, g.height * g.width)
        return super().x_shape

    @property
    def padded_width(self):
        """Output columns computed per row: whole register tiles."""
        step = self.vectors * self.lanes
        return -(-self.geo.out_width // step) * step

    @property
    def padded_height(self):
        return -(-self.geo.out_height // self.rows) * self.rows

    @property
    def phase_shape(self):
        """(phases, rows, columns) of one channel's laid-out input."""
        g = self.geo
        return (g.phases, self.padded_height + g.phase_height - g.out_height,
                self.padded_width + g.reach)

    @property
    def rows_shape(self):
        """(row phases, rows, columns) of one channel's padded input rows, split by row phase
        only: what the column phases are picked from at the stride."""
        g = self.geo
        phases, rows, width = self.phase_shape
        return (g.stride[0], rows, width * g.stride[1])


def register_tile(out_height: int, out_width: int, lanes: int, registers: int, taps: int) -> tuple[int, int]:
    """(vectors, rows): accumulators fill what the registers leave after the taps' weights
    (broadcast once per channel and kept) and one input vector; vectors along the row first (a
    row of the tile reads whole runs of its input rows), only as many as the row has, then rows."""
    budget = max(1, registers - min(taps, registers // 2) - 1)
    row_vectors = -(-out_width // lanes)
    vectors = min(row_vectors, budget)
    vectors = min(range(1, vectors + 1), key=lambda v: (-(-row_vectors // v) * v, -v))  # pad the row least
    rows = max(1, min(budget // vectors, out_height, 4))
    return vectors, rows


def row_lanes(out_width: int, lanes: int) -> int:
    """Lanes of the vectors along an output row: the machine's, or half of 16 where that
    computes fewer padding columns (a 7-column row in one 8-lane vector, not in 16 lanes). A
    256-bit vector does as many FMAs a cycle as half a 512-bit one on a CPU that splits those
    (Zen 4); narrower ones lost more in instructions than they saved in padding (4 lanes: 0.57x
    on AVX-512, 0.88-0.91x on AVX2)."""
    return min((v for v in {lanes, lanes // 2} if v >= min(lanes, 8)), key=lambda v: (-(-out_width // v) * v, -v))


def make_depthwise_spec(x_shape, weight_shape, has_bias, activation, target, stride=1, padding=0,
                        dilation=1, expansion: E.Expansion | None = None) -> DepthwiseSpec:
    """``x_shape``: the depthwise conv's input (with an expansion, that conv's output)."""
    for act in (activation,) + ((expansion.activation,) if expansion else ()):
        if act not in ACTIVATIONS:
            raise ValueError(f"activation: {act!r} is not supported; use one of {ACTIVATIONS}")
    if expansion is not None and (len(x_shape) != 4 or weight_shape[0] != x_shape[1]):
        raise ValueError("an expansion needs a depthwise conv of depth multiplier 1 on a 4-D input")
    if len(weight_shape) != 4 or weight_shape[1] != 1:
        raise ValueError(f"weight: a depthwise weight is (C * multiplier, 1, kh, kw), got {tuple(weight_shape)}")
    if len(x_shape) == 4 and weight_shape[0] % x_shape[1]:
        raise ValueError(f"weight: {weight_shape[0]} output channels are not a multiple of the input's "
                         f"{x_shape[1]} channels (a depthwise conv has groups = input channels)")
    k, _, kh, kw = (int(s) for s in weight_shape)
    geo = ConvGeometry.create(x_shape, (k, x_shape[1] if len(x_shape) == 4 else 1, kh, kw), stride, padding, dilation)
    lanes = row_lanes(geo.out_width, vector_lanes(target))
    vectors, rows = register_tile(geo.out_height, geo.out_width, lanes, vector_registers(target), kh * kw)
    return DepthwiseSpec(geo, has_bias, activation, lanes, vectors, rows, expansion)


def depthwise_inputs(weight, x_shape, bias, activation, target, expand=None, **conv_args):
    """The kernel's spec and its constant arrays ([the expansion's table and bias,] taps per
    channel, bias) for one layer. ``expand``: (weight, bias, activation) of a pointwise conv
    fused in front (``Expansion``); ``x_shape`` is then its output's shape."""
    expansion, arrays = None, []
    if expand is not None:
        e_weight, e_bias, e_act = expand
        if e_weight.ndim != 4 or e_weight.shape[2:] != (1, 1):
            raise ValueError(f"expand: a pointwise weight is (K, C, 1, 1), got {tuple(e_weight.shape)}")
        group = E.expansion_group(e_weight)
        cols, vals, length = E.expansion_table(e_weight, group)
        expansion = E.Expansion(e_weight.shape[1], cols.shape[1], e_bias is not None, e_act, vector_lanes(target), group,
                              vector_registers(target))
        arrays = [cols, vals, length] + ([np.asarray(e_bias, np.float32).reshape(-1)] if e_bias is not None else [])
    spec = make_depthwise_spec(tuple(x_shape), weight.shape, bias is not None, activation, target,
                               expansion=expansion, **conv_args)
    arrays.append(np.ascontiguousarray(np.asarray(weight, np.float32).reshape(weight.shape[0], -1)))
    if bias is not None:
        arrays.append(np.asarray(bias, np.float32).reshape(-1))
    return spec, arrays


def depthwise_compute(spec: DepthwiseSpec) -> list[te.Tensor]:
    """TE tensors (x, w[, bias], out) of the whole layer."""
    g = spec.geo
    (sh, sw), (dh, dw), (pt, pl) = g.stride, g.dilation, g.pad[:2]
    batch = batch_extent(g.batch)
    if spec.expansion is not None:
        inputs, padded = E.compute(spec, batch)
    else:
        x = te.placeholder(with_batch(spec.x_shape, batch), "float32", name="x_nchw")
        inputs = [x]

        def padded(n, c, row, col):
            return te.if_then_else(g.inside(row, col), x[n, c, row, col], tvm.tirx.const(0.0, "float32"))
    w = te.placeholder((g.out_channels, g.kh * g.kw), "float32", name="w")
    bias = te.placeholder((g.out_channels,), "float32", name="bias") if spec.has_bias else None

    if sw == 1:
        x_phase = te.compute((batch, g.in_channels) + spec.phase_shape,
                             lambda n, c, q, hh, ww: padded(n, c, hh * sh + q - pt, ww - pl), name="x_phase")
    else:  # padded rows first, so that the column phases are picked from them without conditions
        x_rows = te.compute((batch, g.in_channels) + spec.rows_shape,
                            lambda n, c, qr, hh, col: padded(n, c, hh * sh + qr - pt, col - pl), name="x_rows")
        x_phase = te.compute((batch, g.in_channels) + spec.phase_shape,
                             lambda n, c, q, hh, ww: x_rows[n, c, q // sw, hh, ww * sw + q % sw], name="x_phase")
    r, s = te.reduce_axis((0, g.kh), name="r"), te.reduce_axis((0, g.kw), name="s")
    acc = te.compute(
        (batch, g.out_channels, spec.padded_height, spec.padded_width),
        lambda n, k, oh, ow: te.sum(
            x_phase[n, k // spec.multiplier, (r * dh % sh) * sw + s * dw % sw, oh + r * dh // sh, ow + s * dw // sw]
            * w[k, r * g.kw + s], axis=[r, s]),
        name="acc")

    out = conv_epilogue(lambda n, k, oh, ow: acc[n, k, oh, ow], with_batch(spec.out_shape, batch), bias,
                        spec.activation)
    return inputs + [w] + ([bias] if bias is not None else []) + [out]


def prim_func(spec: DepthwiseSpec) -> tvm.tirx.PrimFunc:
    return te.create_prim_func(depthwise_compute(spec))


def schedule_depthwise(func: tvm.tirx.PrimFunc, spec: DepthwiseSpec, decide=FixedDecisions(),
                       seed: int | None = None) -> tvm.s_tir.Schedule:
    """Parallel over (batch, output channel); per channel, the phase layout, then register
    tiles (``rows`` x ``vectors``) with every tap unrolled, bias and activation on the way out."""
    sch = tvm.s_tir.Schedule(func, seed=seed)
    acc, out, x_phase = sch.get_sblock("acc"), sch.get_sblock("out"), sch.get_sblock("x_phase")
    n, k, oh, ow, r, s = sch.get_loops(acc)
    oh_o, oh_i = sch.split(oh, [None, spec.rows])
    ow_o, ow_t, ow_v = sch.split(ow, [None, spec.vectors, spec.lanes])
    sch.reorder(n, k, oh_o, ow_o, r, s, oh_i, ow_t, ow_v)
    if spec.expansion is not None and spec.expansion.group > 1:  # a task: the channels of a group
        k = sch.split(k, [None, spec.expansion.group])[0]
    par = sch.fuse(n, k)
    sch.parallel(par)
    decide.unroll_limit(sch, par)
    sch.reverse_compute_at(out, ow_o, preserve_unit_loops=True)
    sch.compute_at(x_phase, par, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    sch.vectorize(ow_v)
    for loop in (r, s, oh_i, ow_t):
        sch.unroll(loop)
    init = sch.decompose_reduction(acc, r)
    *_, i_oh, i_t, i_v = sch.get_loops(init)
    sch.unroll(i_oh)
    sch.unroll(i_t)
    sch.vectorize(i_v)
    *_, o_oh, o_ow = sch.get_loops(out)
    sch.unroll(o_oh)
    if spec.geo.out_width % spec.lanes == 0:  # (a ragged row would need a predicated tail)
        sch.vectorize(sch.split(o_ow, [None, spec.lanes])[1])
    if spec.geo.stride[1] > 1:
        # The padded rows are a unit-stride copy, which LLVM vectorises on its own; the column
        # phases are picked from them in whole vectors (strided loads ``pipeline`` turns into
        # contiguous loads and shuffles).
        x_rows = sch.get_sblock("x_rows")
        sch.compute_at(x_rows, par, preserve_unit_loops=True)
        if spec.expansion is not None:  # (before its consumer is partitioned)
            E.schedule(sch, spec, par)
        split_at(sch, sch.get_loops(x_rows)[-1], [spec.geo.pad[1], spec.geo.pad[1] + spec.geo.width])
        columns = sch.get_loops(x_phase)[-1]
        whole = split_at(sch, columns, [sch.get(columns).extent // spec.lanes * spec.lanes])[0]
        if sch.get(whole).extent >= spec.lanes:  # whole vectors, then a scalar tail
            sch.vectorize(sch.split(whole, [None, spec.lanes])[1])
    elif spec.expansion is not None:
        E.schedule(sch, spec, par)
    return sch


def default_schedule(func: tvm.tirx.PrimFunc, spec: DepthwiseSpec) -> tvm.s_tir.Schedule:
    return schedule_depthwise(func, spec)
