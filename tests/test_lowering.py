"""The post-schedule rewrite refuses kernels it cannot fully see instead of skipping parts."""
import numpy as np
import pytest
import torch
import tvm

import fscnn_tvm
from fscnn_tvm import lowering, ops, rowends, schedule
from fscnn_tvm.formats import to_csr


def _scheduled(rng):
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    spec, _ = ops.kernel_inputs("conv2d", to_csr(w), (1, 4, 8, 8), None, "relu", fscnn_tvm.resolve_target(None),
                                padding=1)
    return schedule.schedule_sparse(ops.prim_func(spec), spec).mod["main"]


def test_the_rewrite_permutes_the_one_epilogue_store():
    lowered = lowering.lower_sparse(_scheduled(np.random.default_rng(0))).script()
    assert "w_perm[" in lowered and "w_length[" in lowered


def test_a_statement_kind_it_does_not_know_is_an_error():
    func = _scheduled(np.random.default_rng(1))
    hidden = func.with_body(tvm.tirx.While(tvm.tirx.const(True, "bool"), func.body))
    with pytest.raises(NotImplementedError, match="While"):
        lowering.lower_sparse(hidden)


def test_a_kernel_without_its_epilogue_store_is_an_error():
    func = _scheduled(np.random.default_rng(2))
    with pytest.raises(NotImplementedError, match="one epilogue block"):
        lowering.lower_sparse(func.with_body(tvm.tirx.Evaluate(0)))


def _shared_rows_spec(rng, out_channels, in_channels, size, chunk):
    """The spec of a chunked 3x3 conv (half its weights zero) on a table of 2 channels per row."""
    w = rng.standard_normal((out_channels, in_channels, 3, 3)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops, "chunking", lambda spec, mean_row: chunk)
        patch.setattr(ops, "shared_channels", lambda spec, sharing: 2)
        return ops.kernel_inputs("conv2d", to_csr(w), (1, in_channels, size, size), None, None,
                                 fscnn_tvm.resolve_target(None), padding=1)[0]


def test_a_masked_slot_loop_whose_channels_are_split_is_an_error(rng=np.random.default_rng(3)):
    """The mask loops unroll the channel loop to each mask's channels: a schedule that split it
    cannot be rewritten, and says so instead of running every channel in every mask."""
    spec = _shared_rows_spec(rng, 8, 4, 8, chunk=2)
    sch = schedule.schedule_sparse(ops.prim_func(spec), spec)
    *_, channel, _, _, _ = sch.get_loops(sch.get_sblock("acc_update"))
    sch.split(channel, [None, 1])
    with pytest.raises(NotImplementedError, match="channels are not one loop"):
        lowering.lower_sparse(sch.mod["main"])


def test_each_task_of_a_masked_kernel_allocates_its_own_register_tiles(rng=np.random.default_rng(4)):
    """The tiles the mask loops accumulate in are allocated inside the parallel loop, after TVM's
    allocation planning too: one tile shared by the threads would race (each copies its task's
    accumulators in and out) and bounce its cache lines between the cores."""
    from tvm import s_tir, tirx
    spec = _shared_rows_spec(rng, 16, 8, 16, chunk=4)
    lowered = lowering.lower_sparse(schedule.schedule_sparse(ops.prim_func(spec), spec).mod["main"])
    planned = tvm.transform.Sequential([
        s_tir.transform.LowerInitBlock(), s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
        s_tir.transform.ConvertBlocksToOpaque(), s_tir.transform.CompactBufferAllocation(),
        s_tir.transform.LowerOpaqueBlock()])(tvm.IRModule({"main": lowered}))["main"]
    inside, outside = [], []

    def visit(stmt, in_parallel):
        if isinstance(stmt, tirx.AllocBuffer) and stmt.buffer.name.startswith("acc_tile"):
            (inside if in_parallel else outside).append(stmt.buffer.name)
        for child in _children(stmt):
            visit(child, in_parallel or isinstance(stmt, tirx.For) and stmt.kind == tirx.ForKind.PARALLEL)
    visit(planned.body, False)
    assert sorted(inside) == ["acc_tile0", "acc_tile1"] and not outside


def _children(stmt):
    from tvm.s_tir.stmt import SBlock, SBlockRealize
    if isinstance(stmt, tvm.tirx.SeqStmt):
        return list(stmt.seq)
    if isinstance(stmt, SBlockRealize):
        return [stmt.block]
    if isinstance(stmt, tvm.tirx.IfThenElse):
        return [stmt.then_case] + ([stmt.else_case] if stmt.else_case is not None else [])
    body = getattr(stmt, "body", None)
    return [body] if isinstance(body, tvm.tirx.Stmt) else []


def test_functions_without_a_permutation_pass_through():
    func = tvm.tirx.PrimFunc([], tvm.tirx.Evaluate(0))
    assert lowering.lower_sparse(func).same_as(func)


def _pointwise(rng, hw):
    w = rng.standard_normal((16, 8, 1, 1)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0
    x = rng.standard_normal((1, 8, hw, hw)).astype(np.float32)
    layer = fscnn_tvm.SparseLayer("conv2d", w, x.shape, None, activation="relu")
    ref = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w))).numpy()
    return layer, x, ref


@pytest.mark.parametrize("hw, split", [(14, True), (3, True), (7, False)])
def test_stores_past_the_row_end_split_off_the_whole_vectors(hw, split):
    """Rows that end inside a vector store every whole vector unpredicated (a masked store per
    vector is slow on AVX2 CPUs) and the rest lane by lane, with the same result. (7x7 runs per
    row: no row has a whole vector.)"""
    layer, x, ref = _pointwise(np.random.default_rng(hw), hw)
    lowered = lowering.lower_sparse(schedule.schedule_sparse(ops.prim_func(layer.spec), layer.spec).mod["main"])
    script = lowered.script()
    assert "T.where" in script  # the lane-by-lane stores keep their predicate
    assert not split or "if " in script
    np.testing.assert_allclose(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_a_loop_whose_predicate_is_not_a_lane_range_is_kept():
    i = tvm.tirx.Var("i", "int32")
    buf = tvm.tirx.decl_buffer((8,), "float32", name="b")
    from tvm.s_tir.stmt import SBlock, SBlockRealize
    block = SBlock([], [], [], "out", tvm.tirx.BufferStore(buf, tvm.tirx.const(0.0, "float32"), [i]))
    for predicate in (i * i < 5, tvm.tirx.const(5, "int32") > i, i < i + 1):
        loop = tvm.tirx.For(i, 0, 8, tvm.tirx.ForKind.VECTORIZED, SBlockRealize([], predicate, block))
        assert rowends.split_partial_vector(loop) is None


@pytest.mark.parametrize("hw", [14, 3, 7, 9])
def test_the_part_of_a_vector_inside_the_row_is_one_masked_store_where_those_are_cheap(hw):
    """With masked stores (AVX-512), a vector that ends past the row is computed whole into a
    scratch vector and its lanes inside stored by ``llvm.masked.store``: no lane-by-lane stores
    left, and the same output."""
    import tvm_ffi
    from fscnn_tvm.pipeline import PIPELINE
    layer, x, ref = _pointwise(np.random.default_rng(hw), hw)
    func = schedule.schedule_sparse(ops.prim_func(layer.spec), layer.spec).mod["main"]
    lowered = lowering.lower_sparse(func, masked_stores=True)
    calls = []
    tvm_ffi.structural_visit(lowered, (tvm.ir.expr.Call, lambda c, _: calls.append(c)))
    assert any("llvm_intrin" in str(c.op) for c in calls) and "T.where" not in lowered.script()
    run = tvm.compile(tvm.IRModule({"main": lowered}), target=fscnn_tvm.resolve_target(None),
                      tir_pipeline=PIPELINE).jit()["main"]
    out = tvm.runtime.empty(layer.spec.out_shape, "float32")
    run(tvm.runtime.tensor(x.reshape(layer.spec.x_shape)), *[tvm.runtime.tensor(a) for a in layer.arrays], out)
    np.testing.assert_allclose(out.numpy().reshape(ref.shape), ref, rtol=1e-5, atol=1e-5)


def _masked_copy(columns):
    """y[0, 0, j] = 2 x[j] in vectors of 16 lanes, the lanes past the row's end predicated off,
    as in an epilogue."""
    x = tvm.te.placeholder((48,), "float32", name="x")
    w_perm = tvm.te.placeholder((1,), "int32", name="w_perm")
    y = tvm.te.compute((1, 1, columns), lambda n, k, j: x[j] * 2.0, name="out")
    sch = tvm.s_tir.Schedule(tvm.te.create_prim_func([x, w_perm, y]))
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("out"))[-1], [None, 16])[1])
    return sch.mod["main"]


@pytest.mark.parametrize("columns", [5, 29, 41, 1, 32])
def test_a_masked_store_writes_the_lanes_inside_and_nothing_past_them(columns):
    """A partial vector's lanes by a masked store: the row right, and the memory after the
    row's end (here: after the buffer's) untouched."""
    from fscnn_tvm.pipeline import PIPELINE
    func = lowering.lower_sparse(_masked_copy(columns), masked_stores=True)
    assert ("llvm_intrin" in func.script()) == (columns % 16 != 0)
    run = tvm.compile(tvm.IRModule({"main": func}), target=fscnn_tvm.resolve_target(None), tir_pipeline=PIPELINE)
    xs = np.arange(1, 49, dtype=np.float32)
    memory = tvm.runtime.tensor(np.full((1, 64), -1.0, np.float32))
    run["main"](tvm.runtime.tensor(xs), tvm.runtime.tensor(np.zeros(1, np.int32)), memory._create_view((1, 1, columns)))
    expected = np.full((1, 64), -1.0, np.float32)
    expected[0, :columns] = 2 * xs[:columns]
    np.testing.assert_array_equal(memory.numpy(), expected)


READ_BEFORE_A_GUARD_PAGE = """
import ctypes, mmap, sys
import numpy as np
import fscnn_tvm, tvm
from fscnn_tvm.formats import to_csr
c, hw = 64, 14  # 64 planes of 196 floats: 50176 bytes, a multiple of 64 (the tensor stays aligned)
rng = np.random.default_rng(0)
w = rng.standard_normal((16, c, 1, 1)).astype(np.float32)
w[rng.random(w.shape) < 0.9] = 0
layer = fscnn_tvm.SparseLayer("conv2d", w, (1, c, hw, hw))
assert layer.spec.masked_row, layer.spec
size, page = c * hw * hw * 4, mmap.PAGESIZE
span = -(-size // page) * page
buf = mmap.mmap(-1, span + page)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(base + span, page, 0) == 0  # PROT_NONE: a read past the input faults
x = np.frombuffer(buf, np.float32, count=size // 4, offset=span - size)
x[:] = rng.standard_normal(x.size).astype(np.float32)
out = tvm.runtime.empty(layer.spec.out_shape, "float32")
layer._func(tvm.runtime.from_dlpack(x.reshape(layer.spec.x_shape)), *layer._params, out)
ref = np.einsum("kc,cp->kp", w[:, :, 0, 0], x.reshape(c, -1)).reshape(1, 16, hw, hw)
assert np.abs(out.numpy().reshape(ref.shape) - ref).max() < 1e-3
print("ok")
"""


def test_a_masked_row_kernel_reads_nothing_past_its_input():
    """The input of a pointwise conv read in place ends right before a page that faults when
    read: the last vector of its last plane runs past the input, and its masked load reads nothing
    there (an unmasked one would kill the process). Checked in a subprocess, on a CPU with mask
    registers."""
    import subprocess
    import sys
    if not fscnn_tvm.target.masked_stores(fscnn_tvm.resolve_target(None)):
        pytest.skip("this CPU has no mask registers: such kernels keep the layout pass")
    run = subprocess.run([sys.executable, "-c", READ_BEFORE_A_GUARD_PAGE], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "ok" in run.stdout, (run.returncode, run.stderr[-2000:])
