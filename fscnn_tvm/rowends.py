"""Vectors at a row's end (``lowering.lower_sparse`` applies them): a vector that ends past its
row is stored whole where it is inside, else by one masked store (AVX-512) or lane by lane; a
kernel that reads a row that is not whole vectors in place loads each window by a masked load."""
from __future__ import annotations

import tvm

from .tirwalk import at_lane, for_with


def masked_windows(loop, row: int, x):
    """A vectorised loop over one ``acc_update`` block of a kernel that reads its input in place
    on a row of ``row`` pixels that are not whole vectors (``ops.KernelSpec.masked_row``), with
    the block's window (its one read of ``x``) loaded first by ``llvm.masked.load``: lanes past
    the row read nothing (the last vector of the last input channel would read past the input's
    end) and hold zero (their outputs are cropped). A loop over anything else: None."""
    import tvm_ffi
    from tvm.s_tir.stmt import SBlock, SBlockRealize
    tirx = tvm.tirx
    realize = loop.body
    if not isinstance(realize, SBlockRealize) or realize.block.name_hint != "acc_update":
        return None
    block, lane, lanes = realize.block, loop.loop_var, int(loop.extent)
    loads = []

    def find(node):
        if node.source.same_as(x):
            loads.append(node)
        return node
    tvm_ffi.structural_map(block.body, (tvm.ir.expr.TensorLoad, find))
    if len(loads) != 1:
        raise NotImplementedError(f"lower_sparse: a masked-row kernel's update with {len(loads)} window reads")
    first = at_lane(realize, lane, 0)  # the vector's first lane
    pixel = first(block.iter_vars[4].var)
    if int(loop.min) != 0 or not tvm.sym.Analyzer().can_prove_equal(tirx.floormod(pixel, lanes), 0):
        raise NotImplementedError("lower_sparse: a masked-row kernel whose vectors do not start at whole vectors")
    window = tirx.decl_buffer((lanes,), "float32", "window", scope="global")
    mask = tirx.Ramp(pixel, 1, lanes) < tirx.Broadcast(row, lanes)
    args = [tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(x, [first(i) for i in loads[0].indices]))]
    if tvm.target.codegen.llvm_version_major() < 22:  # (the alignment operand LLVM 22 dropped)
        args.append(tirx.const(4, "int32"))
    args += [mask, tirx.Broadcast(tirx.const(0.0, "float32"), lanes)]
    fill = tirx.BufferStore(window, tirx.call_llvm_pure_intrin(f"float32x{lanes}", "llvm.masked.load", *args),
                            [tirx.Ramp(0, 1, lanes)])
    in_window = tirx.BufferLoad(window, [tirx.floormod(block.iter_vars[4].var, lanes)])
    body = tvm_ffi.structural_map(block.body, (tvm.ir.expr.TensorLoad, lambda n: in_window if n.same_as(loads[0]) else n))
    reads = [tirx.BufferRegion(window, [tvm.ir.Range.from_min_extent(0, lanes)]) if r.source.same_as(x) else r
             for r in block.reads]
    update = SBlock(block.iter_vars, reads, block.writes, block.name_hint, body, block.init, block.alloc_buffers,
                    block.match_buffers, block.annotations)
    return tirx.SeqStmt([tirx.AllocBuffer(window), fill,
                         for_with(loop, body=SBlockRealize(realize.iter_values, realize.predicate, update))])


def split_partial_vector(loop, scratch: list | None = None):
    """A vectorised loop over one predicated block (a register tile's store past the row's end)
    as ``if every lane is inside: the store unpredicated, else: the part inside``. TVM leaves a
    predicated vector loop scalar (a 14x14 pointwise conv whose 196-pixel rows pad to 200 ran
    2.3x slower than a 192-pixel one on AVX2 Zen 3). The part inside is stored lane by lane, or,
    given ``scratch`` (a list that receives the one vector buffer the rewrite needs), as the
    vector computed whole into it and a masked store of the lanes inside (``masked_store``).
    None (keep the loop) unless the predicate is ``a < b`` with ``a`` rising by a constant
    step per lane and ``b`` free of the lane."""
    from tvm.s_tir.stmt import SBlockRealize
    tirx = tvm.tirx
    realize, lane = loop.body, loop.loop_var
    if not isinstance(realize, SBlockRealize) or not isinstance(realize.predicate, tirx.LT):
        return None
    a, b = realize.predicate.a, realize.predicate.b

    def at(expr, value):
        analyzer = tvm.sym.Analyzer()
        analyzer.bind(lane, value)
        return analyzer.simplify(expr)
    step = tvm.sym.Analyzer().simplify(at(a, 1) - at(a, 0))
    if (any(v.same_as(lane) for v in tirx.analysis.undefined_vars(b)) or not isinstance(step, tirx.IntImm)
            or step.value <= 0 or not tvm.sym.Analyzer().can_prove_equal(at(a, 2) - at(a, 1), step)):
        return None
    whole = for_with(loop, body=SBlockRealize(realize.iter_values, tirx.const(True, "bool"), realize.block))
    lanes = tirx.For(lane, loop.min, loop.extent, tirx.ForKind.SERIAL, realize)
    if scratch is not None:
        lanes = masked_store(loop, at(a, loop.min), step, b, scratch) or lanes
    inside = tvm.sym.Analyzer().simplify(at(a, loop.min + loop.extent - 1) < b)
    if isinstance(inside, tirx.IntImm):  # (a row of fewer pixels than a vector: never whole)
        return whole if inside.value else lanes
    return tirx.IfThenElse(inside, whole, lanes)


def masked_store(loop, first, step, bound, scratch: list):
    """The vectorised loop's block (one store, lanes contiguous in the buffer) as: the whole
    vector into a scratch vector, then ``llvm.masked.store`` of the lanes whose ``first + step *
    lane < bound``. None where the store does not have that form."""
    tirx = tvm.tirx
    realize, lane, count = loop.body, loop.loop_var, int(loop.extent)
    store = realize.block.body
    if not isinstance(store, tirx.BufferStore) or not isinstance(loop.extent, tirx.IntImm):
        return None
    index = [at_lane(realize)(i) for i in store.indices]
    starts = [at_lane(realize, lane, loop.min)(i) for i in store.indices]
    moved = [tvm.sym.Analyzer().simplify(at_lane(realize, lane, loop.min + 1)(i) - s)
             for i, s in zip(store.indices, starts)]
    unit = [1 if k == len(moved) - 1 else 0 for k in range(len(moved))]  # along the last axis only
    if not all(isinstance(m, tirx.IntImm) and m.value == u for m, u in zip(moved, unit)) \
            or any(any(v.same_as(lane) for v in tirx.analysis.undefined_vars(i)) for i in index[:-1]):
        return None  # (not one contiguous run of the buffer)
    if not scratch:  # ("local": a "global" one may share an allocation of the whole function)
        scratch.append(tirx.decl_buffer((count,), store.buffer.dtype, "store_vector", scope="local"))
    vector = scratch[0]
    if int(vector.shape[0]) != count or vector.dtype != store.buffer.dtype:
        return None
    fill = tirx.For(lane, loop.min, loop.extent, tirx.ForKind.VECTORIZED,
                    tirx.BufferStore(vector, at_lane(realize)(store.value), [lane - loop.min]))
    mask = tirx.Ramp(first, step, count) < tirx.Broadcast(bound, count)
    args = [tirx.BufferLoad(vector, [tirx.Ramp(0, 1, count)]),
            tirx.call_intrin("handle", "tirx.address_of", tirx.BufferLoad(store.buffer, starts))]
    if tvm.target.codegen.llvm_version_major() < 22:  # (the alignment operand LLVM 22 dropped)
        args.append(tirx.const(tvm.DataType(str(store.buffer.dtype)).bits // 8, "int32"))
    call = tirx.call_llvm_intrin("void", "llvm.masked.store", *args, mask)
    return tirx.SeqStmt([fill, tirx.Evaluate(call)])
