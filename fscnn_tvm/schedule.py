"""The sparse kernel's schedule (how; ``ops`` says what): a register tile of table channels x
output rows x whole vectors of output pixels kept in registers across the nonzero loop, the
parallel loop chosen by a structural variant, and the input layout pass's loops. Tile sizes come
from ``tiles``' default tile (a policy of the CPU description) or are sampled by the tuner
(``decisions``)."""
from __future__ import annotations

import tvm

from .decisions import TILE_BOUND, FixedDecisions
from .layout_pass import schedule_layout
from .ops import KernelSpec
from .tiles import FMA_CHAINS, batch_lanes, chunk_task_channels, chunk_task_vectors, chunk_tile, default_tile, folds_batch


# Structural choices, one design space each (meta_schedule replays traces, so a choice that
# changes which primitives run cannot be a sampled decision).
# "channels": parallel over channel tiles, each sweeping all rows (input re-read per tile).
# "rows+channels": row tiles outermost, so all channel tiles of a band of rows reuse that
# band of input while it is in cache: what large feature maps need.
# "tiles": every tile coordinate (rows, pixel vectors) outside the channel tiles, so the
# channel tiles of one pixel tile run back to back on the input slab that tile reads.
VARIANTS = ("channels", "channels+rows", "rows+channels", "tiles")
# A spec with ``band_rows`` has one: "bands", parallel over bands of rows, each band laying out
# its input and then running all its channel tiles.
BANDED = ("bands",)
# A spec with ``chunk_channels`` has one: "chunks", parallel over tasks (see ``_schedule_chunks``),
# each running all its channels on one chunk of input channels, then the next.
CHUNKED = ("chunks",)


def variants(spec: KernelSpec) -> tuple:
    """The structural variants (design spaces) a kernel of ``spec`` can be scheduled with."""
    if spec.kind != "conv2d":
        return VARIANTS[:1]
    if spec.chunk_channels:
        return CHUNKED
    if spec.band_rows:
        return BANDED
    # ("tiles" runs a row's pixel tiles in different tasks; an interleaved row's epilogue needs all)
    return VARIANTS[:3] if spec.interleaved else VARIANTS


def default_variant(spec: KernelSpec) -> str:
    """A one-row image (a flattened pointwise conv) whose input exceeds one core's L2 runs
    "tiles": its row tile is the whole image, and each channel tile would re-read all of it
    from L3; pixel tiles outermost keep one tile's slab of every input channel in L1 while all
    channel tiles use it. Measured at 90 %, AVX2 (512 KiB L2): 512->128 at 28x28 (1.6 MB of
    input) 1.5x; where the input fits L2, row tiles outermost won: 128->512 at 28x28 1.6x,
    32->192 2.6x, 64->384 at 14x14 1.2x. Other maps run row tiles outermost."""
    options = variants(spec)
    if spec.kind == "conv2d" and spec.geo.out_height == 1 and "tiles" in options \
            and spec.layout.size * 4 > spec.l2_bytes:
        return "tiles"
    return "rows+channels" if "rows+channels" in options else options[-1]


def schedule_sparse(func: tvm.tirx.PrimFunc, spec: KernelSpec, decide=FixedDecisions(),
                    variant: str | None = None, seed: int | None = None) -> tvm.s_tir.Schedule:
    """Register-blocked schedule. Conv: a tile of (channels x output rows x whole vectors of
    output pixels) stays in registers across the nonzero loop, which sits outside the
    vector loops, so each weight is broadcast once per tile and each input vector loaded once
    per tile; bias and activation are applied on the way out; tiles run in parallel over
    (batch, channel tiles[, row tiles]). Linear: block rows in parallel.
    A conv of a fixed batch above one may also span images in its tile (a sampled decision; the
    default is one image: at batch 8, 2 or 4 images per tile ran 0.97-1.03x on 7x7 and 14x14
    layers, where the input loads, not the weight broadcasts, bind).
    ``decide`` fixes or samples the tile sizes (``seed``: of the sampling, 1 .. 2**31-1; None: random) and
    whether each tile's nonzero loop is bounded (TILE_BOUND); ``variant`` (one of ``variants(spec)``,
    default ``default_variant``) picks the parallel loop."""
    variant = variant or default_variant(spec)
    if variant not in variants(spec):
        raise ValueError(f"variant {variant!r}: this kernel's variants are {variants(spec)}")
    sch = tvm.s_tir.Schedule(func, seed=seed)
    if variant == "chunks":
        return _schedule_chunks(sch, spec, decide)
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    _, _, bo, _ = spec.ell_shape
    n, kb, io, oh, ow, red_w, red_i = sch.get_loops(acc)
    channels, rows, vectors = default_tile(spec)
    w_o, w_i = sch.split(red_w, decide.tile(sch, red_w, 2, 4, [None, 1]))
    decide.tile_bound(sch, w_o)
    # (a linear layer's tile spans up to FMA_CHAINS rows, its default among them)
    most = max(channels, max(1, 4 // bo) if spec.kind == "conv2d" else FMA_CHAINS)
    kb_o, kb_i = sch.split(kb, decide.tile(sch, kb, 2, most, [None, channels]))
    if folds_batch(spec):
        n, n_i = sch.split(n, decide.tile(sch, n, 2, 8, [None, 1]))
    else:
        n_i = None
    if spec.kind == "conv2d":
        ow_q, ow_v = sch.split(ow, [None, spec.lanes])
        ow_o, ow_u = sch.split(ow_q, decide.tile(sch, ow_q, 2, 8, [None, vectors]))
        if spec.band_rows:
            oh_b, oh = sch.split(oh, [None, spec.band_rows])
        oh_o, oh_i = sch.split(oh, decide.tile(sch, oh, 2, 8, [None, rows]))
        # The register tile: channels x images x rows x vectors, one accumulator each.
        tile = [loop for loop in (kb_i, n_i, oh_i, io, ow_u) if loop is not None]
        if variant == "bands":
            sch.reorder(n, oh_b, kb_o, oh_o, ow_o, w_o, red_i, w_i, *tile, ow_v)
            # One loop over bands runs each band's layout, then its tiles (``merge``, not
            # ``compute_at``, which cannot bound a region read through the offsets).
            layout_n, layout_band, _ = sch.get_loops(sch.get_sblock("x_flat"))
            par = sch.merge(sch.fuse(layout_n, layout_band), sch.fuse(n, oh_b))
        elif variant == "rows+channels":
            sch.reorder(n, oh_o, kb_o, ow_o, w_o, red_i, w_i, *tile, ow_v)
            par = sch.fuse(n, oh_o, kb_o)
        elif variant == "tiles":
            sch.reorder(n, oh_o, ow_o, kb_o, w_o, red_i, w_i, *tile, ow_v)
            par = sch.fuse(n, oh_o, ow_o, kb_o)
        else:
            sch.reorder(n, kb_o, oh_o, ow_o, w_o, red_i, w_i, *tile, ow_v)
            par = sch.fuse(n, kb_o, oh_o) if variant == "channels+rows" else sch.fuse(n, kb_o)
        sch.vectorize(ow_v)
        tile_loop, inner = par if variant == "tiles" else ow_o, tile
        if spec.interleaved:  # an interleaved row's epilogue reads all its pixel tiles
            tile_loop = {"bands": oh_o, "channels": oh_o}.get(variant, par)
    elif spec.batch_in_lanes:  # the tile: channels x every image, the images in the lanes
        n_o, n_v = sch.split(n, [None, batch_lanes(spec)])
        sch.reorder(kb_o, oh, ow, n_o, w_o, red_i, w_i, kb_i, io, n_v)
        sch.vectorize(n_v)
        par, tile_loop, inner = kb_o, n_o, (kb_i, io)
        x_t = sch.get_sblock("x_t")
        j, _ = sch.get_loops(x_t)
        sch.parallel(sch.split(j, [None, 64])[0])
    else:
        sch.reorder(kb_o, n, oh, ow, w_o, red_i, w_i, kb_i, io)
        par, tile_loop, inner = kb_o, n, (kb_i,)
        if bo > 1:
            sch.vectorize(io)
    sch.parallel(par)
    decide.unroll_limit(sch, par)
    # Keep unit loops: the epilogue's loops are picked by position below.
    sch.reverse_compute_at(out, tile_loop, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    for loop in (w_i, *inner):
        sch.unroll(loop)
    init = sch.decompose_reduction(acc, w_o)
    for loop in sch.get_loops(init)[-len(inner) - 1:-1]:  # the init's copies of ``inner``
        sch.unroll(loop)
    if spec.kind == "conv2d":
        loops = sch.get_loops(out)
        for loop in loops[-4 if n_i is not None else -3:-1]:  # [images,] channels, rows of the tile
            sch.unroll(loop)
        _vectorize_epilogue(sch, loops[-1], spec)
        schedule_layout(sch, spec)
    return sch


def _schedule_chunks(sch, spec: KernelSpec, decide):
    """Chunked reduction: a task (a band of rows, or a tile of a one-row image, x a group of
    table channels; or one band of a banded layout, which it lays out first, then runs a band
    of the tile's rows at a time) runs, for each chunk of input channels, every register tile
    of one channel x rows x vectors over that channel's nonzeros of the chunk (bounded exactly
    by ``lower_sparse``); the tiles' accumulators wait in a task buffer between chunks."""
    acc, out = sch.get_sblock("acc"), sch.get_sblock("out")
    n, kb, io, oh, ow, red_c, red_w = sch.get_loops(acc)
    rows, vectors = chunk_tile(spec)
    ow_q, ow_v = sch.split(ow, [None, spec.lanes])
    if spec.band_rows:  # a task per band: it lays out its band, then runs every channel on it
        oh_t, oh_b = sch.split(oh, [None, spec.band_rows])
        oh_o, oh_i = sch.split(oh_b, decide.tile(sch, oh_b, 2, 8, [None, rows]))
        ow_o, ow_u = sch.split(ow_q, decide.tile(sch, ow_q, 2, 16, [None, vectors]))
        sch.reorder(n, oh_t, oh_o, red_c, kb, ow_o, red_w, io, oh_i, ow_u, ow_v)
        layout_n, layout_band, _ = sch.get_loops(sch.get_sblock("x_flat"))
        par = sch.merge(sch.fuse(layout_n, layout_band), sch.fuse(n, oh_t))
    else:
        task_vectors = chunk_task_vectors(spec)
        kb_t, kb_o = sch.split(kb, decide.tile(sch, kb, 2, 64, [None, chunk_task_channels(spec)]))
        oh_t, oh_i = sch.split(oh, decide.tile(sch, oh, 2, 8, [None, rows]))
        if spec.interleaved:  # a task spans whole rows: their epilogue gathers all their vectors
            ow_t, ow_o, ow_u = sch.split(ow_q, [1, *decide.tile(sch, ow_q, 2, 16, [None, vectors])])
        else:
            ow_t, ow_o, ow_u = sch.split(ow_q, decide.tile(sch, ow_q, 3, 16, [None, task_vectors // vectors, vectors]))
        sch.reorder(n, kb_t, oh_t, ow_t, red_c, kb_o, ow_o, red_w, io, oh_i, ow_u, ow_v)
        par = sch.fuse(n, kb_t, oh_t, ow_t)
    sch.parallel(par)
    decide.unroll_limit(sch, par)
    sch.annotate(red_w, TILE_BOUND, 1)  # the chunk's own end: no slot of the next chunk runs
    sch.reverse_compute_at(out, par, preserve_unit_loops=True)
    sch.set_scope(acc, 0, "local")
    for loop in (io, oh_i, ow_u):
        sch.unroll(loop)
    sch.vectorize(ow_v)
    init = sch.decompose_reduction(acc, red_c)
    *_, i_io, i_oh, i_u, i_v = sch.get_loops(init)
    for loop in (i_io, i_oh, i_u):
        sch.unroll(loop)
    sch.vectorize(i_v)
    _vectorize_epilogue(sch, sch.get_loops(out)[-1], spec)
    if spec.pool:
        schedule_pool(sch, spec)
    schedule_layout(sch, spec)
    return sch


def schedule_pool(sch, spec: KernelSpec):
    """The max pool after a chunked kernel's epilogue (``KernelSpec.pool``) in the parallel task
    that writes its rows, so it reads them from the task's buffer; its rows in vectors. Where a
    task's rows are not whole windows (a tuned record's tile rows), the pool runs after the kernel
    in a parallel loop of its own over the channels (TVM would place it in the tasks anyway, each
    pooling what the tasks before it wrote: a race between the threads)."""
    loops = sch.get_loops(sch.get_sblock("out"))
    at = next(i for i, loop in enumerate(loops) if sch.get(loop).kind == tvm.tirx.ForKind.PARALLEL)
    rows = sch.get(loops[at + 3]).extent  # (the epilogue's loops in a task: image, channels, rows, columns)
    pool = sch.get_sblock("pool")
    if isinstance(rows, tvm.tirx.IntImm) and int(rows) % spec.pool == 0:
        sch.reverse_compute_at(pool, loops[at], preserve_unit_loops=True)
        columns = sch.get_loops(pool)[-1]
    else:
        _, channels, _, columns = sch.get_loops(pool)
        sch.parallel(channels)
    _, lanes = sch.split(columns, [None, spec.lanes])
    sch.vectorize(lanes)


def _vectorize_epilogue(sch, column, spec: KernelSpec):
    """The epilogue's loop over a row's ``column``s in vectors; on interleaved rows the vector
    loop unrolled too, so its reads of the row ``lowering.interleaved_rows`` gathers are at
    constant places."""
    vectors, lanes = sch.split(column, [None, spec.lanes])
    sch.vectorize(lanes)
    if spec.interleaved:
        sch.unroll(vectors)


def default_schedule(func: tvm.tirx.PrimFunc, spec: KernelSpec) -> tvm.s_tir.Schedule:
    return schedule_sparse(func, spec)
