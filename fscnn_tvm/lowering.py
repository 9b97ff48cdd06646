"""The TIR rewrite applied to every scheduled sparse kernel (``lower_sparse``): what the kernel
does that TE cannot say. The epilogue stores table channel k to output channel ``w_perm[k]``
(reading the accumulators where interleaved rows hold them), each nonzero loop annotated with
TILE_BOUND runs to the longest row of its register tile (``w_length``) or, over a table of several
channels per row, runs as one loop per mask of them (``mask_segments``), and vectors at a row's
end are stored or loaded masked (``rowends``)."""
from __future__ import annotations

import functools
import itertools

import tvm

from .decisions import INTERLEAVE_ATTR, MASKED_ROW_ATTR, ROW_BOUND, TILE_BOUND
from .rowends import masked_windows, split_partial_vector
from .tiles import linear_group
from .tirwalk import at_lane, block_with, for_with, rebuild, visit
from .transposed import transposed_stores


def lower_sparse(func: tvm.tirx.PrimFunc, masked_stores: bool = False) -> tvm.tirx.PrimFunc:
    """The scheduled kernel as it runs: the epilogue (or the pool after it) stores table channel k
    to output channel ``w_perm[k]``, and each nonzero loop annotated with TILE_BOUND runs to the
    longest row of its register tile (``w_length``), so a tile of short rows skips the table's
    padding (a chunked kernel's: exactly its row's slots on the chunk, by mask where a row holds
    several channels). A vector that is part inside the row is stored with a masked store where
    ``masked_stores`` (cheap on AVX-512), else lane by lane. A CSR linear table is read
    interleaved (``interleaved_table``). Other functions pass through unchanged."""
    from tvm.s_tir.stmt import SBlock, SBlockRealize
    tirx = tvm.tirx
    params = {p.name: p for p in func.params}
    if "w_perm" not in params:
        return func
    func = interleaved_table(func)

    permuted, scratch, masked = [], [], []
    interleave = int(func.attrs[INTERLEAVE_ATTR]) if func.attrs is not None and INTERLEAVE_ATTR in func.attrs else None

    # The block whose stores take the permutation: the epilogue's, or the pool's after it (the
    # epilogue then writes the pool's task buffer in table order).
    final = "pool" if any(isinstance(n, SBlock) and n.name_hint == "pool" for n in visit(func.body, [])) else "out"

    def post(node):
        if isinstance(node, SBlock) and node.name_hint == final:
            store = node.body
            if not isinstance(store, tirx.BufferStore):
                raise NotImplementedError(f"lower_sparse: the epilogue block holds a {type(store).__name__}, "
                                          "not the one store it permutes")
            index = list(store.indices)
            index[1] = params["w_perm"][index[1]]
            permuted.append(node)
            return block_with(node, tirx.BufferStore(store.buffer, store.value, index))
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.VECTORIZED:
            return split_partial_vector(node, scratch if masked_stores else None)
        if isinstance(node, tirx.For) and TILE_BOUND in node.annotations:
            if "w_span" in params and int(params["w_span"].shape[2]) > 2:
                masked.append(node)
                return mask_segments(node, params["w_span"])
            annotations = {k: v for k, v in node.annotations.items() if k != TILE_BOUND}
            extent = _tile_bound(node, params) if int(node.annotations[TILE_BOUND]) else node.extent
            return for_with(node, extent=extent, annotations=annotations)
        return None

    body = func.body
    if interleave:  # (first: the vectorised loop is rewritten below)
        rows = []

        def gather(node):
            if isinstance(node, tirx.For) and isinstance(node.body, tirx.For) \
                    and isinstance(node.body.body, SBlockRealize) and node.body.body.block.name_hint == "out":
                rows.append(node)
                return interleaved_rows(node, interleave)
            return None
        body = rebuild(body, gather)
        if len(rows) != 1:
            raise NotImplementedError(f"lower_sparse: expected one epilogue loop over a row's vectors, "
                                      f"found {len(rows)}")
    body = rebuild(body, post)
    if len(permuted) != 1:
        raise NotImplementedError(f"lower_sparse: expected one epilogue block {final!r} (whose stores it permutes), "
                                  f"found {len(permuted)}")
    if scratch:  # the root block allocates the scratch vector
        from tvm.s_tir.stmt import SBlockRealize
        root = body.block
        body = SBlockRealize(body.iter_values, body.predicate,
                             block_with(root, root.body, list(root.alloc_buffers) + scratch[:1]))
    if func.attrs is not None and MASKED_ROW_ATTR in func.attrs:  # (after ``mask_segments`` has
        row = int(func.attrs[MASKED_ROW_ATTR])                       # copied each update per channel)
        body = rebuild(body, lambda node: masked_windows(node, row, params["x_nchw"])
                        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.VECTORIZED else None)
    func = func.with_body(body)
    # (the mask loops repeat the slot loop's body: ConvertSSA gives each copy its own variables)
    return tvm.tirx.transform.ConvertSSA()(tvm.IRModule({"main": func}))["main"] if masked else func


def interleaved_rows(loop, interleave: int):
    """The epilogue's loop over a row's vectors (``loop``, over a vectorised loop over one
    ``out`` block) on interleaved rows: the row's accumulators first gathered back in column
    order into a buffer of one row, vector by vector, each a shuffle of the row's vectors (a few
    permutes, where lane by lane loads and inserts cost ~20 instructions a vector), then the
    epilogue as scheduled, reading that buffer."""
    import tvm_ffi
    from tvm.s_tir.stmt import SBlockRealize
    tirx = tvm.tirx
    lanes_loop, realize = loop.body, loop.body.body
    if not (isinstance(lanes_loop, tirx.For) and lanes_loop.kind == tirx.ForKind.VECTORIZED
            and isinstance(realize, SBlockRealize)):
        raise NotImplementedError("lower_sparse: an interleaved epilogue that is not a loop of vectors over one block")
    block, lanes = realize.block, int(lanes_loop.extent)
    loads = []
    tvm_ffi.structural_map(block.body.value, (tvm.ir.expr.TensorLoad, lambda n: loads.append(n) or n))
    acc_loads = [n for n in loads if len(n.indices) == 5]  # (by table row and block channel: the accumulators)
    if len(acc_loads) != 1:
        raise NotImplementedError(f"lower_sparse: expected the epilogue to read the accumulators once, "
                                  f"found {len(acc_loads)}")
    acc, (*head, col) = acc_loads[0].source, acc_loads[0].indices
    at = at_lane(realize)
    head = [at(e) for e in head]
    inner = {loop.loop_var, lanes_loop.loop_var}
    if any(v in inner for e in head for v in tirx.analysis.undefined_vars(e)) or int(loop.min) \
            or int(lanes_loop.min) or not tvm.sym.Analyzer().can_prove_equal(
                at(col), loop.loop_var * lanes + lanes_loop.loop_var):
        raise NotImplementedError("lower_sparse: an interleaved epilogue whose vectors are not one row's, in order")
    row = tirx.decl_buffer((interleave * lanes,), acc.dtype, "acc_row", scope="local")
    vectors = [tirx.BufferLoad(acc, [*head, tirx.Ramp(j * lanes, 1, lanes)]) for j in range(interleave)]

    def gathered(u):  # output columns u*lanes .. (u+1)*lanes - 1, from where the row holds them
        where = [tirx.IntImm("int32", c % interleave * lanes + c // interleave)
                 for c in range(u * lanes, (u + 1) * lanes)]
        return tirx.BufferStore(row, tirx.Shuffle(vectors, where), [tirx.Ramp(u * lanes, 1, lanes)])
    value = tvm_ffi.structural_map(block.body.value, (tvm.ir.expr.TensorLoad, lambda n: tirx.BufferLoad(row, [col])
                                                       if n.same_as(acc_loads[0]) else n))
    reads = [tirx.BufferRegion(row, [tvm.ir.Range.from_min_extent(col, 1)]) if r.source.same_as(acc) else r
             for r in block.reads]
    block = block_with(block, tirx.BufferStore(block.body.buffer, value, block.body.indices), reads=reads)
    body = for_with(lanes_loop, body=SBlockRealize(realize.iter_values, realize.predicate, block))
    return tirx.SeqStmt([tirx.AllocBuffer(row), *[gathered(u) for u in range(int(loop.extent))],
                         for_with(loop, body=body)])


def mask_segments(loop, w_span):
    """A chunked kernel's slot loop over a table of several channels per row as one loop per
    mask (``formats.chunk_major``: a row's slots on a chunk ordered by which of its channels
    have a nonzero weight), each over its mask's slots with only its channels' FMAs: a window
    loaded once serves every channel of the mask, and no FMA multiplies a zero. The compute's
    guard (slot before the chunk's end) holds in every mask loop and is dropped. The register
    tile is copied from the task's accumulators into buffers of its own, allocated here, inside
    the task, before the mask loops and back after them: the code generator keeps those buffers
    in registers through all of them, where it loaded and stored the task buffer around each."""
    import tvm_ffi
    from tvm.s_tir.stmt import SBlock, SBlockRealize
    tirx = tvm.tirx
    nodes = visit(loop.body, [])
    update = next(n for n in nodes if isinstance(n, SBlockRealize) and n.block.name_hint == "acc_update")
    inner = [n for n in nodes if isinstance(n, tirx.For)]
    image, kb, io, oh, ow, chunk = update.iter_values[:6]
    channel = next((n for n in inner if io.same_as(n.loop_var)), None)
    if channel is None or int(channel.min) != 0 or not isinstance(channel.extent, tirx.IntImm):
        raise NotImplementedError("lower_sparse: a masked slot loop whose channels are not one loop of its own")

    starts = {n.loop_var: n.min for n in inner}

    def at_origin(expr):  # the tile's first element: every loop inside at its start
        return tvm.sym.Analyzer().simplify(tvm_ffi.structural_map(expr, (tirx.Var, lambda v: starts.get(v, v))))

    def extent(expr):  # elements of the tile along the axis ``expr`` indexes
        used = tirx.analysis.undefined_vars(expr)
        return functools.reduce(lambda a, n: a * int(n.extent), [n for n in inner if any(
            v.same_as(n.loop_var) for v in used)], 1)
    acc = update.block.body.buffer
    shape = (int(channel.extent), extent(oh), extent(ow))
    origin = [at_origin(e) for e in (image, kb, io, oh, ow)]
    analyzer = tvm.sym.Analyzer()
    if not all(analyzer.can_prove_equal(tirx.floormod(o, e), 0) for o, e in zip(origin[3:], shape[1:])):
        raise NotImplementedError("lower_sparse: a masked kernel's register tile that does not start at a "
                                  "multiple of its size")
    # One buffer per channel, in global scope: TVM puts a global buffer of under 1 KiB on the
    # stack, where the code generator promotes it to registers (a local buffer, or a bigger one,
    # comes from the workspace allocator: an opaque pointer, loaded and stored around each loop).
    # Allocated by a statement in the task's body: one in a block's list of buffers is moved by
    # TVM's allocation planner above the parallel loop, and every thread then shares it (its
    # copies in and out race, and each store fights the other core for the line).
    per_channel = shape[1:]
    channel_tiles = [tirx.decl_buffer(per_channel, acc.dtype, f"acc_tile{i}", scope="global")
                     for i in range(shape[0])]
    block = update.block
    v_oh, v_ow = (block.iter_vars[i].var for i in (3, 4))
    within = [tirx.floormod(v_oh, shape[1]), tirx.floormod(v_ow, shape[2])]

    def on_tile(tile):
        def rewrite(node):
            if isinstance(node, tvm.ir.expr.TensorLoad) and node.source.same_as(acc):
                return tirx.BufferLoad(tile, within)
            if isinstance(node, tirx.BufferStore) and node.buffer.same_as(acc):
                return tirx.BufferStore(tile, node.value, within)
            if isinstance(node, tvm.ir.expr.Call) and node.op.name == "prim.if_then_else":
                return node.args[1]  # the guard's value
            return node

        def regions(of):
            return [tirx.BufferRegion(tile, [tvm.ir.Range.from_min_extent(i, 1) for i in within])
                    if r.source.same_as(acc) else r for r in of]
        body = tvm_ffi.structural_map(block.body, [(tvm.ir.expr.TensorLoad, rewrite), (tirx.BufferStore, rewrite),
                                                   (tvm.ir.expr.Call, rewrite)])
        return SBlock(block.iter_vars, regions(block.reads), regions(block.writes), block.name_hint, body,
                      block.init, block.alloc_buffers, block.match_buffers, block.annotations)
    channel_blocks = [on_tile(tile) for tile in channel_tiles]

    def only(mask):  # the slot loop's body with the channel loop unrolled to the mask's channels
        def post(node):
            if not (isinstance(node, tirx.For) and node.loop_var.same_as(channel.loop_var)):
                return None
            dtype = str(channel.extent.ty)
            bodies = []
            for i in (i for i in range(int(channel.extent)) if mask >> i & 1):
                body = rebuild(node.body, lambda n, i=i: SBlockRealize(n.iter_values, n.predicate, channel_blocks[i])
                                if isinstance(n, SBlockRealize) and n.block.name_hint == "acc_update" else None)
                bodies.append(tvm_ffi.structural_map(body, (tirx.Var, lambda v, i=i: tirx.const(i, dtype)
                                                            if v.same_as(channel.loop_var) else v)))
            return bodies[0] if len(bodies) == 1 else tirx.SeqStmt(bodies)
        return rebuild(loop.body, post)
    start = w_span[chunk, kb, 0]
    loops = [tirx.For(loop.loop_var, w_span[chunk, kb, mask - 1] - start,
                      w_span[chunk, kb, mask] - w_span[chunk, kb, mask - 1], loop.kind, only(mask))
             for mask in range(1, int(w_span.shape[2]))]
    lanes = next(int(n.extent) for n in inner if n.kind == tirx.ForKind.VECTORIZED)

    def copy(into_tile):
        stmts = []
        for i, tile in enumerate(channel_tiles):
            r, v, lane = (tirx.Var(name, "int32") for name in ("r", "v", "lane"))
            index = [r, v * lanes + lane]
            task = origin[:2] + [origin[2] + i, origin[3] + r, origin[4] + index[1]]
            stmt = tirx.BufferStore(tile, tirx.BufferLoad(acc, task), index) if into_tile else \
                tirx.BufferStore(acc, tirx.BufferLoad(tile, index), task)
            for var, size, kind in ((lane, lanes, tirx.ForKind.VECTORIZED),
                                    (v, shape[2] // lanes, tirx.ForKind.UNROLLED), (r, shape[1], tirx.ForKind.UNROLLED)):
                stmt = tirx.For(var, 0, size, kind, stmt)
            stmts.append(stmt)
        return stmts
    return tirx.SeqStmt([tirx.AllocBuffer(tile) for tile in channel_tiles] + copy(True) + loops + copy(False))


def _tile_bound(loop, params):
    """ceil(longest row of the tile / slots per iteration of ``loop``): the update block's
    block-row binding evaluated at every value of the loops inside ``loop`` it depends on. A
    chunked kernel's rows are their slots on the chunk ``loop`` runs (``w_span``)."""
    from tvm.s_tir.stmt import SBlockRealize
    nodes = visit(loop.body, [])
    update = next(n for n in nodes if isinstance(n, SBlockRealize) and n.block.name_hint == "acc_update")
    kb_binding = update.iter_values[1]
    if "w_span" in params:
        chunk, width = update.iter_values[5], int(update.block.iter_vars[6].dom.extent)
        w_span = params["w_span"]

        def length(kb):
            return w_span[chunk, kb, 1] - w_span[chunk, kb, 0]
    else:
        width = int(update.block.iter_vars[5].dom.extent)

        def length(kb):
            return params["w_length"][kb]
    depends = tvm.tirx.analysis.undefined_vars(kb_binding)
    inner = [n for n in nodes if isinstance(n, tvm.tirx.For)
             and any(v.same_as(n.loop_var) for v in depends)]
    rows = []
    for values in itertools.product(*(range(int(n.extent)) for n in inner)):
        analyzer = tvm.sym.Analyzer()
        for n, v in zip(inner, values):
            analyzer.bind(n.loop_var, v)
        rows.append(length(analyzer.simplify(kb_binding)))
    longest = functools.reduce(tvm.tirx.max, rows)
    per_iteration = width // int(loop.extent)
    return tvm.tirx.floordiv(longest + per_iteration - 1, per_iteration) if per_iteration > 1 else longest


def bound_rows(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """Each loop annotated ROW_BOUND (the nonzero loop of an expansion fused into the depthwise
    kernel) runs to its row's length, ``e_length[k // group]``, k the channel its block binds
    (with the channels of a group: the first's, as they share the row).
    Other functions pass through unchanged."""
    from tvm.s_tir.stmt import SBlockRealize
    length = next((p for p in func.params if p.name == "e_length"), None)
    if length is None:
        return func

    def post(node):
        if isinstance(node, tvm.tirx.For) and ROW_BOUND in node.annotations:
            inside = visit(node.body, [])
            block = next(n for n in inside if isinstance(n, SBlockRealize))
            group = int(block.block.iter_vars[1].dom.extent) // int(length.shape[0])  # channels a row
            analyzer = tvm.sym.Analyzer()
            for loop in (n for n in inside if isinstance(n, tvm.tirx.For)):  # the group's first channel
                analyzer.bind(loop.loop_var, loop.min)
            row = analyzer.simplify(tvm.tirx.floordiv(block.iter_values[1], group))
            annotations = {k: v for k, v in node.annotations.items() if k != ROW_BOUND}
            return for_with(node, extent=length[row], annotations=annotations)
        return None
    return func.with_body(rebuild(func.body, post))


def interleaved_table(func: tvm.tirx.PrimFunc) -> tvm.tirx.PrimFunc:
    """A CSR linear kernel (no images in the lanes) reading its table as ``ops.kernel_inputs``
    stores it: each group of ``tiles.linear_group`` rows slot by slot
    (``formats.interleave_rows``), so row kb's slot w is at position ((kb // group) * width + w)
    * group + kb % group of the table's rows x slots. The tile's rows are unrolled, so kb // group
    and kb % group fold to constants and the two indices back into that position. Other
    functions pass through unchanged. The grouping is read from the table's shape and the
    function's blocks, not from a function attribute: an attribute would change the kernel's
    workload, and the shipped records of linear layers would no longer match it."""
    import tvm_ffi
    from tvm.s_tir.stmt import SBlock
    tirx = tvm.tirx
    params = {p.name: p for p in func.params}
    if "w_data" not in params or "x" not in params:
        return func
    data, offset = params["w_data"], params["w_offset"]
    shape = tuple(int(d) for d in data.shape)
    group, width = linear_group(shape), shape[1]
    if group == 1 or any(isinstance(n, SBlock) and n.name_hint == "x_t" for n in visit(func.body, [])):
        return func

    def moved(load):
        if not (load.source.same_as(data) or load.source.same_as(offset)):
            return load
        kb, w, *rest = load.indices
        slot = (tirx.floordiv(kb, group) * width + w) * group + tirx.floormod(kb, group)
        return tirx.BufferLoad(load.source, [tirx.floordiv(slot, width), tirx.floormod(slot, width), *rest])

    def remap(expr):
        return tvm_ffi.structural_map(expr, (tvm.ir.expr.TensorLoad, moved))

    def post(node):  # innermost blocks only: an outer block's body holds the rewritten ones
        if not isinstance(node, SBlock) or any(isinstance(n, SBlock) for n in visit(node.body, [])):
            return None
        body = remap(node.body)
        if body.same_as(node.body):
            return None
        reads = [tirx.BufferRegion(r.source, [tvm.ir.Range(0, d) for d in r.source.shape])
                 if r.source.same_as(data) or r.source.same_as(offset) else r for r in node.reads]
        return block_with(node, body, reads=reads)
    return func.with_body(rebuild(func.body, post))


def kernel_func(sch: tvm.s_tir.Schedule, masked_stores: bool = False) -> tvm.tirx.PrimFunc:
    """A scheduled kernel, lowered to what runs."""
    return lower_sparse(bound_rows(transposed_stores(sch.mod["main"])), masked_stores)
