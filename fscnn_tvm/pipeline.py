"""The TIR pipeline every kernel of ours is built with: TVM's, then two rewrites of what TVM's
LLVM code generator leaves slow. Registered under ``PIPELINE`` for ``tvm.tirx.build`` /
``tvm.compile``; every build site of the package passes it.

A task's own buffers (its register tile's accumulators, a depthwise channel's laid-out plane, an
expanded channel) are allocated in the body of the parallel loop, once per task. TVM puts the
"global" ones of under 1 KiB on the stack and fetches every other one (the "local" accumulators
whatever their size) from its workspace allocator: two runtime calls per task, and an opaque
pointer the accumulators are stored to and reloaded from. On small tasks (a channel of a 7x7 to
28x28 map: 0.1-0.5 us) that cost 25-35 %. They go on the task's stack while they fit
``TASK_STACK_BYTES`` together, where LLVM keeps small ones in registers. Measured on a Zen 4,
2 threads: depthwise 576@14 / 960@7 1.57x / 1.33x, fused expansions 1.05-1.39x (the
accumulators alone) and 28x28 / 14x14 1.49-1.55x / 1.17-1.66x (every buffer), a sparse
960->160@7 1.19x; MobileNetV2 90 % batch 1 1.19x, ResNet-50 batch 8 1.04x (one process, rounds
interleaved); MobileNetV2 90 % batch 8 against DeepSparse from 0.75-0.90x to 1.11-1.34x (two
runs).

A vector load at a constant stride (a depthwise conv's stride-2 input read into its column
phases) is scalarised by the code generator: one scalar load and insert per lane, ~1 lane a
cycle. The same lanes come from the few contiguous vectors that span them and one shuffle
(``vpermt2ps`` on AVX-512): the loads touch exactly the span the strided read reads from its
first lane to its last, so a load that was in bounds stays in bounds."""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

PIPELINE = "fscnn"
MAX_STRIDE = 4  # wider strides need as many loads as lanes they pick: no gain over scalar
# Stack bytes a task's buffers may take (all of them: one task's frame): tasks whose buffers
# are bigger are long enough for the allocator's calls not to matter, and this much leaves any
# thread's stack untouched (8 MiB by default on Linux, 128 KiB with musl).
TASK_STACK_BYTES = 32 << 10


def shuffle_lanes(stride: int, lanes: int) -> tuple[list[int], list[int]]:
    """(start of each contiguous load within the span, concatenated lane each output lane
    takes) for ``lanes`` lanes at ``stride``: loads of ``lanes`` at 0, lanes, ..., and a last
    one ending at the span's last element."""
    span = stride * (lanes - 1) + 1
    count = -(-span // lanes)
    starts = [j * lanes for j in range(count - 1)] + [span - lanes]
    picks = []
    for i in range(lanes):
        e = stride * i
        picks.append(e if e < (count - 1) * lanes else (count - 1) * lanes + e - starts[-1])
    return starts, picks


def _contiguous(load):
    """A strided vector load as contiguous loads and a shuffle (other loads unchanged)."""
    index = load.indices[-1] if len(load.indices) else None
    if not isinstance(index, tirx.Ramp) or not isinstance(index.stride, tirx.IntImm) \
            or not isinstance(index.lanes, tirx.IntImm) or not isinstance(load.source, tirx.Buffer):
        return load
    stride, lanes = int(index.stride.value), int(index.lanes.value)
    if not 2 <= stride <= MAX_STRIDE or lanes < 2:
        return load
    starts, picks = shuffle_lanes(stride, lanes)
    head = list(load.indices[:-1])
    parts = [tirx.BufferLoad(load.source, head + [tirx.Ramp(index.base + s, 1, lanes)]) for s in starts]
    return tirx.Shuffle(parts, picks)


@tvm.transform.module_pass(opt_level=0, name="ContiguousStridedLoads")
def contiguous_strided_loads(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return tvm_ffi.structural_map(mod, (tvm.ir.expr.TensorLoad, _contiguous))


def _bytes(buffer) -> int | None:
    """Bytes of a buffer of constant shape in main memory ("global", or "local": the scope of
    every register tile of ours and of the shipped records' traces, which on a CPU means the
    same but which TVM never puts on the stack); None for any other."""
    if buffer.scope() not in ("global", "local") or not all(isinstance(d, tirx.IntImm) for d in buffer.shape):
        return None
    dtype = tvm.DataType(str(buffer.dtype))
    size = dtype.bits * dtype.lanes // 8
    for d in buffer.shape:
        size *= int(d)
    return size


def _task_buffers(loop):
    """A parallel loop whose body's buffers, in order, are marked for the stack (TVM's
    ``disable_lower_builtin``) while they fit TASK_STACK_BYTES together. ("local" stays the
    tiles' scope: a "global" buffer may be merged into an allocation of the whole function,
    outside the parallel loop, which every thread would then share.)"""
    if loop.kind != tirx.ForKind.PARALLEL:
        return loop
    left = [TASK_STACK_BYTES]

    def on_stack(alloc):
        size = _bytes(alloc.buffer)
        if size is None or size > left[0]:
            return alloc
        left[0] -= size
        return tirx.AllocBuffer(alloc.buffer, {**dict(alloc.annotations),
                                               "disable_lower_builtin": tirx.IntImm("bool", 1)})
    return tirx.For(loop.loop_var, loop.min, loop.extent, loop.kind,
                    tvm_ffi.structural_map(loop.body, (tirx.AllocBuffer, on_stack)), loop.thread_binding,
                    loop.annotations, loop.step)


@tvm.transform.module_pass(opt_level=0, name="TaskBuffersOnStack")
def task_buffers_on_stack(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    return tvm_ffi.structural_map(mod, (tirx.For, _task_buffers))


def _pipeline():
    passes, host, device = tirx.get_tir_pipeline("default")
    return tvm.transform.Sequential([passes, contiguous_strided_loads, task_buffers_on_stack]), host, device


tirx.compilation_pipeline.register_tir_pipeline(PIPELINE, _pipeline)
