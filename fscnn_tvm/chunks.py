"""Batch chunks: the layers of a batched model run a chunk of images at a time, depth first.

At batch N the activations of a CNN's early layers are N times one image's: once they exceed
the caches every layer streams them through memory, and a batch costs more than N single
images. So a model imported at a static batch N > 1 is cut into *segments*: each runs as its
own function built for a chunk of images, called once per chunk on views of its input, each
call writing its images into the batch-N tensor the next segment starts from. A segment's chunk is
the most images (a divisor of N) whose largest activation in it fits the cores' L2, and at least
one image per core: the sparse kernels' and layout passes' parallel loops split their images
first, so each core then runs its own image through the segment, where one image split between
the cores passes its lines between them at every kernel (measured at batch 8, 90 %, 2 cores, one
process, against one image a chunk: ResNet-50 1.13x, ResNet-18 1.05x, VGG16-224 1.03x,
MobileNetV2 0.99x; in a slow stretch of the host, where a session before saw larger chunks gain
only there); several images through the 14x14 layers (a chunk of small images still fills
the threads, and each call costs a launch per op); the rest of the model, where the whole batch
fits, runs at batch N. Each image flows through a segment while its activations are in cache.

A cut must leave exactly one live tensor (batch first), and every op before the last cut must
treat the images of a batch independently: only ops known to do so (``BATCH_INDEPENDENT``, axis
arguments checked) may be in a segment, and each of their outputs must keep the batch as its
first dimension. Anything else ends the region where chunks may run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm

# Ops that compute each image of a batch from that image alone (elementwise ops broadcast a
# batch-1 or batch-less operand; ``_independent`` checks the axis of those that take one).
ELEMENTWISE = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
               "relax.power", "relax.nn.relu", "relax.clip", "relax.sigmoid", "relax.tanh", "relax.exp",
               "relax.sqrt", "relax.rsqrt", "relax.negative", "relax.abs", "relax.nn.silu", "relax.nn.gelu",
               "relax.nn.gelu_tanh", "relax.nn.leakyrelu", "relax.hardswish", "relax.nn.hardswish",
               "relax.nn.hardsigmoid", "relax.astype", "relax.nn.dropout", "relax.zeros_like", "relax.ones_like",
               "relax.full_like"}
SPATIAL = {"relax.nn.conv2d", "relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d",
           "relax.nn.batch_norm"}  # NCHW, checked in ``_independent``
AXIS_OPS = {"relax.concat", "relax.mean", "relax.sum", "relax.max", "relax.nn.softmax", "relax.strided_slice"}
BATCH_INDEPENDENT = ELEMENTWISE | SPATIAL | AXIS_OPS | {"relax.reshape"}


@dataclass(frozen=True)
class Segment:
    start: int  # bindings[start : end + 1] run as one function
    end: int
    chunk: int  # images per call


def _op(value):
    from tvm import relax
    return value.op.name if isinstance(value, relax.Call) and hasattr(value.op, "name") else None


def reshape_source(bb, x):
    """The tensor ``x`` is a reshape of, when ``bb`` bound ``x`` to a reshape; else ``x``."""
    from tvm import relax
    bound = bb.lookup_binding(x) if isinstance(x, relax.Var) else None
    return bound.args[0] if _op(bound) == "relax.reshape" else x


_MISSING = object()


def _axes(value) -> list[int] | None:
    """The axes an op works along ([] when it takes none; None: every axis, the batch too)."""
    for key in ("axis", "axes"):
        axis = getattr(value.attrs, key, _MISSING)
        if axis is not _MISSING:
            if axis is None:
                return None
            return [int(a) for a in axis] if hasattr(axis, "__len__") else [int(axis)]
    return []


def _independent(value) -> bool:
    """Whether ``value`` (a binding's value) treats the images of a batch independently."""
    from tvm import relax
    if isinstance(value, (relax.TupleGetItem, relax.Tuple, relax.Var)):
        return True
    name = _op(value)
    if name not in BATCH_INDEPENDENT:
        return False
    if name in SPATIAL:
        layout = getattr(value.attrs, "data_layout", getattr(value.attrs, "layout", "NCHW"))
        return str(layout).startswith("N") and (name != "relax.nn.batch_norm" or int(value.attrs.axis) != 0)
    if name == "relax.reshape":  # row-major: an image's elements stay that image's when the batch stays first
        return batch_of(value.args[0].ty) is not None and batch_of(value.args[0].ty) == batch_of(value.ty)
    if name in AXIS_OPS:
        axes = _axes(value)
        return axes is not None and 0 not in axes
    return True


def batch_of(ty) -> int | None:
    shape = getattr(ty, "shape", None)
    if shape is None or not len(shape) or not hasattr(shape[0], "value"):
        return None
    return int(shape[0].value)


def _bytes(ty) -> int:
    shape = getattr(ty, "shape", None)
    if shape is None or not all(hasattr(d, "value") for d in shape):
        return 0
    return int(np.prod([int(d.value) for d in shape])) * 4


def plan(main, absorbed: set, cache_bytes: int, least: int = 1) -> list[Segment]:
    """The segments of ``main`` (a static-batch Relax function) that run in chunks, in order;
    empty when none would (batch 1, or every activation of the batch fits ``cache_bytes``).
    Bindings after the last segment run at the full batch. ``absorbed``: bindings folded into a
    layer chain or computed inside a kernel (no cut there, and no tensor of their own). A chunk
    is at least the smallest divisor of the batch from ``least`` (the cores) on."""
    batches = {batch_of(p.ty) for p in main.params}
    if len(batches) != 1 or None in batches or next(iter(batches)) < 2:
        return []
    batch = next(iter(batches))
    least = min(d for d in range(min(least, batch), batch + 1) if batch % d == 0)
    bindings = [b for blk in main.body.blocks for b in blk.bindings]
    last_use, reads = {}, {}
    for i, b in enumerate(bindings):
        reads[b.var] = free_vars(b.value)
        for v in reads[b.var]:
            last_use[v] = i
    for v in free_vars(main.body.body):
        last_use[v] = len(bindings)
    on_input = set(main.params)  # what depends on the model's inputs (constants' reshapes need not keep the batch)
    live_until = max((last_use.get(p, -1) for p in main.params), default=-1)  # of everything defined so far
    # Blocks between the points where one tensor is live, with the chunk each one's largest activation allows.
    blocks, start, chunk = [], 0, batch
    for i, b in enumerate(bindings):
        if any(v in on_input for v in reads[b.var]):
            on_input.add(b.var)
            if not _independent(b.value) or batch_of(b.var.ty) not in (batch, None):
                break
            per_image = 0 if b.var in absorbed else _bytes(b.var.ty) // batch  # (absorbed: no tensor of its own)
            chunk = min(chunk, max(c for c in range(least, batch + 1) if batch % c == 0
                                   and (c == least or c * per_image <= cache_bytes)))
        if live_until <= i and b.var not in absorbed and b.var in on_input \
                and batch_of(b.var.ty) == batch and last_use.get(b.var, -1) > i:
            blocks.append(Segment(start, i, chunk))
            start, chunk = i + 1, batch
        live_until = max(live_until, last_use.get(b.var, -1))
    # Chunks only grow along the model (a block takes the least of its own and every later
    # block's), so the activations that shrink and grow again inside each residual block do
    # not cut the model into many segments, each boundary a concat and a slice.
    for k in range(len(blocks) - 2, -1, -1):
        blocks[k] = Segment(blocks[k].start, blocks[k].end, min(blocks[k].chunk, blocks[k + 1].chunk))
    segments = []
    for block in blocks:  # neighbours of one chunk size are one segment
        if segments and segments[-1].chunk == block.chunk:
            segments[-1] = Segment(segments[-1].start, block.end, block.chunk)
        else:
            segments.append(block)
    return [s for s in segments if s.chunk < batch]


def free_vars(expr) -> list:
    """Every var ``expr`` reads, in visiting order (repeats included)."""
    from tvm import relax
    found = []
    relax.analysis.post_order_visit(expr, lambda n: found.append(n) if isinstance(n, relax.Var) else None)
    return found


def same_bindings(small, big, end: int, chunk: int, batch: int) -> bool:
    """Whether ``small`` (the model traced on ``chunk`` images) has the same first ``end + 1``
    bindings as ``big`` (traced on the batch): same ops, shapes equal but for the batch."""
    def dims(ty):
        return [int(d.value) if hasattr(d, "value") else None for d in getattr(ty, "shape", None) or []]

    def alike(s, b):  # equal, or equal but for a batch-first dimension (a bias's (1, K, 1, 1) is both)
        return s == b or (s[:1] == [chunk] and b[:1] == [batch] and s[1:] == b[1:])

    pairs = list(zip(*([b for blk in m.body.blocks for b in blk.bindings][: end + 1] for m in (small, big))))
    return len(pairs) == end + 1 and all(
        _op(s.value) == _op(b.value) and alike(dims(s.var.ty), dims(b.var.ty)) for s, b in pairs)


def checked_plan(main, absorbed: set, cache_bytes: int, trace, least: int = 1) -> tuple[list[Segment], dict]:
    """(``plan``'s segments, the model traced on each chunk size: ``trace(chunk)``, a Relax main
    or None), or ([], {}) when a trace fails or differs from ``main`` where its segments run."""
    segments = plan(main, absorbed, cache_bytes, least)
    traced = {}
    for chunk in sorted({seg.chunk for seg in segments}):
        traced[chunk] = trace(chunk)
        end = max(seg.end for seg in segments if seg.chunk == chunk)
        if traced[chunk] is None or not same_bindings(traced[chunk], main, end, chunk, batch_of(main.params[0].ty)):
            return [], {}
    return segments, traced


def segment_function(bb, name: str, traced, seg: Segment, layers, emit, batch: int):
    """The private Relax function of ``seg``, built from ``traced`` (the model traced on the
    segment's chunk): its inputs are the model's (the first segment's) or the one tensor live
    where it starts, then ``into`` (the batch's output of the segment) and the byte offset of the
    call's images in it. ``layers(main)``: (bindings, chains, absorbed); ``emit(bindings, lo, hi,
    chains, absorbed, remap)`` emits ``bindings[lo:hi]``. The segment's last kernel writes its
    images into a view of ``into`` (``call_tir_inplace``; the ``call_tir`` it replaces is dead
    code), so no concat follows the chunks (TVM's concat of the pieces, cold by then, took 3.2 ms
    of ResNet-18's 46 at batch 8); an output some other op makes is copied there while it is in
    cache. Returns its GlobalVar; the function returns (``into``, the view written)."""
    from tvm import relax
    bindings, chains, absorbed = layers(traced)
    inputs = traced.params if seg.start == 0 else [bindings[seg.start - 1].var]
    params = [relax.Var(p.name if seg.start == 0 else "x", p.ty) for p in inputs]
    last = bindings[seg.end].var.ty
    into = relax.Var("into", relax.TensorType([batch] + [int(d) for d in list(last.shape)[1:]], last.dtype))
    offset = relax.Var("offset", tvm.ir.PrimType("int64"))
    with bb.function(name, params + [into, offset], private=True):
        with bb.dataflow():
            remap = dict(zip(inputs, params))
            emit(bindings, seg.start, seg.end + 1, chains, absorbed, remap)
            # What the last kernel wrote (its reshape, if any, is a view of the same images).
            out = reshape_source(bb, remap[bindings[seg.end].var])
            shape = [int(d) for d in out.ty.shape]
            view = bb.emit(relax.op.memory.ensure_zero_offset(
                relax.op.memory.view(into, shape, str(out.ty.dtype), offset)))
            bound = bb.lookup_binding(out)
            if _op(bound) == "relax.call_tir" and len(bound.args) == 2:
                args = list(bound.args[1].fields)
                written = relax.call_tir_inplace(bound.args[0], args + [view], [len(args)], out.ty)
            else:
                written = relax.call_tir_inplace(bb.add_func(_copy(shape, str(out.ty.dtype)), "copy_into"),
                                                 [out, view], [1], out.ty)
            result = bb.emit_output(relax.Tuple([into, bb.emit(written)]))
        return bb.emit_func_output(result)


def _copy(shape, dtype):
    """A copy of a tensor into another (written in place), marked opaque: fused with the op
    before it, TVM's FuseTIR cannot map an in-place output."""
    from tvm import te

    from .kernels import OPAQUE
    src = te.placeholder(shape, dtype, name="src")
    func = te.create_prim_func([src, te.compute(shape, lambda *i: src(*i), name="dst")])
    return func.without_attr("global_symbol").with_attr("op_pattern", OPAQUE)


def call_in_chunks(bb, func, inputs: list, chunk: int, out_shape, dtype: str):
    """``func`` (a ``segment_function``) on the batch: one call per chunk of images, each on
    views of its inputs (the images of a chunk are one contiguous block of an NCHW tensor: no
    copy), writing its images into one tensor of ``out_shape`` (batch first), which it returns."""
    from tvm import relax
    batch = int(inputs[0].ty.shape[0])
    out_shape = [int(d) for d in out_shape]

    def image_bytes(shape, of_dtype):
        return int(np.prod([int(d) for d in shape[1:]])) * np.dtype(of_dtype).itemsize

    def view(x, i):
        shape = [int(d) for d in x.ty.shape]
        return bb.emit(relax.op.memory.ensure_zero_offset(
            relax.op.memory.view(x, [chunk] + shape[1:], str(x.ty.dtype), i * image_bytes(shape, str(x.ty.dtype)))))
    out = bb.emit(relax.op.builtin.alloc_tensor(relax.ShapeExpr(out_shape), dtype, 0))
    for i in range(0, batch, chunk):
        offset = relax.expr.prim_value(tvm.tirx.IntImm("int64", i * image_bytes(out_shape, dtype)))
        call = bb.emit(relax.Call(func, [view(x, i) for x in inputs] + [out, offset]))
        out = bb.emit(relax.TupleGetItem(call, 0))
    return out
