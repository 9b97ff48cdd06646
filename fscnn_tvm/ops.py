"""Sparse conv2d / linear as TVM TE compute over the blocked-ELL table of a sparse format.

Direct sparse convolution (Park et al., 2017): nonzero w[k, c, r, s] adds w times a shifted
window of input channel c to output channel k. The input is first laid out once as
``x_flat[n, ((c*Q + q)*Hq + i)*Wq + j]``: padded and split into Q = sh*sw stride phases, so that
every nonzero reads its window as ``x_flat[n, off + oh*Wq + ow]``, contiguous along ``ow``
whatever the stride. The per-nonzero ``off`` is computed here from the format's column index
(c, r, s) and the layer geometry, so the inner loop does no index decoding.

A linear layer is the same compute with a 1x1 output and ``off`` = the input column.

The ELL table holds rows grouped by length, so a register tile's rows are alike; each tile's
nonzero loop stops at its longest row and the epilogue stores each row to its channel
(``lower_sparse``, the one step applied after scheduling, wherever a kernel is built).

This module says *what* (the compute) and derives a layer's ``KernelSpec`` from its shapes and the
CPU description, with the default register tile; ``schedule`` says *how*; ``lowering`` rewrites the
scheduled TIR.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from . import formats as F
from .geometry import ConvGeometry, batch_extent, with_batch
from .target import Caches, caches, vector_lanes, vector_registers

ACTIVATIONS = (None, "relu", "relu6")
# Rows padded to a multiple of 4 nonzeros: a few zero slots per row buy an evenly splittable
# nonzero loop and let layers of one shape and similar density share a compiled kernel.
ELL_WIDTH_MULTIPLE = 4


# ----------------------------------------------------------------------------- compute

def conv2d_layout_compute(x_nchw: te.Tensor, geo: ConvGeometry, tail: int, band_rows: int | None = None) -> te.Tensor:
    """Pad and phase-split the input into ``x_flat`` (N, C*Q*Hq*Wq + tail); the zero tail lets
    the kernel compute whole vectors past the last output column without reading out of bounds.
    With ``band_rows``: (N, bands, C*Q*Hb*Wq + tail), each band of output rows with its own
    layout of the Hb phase rows it reads (halo rows repeated), so the kernel can lay out one
    band at a time, just before the band's tiles read it from cache. (The unbanded form keeps its
    own expressions, here and in ``sparse_accumulate_compute``, so its workloads stay
    structurally identical and the tuning records shipped for them still match.)"""
    sh, sw = geo.stride
    pt, pl = geo.pad[0], geo.pad[1]
    hq, wq, q_n = geo.band_height(band_rows), geo.phase_width, geo.phases
    size = geo.in_channels * q_n * hq * wq

    def value(n, band, f):
        c = f // (q_n * hq * wq)
        q = f // (hq * wq) % q_n
        phase_row = f // wq % hq if band is None else band * band_rows + f // wq % hq
        row = phase_row * sh + q // sw - pt
        col = f % wq * sw + q % sw - pl
        inside = tvm.tirx.all(f < size, row >= 0, row < geo.height, col >= 0, col < geo.width)
        return te.if_then_else(inside, x_nchw[n, c, row, col], tvm.tirx.const(0.0, "float32"))

    batch = x_nchw.shape[0]
    if band_rows is None:
        return te.compute((batch, size + tail), lambda n, f: value(n, None, f), name="x_flat")
    return te.compute((batch, geo.out_height // band_rows, size + tail), value, name="x_flat")


def sparse_accumulate_compute(x_flat, w_data, w_offset, out_hw, row_stride, band_rows=None):
    """acc[n, kb, io, oh, ow] = sum_{w, ii} w_data[kb, w, io, ii] * x_flat[n, w_offset[kb, w, ii] + oh*row_stride + ow]
    (with ``band_rows``: row oh % band_rows of band oh // band_rows's layout)."""
    n_b = x_flat.shape[0]
    n_kb, width, bo, bi = w_data.shape
    red_w = te.reduce_axis((0, width), name="w")
    red_i = te.reduce_axis((0, bi), name="ii")

    def window(n, kb, oh, ow):
        offset = w_offset[kb, red_w, red_i].astype("int32")
        if band_rows is None:
            return x_flat[n, offset + oh * row_stride + ow]
        return x_flat[n, oh // band_rows, offset + oh % band_rows * row_stride + ow]

    return te.compute(
        (n_b, n_kb, bo, out_hw[0], out_hw[1]),
        lambda n, kb, io, oh, ow: te.sum(w_data[kb, red_w, io, red_i] * window(n, kb, oh, ow), axis=[red_w, red_i]),
        name="acc")


def chunked_accumulate_compute(x_flat, w_data, w_offset, w_start, out_hw, row_stride, chunk_width, band_rows=None):
    """``sparse_accumulate_compute`` with the reduction in chunks of input channels: row kb's
    nonzeros on chunk c's channels are its slots ``w_start[kb, c] .. w_start[kb, c + 1]`` (a
    row's slots are in column order), so a schedule can run every row on one chunk (whose input
    fits the L1d) before the next. The guard keeps slots past the chunk's end out; the nonzero
    loop is bounded at the chunk's end by ``lower_sparse``, which makes the guard always true."""
    n_b = x_flat.shape[0]
    n_kb, _, bo, _ = w_data.shape
    red_c = te.reduce_axis((0, w_start.shape[1] - 1), name="c")
    red_w = te.reduce_axis((0, chunk_width), name="w")

    def term(n, kb, io, oh, ow):
        start = w_start[kb, red_c]
        slot = start + red_w
        offset = w_offset[kb, slot, 0].astype("int32")
        window = x_flat[n, offset + oh * row_stride + ow] if band_rows is None else \
            x_flat[n, oh // band_rows, offset + oh % band_rows * row_stride + ow]
        value = w_data[kb, slot, io, 0] * window
        return te.if_then_else(red_w < w_start[kb, red_c + 1] - start, value, tvm.tirx.const(0.0, "float32"))

    return te.compute((n_b, n_kb, bo, out_hw[0], out_hw[1]),
                      lambda n, kb, io, oh, ow: te.sum(term(n, kb, io, oh, ow), axis=[red_c, red_w]), name="acc")


def epilogue_compute(acc, out_shape, bias, activation, residual=None, perm=None):
    """Crop padded channels and columns, add bias (and the residual, at the table channel's
    output channel ``perm[k]``), apply the activation."""
    bo = acc.shape[2]

    def value(n, k, *hw):
        v = acc[n, k // bo, k % bo, hw[0], hw[1]] if hw else acc[n, k // bo, k % bo, 0, 0]
        v = v + bias[k] if bias is not None else v
        return activate(v + residual[n, perm[k], hw[0], hw[1]] if residual is not None else v, activation)

    return te.compute(out_shape, value, name="out")


def activate(v, activation):
    """``v`` through one of ACTIVATIONS (fused into every kernel's epilogue)."""
    if activation in ("relu", "relu6"):
        v = te.max(v, tvm.tirx.const(0.0, "float32"))
    if activation == "relu6":
        v = te.min(v, tvm.tirx.const(6.0, "float32"))
    return v


@dataclass(frozen=True)
class KernelSpec:
    """The shape facts a compiled sparse kernel is specialised on (not the values)."""
    kind: str  # "conv2d" or "linear"
    geo: ConvGeometry | None
    batch: int
    in_features: int
    out_features: int
    ell_shape: tuple  # (KB, W, bo, bi)
    has_bias: bool
    activation: str | None
    lanes: int  # vector width the padded output row is rounded to
    # Linear layers' offsets are input columns: int16 when they fit halves the index bytes of
    # the memory-bound classifiers (a conv's offsets index the whole laid-out input: int32).
    offset_dtype: str = "int32"
    # (H, W) of a pointwise conv computed on its image flattened to one row of H*W pixels
    # (``geo`` is then that 1 x H*W image): one padded row end instead of H of them.
    flat_hw: tuple | None = None
    registers: int = 16  # SIMD registers of the target (vector_registers): how big a register tile fits
    line_vectors: int = 1  # vectors of ``lanes`` floats in one cache line of the target
    l2_bytes: int = 512 << 10  # L2 cache per core of the target (``default_variant``)
    # Output rows per band when the input is laid out band by band inside the parallel loop
    # (``band_rows_for``); None: one layout pass over the whole input first.
    band_rows: int | None = None
    residual: bool = False  # conv: a tensor of the output's shape added before the activation
    l1_bytes: int = 32 << 10  # L1d per core of the target (``chunking``)
    cores: int = 1  # cores of the target (how many tasks a parallel loop needs)
    # Input channels per chunk of the reduction (``chunking``; None: one pass over all of them),
    # and the most slots a row holds on one chunk (the nonzero loop's static extent).
    chunk_channels: int | None = None
    chunk_width: int = 0

    @property
    def x_shape(self):
        """The kernel's input shape (a flattened conv's is (N, C, 1, H*W); one that reads its
        input in place takes it as (N, C*H*W))."""
        geo = self.geo
        if self.kind != "conv2d":
            return (self.batch, self.in_features)
        if self.in_place:
            return (geo.batch, geo.in_channels * geo.height * geo.width)
        return (geo.batch, geo.in_channels, geo.height, geo.width)

    @property
    def in_place(self):
        """Whether the input is its own layout: a conv without padding or stride whose rows are
        whole vectors (a pointwise conv on 56-, 112- or flattened 28x28 maps). The kernel then
        reads its windows from the input where it lies, instead of copying it first."""
        return self.kind == "conv2d" and identity_layout(self.geo, self.padded_width)

    @property
    def out_shape(self):
        """The kernel's output shape (a flattened conv's is (N, K, 1, H*W))."""
        return self.geo.out_shape if self.kind == "conv2d" else (self.batch, self.out_features)

    @property
    def layer_out_shape(self):
        """The layer's output shape: ``out_shape`` with a flattened image unflattened."""
        return self.out_shape[:2] + tuple(self.flat_hw) if self.flat_hw else self.out_shape

    @property
    def padded_width(self):
        """Output columns computed per row: the row rounded up to whole vectors."""
        return -(-self.geo.out_width // self.lanes) * self.lanes if self.kind == "conv2d" else 1


def sparse_compute(spec: KernelSpec) -> list[te.Tensor]:
    """TE tensors (inputs..., output) of the whole sparse layer. The layer's channels come in
    the ELL table's order; ``w_length`` (slots in use per block row) and ``w_perm`` (the output
    channel of each table channel) are read by ``lower_sparse``, which TE cannot express."""
    n_kb, width, bo, bi = spec.ell_shape
    w_data = te.placeholder(spec.ell_shape, "float32", name="w_data")
    w_offset = te.placeholder((n_kb, width, bi), spec.offset_dtype, name="w_offset")
    w_length = te.placeholder((n_kb,), "int32", name="w_length")
    w_perm = te.placeholder((spec.out_features,), "int32", name="w_perm")
    w_start = te.placeholder((n_kb, spec.geo.in_channels // spec.chunk_channels + 1), "int32", name="w_start") \
        if spec.chunk_channels else None
    bias = te.placeholder((spec.out_features,), "float32", name="bias") if spec.has_bias else None
    batch = batch_extent(spec.batch)
    if spec.kind == "conv2d":
        geo = spec.geo
        x = te.placeholder(with_batch(spec.x_shape, batch), "float32", name="x_nchw")
        tail = spec.padded_width - geo.out_width
        x_flat = x if spec.in_place else conv2d_layout_compute(x, geo, tail, spec.band_rows)
        if w_start is not None:
            acc = chunked_accumulate_compute(x_flat, w_data, w_offset, w_start, (geo.out_height, spec.padded_width),
                                             geo.phase_width, spec.chunk_width, spec.band_rows)
        else:
            acc = sparse_accumulate_compute(x_flat, w_data, w_offset, (geo.out_height, spec.padded_width),
                                            geo.phase_width, spec.band_rows)
    else:
        x = te.placeholder((batch, spec.in_features), "float32", name="x")
        acc = sparse_accumulate_compute(x, w_data, w_offset, (1, 1), 0)
    residual = te.placeholder(with_batch(spec.out_shape, batch), "float32", name="residual") \
        if spec.residual else None
    out = epilogue_compute(acc, with_batch(spec.out_shape, batch), bias, spec.activation, residual, w_perm)
    return [x, w_data, w_offset, w_length, w_perm] + [t for t in (w_start, bias, residual) if t is not None] + [out]


# ----------------------------------------------------------------------------- the default register tile

def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _default_tile(spec: KernelSpec) -> tuple[int, int, int]:
    """(table channel blocks, output rows, vectors of output pixels) of the default register tile."""
    n_kb, _, bo, _ = spec.ell_shape
    if spec.kind != "conv2d":
        return 1, 1, 1
    n_vectors = spec.padded_width // spec.lanes
    if bo > 1:
        # BSR: one block row (bo channels) by up to 8 // bo vectors. Measured on VGG16 layers
        # with 8x1 blocks at 90 %: filling more accumulators (2 rows or 2 vectors) was 0.66-1.21x.
        return 1, 1, _largest_divisor(n_vectors, max(1, 8 // bo))
    # CSR: up to 4 channels x whole vectors along a row, up to one cache line (then each
    # nonzero's window loads whole lines, and a tile spans fewer rows of the input, which
    # matters where the input band lives in L2), x as many rows as the registers hold (at
    # most 7): each channel's weight broadcast and offset load then serve more FMAs.
    # Measured at 90 %: with AVX-512 (32 registers, a line is one vector) 4 x 7 rows beat 4
    # x <=4 by 0.95-1.10x on maps of 28-224 rows and 1.23-2.2x on 7 and 14 rows; with AVX2
    # (16, a line is two vectors) 4 x 2 rows x 2 vectors beat 4 x 4 x 1 by 1.1-1.3x on
    # 28-112-wide maps (e.g. 512->512 at 28, 256->512 at 28, stride-2 layers), where 56-wide
    # rows (7 vectors) keep 4 x 4 x 1. Where 4 channels leave no room for a second row
    # (7-row maps on AVX2), 2 channels x 7 rows beat 4 x 1 row: 2.0x on 512->512 at 7x7,
    # 1.7-1.8x on 7x7 pointwise convs (1.1x over their flattened 1 x 7 vectors). A one-row
    # image (a flattened pointwise conv) spans vectors instead: as many as the registers
    # hold besides a broadcast, a load and two spares, then channels up to 4 in what is left
    # (a channel's offset load and broadcast serve one FMA per vector, so vectors, not
    # channels, cut the loads per FMA). Measured on AVX2 at 90 %: 1024->256 at 14x14 (25
    # vectors) 2 channels x 5 vectors 1.37-1.47x over 4 x 1; 512->128 at 28x28 1 x 7
    # 1.03-1.08x over 4 x 2.
    vectors = _largest_divisor(n_vectors, spec.line_vectors)
    for channels in sorted({_largest_divisor(n_kb, c) for c in (4, 2)}, reverse=True):
        rows = _largest_divisor(spec.band_rows or spec.geo.out_height, min(7, spec.registers // (channels * vectors)))
        if rows > 1:
            return channels, rows, vectors
    vectors = _largest_divisor(n_vectors, spec.registers - 4)
    return _largest_divisor(n_kb, min(4, (spec.registers - 4) // vectors)), 1, vectors


def chunk_tile(spec: KernelSpec) -> tuple[int, int]:
    """(output rows, vectors of output pixels) of a chunked kernel's register tile, one table
    channel wide (each row runs exactly its own slots of a chunk, so a tile of one channel has
    no padding to skip; a channel's offset load and broadcast serve rows x vectors FMAs): the
    most vectors of a row that divide it, then the most rows that divide the map, within the
    registers but two (a broadcast and a spare)."""
    room = spec.registers - 2
    vectors = _largest_divisor(spec.padded_width // spec.lanes, room)
    return _largest_divisor(spec.band_rows or spec.geo.out_height, max(1, room // vectors)), vectors


def chunk_task_vectors(spec: KernelSpec) -> int:
    """Vectors of output pixels a chunked kernel's task spans: its rows whole, or on a one-row
    image (a flattened pointwise conv) one tile, so a chunk's window stays small."""
    return chunk_tile(spec)[1] if spec.geo.out_height == 1 else spec.padded_width // spec.lanes


# Fewest nonzeros a row should hold on one chunk: each (row, chunk) costs a loop's setup and a
# load and store of the tile's accumulators.
CHUNK_NONZEROS = 4


def chunkable(spec: KernelSpec) -> bool:
    """Whether a kernel of ``spec`` can run its reduction in chunks: a CSR conv."""
    return spec.kind == "conv2d" and spec.ell_shape[2:] == (1, 1)


def chunking(spec: KernelSpec, mean_row: float) -> int | None:
    """Input channels per chunk of a CSR conv's reduction, or None (one pass). Without chunks
    each nonzero's input window comes from wherever its channel lies, mostly L2 on maps of 14
    rows and up; measured on AVX2 (Zen 3) a loop of such loads runs ~2.5x slower from L2 than
    from L1. A task of the chunked kernel (a band of the tile's rows, a group of channels) runs
    every channel on one chunk of input channels, whose window of the band fits the L1d, before
    the next (the largest such chunk: on AVX2 at 90 %, chunks filling 15 and 30 KiB of a 32 KiB
    L1d ran 1.40x and 1.51x on 64->64 3x3 at 56x56, 1.26x and 1.37x on 256->64 1x1 at 56x56).
    Only where the laid-out input exceeds a quarter of the L2: measured
    at 70-90 % on AVX2 (512 KiB L2), 3x3 convs on 14-56 rows (262-950 KiB of input) 1.2-1.7x,
    2048->512 1x1 at 7x7 (458 KiB) 1.23x, 3x3 convs at 7x7 (147-295 KiB) 0.91-1.06x, 512->2048
    1x1 at 7x7 (115 KiB) 0.97x. And with ``CHUNK_NONZEROS`` per row and chunk on average."""
    if not chunkable(spec) or spec.geo.flat_size * 4 <= spec.l2_bytes // 4:
        return None
    geo = spec.geo
    rows, vectors = spec.band_rows or chunk_tile(spec)[0], chunk_task_vectors(spec)
    cols = geo.phase_width if vectors * spec.lanes == spec.padded_width else \
        vectors * spec.lanes + (geo.kw - 1) * geo.dilation[1]
    channel_bytes = geo.phases * geo.band_height(rows) * cols * 4
    fits = [d for d in range(1, geo.in_channels // 2 + 1) if geo.in_channels % d == 0
            and d * channel_bytes <= spec.l1_bytes and mean_row * d / geo.in_channels >= CHUNK_NONZEROS]
    return max(fits, default=None)


def folds_batch(spec: KernelSpec) -> bool:
    """Whether the register tile can span images: a conv kernel of a fixed batch above one
    (a banded layout is laid out per image and band, so its tiles stay in one image)."""
    return spec.kind == "conv2d" and spec.batch > 1 and not spec.band_rows


# ----------------------------------------------------------------------------- a layer's spec and arrays

def choose_lanes(out_width: int, native: int) -> int:
    """Vector width for the output rows: native or half, whichever pads the row least. Never
    below 8 lanes while the native width is 8 or more: a 128-bit op costs what a 256-bit one
    does on every AVX2 and AVX-512 CPU, so 4-lane rows do the same work in more ops
    (measured at 90 % on AVX2, 28-wide rows, where 4 lanes pad nothing: 8 lanes 1.02-1.20x on
    3x3 layers, 1.44x on a 1x1 conv, which then runs flattened)."""
    options = [v for v in (native, native // 2) if v >= min(native, 8)]
    return min(options, key=lambda v: (-(-out_width // v) * v, -v))


def _flattens(row: KernelSpec, flat: KernelSpec) -> bool:
    """Whether a pointwise conv (1x1, stride 1, no padding) runs on its image flattened to one
    row (``flat``) instead of per row (``row``): where its H*W pixels pad to fewer whole vectors
    than its H rows do and split into a register tile of 4 to 8 vectors, or pad as much and
    fill a bigger register tile. Measured at 90 %: 1.19-1.90x the per-row kernel at 28x28
    (AVX-512); at 7x7 (AVX2: a row is one vector and 7 rows do not split, so the per-row tile is
    4 channels x 1 vector, flattened 1 x 7 vectors) 1.59-1.83x; at 56x56, where 8-lane rows pad
    nothing and the per-row tile holds 16 accumulators, 0.69-0.82x."""
    def padded(spec):
        return spec.geo.out_height * spec.padded_width
    if padded(flat) != padded(row):
        n_vectors = flat.padded_width // flat.lanes
        return padded(flat) < padded(row) and any(n_vectors % v == 0 for v in range(4, 9))
    return math.prod(_default_tile(flat)) > math.prod(_default_tile(row))


def identity_layout(geo: ConvGeometry, padded_width: int) -> bool:
    """Whether ``x_flat`` would be the input itself: no padding, no stride phases, no zero tail."""
    return max(geo.pad) == 0 and geo.stride == (1, 1) and padded_width == geo.out_width


def band_rows_for(geo: ConvGeometry, cache: Caches) -> int | None:
    """Output rows per band of the banded layout (``KernelSpec.band_rows``), or None.
    The input is laid out band by band when the whole layout would not fit the cores' L2
    caches together (the pass would write it to memory and the tiles re-read it from there);
    a band is at most half of one core's L2, and there are at least 4 bands to share between
    threads. Measured at 90 %, default schedules, on a Zen 4 (1 MiB L2 per core, 2 cores)
    against the whole-image layout: VGG16 64->64 at 224 CSR 1.20-1.27x, 8x1 BSR 1.07x;
    128->128 at 112 BSR 1.47x, CSR 1.04x; 256->256 at 56 1.0-1.1x; ResNet-50's 256->64 1x1 at
    56 3.2-4.3x."""
    if geo.flat_size * 4 <= cache.l2 * cache.cores:
        return None
    row_bytes = geo.in_channels * geo.phases * geo.phase_width * 4
    fits = [r for r in range(1, geo.out_height // 4 + 1)
            if geo.out_height % r == 0 and geo.band_height(r) * row_bytes <= cache.l2 // 2]
    return max(fits, default=None)


def make_spec(kind, x_shape, weight_shape, ell_shape, has_bias, activation, target,
              stride=1, padding=0, dilation=1) -> KernelSpec:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: {activation!r} is not supported; use one of {ACTIVATIONS}")
    native, registers = vector_lanes(target), vector_registers(target)
    if kind == "conv2d":
        geo, cache = ConvGeometry.create(x_shape, weight_shape, stride, padding, dilation), caches(target)

        def spec(geo, lanes, flat_hw=None):
            # (an input read in place has no layout pass to run band by band)
            in_place = identity_layout(geo, -(-geo.out_width // lanes) * lanes)
            return KernelSpec("conv2d", geo, geo.batch, geo.in_channels, geo.out_channels, tuple(ell_shape),
                              has_bias, activation, lanes, flat_hw=flat_hw, registers=registers,
                              line_vectors=max(1, cache.line // (4 * lanes)), l2_bytes=cache.l2, l1_bytes=cache.l1d,
                              cores=cache.cores, band_rows=None if in_place else band_rows_for(geo, cache))
        row = spec(geo, choose_lanes(geo.out_width, native))
        if (geo.kh, geo.kw, geo.stride, geo.pad) != (1, 1, (1, 1), (0, 0, 0, 0)):
            return row
        flat = spec(ConvGeometry.create((geo.batch, geo.in_channels, 1, geo.height * geo.width), weight_shape),
                    native, (geo.height, geo.width))
        return flat if _flattens(row, flat) else row
    if len(x_shape) != 2:
        raise ValueError(f"x: expected (batch, in_features), got shape {tuple(x_shape)}")
    if len(weight_shape) != 2:
        raise ValueError(f"weight: expected (out_features, in_features), got shape {tuple(weight_shape)}")
    if x_shape[1] != weight_shape[1]:
        raise ValueError(f"weight has {weight_shape[1]} input features but x has {x_shape[1]}")
    if x_shape[0] < 1:
        raise ValueError(f"x: batch must be >= 1, got shape {tuple(x_shape)}")
    return KernelSpec("linear", None, int(x_shape[0]), int(weight_shape[1]), int(weight_shape[0]),
                      tuple(ell_shape), has_bias, activation, native,
                      "int16" if weight_shape[1] <= np.iinfo(np.int16).max + 1 else "int32", registers=registers)


def kernel_inputs(kind, sparse: F.SparseMatrix, x_shape, bias, activation, target, **conv_args):
    """The kernel's spec and its weight arrays (ELL values, offsets, bias) for one layer."""
    ell = sparse.ell(ELL_WIDTH_MULTIPLE)
    spec = make_spec(kind, tuple(x_shape), sparse.shape, ell.data.shape, bias is not None, activation, target,
                     **conv_args)
    offsets = (spec.geo.offsets(ell.cols, spec.band_rows) if kind == "conv2d" else ell.cols).astype(spec.offset_dtype)
    starts = []
    chunk = chunking(spec, float(ell.lengths.mean()) if len(ell.lengths) else 0.0)
    if chunk:
        bounds = ell.chunk_starts(chunk * spec.geo.kh * spec.geo.kw, spec.geo.in_channels // chunk)
        width = -(-max(1, int(np.diff(bounds, axis=1).max())) // ELL_WIDTH_MULTIPLE) * ELL_WIDTH_MULTIPLE
        spec = dataclasses.replace(spec, chunk_channels=chunk, chunk_width=width)
        starts = [bounds]
    return spec, [ell.data, offsets, ell.lengths, ell.perm] + starts + ([bias[ell.perm]] if bias is not None else [])


def prim_func(spec: KernelSpec) -> tvm.tirx.PrimFunc:
    return te.create_prim_func(sparse_compute(spec))
