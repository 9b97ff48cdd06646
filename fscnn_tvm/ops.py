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
CPU description (``tiles``: the policies: vector width, register tile, bands, chunks); ``schedule``
says *how*; ``lowering`` rewrites the scheduled TIR.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from . import formats as F
from .geometry import ConvGeometry, InputLayout, batch_extent, with_batch
from .layout_pass import conv2d_layout_compute
from .decisions import MASKED_ROW_ATTR, INTERLEAVE_ATTR
from .cpuprobe import half_width_cost
from .target import caches, masked_stores, vector_lanes, vector_registers
from .tiles import (band_rows_for, choose_lanes, chunk_task_channels, chunking, flattens, interleavable, interleaves,
                    linear_group, shared_channels)

ACTIVATIONS = (None, "relu", "relu6")
# Rows padded to a multiple of 4 nonzeros: a few zero slots per row buy an evenly splittable
# nonzero loop and let layers of one shape and similar density share a compiled kernel.
ELL_WIDTH_MULTIPLE = 4


# ----------------------------------------------------------------------------- compute

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


def batched_linear_compute(x_t, w_data, w_offset):
    """acc[n, kb, io, 0, 0] = sum_{w, ii} w_data[kb, w, io, ii] * x_t[w_offset[kb, w, ii], n]: a
    linear layer on its input transposed (features x images), so a nonzero's images are one
    contiguous vector and each weight loaded serves every image."""
    n_kb, width, bo, bi = w_data.shape
    red_w = te.reduce_axis((0, width), name="w")
    red_i = te.reduce_axis((0, bi), name="ii")
    return te.compute(
        (x_t.shape[1], n_kb, bo, 1, 1),
        lambda n, kb, io, oh, ow: te.sum(w_data[kb, red_w, io, red_i] * x_t[w_offset[kb, red_w, red_i], n],
                                         axis=[red_w, red_i]), name="acc")


def chunked_accumulate_compute(x_flat, w_data, w_offset, w_span, out_hw, row_stride, chunk_width, band_rows=None):
    """``sparse_accumulate_compute`` with the reduction in chunks of input channels: row kb's
    slots on chunk c's channels are the table's slots ``w_span[c, kb, 0] .. w_span[c, kb, -1]``
    counted row-major over the whole table (``formats.chunk_major``: a task's rows' slots of one
    chunk follow each other), so a schedule can run every row on one chunk (whose input fits the
    L1d) before the next. The guard keeps slots past the chunk's end out; ``lower_sparse``
    bounds the slot loop at the chunk's end (or, for a table of several channels per row, runs
    each mask's slots with only its channels' FMAs), which makes the guard always true."""
    n_b = x_flat.shape[0]
    n_kb, width, bo, _ = w_data.shape
    red_c = te.reduce_axis((0, w_span.shape[0]), name="c")
    red_w = te.reduce_axis((0, chunk_width), name="w")
    end = w_span.shape[2] - 1

    def term(n, kb, io, oh, ow):
        start = w_span[red_c, kb, 0]
        slot = start + red_w
        row, col = slot // width, slot % width
        offset = w_offset[row, col, 0].astype("int32")
        window = x_flat[n, offset + oh * row_stride + ow] if band_rows is None else \
            x_flat[n, oh // band_rows, offset + oh % band_rows * row_stride + ow]
        value = w_data[row, col, io, 0] * window
        return te.if_then_else(red_w < w_span[red_c, kb, end] - start, value, tvm.tirx.const(0.0, "float32"))

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
    # A flattened pointwise conv read in place though its H*W pixels are not whole vectors: the
    # windows of a row's last vector run past the row, and their loads are masked there
    # (``rowends.masked_windows``; CPUs with mask registers).
    masked_row: bool = False
    # The table's rows in this many equal parts, part p reading only input channels of range p
    # (``formats.split_columns``): each part's tasks run on one core (``tiles.chunk_task_channels``).
    parts: int = 1
    # The input laid out in interleaved rows (``InputLayout.interleave``, ``tiles.interleaves``):
    # every window load aligned; the epilogue gathers each output row's columns back in order.
    interleaved: bool = False
    # A max pool of this window and stride (no padding) after the epilogue, in the task that
    # writes its rows (``tiles.with_pool``); 0: none.
    pool: int = 0

    @property
    def layout(self) -> InputLayout:
        """The input layout the kernel reads its windows from: the input itself (rows of its
        width) where ``in_place``, else rows of whole vectors. Measured at 70 and 90 % on a Zen 4
        (AVX-512), against rows of the phase's width: pointwise convs at 14x14 and 7x7 (rows of
        14 and 7 floats widened to 16 and 8) 1.26-1.29x; 3x3 convs 1.04-1.09x (a third of their
        windows aligned), one stride-2 layer 0.96-1.08x."""
        if self.interleaved:
            return InputLayout(self.geo, self.band_rows, None, self.padded_width // self.lanes, self.lanes)
        width = None if self.in_place else F.round_up(self.geo.phase_width, self.lanes)
        return InputLayout(self.geo, self.band_rows, width)

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
        reads its windows from the input where it lies, instead of copying it first. So does one
        with ``masked_row``."""
        return self.kind == "conv2d" and (self.masked_row or self.geo.identity_layout(self.padded_width))

    @property
    def out_shape(self):
        """The kernel's output shape (a flattened conv's is (N, K, 1, H*W); pooled, the pool's)."""
        if self.pool:
            n, k, h, w = self.geo.out_shape
            return n, k, h // self.pool, w // self.pool
        return self.geo.out_shape if self.kind == "conv2d" else (self.batch, self.out_features)

    @property
    def layer_out_shape(self):
        """The layer's output shape: ``out_shape`` with a flattened image unflattened."""
        return self.out_shape[:2] + tuple(self.flat_hw) if self.flat_hw else self.out_shape

    @property
    def batch_in_lanes(self):
        """Whether a linear layer of a fixed batch above one runs its images in the vector lanes,
        each weight loaded once for all of them (at batch 1 it is one dot product per row).
        Measured on VGG16-224's classifier at 90 %, batch 8 (Zen 4): one image at a time
        re-streamed the weights per image, 10.6x batch 1's time."""
        return self.kind == "linear" and self.batch > 1

    @property
    def tail(self):
        """Zero floats after the layout: what the last row's windows read past its end."""
        geo = self.geo
        return max(0, geo.reach + self.padded_width - self.layout.width)

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
    w_span = te.placeholder((spec.geo.in_channels // spec.chunk_channels, n_kb, 1 << bo), "int32", name="w_span") \
        if spec.chunk_channels else None
    bias = te.placeholder((spec.out_features,), "float32", name="bias") if spec.has_bias else None
    batch = batch_extent(spec.batch)
    if spec.kind == "conv2d":
        geo = spec.geo
        x = te.placeholder(with_batch(spec.x_shape, batch), "float32", name="x_nchw")
        layout = spec.layout
        x_flat = x if spec.in_place else conv2d_layout_compute(x, layout, spec.tail)
        if w_span is not None:
            acc = chunked_accumulate_compute(x_flat, w_data, w_offset, w_span, (geo.out_height, spec.padded_width),
                                             layout.width, spec.chunk_width, spec.band_rows)
        else:
            acc = sparse_accumulate_compute(x_flat, w_data, w_offset, (geo.out_height, spec.padded_width),
                                            layout.width, spec.band_rows)
    else:
        x = te.placeholder((batch, spec.in_features), "float32", name="x")
        if spec.batch_in_lanes:
            x_t = te.compute((spec.in_features, batch), lambda j, n: x[n, j], name="x_t")
            acc = batched_linear_compute(x_t, w_data, w_offset)
        else:
            acc = sparse_accumulate_compute(x, w_data, w_offset, (1, 1), 0)
    residual = te.placeholder(with_batch(spec.out_shape, batch), "float32", name="residual") \
        if spec.residual else None
    out = epilogue_compute(acc, with_batch(spec.geo.out_shape if spec.pool else spec.out_shape, batch), bias,
                           spec.activation, residual, w_perm)
    if spec.pool:  # (in table order, as ``out``: ``lower_sparse`` permutes the pool's stores instead)
        p = spec.pool
        out = te.compute(with_batch(spec.out_shape, batch), lambda n, k, h, w: functools.reduce(
            te.max, [out[n, k, h * p + i, w * p + j] for i in range(p) for j in range(p)]), name="pool")
    return [x, w_data, w_offset, w_length, w_perm] + [t for t in (w_span, bias, residual) if t is not None] + [out]


# ----------------------------------------------------------------------------- a layer's spec and arrays

# Most times each input element is read (nonzeros per input channel) for which a pointwise conv
# whose pixels are not whole vectors reads its input in place (``KernelSpec.masked_row``): each
# window then starts unaligned, which costs more than the layout pass saves where every input
# element is read many times. Measured at 90 % on Zen 4, masked in place against the layout pass:
# 6-26 reads 1.2-3.5x (384->64, 576->96 and 1024->256 at 14x14, 960->160 and 2048->512 at 7x7),
# 38 1.69x (64->384@14), 96 1.17x (160->960@7), 102 0.98x (256->1024@14), 205 0.87x (512->2048@7).
MASKED_ROW_READS = 100
# The same bound where the masked rows run at half the native width and half-width ops cost more
# (``cpuprobe.half_width_cost``), against a layout pass whose rows run native vectors: every read
# then pays the width too. Zen 5, 1024->256@14 (masked 8 lanes, rows of 14 at 16): 77, 51, 38 reads
# 0.78x, 0.84x, 0.81x the layout pass; 26 reads 1.05x; 576->96@14, 29 reads, 1.03-1.25x. (Zen 4,
# half width as cheap: 77 reads 0.99-1.07x, 51 reads 1.2-2x; 7x7 maps run 8 lanes on both paths.)
MASKED_HALF_ROW_READS = 32


def make_spec(kind, x_shape, weight_shape, ell_shape, has_bias, activation, target,
              stride=1, padding=0, dilation=1, reads=None, parts=1, nonzeros=None) -> KernelSpec:
    """The spec of a layer; ``reads``: nonzeros per input channel, where known (``MASKED_ROW_READS``);
    ``parts``: of a table split by ``formats.split_columns``; ``nonzeros`` (a CSR table's): lay the
    input out in interleaved rows where they pay (``interleaves``) and the conv allows
    (``interleavable``)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: {activation!r} is not supported; use one of {ACTIVATIONS}")
    native, registers = vector_lanes(target), vector_registers(target)
    if kind == "conv2d":
        half_cost = half_width_cost(target)
        geo, cache = ConvGeometry.create(x_shape, weight_shape, stride, padding, dilation), caches(target)

        def spec(geo, lanes, flat_hw=None, masked_row=False):
            spec = KernelSpec("conv2d", geo, geo.batch, geo.in_channels, geo.out_channels, tuple(ell_shape),
                              has_bias, activation, lanes, flat_hw=flat_hw, registers=registers,
                              line_vectors=max(1, cache.line // (4 * lanes)), l2_bytes=cache.l2, l1_bytes=cache.l1d,
                              cores=cache.cores, masked_row=masked_row, parts=parts)
            spec = dataclasses.replace(spec, interleaved=nonzeros is not None and interleavable(spec)
                                       and interleaves(spec, nonzeros))
            # (an input read in place has no layout pass to run band by band)
            return spec if spec.in_place else dataclasses.replace(spec, band_rows=band_rows_for(spec.layout, cache))
        row = spec(geo, choose_lanes(geo.out_width, native, half_cost))
        if (geo.kh, geo.kw, geo.stride, geo.pad) != (1, 1, (1, 1), (0, 0, 0, 0)):
            return row
        pixels = geo.height * geo.width
        flat_geo = ConvGeometry.create((geo.batch, geo.in_channels, 1, pixels), weight_shape)
        lanes = choose_lanes(pixels, native)  # (at 16 lanes ResNet-50's 1024->256@14 ran 0.52x on a Xeon)
        limit = MASKED_HALF_ROW_READS if half_cost > 1 and lanes < row.lanes else MASKED_ROW_READS
        if pixels % native and masked_stores(target) and reads is not None and reads <= limit:
            return spec(flat_geo, lanes, (geo.height, geo.width), masked_row=bool(pixels % lanes))
        flat = spec(flat_geo, native, (geo.height, geo.width))
        return flat if flattens(row, flat) else row
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


def kernel_inputs(kind, sparse: F.SparseMatrix, x_shape, bias, activation, target, ragged_in_place=True, parts=1,
                  **conv_args):
    """The kernel's spec and its weight arrays (ELL values, offsets, bias) for one layer. A CSR
    conv runs on the same weights as a table of several channels per row where the policy picks
    it (``tiles.shared_channels``, ``formats.shared_rows``) and that table's kernel runs chunked
    (its mask loops need the chunked kernel). ``ragged_in_place=False`` keeps a pointwise conv
    whose pixels are not whole vectors on its layout pass (``KernelSpec.masked_row``). ``parts``:
    ``sparse`` is split by ``formats.split_columns`` in that many parts."""
    nonzeros = sparse.nnz if isinstance(sparse, F.CSR) else None

    def table(sparse):
        ell = sparse.ell(ELL_WIDTH_MULTIPLE, parts)
        spec = make_spec(kind, tuple(x_shape), sparse.shape, ell.data.shape, bias is not None, activation, target,
                         reads=sparse.nnz / max(1, sparse.cols) if ragged_in_place else None, parts=parts,
                         nonzeros=nonzeros, **conv_args)
        chunk = chunking(spec, float(ell.lengths.mean()) if len(ell.lengths) else 0.0)
        # (spatial convs only: MobileNetV2's pointwise convs at batch 8 ran 0.98-0.99x banded)
        if not chunk and kind == "conv2d" and spec.batch > 1 and spec.geo.kh * spec.geo.kw > 1 \
                and not (spec.band_rows or spec.in_place):
            spec = dataclasses.replace(spec, band_rows=band_rows_for(spec.layout, caches(target), spec.batch))
        return ell, spec, chunk
    ell, spec, chunk = table(sparse)
    channels = shared_channels(spec, lambda n: F.column_sharing(sparse, n)) \
        if kind == "conv2d" and isinstance(sparse, F.CSR) else 1
    if channels > 1 and (parts == 1 or sparse.rows // parts % channels == 0):  # (no block row across parts)
        shared = table(F.shared_rows(sparse, channels))
        ell, spec, chunk = shared if shared[2] else (ell, spec, chunk)
    data, cols, spans = ell.data, ell.cols, []
    if chunk:
        bounds = ell.chunk_starts(chunk * spec.geo.kh * spec.geo.kw, spec.geo.in_channels // chunk)
        width = F.round_up(max(1, int(np.diff(bounds, axis=1).max())), ELL_WIDTH_MULTIPLE)
        spec = dataclasses.replace(spec, chunk_channels=chunk, chunk_width=width)
        data, cols, span = F.chunk_major(ell, bounds, chunk_task_channels(spec))
        spans = [span]
    offsets = (spec.layout.offsets(cols) if kind == "conv2d" else cols).astype(spec.offset_dtype)
    if kind == "linear" and not spec.batch_in_lanes:
        group = linear_group(spec.ell_shape)
        data, offsets = F.interleave_rows(data, group), F.interleave_rows(offsets, group)
    return spec, [data, offsets, ell.lengths, ell.perm] + spans + ([bias[ell.perm]] if bias is not None else [])


def prim_func(spec: KernelSpec) -> tvm.tirx.PrimFunc:
    func = te.create_prim_func(sparse_compute(spec))
    func = func.with_attr(MASKED_ROW_ATTR, spec.geo.out_width) if spec.masked_row else func
    return func.with_attr(INTERLEAVE_ATTR, spec.layout.interleave) if spec.interleaved else func
