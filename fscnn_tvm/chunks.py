"""Batch chunks: the early layers of a batched model run a chunk of images at a time.

At batch N the activations of a CNN's early layers are N times one image's: once they exceed
the caches every layer streams them through memory, and a batch costs more than N single
images. So a model imported at a static batch N > 1 is cut after the last layer whose batch-N
activation exceeds the cores' L2: the part before the cut (the *prefix*) is its own function,
built for a chunk of images and called once per chunk on slices of the input, its outputs
concatenated into the batch-N tensor the rest of the model runs on. That is depth-first
execution at the coarsest grain: each image flows through the prefix while its activations are
in cache.

A cut must leave exactly one live tensor (batch first), and every op before it must treat the
images of a batch independently: only ops known to do so (``BATCH_INDEPENDENT``, axis
arguments checked) may be in the prefix, and each of their outputs must keep the batch as its
first dimension. Anything else ends the region where chunks may run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
class Cut:
    index: int  # the prefix is bindings[: index + 1]
    chunk: int  # images per prefix call
    batch: int  # the model's batch N


def _op(value):
    from tvm import relax
    return value.op.name if isinstance(value, relax.Call) and hasattr(value.op, "name") else None


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
        return _batch_of(value.args[0].ty) is not None and _batch_of(value.args[0].ty) == _batch_of(value.ty)
    if name in AXIS_OPS:
        axes = _axes(value)
        return axes is not None and 0 not in axes
    return True


def _batch_of(ty) -> int | None:
    shape = getattr(ty, "shape", None)
    if shape is None or not len(shape) or not hasattr(shape[0], "value"):
        return None
    return int(shape[0].value)


def _bytes(ty) -> int:
    shape = getattr(ty, "shape", None)
    if shape is None or not all(hasattr(d, "value") for d in shape):
        return 0
    return int(np.prod([int(d.value) for d in shape])) * 4


def plan(main, absorbed: set, cache_bytes: int) -> Cut | None:
    """Where to cut ``main`` (a static-batch Relax function) for chunked execution, or None:
    at the first point that leaves one live tensor after the last binding whose batch-N output
    exceeds ``cache_bytes`` (the cores' L2), or at the last such point before an op that mixes
    images; chunks of the most images whose largest activation fits ``cache_bytes`` (at least
    one; a proper divisor of the batch). ``absorbed``: bindings folded into a layer chain (no
    cut inside a chain)."""
    batches = {_batch_of(p.ty) for p in main.params}
    if len(batches) != 1 or None in batches or next(iter(batches)) < 2:
        return None
    batch = next(iter(batches))
    bindings = [b for blk in main.body.blocks for b in blk.bindings]
    last_use, reads = {}, {}
    for i, b in enumerate(bindings):
        reads[b.var] = [n for n in _free_vars(b.value)]
        for v in reads[b.var]:
            last_use[v] = i
    for v in _free_vars(main.body.body):
        last_use[v] = len(bindings)
    big = max((i for i, b in enumerate(bindings) if _bytes(b.var.ty) > cache_bytes), default=None)
    if big is None:
        return None
    on_input = set(main.params)  # what depends on the model's inputs (constants' reshapes need not keep the batch)
    live_until = max((last_use.get(p, -1) for p in main.params), default=-1)  # of everything defined so far
    cuts = []
    for i, b in enumerate(bindings):
        if any(v in on_input for v in reads[b.var]):
            on_input.add(b.var)
            if not _independent(b.value) or _batch_of(b.var.ty) not in (batch, None):
                break
        if live_until <= i and b.var not in absorbed and b.var in on_input \
                and _batch_of(b.var.ty) == batch and last_use.get(b.var, -1) > i:
            cuts.append(i)
            if i >= big:
                break
        live_until = max(live_until, last_use.get(b.var, -1))
    if not cuts:
        return None
    # Images per chunk: as many as keep the prefix's largest activation within the caches (a
    # chunk of small images still fills the threads; one image of 32x32 does not).
    peak = max(_bytes(b.var.ty) for b in bindings[: cuts[-1] + 1] if b.var in on_input) // batch
    chunk = max(c for c in range(1, batch) if batch % c == 0 and (c == 1 or c * peak <= cache_bytes))
    return Cut(cuts[-1], chunk, batch)


def _free_vars(expr) -> list:
    from tvm import relax
    found = []
    relax.analysis.post_order_visit(expr, lambda n: found.append(n) if isinstance(n, relax.Var) else None)
    return found


def same_prefix(small, big, cut: Cut) -> bool:
    """Whether ``small`` (the model traced on one chunk) has the same first ``cut.index + 1``
    bindings as ``big`` (traced on the batch): same ops, shapes equal but for the batch."""
    def prefix(main):
        return [b for blk in main.body.blocks for b in blk.bindings][: cut.index + 1]

    def dims(ty):
        return [int(d.value) if hasattr(d, "value") else None for d in getattr(ty, "shape", None) or []]

    def alike(s, b):  # equal, or equal but for a batch-first dimension (a bias's (1, K, 1, 1) is both)
        return s == b or (s[:1] == [cut.chunk] and b[:1] == [cut.batch] and s[1:] == b[1:])

    pairs = list(zip(prefix(small), prefix(big)))
    return len(pairs) == cut.index + 1 and all(
        _op(s.value) == _op(b.value) and alike(dims(s.var.ty), dims(b.var.ty)) for s, b in pairs)
