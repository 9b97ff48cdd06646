"""NCHW stores of a tile that holds output channels in its vector lanes, by a transpose in
registers: the epilogue's loop over a vector's channels, annotated TRANSPOSE_ATTR with the name of
the buffer it reads that way, is rewritten to load ``width`` vectors of channels (one per output
pixel of the run of pixels it stores), transpose them by rounds of two-vector shuffles, and then
run the epilogue as scheduled, vectorised over the pixels, reading the transposed buffer. A
store per ``width`` pixels of a channel instead of one per pixel, and each product read once per
vector instead of once per pixel from a line of its own."""
from __future__ import annotations

import random

import tvm

from .decisions import TRANSPOSE_ATTR
from .tirwalk import at_lane, block_with, for_with, rebuild


# Samples of the outer loops' values at which ``transposed_loop`` checks its lanes (``_in_order``).
SAMPLES = 16


def transposed_stores(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """``func`` with every loop annotated TRANSPOSE_ATTR rewritten (``transposed_loop``)."""
    import tvm_ffi
    loops = []
    tvm_ffi.structural_map(func.body, (tvm.tirx.For, lambda n: loops.append(n) or n))
    if not any(TRANSPOSE_ATTR in n.annotations for n in loops):  # (other kernels pass through untouched:
        return func                                               # ``rebuild`` knows only scheduled kernels)
    extents = {n.loop_var: (int(n.min), int(n.extent)) for n in loops}

    def post(node):
        if isinstance(node, tvm.tirx.For) and TRANSPOSE_ATTR in node.annotations:
            return transposed_loop(node, str(node.annotations[TRANSPOSE_ATTR]), extents)
        return None
    return func.with_body(rebuild(func.body, post))


def shuffle_rounds(width: int, lanes: int) -> list[list[tuple[int, int, list[int]]]]:
    """The rounds that transpose ``width`` vectors of ``lanes`` (row t: column t's channels) into
    the same registers holding the channels' rows one after the other (lane r * width + t of the
    flattened registers: channel r, column t). A round is the perfect shuffle of the registers
    seen as one sequence (vector 2i and 2i + 1 interleave vectors i and i + width / 2, the low
    halves and the high halves): it rotates an element's position bits left by one, and the
    transpose is a rotation by log2(width). Each entry: (vector a, vector b, shuffle indices into
    their concatenation)."""
    if width & (width - 1) or lanes & (lanes - 1) or not 2 <= width <= lanes:
        raise ValueError(f"a register transpose of {width} vectors of {lanes} lanes: powers of two, 2 <= width <= lanes")
    half = lanes // 2
    one = []
    for i in range(width // 2):
        for hi in (0, 1):
            one.append((i, i + width // 2, [src for j in range(hi * half, hi * half + half) for src in (j, lanes + j)]))
    return [one] * (width.bit_length() - 1)


def transposed_loop(loop, buffer_name: str, extents: dict):
    """``loop`` (a vector's channels, its body a vectorised loop over ``width`` pixels of one
    ``out`` block) reading buffer ``buffer_name``, whose last index is the channel, transposed.
    ``extents``: (min, extent) of every loop around it, by loop variable: the lanes' channels and
    pixels are checked at samples of them (TVM's simplifier does not prove that a vector's pixels
    are consecutive where it spans rows: ``(x + 15) // 12 * 12 + (x + 3) % 12``)."""
    import tvm_ffi
    from tvm.s_tir.stmt import SBlockRealize
    tirx = tvm.tirx
    lanes_loop = loop.body
    realize = lanes_loop.body if isinstance(lanes_loop, tirx.For) else None
    if not (isinstance(lanes_loop, tirx.For) and lanes_loop.kind == tirx.ForKind.VECTORIZED
            and isinstance(realize, SBlockRealize) and isinstance(realize.block.body, tirx.BufferStore)):
        raise NotImplementedError("transposed_stores: the annotated loop is not a loop over one block's "
                                  "vectorised stores")
    block, lanes, width = realize.block, int(loop.extent), int(lanes_loop.extent)
    loads = []
    tvm_ffi.structural_map(block.body.value, (tvm.ir.expr.TensorLoad, lambda n: loads.append(n) or n))
    tile_loads = [n for n in loads if n.source.name == buffer_name]
    if len(tile_loads) != 1:
        raise NotImplementedError(f"transposed_stores: expected the epilogue to read {buffer_name!r} once, "
                                  f"found {len(tile_loads)}")
    tile = tile_loads[0]
    analyzer = tvm.sym.Analyzer()
    at = at_lane(realize)
    k, t = loop.loop_var, lanes_loop.loop_var

    def index_at(expr, k_value, t_value):
        values = {k: tirx.const(k_value, k.ty), t: tirx.const(t_value, t.ty)}
        return analyzer.simplify(tvm_ffi.structural_map(at(expr), (tirx.Var, lambda v: values.get(v, v))))
    *head, channel = tile.indices
    store = block.body
    # (the stored pixel's place in its NCHW plane: a vector's pixels may span rows)
    pixel = store.indices[-2] * store.buffer.shape[-1] + store.indices[-1]
    base = index_at(channel, 0, 0)
    if int(loop.min) or int(lanes_loop.min) or not isinstance(channel, tirx.Var) \
            or not _in_order(index_at, channel, base, pixel, lanes, width, extents):
        raise NotImplementedError("transposed_stores: the loops do not run a whole vector of channels (the buffer's "
                                  "last index, the same for every pixel) by a whole vector of consecutive pixels")
    stages = [tirx.decl_buffer((width * lanes,), tile.source.dtype, f"transposed{s}", scope="local")
              for s in range(width.bit_length())]
    stmts = [tirx.BufferStore(stages[0], tirx.BufferLoad(tile.source, [index_at(e, 0, c) for e in head]
                                                         + [tirx.Ramp(base, 1, lanes)]),
                              [tirx.Ramp(c * lanes, 1, lanes)]) for c in range(width)]
    for s, rounds in enumerate(shuffle_rounds(width, lanes)):
        for out, (a, b, where) in enumerate(rounds):
            pair = [tirx.BufferLoad(stages[s], [tirx.Ramp(v * lanes, 1, lanes)]) for v in (a, b)]
            stmts.append(tirx.BufferStore(stages[s + 1], tirx.Shuffle(pair, [tirx.IntImm("int32", w) for w in where]),
                                          [tirx.Ramp(out * lanes, 1, lanes)]))
    done = stages[-1]
    where = tirx.floormod(channel, lanes) * width + tirx.floormod(pixel, width)
    value = tvm_ffi.structural_map(block.body.value, (tvm.ir.expr.TensorLoad, lambda n: tirx.BufferLoad(done, [where])
                                                       if n.same_as(tile) else n))
    reads = [tirx.BufferRegion(done, [tvm.ir.Range.from_min_extent(where, 1)]) if r.source.same_as(tile.source) else r
             for r in block.reads]
    block = block_with(block, tirx.BufferStore(block.body.buffer, value, block.body.indices), reads=reads)
    body = for_with(loop, body=for_with(lanes_loop, body=SBlockRealize(realize.iter_values, realize.predicate, block)),
                    annotations={})
    return tirx.SeqStmt([*(tirx.AllocBuffer(b) for b in stages), *stmts, body])


def _in_order(index_at, channel, base, pixel, lanes: int, width: int, extents: dict) -> bool:
    """Whether lane (r, c) of the loops (``index_at(expr, r, c)``) reads channel ``base + r`` and
    stores pixel ``first + c`` of its channel's plane, with ``base`` and each ``first`` whole
    vectors, at SAMPLES values of the outer loops (the first two: every loop at its first value,
    then at its last)."""
    import tvm_ffi
    tirx = tvm.tirx
    analyzer, rng = tvm.sym.Analyzer(), random.Random(0)
    firsts = {r: index_at(pixel, r, 0) for r in (0, lanes - 1)}

    def sample(i, var):
        low, extent = extents[var]
        return low if i == 0 else low + extent - 1 if i == 1 else rng.randrange(low, low + extent)
    outer = [v for v in tirx.analysis.undefined_vars(tirx.Add(firsts[0], base)) if v in extents]
    samples = [{v: sample(i, v) for v in outer} for i in range(SAMPLES)]

    def holds(lhs, rhs):
        return all(analyzer.can_prove_equal(tvm_ffi.structural_map(tirx.Sub(lhs, rhs), (tirx.Var, lambda v: tirx.const(
            values[v], v.ty) if v in values else v)), 0) for values in samples)
    return holds(tirx.floormod(base, lanes), 0) and all(
        holds(tirx.floormod(first, width), 0)
        and all(holds(index_at(pixel, r, c), first + c) and holds(index_at(channel, r, c), base + r)
                for c in range(width)) for r, first in firsts.items())
