"""From a matched layer chain to the module: which kernel runs it (format, sparse or dense, our
grouped kernel or TVM's), and its ``call_tir`` with the kernel's constant arrays. Each kernel is
added to the module once per spec and remembered as a ``Kernel`` (what tuning works on)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import tvm

from . import convpool, dense, depthwise, kernels, ops, pick, tiles, winograd
from . import formats as F
from .chunks import reshape_source
from .geometry import DYNAMIC, with_batch
from .layer import relax_layer


@dataclass
class Kernel:
    """A kernel of the module (sparse, or the dense conv kernel): its spec, the weight arrays of
    its first layer (what tuning measures on), and every layer that calls it."""
    spec: ops.KernelSpec | dense.DenseConvSpec | depthwise.DepthwiseSpec
    arrays: list
    layers: list


# ----------------------------------------------------------------------------- decisions

DEPTHWISE_PREFIX = "depthwise_conv2d"  # the name of our depthwise kernels' functions


def choose_format(weight: np.ndarray, fmt: str, block) -> tuple[str, tuple | None]:
    """``auto``: BSR when whole blocks are mostly full (the block-pruned case), else CSR."""
    if fmt != "auto":
        return fmt, (tuple(block) if block is not None else ((4, 1) if fmt == "bsr" else None))
    candidates = [tuple(block)] if block is not None else [(8, 1), (4, 1)]
    nnz = np.count_nonzero(weight)
    for cand in candidates:
        bsr = F.to_bsr(weight, cand)
        if nnz and nnz / (bsr.nnz_blocks * cand[0] * cand[1]) >= 0.7:
            return "bsr", cand
    return "csr", None


def dense_reason(chain, threshold: float | None) -> str | None:
    attrs = chain.head.attrs
    if threshold is None:
        return "dense baseline"
    if chain.weight is None:
        return "weight is a graph input, not a constant"
    if chain.kind == "conv2d":
        if int(attrs.groups) != 1:
            return f"groups={int(attrs.groups)} (grouped/depthwise)"
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW", "NCHW"):
            return f"layout {attrs.data_layout}/{attrs.kernel_layout}: only NCHW/OIHW"
        if chain.weight.dtype != np.float32 or chain.x.ty.dtype != "float32":
            return "not float32"
    sparsity = 1.0 - np.count_nonzero(chain.weight) / chain.weight.size
    if sparsity < threshold:
        return f"sparsity {sparsity:.2f} < threshold {threshold:.2f}"
    return None


# ----------------------------------------------------------------------------- emission

def emit_sparse(bb, chain, fmt, block, target, funcs: dict, kernels_: dict, layer: str):
    """The chain on our sparse kernel; its max pool in the kernel's tasks where ``tiles.with_pool``
    allows, else after the kernel."""
    x_shape, conv_args = kernel_view(chain)
    sparse = F.to_format(chain.weight, fmt, block)
    after_depthwise = _from_depthwise(bb, chain.x)
    parts = split_parts(chain, target) if after_depthwise and isinstance(sparse, F.CSR) else 1
    if parts > 1:  # (read in place where masked loads allow: each core's windows lie in lines it wrote)
        spec, weights = ops.kernel_inputs(chain.kind, F.split_columns(sparse, parts), x_shape, None, None, target,
                                          parts=parts, **conv_args)
        if follows_parts(spec):
            return emit_pool(bb, chain, _emit_split(bb, chain, spec, weights, f"sparse_{chain.kind}", target, funcs,
                                                    kernels_, layer))
    spec, weights = ops.kernel_inputs(chain.kind, sparse, x_shape, bias_of(chain), chain.activation, target,
                                      ragged_in_place=not after_depthwise, **conv_args)
    pooled = tiles.with_pool(spec, *fusable_pool(chain.pool)) \
        if chain.pool is not None and chain.residual is None else None
    out = emit_kernel(bb, chain, pooled or spec, weights, f"sparse_{chain.kind}", funcs, kernels_, layer,
                      _subsamples(chain))
    return out if pooled is not None else emit_pool(bb, chain, out)


def split_parts(chain, target) -> int:
    """In how many parts (``splitk``) a pointwise conv reading our depthwise kernel's output
    sums its input channels (on the CSR or the dense kernel): one per core, where the input is
    one image (the depthwise tasks then split its channels between the cores), its channels
    divide evenly, and each core's share of it fits half its L2 (where it does not, the lines
    come back from L3 or memory whoever wrote them). Measured on MobileNetV2 90 % (Zen 4, 1 MiB
    L2, 2 threads), split against whole: 14x14 (225-450 KiB of input) 34-52 us against 52-83;
    28x28 (600 KiB) even; 56x56 (1.2-1.8 MiB) 64-76 against 34-50 (the partial sums' extra pass
    costs more than the lines it keeps local). Else 1."""
    from .target import caches
    cache = caches(target)
    x_shape = list(chain.x.ty.shape)
    one_image = isinstance(x_shape[0], tvm.tirx.IntImm) and int(x_shape[0]) == 1
    share = int(np.prod([int(d) for d in x_shape[1:]])) * 4 // cache.cores if one_image else 0
    ok = pointwise(chain) and one_image and cache.cores > 1 \
        and chain.weight.shape[1] % cache.cores == 0 and share <= cache.l2 // 2
    return cache.cores if ok else 1


def pointwise(chain) -> bool:
    """A 1x1 conv at stride 1, unpadded, ungrouped: one matrix product over the pixels."""
    a = chain.head.attrs
    return chain.weight.shape[2:] == (1, 1) and tuple(int(s) for s in a.strides) == (1, 1) \
        and not any(int(p) for p in a.padding) and int(a.groups) == 1


def follows_parts(spec) -> bool:
    """Whether the default schedule of a split kernel (``spec.parts``) gives each core the tasks
    of one part: its parallel loop's static shares (contiguous, one per thread) must each be one
    part's rows, as in the chunked kernel (channel groups, each within a part, outside the pixel
    tiles) unless banded. The unchunked kernels of 7x7 maps, whose channel tiles are outermost
    too, ran slower split (MobileNetV2 90 %, Zen 4: 960->160 95 us against 80, 960->320 175
    against 133: twice the table rows, each with its loop and tile to store, on 49 pixels)."""
    return bool(spec.chunk_channels) and not spec.band_rows


def _emit_split(bb, chain, spec, weights, prefix, target, funcs: dict, kernels_: dict, layer: str):
    """The split kernel (its partial outputs, one per part), then ``splitk.sum_parts`` adding
    them with the chain's bias, residual and activation."""
    from tvm import relax

    from . import splitk
    from .target import vector_lanes
    partial = emit_kernel(bb, dataclasses.replace(chain, residual=None), spec, weights, prefix, funcs, kernels_,
                          layer)
    (n, _, h, w), c = static_shape(chain.x), chain.weight.shape[0]
    partial = reshaped(bb, partial, (n, spec.parts, c, h * w))
    bias = bias_of(chain)
    key = ("sum_parts", spec.parts, (n, c, h, w), bias is not None, chain.activation, chain.residual is not None)
    if key not in funcs:
        funcs[key] = bb.add_func(splitk.sum_parts(*key[1:], vector_lanes(target)), "sum_parts")
    args = [partial] + ([relax.const(bias)] if bias is not None else []) \
        + ([chain.residual] if chain.residual is not None else [])
    return bb.emit(relax.call_tir(funcs[key], args, relax.TensorType((n, c, h, w), "float32")))


def _from_depthwise(bb, x) -> bool:
    """Whether ``x`` is the output of one of our depthwise kernels. A pointwise conv that reads
    such an input in place (``ops.KernelSpec.masked_row``) lost on two cores: each task reads
    every channel's pixels, half of them still in the other core's cache, where the depthwise
    kernel wrote them (MobileNetV2 90 %: 0.93x; the same conv after an elementwise op 1.32x)."""
    from tvm import relax
    bound = bb.lookup_binding(x) if isinstance(x, relax.Var) else None
    callee = bound.args[0] if isinstance(bound, relax.Call) and bound.args else None
    return isinstance(callee, tvm.ir.GlobalVar) and callee.name_hint.startswith(DEPTHWISE_PREFIX)


def emit_kernel(bb, chain, spec, weights, prefix, funcs: dict, kernels_: dict, layer: str, subsample=False):
    """A ``call_tir`` of our kernel for ``spec`` (added to the module once per spec); with
    ``subsample``, on the input subsampled as ``kernel_view`` says. A chain whose input has a
    symbolic batch gets the kernel built for every batch size."""
    from tvm import relax
    batch = chain.x.ty.shape[0]
    dynamic = not isinstance(batch, tvm.tirx.IntImm)
    if chain.residual is not None:  # (only sparse and dense conv kernels' chains carry one)
        spec = dataclasses.replace(spec, residual=True)
    if dynamic:
        spec = kernels.batched(spec, DYNAMIC)
    if spec not in funcs:
        # Unscheduled here: ``compile`` applies a tuned or the default schedule.
        name = f"{prefix}_{len(funcs)}"
        funcs[spec] = bb.add_func(kernels.prim_func(spec).with_attr("global_symbol", name), name)
        kernels_[name] = Kernel(spec, weights, [])
    kernels_[funcs[spec].name_hint].layers.append(layer)

    def shape(s):  # the batch dimension as the model has it
        return with_batch(s, batch) if dynamic else s
    x, x_shape = chain.x, static_shape(chain.x)
    if subsample:
        stride = [int(s) for s in chain.head.attrs.strides]
        x = bb.emit(relax.op.strided_slice(x, axes=[2, 3], begin=[0, 0], end=list(x_shape[2:]), strides=stride))
        x_shape = kernel_view(chain)[0]
    x = x if spec.x_shape[1:] == x_shape[1:] else reshaped(bb, x, shape(spec.x_shape))
    residual = []
    if chain.residual is not None:  # viewed as the kernel's output (a flattened image, tasks' rows)
        same = spec.out_shape == spec.layer_out_shape
        residual = [chain.residual if same else reshaped(bb, chain.residual, shape(spec.out_shape))]
    out = bb.emit(relax.call_tir(funcs[spec], [x] + [relax.const(a) for a in weights] + residual,
                                 relax.TensorType(shape(spec.out_shape), "float32")))
    return out if spec.out_shape == spec.layer_out_shape else reshaped(bb, out, shape(spec.layer_out_shape))


def reshaped(bb, x, new_shape):
    """``x`` reshaped to ``new_shape``, from what a reshape of it was reshaped from: a layer's
    output viewed back as NCHW and then as the next kernel's view is one reshape of the first
    kernel's output, not two (TVM fuses a chain of two into a function it then runs as a copy
    instead of a view), and none where the shapes agree."""
    from tvm import relax
    x = reshape_source(bb, x)
    if [str(d) for d in x.ty.shape] == [str(d) for d in new_shape]:
        return x
    return bb.emit(relax.op.reshape(x, new_shape))


def static_shape(expr) -> tuple:
    """The shape of ``expr``, a symbolic batch dimension taken as 1: what kernels are specialised
    and timed on (``emit_kernel`` then builds them for every batch size)."""
    dims = list(expr.ty.shape)
    if any(not isinstance(d, tvm.tirx.IntImm) for d in dims[1:]):
        raise ValueError(f"only the batch dimension may be dynamic; this tensor has shape {dims}")
    return tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else 1 for d in dims)


def bias_of(chain):
    return None if chain.bias is None else np.asarray(chain.bias, np.float32).reshape(-1)


def under_threshold_only(chain, threshold: float | None) -> bool:
    """Whether the chain is left dense for its sparsity alone (any other reason excludes it)."""
    return threshold is not None and dense_reason(chain, threshold) is not None and dense_reason(chain, 0.0) is None


def races_csr_when_dense(chain, threshold: float | None) -> bool:
    """Whether a chain under the threshold still races the CSR kernel (on its weight as it is,
    dense or not) against the dense kernel: a pointwise conv (1x1, stride 1 once subsampled, no
    padding). Our dense kernel keeps a tile's channels in the lanes, so its stores to NCHW
    transpose the tile, which on few input channels costs as much as the FMAs; the CSR kernel
    stores whole rows of pixels. Measured on a Zen 4 (AVX-512) with dense weights: 16->96 at
    112x112, 24->144 and 144->24 at 56x56, 32->16 at 112x112 ran 1.35-1.8x faster as CSR; 64-512
    input channels 1.2-1.5x slower (with AVX2 on the same CPU only 32->16 was faster as CSR)."""
    if not (under_threshold_only(chain, threshold) and runs_dense_kernel(chain)
            and tuple(chain.weight.shape[2:]) == (1, 1)):
        return False
    conv_args = kernel_view(chain)[1]
    return conv_args.get("stride", 1) in (1, (1, 1)) and not any(conv_args.get("padding", (0,)))


def _subsamples(chain) -> bool:
    """A 1x1 conv with stride > 1 and no padding reads every s-th pixel only."""
    a = chain.head.attrs
    return chain.kind == "conv2d" and tuple(chain.weight.shape[2:]) == (1, 1) and max(int(s) for s in a.strides) > 1 \
        and max(int(p) for p in a.padding) == 0


def kernel_view(chain) -> tuple[tuple, dict]:
    """(input shape, stride/padding/dilation) of the conv our dense and sparse kernels run for a
    chain. A subsampling 1x1 conv (ResNet's downsample shortcuts) runs as a stride-1 conv on the
    input subsampled by a strided slice before the kernel: its output rows are then read whole,
    not one pixel in s (the strided kernel laid out all s*s stride phases to read one), and it
    may flatten. Measured at 90 %, AVX2: 1024->2048 at 14x14 stride 2 1.5x, 256->512 at 56x56
    stride 2 1.3x, the slice included."""
    x_shape = static_shape(chain.x)
    if not _subsamples(chain):
        return x_shape, kernel_conv_args(chain)
    (sh, sw) = (int(s) for s in chain.head.attrs.strides)
    return x_shape[:2] + (-(-x_shape[2] // sh), -(-x_shape[3] // sw)), {}


def kernel_conv_args(chain) -> dict:
    """stride, padding (t, l, b, r) and dilation, as our kernels take them."""
    return {k: v for k, v in conv_args_of(chain).items() if k != "groups"}


def our_conv(chain) -> bool:
    """Whether our kernels can run this conv chain (NCHW/OIHW float32, constant weight)."""
    if chain.kind != "conv2d" or chain.weight is None:
        return False
    a = chain.head.attrs
    return (a.data_layout, a.kernel_layout, a.out_layout) == ("NCHW", "OIHW", "NCHW") \
        and chain.weight.dtype == np.float32 and chain.x.ty.dtype == "float32"


def runs_dense_kernel(chain) -> bool:
    """Whether a chain left dense runs our dense conv kernel."""
    return our_conv(chain) and int(chain.head.attrs.groups) == 1


def is_depthwise(chain) -> bool:
    """groups = input channels (any depth multiplier): our depthwise kernel runs it."""
    return our_conv(chain) and int(chain.head.attrs.groups) == int(chain.x.ty.shape[1]) \
        and chain.weight.shape[1] == 1


def grouped_kernel(chain, target, measure: bool) -> tuple[str, str]:
    """Which kernel runs a grouped conv ("depthwise", "csr": our sparse kernel on its
    block-diagonal weight, or "tvm": TVM's grouped conv), and why. Depthwise convs always run
    the depthwise kernel (1.3-6x the block-diagonal CSR kernel on MobileNetV2's 3x3 convs, AVX2,
    2 threads). For other groupings CSR beat TVM's at stride 1 on 14x14 and up, and lost at
    stride 2 and 7x7, so they are timed here, and without timing the stride decides."""
    if not our_conv(chain):
        return "tvm", ""
    if is_depthwise(chain):
        return "depthwise", "depthwise kernel"
    if not measure:
        ours = tuple(int(s) for s in chain.head.attrs.strides) == (1, 1)
        return ("csr", "block-diagonal CSR kernel") if ours else ("tvm", "TVM's grouped conv (stride > 1)")
    ours_ms, tvm_ms = pick.time_grouped(chain.weight, static_shape(chain.x), bias_of(chain),
                                        chain.activation, target, conv_args_of(chain))
    times = f"{min(ours_ms, tvm_ms):.3g} ms vs {max(ours_ms, tvm_ms):.3g} ms"
    return ("csr", f"block-diagonal CSR kernel (faster here: {times})") if ours_ms <= tvm_ms else \
        ("tvm", f"TVM's grouped conv (faster here: {times})")


def fusable_pool(call) -> tuple | None:
    """(kernel, stride, padding) of a max pool a chain may take, for our kernels to run fused
    (``convpool``, ``tiles.with_pool``): NCHW, square, the same padding on every side, no
    dilation, no ceil mode."""
    a = call.attrs
    size, strides, pad, dilation = ([int(v) for v in getattr(a, f)] for f in ("pool_size", "strides", "padding",
                                                                              "dilation"))
    plain = a.layout == "NCHW" and a.out_layout == "NCHW" and not bool(a.ceil_mode) and dilation == [1, 1]
    return (size[0], strides[0], pad[0]) if plain and len(set(size)) == len(set(strides)) == len(set(pad)) == 1 \
        else None


def emit_pool(bb, chain, out):
    """``out`` through the chain's max pool, where it has one (unfused: the pool as imported)."""
    from tvm import relax
    return out if chain.pool is None else bb.emit(relax.Call(chain.pool.op, [out], chain.pool.attrs))


def _emit_pooled(bb, chain, target, funcs: dict, kernels_: dict, layer: str):
    """The chain's conv and max pool as one dense kernel (``convpool``), or None where it does not
    fuse."""
    from .target import caches
    if not runs_dense_kernel(chain) or chain.residual is not None or _subsamples(chain) or _from_depthwise(bb, chain.x) \
            or _winograd(chain, target):  # (a pool after it runs apart: Winograd gains more than the fusion)
        return None
    spec = dense.make_dense_spec(static_shape(chain.x), chain.weight.shape, chain.bias is not None, chain.activation,
                                 target, **kernel_conv_args(chain))
    pooled = convpool.pooled_spec(spec, *fusable_pool(chain.pool), caches(target))
    if pooled is None:  # (before the weights are packed: emit_dense packs them for the unfused kernel)
        return None
    return emit_kernel(bb, chain, pooled, dense.dense_arrays(spec, chain.weight, bias_of(chain)), "dense_conv2d",
                       funcs, kernels_, layer)


def emit_dense(bb, chain, target, funcs: dict, kernels_: dict, layer: str, grouped: str = "tvm", expansion=None):
    """The chain run dense, BatchNorm already folded into weight and bias: our dense conv kernel
    (bias and activation fused, and the max pool after it where it has one that fuses) where it
    applies, a grouped conv on the kernel ``grouped`` names (see ``grouped_kernel``), else dense
    Relax ops. ``expansion``: the chain of a pointwise conv computed inside this depthwise conv's
    kernel (``fused_expansions``)."""
    if chain.pool is not None:
        pooled = _emit_pooled(bb, chain, target, funcs, kernels_, layer) if grouped == "tvm" else None
        return pooled if pooled is not None else emit_pool(bb, chain, emit_dense(
            bb, dataclasses.replace(chain, pool=None), target, funcs, kernels_, layer, grouped, expansion))
    x_shape = static_shape(chain.x)
    if grouped == "csr":
        spec, weights = ops.kernel_inputs("conv2d", F.grouped_to_csr(chain.weight, int(chain.head.attrs.groups)),
                                          x_shape, bias_of(chain), chain.activation, target, **kernel_conv_args(chain))
        return emit_kernel(bb, chain, spec, weights, "grouped_conv2d", funcs, kernels_, layer)
    if grouped == "depthwise":
        expand = None if expansion is None else (expansion.weight, bias_of(expansion), expansion.activation)
        spec, weights = depthwise.depthwise_inputs(chain.weight, x_shape, bias_of(chain), chain.activation, target,
                                                   expand=expand, **kernel_conv_args(chain))
        if expansion is not None:  # the kernel reads the expansion's input
            chain = dataclasses.replace(chain, x=expansion.x)
        return emit_kernel(bb, chain, spec, weights, DEPTHWISE_PREFIX, funcs, kernels_, layer)
    if runs_dense_kernel(chain):
        view_shape, conv_args = kernel_view(chain)
        parts = split_parts(chain, target) if _from_depthwise(bb, chain.x) else 1
        if parts > 1:
            spec, weights = dense.dense_inputs(chain.weight, view_shape, None, None, target, parts=parts, **conv_args)
            return _emit_split(bb, chain, spec, weights, "dense_conv2d", target, funcs, kernels_, layer)
        if _winograd(chain, target):
            spec, weights = winograd.winograd_inputs(chain.weight, view_shape, bias_of(chain), chain.activation,
                                                     target, **conv_args)
            return emit_kernel(bb, chain, spec, weights, "winograd_conv2d", funcs, kernels_, layer)
        spec, weights = dense.dense_inputs(chain.weight, view_shape, bias_of(chain), chain.activation, target,
                                           **conv_args)
        return emit_kernel(bb, chain, spec, weights, "dense_conv2d", funcs, kernels_, layer, _subsamples(chain))
    if runs_dense_linear(chain):
        # A linear layer is a 1x1 conv on a 1x1 image: the dense kernel streams the weights in
        # output-channel blocks (TVM's lowering of the matmul ran MobileNetV2's 1280->1000
        # classifier in 1.9 ms, this kernel in 0.07 ms, AVX2, 2 threads).
        from tvm import relax
        (n, k), m = static_shape(chain.x), chain.weight.shape[0]
        spec, weights = dense.dense_inputs(chain.weight.reshape(m, k, 1, 1), (n, k, 1, 1), bias_of(chain),
                                           chain.activation, target)
        out = emit_kernel(bb, chain, spec, weights, "dense_linear", funcs, kernels_, layer)
        return bb.emit(relax.op.reshape(out, (chain.x.ty.shape[0], m)))
    return relax_layer(bb, chain.x, chain.kind, chain.weight, chain.bias, chain.activation, conv_args_of(chain))


def _winograd(chain, target) -> bool:
    """Whether a chain our dense kernel runs runs the Winograd kernel instead (``winograd.applies``;
    a static batch: the kernel's tiles count the images)."""
    if not isinstance(chain.x.ty.shape[0], tvm.tirx.IntImm) or _subsamples(chain):
        return False
    return winograd.applies_to(static_shape(chain.x), chain.weight.shape, target, **kernel_conv_args(chain))


def runs_dense_linear(chain) -> bool:
    """Whether a linear chain left dense runs our dense kernel (a constant 2-D float32 weight)."""
    return chain.kind == "linear" and chain.weight is not None and chain.weight.ndim == 2 \
        and chain.weight.dtype == np.float32 and chain.x.ty.dtype == "float32" and len(chain.x.ty.shape) == 2


def conv_args_of(chain) -> dict:
    if chain.kind != "conv2d":
        return {}
    a = chain.head.attrs
    return {"stride": tuple(int(s) for s in a.strides), "padding": tuple(int(p) for p in a.padding),
            "dilation": tuple(int(d) for d in a.dilation), "groups": int(a.groups)}


def raced_convs(chains, threshold, fmt, block) -> list[tuple]:
    """``pick.time_conv``'s arguments (conv_args a dict last) for each of ``chains`` whose sparse
    and dense kernels the import races: pruned over the threshold and run by our dense kernel
    too, or pointwise under it (``races_csr_when_dense``)."""
    convs = []
    for chain in chains:
        pruned = dense_reason(chain, threshold) is None and runs_dense_kernel(chain)
        if pruned or races_csr_when_dense(chain, threshold):
            x_shape, conv_args = kernel_view(chain)
            convs.append((chain.weight, x_shape, bias_of(chain), chain.activation,
                          *choose_format(chain.weight, fmt, block), conv_args))
    return convs
