"""Split reductions: a pointwise conv after our depthwise kernel sums its input channels in
parts, one per core, and a small kernel adds the parts.

Our depthwise kernel's tasks are output channels, so at batch 1 each core writes one range of
the channels (a contiguous share of the parallel loop). A pointwise conv after it reads every
channel, so half of what each core reads is still in the other core's cache, and each line of
it the depthwise conv writes again next time must first be taken back from the reader: an
invalidation per line, which costs 60-330 ns on a guest whose vCPUs sit near or far apart
(MobileNetV2 90 %, Zen 4: the projections after a depthwise conv ran 3x their near time in the
far placement; a 384@14 depthwise conv writing its output took 27 us after a reader on its own
channel partition, 49 after such a pointwise conv). Split instead (``formats.split_columns``),
the conv's table holds each output channel once per range of input channels, and the tasks of
range p run on the core that wrote range p: every input line a core reads is its own. The
partial outputs (one per core, each as large as the conv's output, which is narrow next to its
input in an inverted residual block) are added by ``sum_parts``, with the bias, the residual
and the activation the conv's epilogue would have applied.
"""
from __future__ import annotations

import tvm
from tvm import te

from .dense import conv_epilogue
from .kernels import OPAQUE


def sum_parts(parts: int, out_shape, has_bias: bool, activation, residual: bool, lanes: int) -> tvm.tirx.PrimFunc:
    """A scheduled function: ``out[n, k, y, x] = activation(sum over p of partial[n, p, k, y*W + x]
    (+ bias[k]) (+ residual[n, k, y, x]))``, parallel over (image, channel), each channel's pixels
    vectorised where they are whole vectors."""
    n, c, h, w = (int(d) for d in out_shape)
    partial = te.placeholder((n, parts, c, h * w), "float32", name="partial")
    bias = te.placeholder((c,), "float32", name="bias") if has_bias else None
    res = te.placeholder((n, c, h, w), "float32", name="residual") if residual else None

    def acc_at(b, k, y, x):
        total = partial[b, 0, k, y * w + x]
        for p in range(1, parts):
            total = total + partial[b, p, k, y * w + x]
        return total
    out = conv_epilogue(acc_at, (n, c, h, w), bias, activation, res)
    func = te.create_prim_func([partial] + [t for t in (bias, res) if t is not None] + [out])
    sch = tvm.s_tir.Schedule(func)
    b, k, y, x = sch.get_loops(sch.get_sblock("out"))
    sch.parallel(sch.fuse(b, k))
    pixels = sch.fuse(y, x)
    if (h * w) % lanes == 0:
        sch.vectorize(sch.split(pixels, [None, lanes])[1])
    return sch.mod["main"].without_attr("global_symbol").with_attr("tir.is_scheduled", True) \
        .with_attr("op_pattern", OPAQUE)
