"""The TIR pipeline's rewrites: strided vector loads into contiguous loads and a shuffle; task
buffers on the stack."""
import re

import numpy as np
import pytest
import tvm
import tvm_ffi
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import tirx

from fscnn_tvm import dense, depthwise, kernels, ops
from fscnn_tvm.formats import to_csr
from fscnn_tvm.pipeline import PIPELINE, shuffle_lanes
from fscnn_tvm.target import resolve_target


@settings(max_examples=60, deadline=None, database=None)
@given(stride=st.integers(2, 4), lanes=st.sampled_from([2, 3, 4, 8, 16, 32]))
def test_the_shuffle_picks_the_strided_lanes_from_loads_inside_the_span(stride, lanes):
    span = stride * (lanes - 1) + 1
    starts, picks = shuffle_lanes(stride, lanes)
    assert all(0 <= s and s + lanes <= span for s in starts)  # no element outside the strided read
    concatenated = [s + i for s in starts for i in range(lanes)]
    assert [concatenated[p] for p in picks] == [stride * i for i in range(lanes)]


def strided_copy(n, stride, lanes, offset):
    """y[i] = x[stride * i + offset], vectorised: a strided vector load per vector of y."""
    x = tvm.te.placeholder((stride * n + offset,), "float32", name="x")
    y = tvm.te.compute((n,), lambda i: x[stride * i + offset], name="y")
    sch = tvm.s_tir.Schedule(tvm.te.create_prim_func([x, y]))
    sch.vectorize(sch.split(sch.get_loops(sch.get_sblock("y"))[0], [None, lanes])[1])
    return sch.mod


def nodes(mod, kind):
    found = []
    tvm_ffi.structural_visit(mod, (kind, lambda node, visitor: found.append(node)))
    return found


@pytest.mark.parametrize("stride,lanes,offset", [(2, 16, 1), (2, 8, 0), (3, 16, 2), (4, 4, 3), (2, 4, 0)])
def test_strided_loads_build_to_the_same_values_through_shuffles(stride, lanes, offset):
    n = lanes * 5
    mod = strided_copy(n, stride, lanes, offset)
    target = resolve_target(None)
    lowered = tirx.get_tir_pipeline(PIPELINE)[0](tirx.transform.BindTarget(target.with_host(target))(mod))
    assert nodes(lowered, tvm.ir.prim.expr.Shuffle)
    assert not [r for r in nodes(lowered, tvm.ir.prim.expr.Ramp) if int(r.stride) != 1]
    lib = tvm.tirx.build(mod, target=target, pipeline=PIPELINE)
    x = np.random.default_rng(stride * lanes).standard_normal(stride * n + offset).astype(np.float32)
    y = tvm.runtime.empty((n,), "float32")
    lib(tvm.runtime.tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), x[offset::stride][:n])


@pytest.mark.parametrize("target", [None, {"kind": "llvm", "mcpu": "znver3"}])
def test_a_stride_2_depthwise_picks_its_column_phases_with_shuffles(target):
    target = resolve_target(target)
    spec = depthwise.make_depthwise_spec((1, 8, 40, 40), (8, 1, 3, 3), False, None, target, stride=2, padding=1)
    mod = tvm.IRModule({"main": kernels.lower(kernels.default_schedule(kernels.prim_func(spec), spec))})
    lowered = tirx.get_tir_pipeline(PIPELINE)[0](tirx.transform.BindTarget(target.with_host(target))(mod))
    assert not [r for r in nodes(lowered, tvm.ir.prim.expr.Ramp) if int(r.stride) != 1]
    assert nodes(lowered, tvm.ir.prim.expr.Shuffle)


def _llvm_ir(spec):
    target = resolve_target(None)
    func = kernels.lower(kernels.default_schedule(kernels.prim_func(spec), spec), target)
    lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), target=target, tir_pipeline=PIPELINE)
    return lib.mod.inspect_source("ll")


def _lines(ir: str):
    """(the ``define`` line of the function it is in, line) for each line of LLVM IR."""
    function = ""
    for line in ir.splitlines():
        if line.startswith("define "):
            function = line
        else:
            yield function, line


def _task_workspaces(ir: str) -> list[int]:
    """Bytes of each buffer the parallel body fetches from the workspace allocator."""
    found = (re.search(r"tail call ptr %\d+\(i32 1, i32 %dev_id, i64 (\d+)", line)
             for function, line in _lines(ir) if "parallel_lambda" in function)
    return [int(f.group(1)) for f in found if f]


def _lambda_stack_bytes(ir: str) -> list[int]:
    """Bytes of the array slots (float or float vectors) of each parallel body's frame."""
    frames = {}
    for function, line in _lines(ir):
        found = re.search(r"alloca \[(\d+) x (?:<(\d+) x )?float", line) if "parallel_lambda" in function else None
        if found:
            frames[function] = frames.get(function, 0) + int(found.group(1)) * int(found.group(2) or 1) * 4
    return list(frames.values())


def _fused_spec(size, stride=1, seed=0):
    """A fused expansion (4 -> 8 channels, 70 % pruned: one channel a task) on size x size maps."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    expand = rng.standard_normal((8, 4, 1, 1)).astype(np.float32) * (rng.random((8, 4, 1, 1)) < 0.3)
    return depthwise.depthwise_inputs(w, (1, 8, size, size), None, "relu6", resolve_target(None), stride=stride,
                                      padding=1, expand=(expand, None, "relu6"))[0]


@pytest.mark.parametrize("size,stride", [(28, 1), (14, 2), (56, 1), (112, 2)])
def test_task_buffers_go_on_the_stack_while_they_fit_the_budget(size, stride):
    """A fused expansion's per-channel buffers (its expanded plane, the laid-out plane) are
    allocated once per task: on the task's stack while they fit TASK_STACK_BYTES together (56x56:
    two of 12-14 KiB), from the workspace allocator beyond (112x112 planes of 52 KiB);
    ``test_expansion`` checks these kernels' outputs."""
    from fscnn_tvm import pipeline
    ir = _llvm_ir(_fused_spec(size, stride, seed=size))
    assert bool(_task_workspaces(ir)) == (size == 112)
    assert all(b <= pipeline.TASK_STACK_BYTES for b in _lambda_stack_bytes(ir))


def test_a_tasks_buffers_past_the_budget_stay_with_the_allocator(monkeypatch):
    """The budget is per task, not per buffer: with room for one of a 56x56 channel's two
    planes, the other comes from the workspace allocator."""
    from fscnn_tvm import pipeline
    monkeypatch.setattr(pipeline, "TASK_STACK_BYTES", 16 << 10)
    ir = _llvm_ir(_fused_spec(56))
    assert len(_task_workspaces(ir)) == 1
    assert all(b <= 16 << 10 for b in _lambda_stack_bytes(ir))


def _small_task_specs(rng):
    """Kernels of many small tasks (one channel of a 7x7 map each, one row tile), every kind."""
    target = resolve_target(None)
    w = rng.standard_normal((64, 1, 3, 3)).astype(np.float32)
    expand = rng.standard_normal((64, 32, 1, 1)).astype(np.float32)
    expand[rng.random(expand.shape) < 0.9] = 0
    sparse = rng.standard_normal((32, 64, 1, 1)).astype(np.float32)
    sparse[rng.random(sparse.shape) < 0.9] = 0
    conv = rng.standard_normal((32, 64, 3, 3)).astype(np.float32)
    conv[rng.random(conv.shape) < 0.9] = 0
    return {"depthwise": depthwise.depthwise_inputs(w, (1, 64, 7, 7), None, "relu6", target, padding=1)[0],
            "fused expansion": depthwise.depthwise_inputs(w, (1, 64, 7, 7), None, "relu6", target, padding=1,
                                                          expand=(expand, None, "relu6"))[0],
            "sparse": ops.kernel_inputs("conv2d", to_csr(sparse), (1, 64, 7, 7), None, None, target)[0],
            # rows of 14 pixels, each row's vector stored masked through a scratch vector
            "sparse, masked rows": ops.kernel_inputs("conv2d", to_csr(conv), (1, 64, 14, 14), None, None, target,
                                                     padding=1)[0],
            "dense": dense.dense_inputs(sparse, (1, 64, 7, 7), None, None, target)[0]}


@pytest.mark.parametrize("kind", ["depthwise", "fused expansion", "sparse", "sparse, masked rows", "dense"])
def test_register_tiles_live_on_each_tasks_stack(kind):
    """A task's accumulators are neither fetched from the workspace allocator (a runtime call per
    task of the parallel loop) nor allocated outside the parallel body, where the threads would
    share one buffer: every float buffer of the kernel is a stack slot of the parallel lambda."""
    for function, line in _lines(_llvm_ir(_small_task_specs(np.random.default_rng(0))[kind])):
        if "parallel_lambda" in function:
            assert "@__TVMBackendAllocWorkspace" not in line, "a buffer from the workspace allocator per task"
        elif " alloca [" in line and "float]" in line:
            raise AssertionError(f"a float buffer outside the parallel body: {line.strip()}")

