"""Dense direct convolution: the kernel for conv layers that stay dense (under the sparsity
threshold, stems, the dense baseline), so no conv falls back to TVM's unscheduled lowering.

The layout of x86 direct convolution in TVM's former TOPI (conv2d_NCHWc; Liu et al., ATC 2019),
inside one kernel with NCHW in and out: the input is packed once as
``x_pack[n, cb, h, w, ci]`` (padded, ``ic_bn`` channels innermost) and the weights ahead of time as
``w_pack[kb, cb, r, s, ci, ko]`` (``oc_bn`` output channels innermost, whole vectors). A register
tile holds ``reg_n`` output pixels x ``oc_bn`` channels; each step of the reduction loads the
``oc_bn / lanes`` weight vectors once and broadcasts one input value per pixel, so every load
serves several FMAs (dense weights share their input windows, which sparse rows do not), and
both streams are read in order. Pixels past the row's end (a tile that does not divide the row)
and channels past K (an ``oc_bn`` that does not divide K) are computed on zeros and cropped.

Where one output block's weights exceed the L1d (``reduction_blocking``: 128+ channel 3x3 layers,
wide pointwise convs), every register tile would stream them from L2 once per tile, and on small
maps (7x7, 14x14: 2-3 tiles a row) that stream binds. There the reduction runs in chunks of input
channel blocks sized to the L1d, as a GEMM blocks K: a task (an output block x a few rows) runs all
its tiles on one chunk before the next, the accumulators kept in a task buffer between chunks.

With ``parts`` (``splitk``: a pointwise conv after our depthwise kernel at batch 1) the reduction
runs in that many ranges of input channels, part p's output blocks summing range p only; the
parts are the outermost tasks of the parallel loop, so each core's static share is one part.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from .decisions import FixedDecisions
from .geometry import ConvGeometry, NCHWShapes, batch_extent, with_batch
from .ops import ACTIVATIONS, activate
from .target import Caches, caches, vector_lanes, vector_registers


@dataclass(frozen=True)
class FusedPool:
    """A max pool run on the conv's output inside the conv's kernel (``convpool``)."""
    kernel: int
    stride: int
    padding: int
    rows: int  # the conv's output rows and columns, which the pool reads
    cols: int
    band: int  # pool rows per task

    @property
    def out_hw(self):
        k, s, p = self.kernel, self.stride, self.padding
        return (self.rows + 2 * p - k) // s + 1, (self.cols + 2 * p - k) // s + 1


@dataclass(frozen=True)
class DenseConvSpec(NCHWShapes):
    """The shape facts a compiled dense conv kernel is specialised on, and its register tile."""
    geo: ConvGeometry
    has_bias: bool
    activation: str | None
    lanes: int  # float32 lanes of one vector register
    oc_bn: int  # output channels per block: whole vectors
    ic_bn: int  # input channels innermost in the packed input
    reg_n: int  # output pixels per register tile
    # (H, W) of a pointwise conv computed on its image flattened to one row of H*W pixels
    # (``geo`` is then that 1 x H*W image): no row ends to pad, and no packing (below).
    flat_hw: tuple | None = None
    # Reduction blocking (None: off): input-channel blocks per chunk of the reduction; each task
    # runs every register tile of its rows on one chunk of weights (L1-resident) before the next,
    # the accumulators kept in a task-local buffer between chunks.
    cb_chunk: int | None = None
    task_rows: int = 1  # output rows per task of the parallel loop
    # Blocked kernels only: a task's rows computed as one run of task_rows * W pixels (tiles cross
    # row ends, so only the task's last tile pads); task_rows must divide the output rows.
    flat_rows: bool = False
    residual: bool = False  # a tensor of the output's shape (``out_shape``) added before the activation
    # Input channels summed in this many ranges (``splitk``): the output holds each part's sums
    # (``out_shape``), with no bias, activation or residual.
    parts: int = 1
    # A max pool after the conv, fused (``convpool``): ``geo`` then also computes the conv rows
    # the pool's padding reads (above and below), which the kernel masks.
    pool: FusedPool | None = None
    kind: str = "dense_conv2d"

    @property
    def out_shape(self):
        """The kernel's output shape (flat_rows: one row per task, its rows end to end; with
        parts, the parts' partial outputs: (N, parts, K, rows, columns))."""
        g = self.geo
        if self.pool:
            return (g.batch, g.out_channels) + self.pool.out_hw
        if self.parts > 1:
            return (g.batch, self.parts) + tuple(g.out_shape[1:])
        if self.flat_rows:
            return (g.batch, g.out_channels, g.out_height // self.task_rows, self.task_rows * g.out_width)
        return g.out_shape

    @property
    def layer_out_shape(self):
        """The layer's output shape: ``out_shape`` with a flattened image (or tasks' rows) unflattened."""
        if self.parts > 1 or self.pool:
            return self.out_shape
        if self.flat_hw:
            return self.out_shape[:2] + tuple(self.flat_hw)
        return self.geo.out_shape

    @property
    def task_pixels(self):
        """flat_rows: pixels computed per task, rounded up to whole register tiles."""
        return -(-self.task_rows * self.geo.out_width // self.reg_n) * self.reg_n

    @property
    def packs(self):
        """Whether the kernel packs its input first. Not when the packed input would be the input
        itself (one channel per block, no padding, every tile inside the row): a pointwise conv
        then reads the input where it is (its packing would cost a ninth of a 3x3 conv's work
        per input value, so a copy there is a large share of the layer)."""
        g = self.geo
        rows, cols = self.pack_hw
        return self.ic_bn > 1 or max(g.pad) > 0 or rows > g.height or cols > g.width

    @property
    def out_blocks(self):
        return -(-self.geo.out_channels // self.oc_bn)

    @property
    def part_blocks(self):
        """Input channel blocks each part sums."""
        return self.geo.in_channels // self.ic_bn // self.parts

    @property
    def padded_width(self):
        """Output columns computed per row: the row rounded up to whole register tiles."""
        return -(-self.geo.out_width // self.reg_n) * self.reg_n

    @property
    def w_pack_shape(self):
        g = self.geo
        return (self.parts * self.out_blocks, self.part_blocks, g.kh, g.kw, self.ic_bn, self.oc_bn)

    @property
    def pack_hw(self):
        """(rows, columns) of the packed, padded input."""
        g = self.geo
        if self.flat_rows:  # the last task's padding pixels run into the rows below
            last = g.out_height - self.task_rows + (self.task_pixels - 1) // g.out_width
            return (last * g.stride[0] + (g.kh - 1) * g.dilation[0] + 1,
                    (g.out_width - 1) * g.stride[1] + (g.kw - 1) * g.dilation[1] + 1)
        return ((g.out_height - 1) * g.stride[0] + (g.kh - 1) * g.dilation[0] + 1,
                (self.padded_width - 1) * g.stride[1] + (g.kw - 1) * g.dilation[1] + 1)


def register_tile(out_channels: int, out_width: int, lanes: int, registers: int,
                  flat: bool = False) -> tuple[int, int]:
    """(oc_bn, reg_n): channel vectors and pixels of the register tile. Two channel vectors when
    the layer has that many channels (each broadcast input then feeds two FMAs), pixels to fill
    the accumulator registers left after the weight vectors and one broadcast. Among tiles of at
    least two thirds of that many pixels, the one that pads the row least (then the widest).
    ``flat`` (a flattened pointwise conv with an unblocked reduction, which reads its input in
    place when a tile divides the row): where none divides, the input is packed and padded anyway,
    and the widest tile wins (measured on AVX2, 49-pixel rows: 6 pixels 1.09-1.30x over 5, the
    least padding, on 320->1280, 960->160, 960->320, 1024->2048; with the reduction blocked,
    2048->512, 5 stayed 1.07x ahead)."""
    vectors = 2 if out_channels > lanes else 1
    most = max(1, (registers - vectors - 1) // vectors)
    least = max(1, math.ceil(most * 2 / 3))
    if flat and all(out_width % r for r in range(least, most + 1)):
        return vectors * lanes, most
    reg_n = min(range(least, most + 1), key=lambda r: (-(-out_width // r) * r, -r))
    return vectors * lanes, reg_n


# Floats of one kernel tap's weights (input block x output block), and of one tap's input
# values for a register tile (input block x pixels), that a reduction step reads: ``input_block``.
TAP_FLOATS = 256


def input_block(in_channels: int, oc_bn: int, reg_n: int) -> int:
    """Input channels per block of the packed input and weights (``ic_bn``): the most, up to 16
    and dividing the channels, whose tap reads at most ``TAP_FLOATS`` weights (ic_bn x oc_bn) and
    input values (ic_bn x reg_n). Measured on a Zen 4 (AVX-512: 32-channel blocks, 14-pixel tiles)
    on ResNet and VGG 3x3 layers from 64 channels at 56x56 to 512 at 7x7: 16 channels per block
    ran at 117-143 GFLOP/s, 8 at 203-221 (1.3-1.8x; 4: 200-214); 16 with 16-channel blocks and
    14-pixel tiles ran at 212, with 28-pixel tiles at 119, with 32-channel blocks and 7-pixel
    tiles at 108: what binds is a tap's slab, not the tile's unrolled length. With AVX2 (16-channel
    blocks, 4-5 pixels) 16 channels per block stay ahead: 8 ran 0.94-0.96x, 4 0.88-0.94x."""
    return max(d for d in range(1, min(in_channels, 16) + 1)
               if in_channels % d == 0 and (d == 1 or d * max(oc_bn, reg_n) <= TAP_FLOATS))


def make_dense_spec(x_shape, weight_shape, has_bias, activation, target, stride=1, padding=0,
                    dilation=1, parts=1) -> DenseConvSpec:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: {activation!r} is not supported; use one of {ACTIVATIONS}")
    geo = ConvGeometry.create(x_shape, weight_shape, stride, padding, dilation)
    if parts > 1 and (has_bias or activation is not None):
        raise ValueError("a split conv (parts > 1) sums partial outputs: its bias and activation belong "
                         "to the kernel adding them (splitk.sum_parts), not to each part")
    lanes, flat_hw = vector_lanes(target), None
    pointwise = (geo.kh, geo.kw, max(geo.pad)) == (1, 1, 0)
    if pointwise and geo.stride == (1, 1):
        flat_hw = (geo.height, geo.width)
        geo = ConvGeometry.create((geo.batch, geo.in_channels, 1, geo.height * geo.width), weight_shape)
    oc_bn, reg_n = register_tile(geo.out_channels, geo.out_width, lanes, vector_registers(target))
    if geo.in_channels % parts:
        raise ValueError(f"{geo.in_channels} input channels do not split into {parts} parts")
    # Pointwise: one channel per block, so the input needs no packing when its tiles fit the row.
    ic_bn = 1 if pointwise else input_block(geo.in_channels // parts, oc_bn, reg_n)
    spec = DenseConvSpec(geo, has_bias, activation, lanes, oc_bn, ic_bn, reg_n, flat_hw, parts=parts)
    cb_chunk, task_rows = reduction_blocking(spec, caches(target))
    spec = dataclasses.replace(spec, cb_chunk=cb_chunk, task_rows=task_rows)
    if task_rows > 1:  # several rows per task: one run of pixels, the tile chosen for the whole run
        _, reg_n = register_tile(geo.out_channels, task_rows * geo.out_width, lanes, vector_registers(target))
        spec = dataclasses.replace(spec, flat_rows=True, reg_n=reg_n)
    elif flat_hw and cb_chunk is None:
        _, reg_n = register_tile(geo.out_channels, geo.out_width, lanes, vector_registers(target), flat=True)
        spec = dataclasses.replace(spec, reg_n=reg_n)
    return spec


def reduction_blocking(spec: DenseConvSpec, cache: Caches) -> tuple[int | None, int]:
    """(cb_chunk, task_rows). Unblocked (None, 1) while one output block's weights fit twice the
    L1d: each register tile then streams them from L1 or a near L2. Otherwise the reduction runs in
    chunks of input-channel blocks whose weights and input window (for the task's rows) fill at
    most half the L1d, and a task takes the most rows (a divisor of the output rows) whose
    accumulators fill at most half the L1d while the parallel loop keeps 4 tasks per core: every
    tile of the task reuses each chunk of weights once it is in L1."""
    g = spec.geo
    n_cb = spec.part_blocks
    w_bytes = spec.ic_bn * g.kh * g.kw * spec.oc_bn * 4  # weights of one block of input channels
    if n_cb * w_bytes <= 2 * cache.l1d:
        return None, 1
    acc_row = spec.padded_width * spec.oc_bn * 4  # accumulator bytes of one output row
    # (a batch of 1 at least: a kernel built for any batch size may mark its batch as negative)
    rows = max((d for d in range(1, g.out_height + 1) if g.out_height % d == 0 and d * acc_row <= cache.l1d // 2
                and max(g.batch, 1) * spec.parts * spec.out_blocks * (g.out_height // d) >= 4 * cache.cores), default=1)
    in_rows = (rows - 1) * g.stride[0] + (g.kh - 1) * g.dilation[0] + 1
    x_bytes = spec.ic_bn * in_rows * spec.pack_hw[1] * 4  # the task's input window of one block
    fits = [d for d in range(1, n_cb + 1) if n_cb % d == 0 and d * (w_bytes + x_bytes) <= cache.l1d // 2]
    return max(fits, default=1), rows


def pack_weight(spec: DenseConvSpec, weight: np.ndarray) -> np.ndarray:
    """OIHW weight -> ``w_pack[kb, cb, r, s, ci, ko]``, channels past K zero; with parts, block
    p * out_blocks + kb holding block kb's weights on part p's input channels."""
    g = spec.geo
    padded = np.zeros((spec.out_blocks * spec.oc_bn,) + tuple(weight.shape[1:]), np.float32)
    padded[:g.out_channels] = weight
    kb, cb = spec.out_blocks, spec.part_blocks
    w = padded.reshape(kb, spec.oc_bn, spec.parts, cb, spec.ic_bn, g.kh, g.kw)
    return np.ascontiguousarray(w.transpose(2, 0, 3, 5, 6, 4, 1)).reshape(spec.w_pack_shape)


def dense_inputs(weight, x_shape, bias, activation, target, parts=1, **conv_args):
    """The kernel's spec and its constant arrays (packed weight, padded bias) for one layer."""
    spec = make_dense_spec(tuple(x_shape), weight.shape, bias is not None, activation, target, parts=parts,
                           **conv_args)
    return spec, dense_arrays(spec, weight, bias)


def dense_arrays(spec: DenseConvSpec, weight, bias) -> list[np.ndarray]:
    """The constant arrays of a layer's kernel of ``spec``: its packed weight and padded bias."""
    arrays = [pack_weight(spec, np.asarray(weight, np.float32))]
    if bias is not None:
        arrays.append(np.pad(np.asarray(bias, np.float32).reshape(-1), (0, spec.out_blocks * spec.oc_bn
                                                                         - spec.geo.out_channels)))
    return arrays


# ----------------------------------------------------------------------------- compute

def dense_compute(spec: DenseConvSpec) -> list[te.Tensor]:
    """TE tensors (x, w_pack[, bias], out) of the whole layer."""
    g = spec.geo
    (sh, sw), (dh, dw), (pt, pl) = g.stride, g.dilation, g.pad[:2]
    batch = batch_extent(g.batch)
    x = te.placeholder(with_batch(spec.x_shape, batch), "float32", name="x_nchw")
    w = te.placeholder(spec.w_pack_shape, "float32", name="w_pack")
    bias = te.placeholder((spec.out_blocks * spec.oc_bn,), "float32", name="bias") if spec.has_bias else None
    n_cb, part = g.in_channels // spec.ic_bn, spec.part_blocks

    def packed(n, cb, h, col, ci):
        row, col = h - pt, col - pl
        return te.if_then_else(g.inside(row, col), x[n, cb * spec.ic_bn + ci, row, col], tvm.tirx.const(0.0, "float32"))

    if spec.packs:
        x_pack = te.compute((batch, n_cb) + spec.pack_hw + (spec.ic_bn,), packed, name="x_pack")
        read = lambda n, cb, h, col, ci: x_pack[n, cb, h, col, ci]  # noqa: E731
    else:
        read = lambda n, cb, h, col, ci: x[n, cb, h, col]  # noqa: E731 - the input is its own packing

    cb, r, s, ci = (te.reduce_axis((0, e), name=nm) for e, nm in
                    ((part, "cb"), (g.kh, "r"), (g.kw, "s"), (spec.ic_bn, "ci")))

    def tap_sum(n, p, kb, oh, ow, ko):  # flat_rows: oh is a task, ow a pixel of the task
        if spec.flat_rows:
            oh, ow = oh * spec.task_rows + ow // g.out_width, ow % g.out_width
        cb_in, kb_w = (cb, kb) if spec.parts == 1 else (p * part + cb, p * spec.out_blocks + kb)
        return te.sum(read(n, cb_in, oh * sh + r * dh, ow * sw + s * dw, ci) * w[kb_w, cb, r, s, ci, ko],
                      axis=[cb, r, s, ci])
    tile = ((g.out_height // spec.task_rows, spec.task_pixels) if spec.flat_rows else
            (g.out_height, spec.padded_width)) + (spec.oc_bn,)
    if spec.parts > 1:  # acc[n, part, kb, ...]; the partial outputs as they are
        acc = te.compute((batch, spec.parts, spec.out_blocks) + tile, tap_sum, name="acc")
        out = te.compute(with_batch(spec.out_shape, batch), lambda n, p, k, oh, ow: acc[
            n, p, k // spec.oc_bn, oh, ow, k % spec.oc_bn], name="out")
        return [x, w, out]
    acc = te.compute((batch, spec.out_blocks) + tile, lambda n, kb, oh, ow, ko: tap_sum(n, 0, kb, oh, ow, ko),
                     name="acc")
    residual = te.placeholder(with_batch(spec.out_shape, batch), "float32", name="residual") \
        if spec.residual else None
    out = conv_epilogue(lambda n, k, oh, ow: acc[n, k // spec.oc_bn, oh, ow, k % spec.oc_bn],
                        with_batch(spec.out_shape, batch), bias, spec.activation, residual)
    return [x, w] + [t for t in (bias, residual) if t is not None] + [out]


def conv_epilogue(acc_at, out_shape, bias, activation, residual=None) -> te.Tensor:
    """``out``: the accumulator ``acc_at(n, k, oh, ow)`` plus bias (and ``residual``), through
    the activation."""
    def value(n, k, oh, ow):
        v = acc_at(n, k, oh, ow)
        v = v + bias[k] if bias is not None else v
        return activate(v + residual[n, k, oh, ow] if residual is not None else v, activation)
    return te.compute(out_shape, value, name="out")


def prim_func(spec: DenseConvSpec) -> tvm.tirx.PrimFunc:
    return te.create_prim_func(dense_compute(spec))


# ----------------------------------------------------------------------------- schedule

def schedule_dense(func: tvm.tirx.PrimFunc, spec: DenseConvSpec, decide=FixedDecisions(),
                   seed: int | None = None) -> tvm.s_tir.Schedule:
    """Register tile (``reg_n`` pixels x ``oc_bn`` channels) in registers across the whole
    reduction, reduction ordered (input channel block, kernel row, kernel column, channel) so both
    packed streams are read in order; bias and activation on the way out; parallel over
    (batch, channel blocks, output rows); the input packed in parallel over its rows first."""
    sch = tvm.s_tir.Schedule(func, seed=seed)
    if spec.cb_chunk is not None:
        return _schedule_blocked(sch, spec, decide)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    n, *kb, oh, ow, ko, cb, r, s, ci = sch.get_loops(acc)  # kb: (part,) output block
    ow_o, ow_i = sch.split(ow, [None, spec.reg_n])
    ko_o, ko_v = sch.split(ko, [None, spec.lanes])
    sch.reorder(n, *kb, oh, ow_o, cb, r, s, ci, ow_i, ko_o, ko_v)
    init = _registers(sch, decide, acc, out, (n, *kb, oh), (ci, ow_i, ko_o, ko_v), cb, epilogue_at=ow_o)
    *_, i_ow, i_ko, i_v = sch.get_loops(init)
    sch.unroll(i_ow)
    sch.unroll(i_ko)
    sch.vectorize(i_v)
    for loop in sch.get_loops(out)[-3:]:  # channels, the row, pixels of the tile
        sch.unroll(loop)
    _schedule_pack(sch, spec)
    return sch


def _registers(sch, decide, acc, out, outer, tile, reduction, epilogue_at=None):
    """The steps both structures share: ``outer`` fused into the parallel loop, the epilogue
    moved to ``epilogue_at`` (None: the parallel loop), the accumulators in registers (``tile``: the
    channel, pixel and channel-vector loops unrolled, the lanes vectorised), the zeroing split
    off at ``reduction``. Returns the zeroing block."""
    par = sch.fuse(*outer)
    sch.parallel(par)
    decide.unroll_limit(sch, par)
    sch.reverse_compute_at(out, par if epilogue_at is None else epilogue_at, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    *unrolled, lanes = tile
    sch.vectorize(lanes)
    for loop in unrolled:
        sch.unroll(loop)
    return sch.decompose_reduction(acc, reduction)


def _schedule_pack(sch, spec):
    if spec.packs:
        pn, pcb, ph, pw, pci = sch.get_loops(sch.get_sblock("x_pack"))
        sch.reorder(pn, pcb, ph, pci, pw)  # read along input rows
        sch.parallel(sch.fuse(pn, pcb, ph))


def _schedule_blocked(sch, spec, decide):
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    n, *kb, oh, ow, ko, cb, r, s, ci = sch.get_loops(acc)  # kb: (part,) block; flat_rows: oh a task
    oh_o, oh_i = (oh, []) if spec.flat_rows else (lambda o, i: (o, [i]))(*sch.split(oh, [None, spec.task_rows]))
    ow_o, ow_i = sch.split(ow, [None, spec.reg_n])
    ko_o, ko_v = sch.split(ko, [None, spec.lanes])
    cb_o, cb_i = sch.split(cb, [None, spec.cb_chunk])
    sch.reorder(n, *kb, oh_o, cb_o, *oh_i, ow_o, cb_i, r, s, ci, ow_i, ko_o, ko_v)
    init = _registers(sch, decide, acc, out, (n, *kb, oh_o), (ci, ow_i, ko_o, ko_v), cb_o)
    *_, i_ow, i_ko = sch.get_loops(init)
    _, i_v = sch.split(i_ko, [None, spec.lanes])
    sch.vectorize(i_v)
    _schedule_pack(sch, spec)
    return sch


def default_schedule(func: tvm.tirx.PrimFunc, spec: DenseConvSpec) -> tvm.s_tir.Schedule:
    return schedule_dense(func, spec)
