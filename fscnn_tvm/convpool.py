"""A dense conv with the max pool after it fused into its kernel (a CNN's stem: conv, BatchNorm,
ReLU, max pool). Each task computes a band of the pool's output rows: first the conv rows those
windows read (the band's rows times the stride, and the rows the windows overlap into, which
the band above computes too) into a task buffer in the register tile's layout (channels in the
lanes, whole-vector stores), then the pool over it; the conv's output never goes to memory. The
conv is computed from one pool padding above (and below where the last window reaches past the
conv's rows), those rows masked to -inf, so every band starts at an affine row; a window's
columns past the row's ends read its edge column instead, which leaves a max unchanged.

Measured on a Zen 4 (AVX-512, 2 threads), ResNet's stem (3->64 7x7 stride 2 at 224x224, BN,
ReLU) and its 3x3 stride-2 pool, against our conv kernel and the pool TVM's lowering runs after
it: batch 1 1.13-1.19x (bands of 7-14 rows; 4 rows: 1.00x), batch 8 1.24-1.26x (8-28 rows)."""
from __future__ import annotations

import dataclasses

import tvm
from tvm import te

from .decisions import FixedDecisions
from .geometry import DYNAMIC
from .dense import DenseConvSpec, FusedPool, _schedule_pack, dense_compute
from .ops import activate
from .target import Caches


def pooled_spec(spec: DenseConvSpec, kernel: int, stride: int, padding: int, cache: Caches) -> DenseConvSpec | None:
    """``spec`` with a max pool (square ``kernel``, ``stride``, ``padding``) fused, or None where
    the kernel does not fuse one: its reduction blocked or in parts, a flattened image, a residual,
    a pool whose windows skip rows (stride over the window: the bands' rows would not be one
    affine run, which TVM's schedule requires), a conv of one output column (every window then
    reads that column, and the task's loop over the tile's columns is left one column long, which
    TVM's parallel refuses) or a pool PyTorch would refuse."""
    g = spec.geo
    if spec.cb_chunk is not None or spec.flat_hw or spec.flat_rows or spec.parts > 1 or spec.residual \
            or spec.reg_n < 2 or g.in_channels * g.kh * g.kw < 2 or g.out_width < 2 \
            or not (kernel >= 2 and 1 <= stride <= kernel and 0 <= padding <= kernel // 2):
        return None
    pool = FusedPool(kernel, stride, padding, g.out_height, g.out_width, 1)
    rows, cols = pool.out_hw
    if rows < 1 or cols < 1:
        return None
    below = max(0, (rows - 1) * stride + kernel - (g.out_height + padding))  # conv rows the last windows add
    t, l, b, r = g.pad
    geo = dataclasses.replace(g, pad=(t + padding * g.stride[0], l, b + below * g.stride[0], r))
    spec = dataclasses.replace(spec, geo=geo, pool=pool)
    return dataclasses.replace(spec, pool=dataclasses.replace(pool, band=pool_band(spec, cache)))


def pool_band(spec: DenseConvSpec, cache: Caches) -> int:
    """Pool rows per task: the most (dividing the pool's rows) whose conv rows' task buffer fills
    at most a quarter of the L2 (the band's input and the weights stay beside it) while the tasks
    (images x channel blocks x bands) give each core 4. Fewer rows recompute more: a band of B
    rows computes B * stride + kernel - stride conv rows (7x7 stem at batch 1 on a Zen 4: 4 rows
    1.00x the unfused kernels, 7 1.13x, 8 1.19x, 14 1.16x)."""
    pool, g = spec.pool, spec.geo
    rows = pool.out_hw[0]
    row_bytes = spec.padded_width * spec.oc_bn * 4
    fits = [d for d in range(1, rows + 1) if rows % d == 0
            and (d * pool.stride + pool.kernel - pool.stride) * row_bytes <= cache.l2 // 4
            and max(g.batch, 1) * spec.out_blocks * (rows // d) >= 4 * cache.cores]
    return max(fits, default=1)


def pooled_compute(spec: DenseConvSpec) -> list[te.Tensor]:
    """TE tensors (x, w_pack[, bias], out): the conv's accumulators through bias and activation
    into ``conv`` (the accumulators' blocked layout, the padding rows -inf), pooled into ``out``."""
    pool = spec.pool
    x, w, *rest = dense_compute(dataclasses.replace(spec, pool=None))
    acc = next(t for t in rest[-1].op.input_tensors if t.op.name == "acc")
    bias = rest[0] if spec.has_bias else None
    k, s, p = pool.kernel, pool.stride, pool.padding

    def value(n, kb, oh, ow, ko):
        v = acc[n, kb, oh, ow, ko] + (bias[kb * spec.oc_bn + ko] if bias is not None else 0.0)
        inside = tvm.tirx.all(oh >= p, oh < p + pool.rows)
        return tvm.tirx.if_then_else(inside, activate(v, spec.activation), tvm.tirx.min_value("float32"))
    conv = te.compute(acc.shape, value, name="conv")
    rr, rs = te.reduce_axis((0, k), "rr"), te.reduce_axis((0, k), "rs")

    def window(n, c, ph, pw):
        col = tvm.te.min(tvm.te.max(pw * s + rs - p, 0), pool.cols - 1)  # (the edge column: same max)
        return te.max(conv[n, c // spec.oc_bn, ph * s + rr, col, c % spec.oc_bn], axis=[rr, rs])
    out = te.compute((x.shape[0], spec.geo.out_channels) + pool.out_hw, window, name="out")
    return [x, w] + ([bias] if bias is not None else []) + [out]


def prim_func(spec: DenseConvSpec) -> tvm.tirx.PrimFunc:
    return te.create_prim_func(pooled_compute(spec))


def schedule_pooled(func: tvm.tirx.PrimFunc, spec: DenseConvSpec, decide=FixedDecisions(),
                    seed: int | None = None) -> tvm.s_tir.Schedule:
    """Parallel over (images, channel blocks, bands of pool rows); in each task the conv rows
    of the band, a register tile (``reg_n`` pixels x ``oc_bn`` channels) at a time as in
    ``dense.schedule_dense``, then the pool with the channels in the lanes."""
    sch = tvm.s_tir.Schedule(func, seed=seed)
    acc, conv, out = sch.get_sblock("acc"), sch.get_sblock("conv"), sch.get_sblock("out")
    n, c, ph, pw, rr, rs = sch.get_loops(out)
    kb, kc = sch.split(c, [None, spec.oc_bn])
    band, ph_i = sch.split(ph, [None, spec.pool.band])
    sch.reorder(n, kb, band, ph_i, pw, rr, rs, kc)
    # (a symbolic batch's loop is 64-bit: fused with the others it would leave casts in the
    # block bindings, which compute_at refuses; there each image is one parallel loop)
    par = sch.fuse(kb, band) if spec.geo.batch == DYNAMIC else sch.fuse(n, kb, band)
    sch.compute_at(conv, par)
    *_, ow, ko = sch.get_loops(conv)
    ow_o, ow_i = sch.split(ow, [None, spec.reg_n])
    sch.compute_at(acc, ow_o)
    ko_o, ko_v = sch.split(ko, [None, spec.lanes])
    sch.unroll(ow_i)
    sch.unroll(ko_o)
    sch.vectorize(ko_v)
    # The tile's own loops under ``ow_o``, where compute_at left out those of one iteration.
    g = spec.geo
    extents = [spec.reg_n, spec.oc_bn, spec.part_blocks, g.kh, g.kw, spec.ic_bn]
    a_ow, a_ko, *reduction = sch.get_loops(acc)[-sum(e > 1 for e in extents):]
    a_ko, a_v = sch.split(a_ko, [None, spec.lanes])
    sch.reorder(*reduction, a_ow, a_ko, a_v)
    sch.parallel(par)
    decide.unroll_limit(sch, par)
    sch.set_scope(acc, 0, "local")
    sch.vectorize(a_v)
    sch.unroll(a_ow)
    sch.unroll(a_ko)
    init = sch.decompose_reduction(acc, reduction[0])
    *_, i_ow, i_ko = sch.get_loops(init)
    i_ko, i_v = sch.split(i_ko, [None, spec.lanes])
    sch.unroll(i_ow)
    sch.unroll(i_ko)
    sch.vectorize(i_v)
    for loop in (rr, rs):
        sch.unroll(loop)
    sch.vectorize(kc)
    sch.vectorize(sch.get_loops(sch.decompose_reduction(out, rr))[-1])
    _schedule_pack(sch, spec)
    return sch


def default_schedule(func: tvm.tirx.PrimFunc, spec: DenseConvSpec) -> tvm.s_tir.Schedule:
    return schedule_pooled(func, spec)
