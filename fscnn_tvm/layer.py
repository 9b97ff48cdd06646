"""Layers and the functional API: a kernel built for one input shape with its weights on the
device (``SparseLayer``, ``DenseConvLayer``), and ``sparse_conv2d`` / ``sparse_linear`` /
``dense_conv2d``, which build once per (shapes, weights, target) and cache.

Non-finite inputs: neither these nor a compiled model check inputs (a pass over every input on
the hot path). A NaN or inf in the input gives non-finite outputs only where a nonzero weight
reads it: the sparse kernels skip zero weights, so a NaN/inf that meets only pruned weights
vanishes, where dense PyTorch propagates it (0 * NaN = NaN). Weights and biases must be finite.
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np
import tvm

from . import formats as F
from . import dense, depthwise, kernels, winograd
from .ops import kernel_inputs
from .pipeline import PIPELINE
from .records import best_schedule
from .target import resolve_target


@functools.lru_cache(maxsize=256)
def _compiled(spec, target_json: str):
    target = tvm.target.Target(target_json)
    return _build(kernels.default_schedule(kernels.prim_func(spec), spec), target)


def _build(sch, target):
    module = tvm.IRModule({"main": kernels.lower(sch, target)})
    return tvm.compile(module, target=target, tir_pipeline=PIPELINE).jit()["main"]


class KernelLayer:
    """A compiled kernel with its constant arrays on the device, callable on numpy arrays.
    Subclasses set ``spec``, ``arrays``, ``x_shape``, ``target`` and ``_func``."""

    def _upload(self):
        self._params = [tvm.runtime.tensor(a, tvm.cpu()) for a in self.arrays]

    def __call__(self, x) -> np.ndarray:
        x = F.as_array(x, "x")
        if x.shape != self.x_shape:
            raise ValueError(f"x: shape {x.shape}, but this layer was built for {self.x_shape}")
        return self.runner(x)().numpy()

    def runner(self, x):
        """A no-argument callable that runs the kernel on ``x`` with preallocated arrays, for
        timing the kernel alone; it returns the output as a TVM tensor."""
        dev = tvm.cpu()
        args = [tvm.runtime.tensor(F.as_array(x, "x").reshape(self.spec.x_shape), dev), *self._params,
                tvm.runtime.empty(self.spec.out_shape, "float32", dev)]
        out = args[-1]._create_view(self.spec.layer_out_shape)

        def run():
            self._func(*args)
            return out
        return run


class SparseLayer(KernelLayer):
    """A sparse conv2d or linear layer built for one input shape: weights held in the kernel's
    layout on the device, callable on numpy arrays."""

    def __init__(self, kind, weight, x_shape, bias=None, fmt="csr", block=None, activation=None,
                 target=None, stride=1, padding=0, dilation=1, groups=1, tuning_db=None):
        if groups != 1:
            raise NotImplementedError(
                f"groups={groups}: pass a grouped weight as formats.grouped_to_csr(weight, {groups}) (its "
                "block-diagonal CSR, which the sparse kernel runs) and groups=1")
        self.target = resolve_target(target)
        self.sparse = weight if isinstance(weight, F.SparseMatrix) else F.to_format(weight, fmt, block)
        self.bias = None if bias is None else F.as_weight(bias, "bias")
        if self.bias is not None and self.bias.shape != (self.sparse.rows,):
            raise ValueError(f"bias: shape {self.bias.shape}, expected ({self.sparse.rows},) for "
                             f"{self.sparse.rows} output channels")
        self.spec, self.arrays = kernel_inputs(kind, self.sparse, x_shape, self.bias, activation, self.target,
                                               stride=stride, padding=padding, dilation=dilation)
        self.x_shape = tuple(int(s) for s in x_shape)
        self._upload()
        sch, self.tuned = None, False
        if tuning_db is not None:
            sch, self.tuned = best_schedule(self.spec, tuning_db)
        self._func = _build(sch, self.target) if self.tuned else _compiled(self.spec, str(self.target))


class DenseConvLayer(KernelLayer):
    """A conv2d layer with dense weights, for one input shape: the direct-conv kernel
    (``dense.py``) for groups=1, or the Winograd kernel where it applies (``winograd.applies``), the
    depthwise kernel (``depthwise.py``) for groups = input channels."""

    def __init__(self, weight, x_shape, bias=None, activation=None, target=None, stride=1, padding=0, dilation=1,
                 groups=1):
        self.target = resolve_target(target)
        weight = F.as_weight(weight)
        if weight.ndim != 4:
            raise ValueError(f"weight: expected OIHW (rank 4), got shape {weight.shape}")
        bias = None if bias is None else F.as_weight(bias, "bias")
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"bias: shape {bias.shape}, expected ({weight.shape[0]},) for "
                             f"{weight.shape[0]} output channels")
        if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
            raise ValueError(f"groups: expected a positive int, got {groups!r}")
        channels = int(x_shape[1]) if len(x_shape) == 4 else None
        conv_args = {"stride": stride, "padding": padding, "dilation": dilation}
        if groups == 1 and winograd.applies_to(x_shape, weight.shape, self.target, **conv_args):
            self.spec, self.arrays = winograd.winograd_inputs(weight, x_shape, bias, activation, self.target,
                                                              **conv_args)
        elif groups == 1:
            self.spec, self.arrays = dense.dense_inputs(weight, x_shape, bias, activation, self.target, **conv_args)
        elif groups == channels and weight.shape[1] == 1:
            self.spec, self.arrays = depthwise.depthwise_inputs(weight, x_shape, bias, activation, self.target,
                                                                **conv_args)
        else:
            raise NotImplementedError(
                f"groups={groups}: dense kernels run groups=1 and depthwise convs (groups = the input's "
                f"{channels} channels, weight (K, 1, kh, kw)); for other groupings use SparseLayer('conv2d', "
                f"formats.grouped_to_csr(weight, {groups}), x.shape, ...)")
        self.x_shape = tuple(int(s) for s in x_shape)
        self._upload()
        self._func = _compiled(self.spec, str(self.target))


def relax_layer(bb, x, kind, weight, bias, activation, conv_args):
    """One conv2d (``conv_args``: stride, padding (t, l, b, r), dilation, groups) or linear layer as
    TVM's own dense Relax ops, emitted into ``bb``: the op, bias add, activation."""
    from tvm import relax
    if kind == "conv2d":
        y = bb.emit(relax.op.nn.conv2d(x, relax.const(np.ascontiguousarray(weight, dtype=np.float32)),
                                       strides=conv_args["stride"], padding=conv_args["padding"],
                                       dilation=conv_args["dilation"], groups=conv_args["groups"]))
        bias_shape = (1, -1, 1, 1)
    else:
        y = bb.emit(relax.op.matmul(x, relax.const(np.ascontiguousarray(weight.T))))
        bias_shape = (1, -1)
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.const(np.asarray(bias, np.float32).reshape(bias_shape))))
    if activation == "relu":
        y = bb.emit(relax.op.nn.relu(y))
    elif activation == "relu6":
        y = bb.emit(relax.op.clip(y, 0.0, 6.0))
    return y


def relax_layer_module(x_shape, kind, weight, bias, activation, conv_args):
    """``relax_layer`` as a module of its own, one input ``x``."""
    from tvm import relax
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(tuple(x_shape), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax_layer(bb, x, kind, weight, bias, activation, conv_args))
        bb.emit_func_output(out)
    return bb.get()


def _layer_key(kind, weight, x_shape, bias, fmt, block, activation, target, conv_args):
    w = F.as_weight(weight)
    b = None if bias is None else F.as_weight(bias, "bias")
    digest = hashlib.sha1(w.tobytes()).hexdigest() + ("" if b is None else hashlib.sha1(b.tobytes()).hexdigest())
    return (kind, w.shape, digest, tuple(x_shape), fmt, None if block is None else F._check_block(block), activation,
            str(resolve_target(target)), conv_args)


_LAYERS: dict = {}


def _cached_layer(kind, x, weight, bias, fmt, block, activation, target, **conv_args) -> tuple[KernelLayer, np.ndarray]:
    x = F.as_array(x, "x")
    key = _layer_key(kind, weight, x.shape, bias, fmt, block, activation, target, tuple(sorted(conv_args.items())))
    if key not in _LAYERS:
        if len(_LAYERS) >= 64:  # bounded: drop the oldest
            _LAYERS.pop(next(iter(_LAYERS)))
        _LAYERS[key] = DenseConvLayer(weight, x.shape, bias, activation, target, **conv_args) \
            if kind == "dense_conv2d" else SparseLayer(kind, weight, x.shape, bias, fmt, block, activation, target,
                                                       **conv_args)
    return _LAYERS[key], x


def sparse_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, fmt="csr", block=None,
                  activation=None, target=None) -> np.ndarray:
    """conv2d (NCHW, OIHW weight) computed by the sparse kernel; equals
    ``torch.nn.functional.conv2d`` (+ReLU when ``activation='relu'``). Builds once per
    (shapes, weight pattern, target) and caches."""
    if groups != 1:
        raise NotImplementedError(f"groups={groups}: sparse_conv2d takes groups=1; for a grouped conv use "
                                  f"SparseLayer('conv2d', formats.grouped_to_csr(weight, {groups}), x.shape, ...)")
    layer, x = _cached_layer("conv2d", x, weight, bias, fmt, block, activation, target,
                             stride=stride, padding=padding, dilation=dilation)
    return layer(x)


def sparse_linear(x, weight, bias=None, fmt="csr", block=None, activation=None, target=None) -> np.ndarray:
    """``x @ weight.T + bias`` (then the activation) computed by the sparse kernel."""
    layer, x = _cached_layer("linear", x, weight, bias, fmt, block, activation, target)
    return layer(x)


def dense_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, activation=None, target=None,
                 groups=1) -> np.ndarray:
    """conv2d (NCHW, OIHW weight) computed by the dense direct-conv kernel (groups=1) or the
    depthwise kernel (groups = input channels); equals ``torch.nn.functional.conv2d`` (then the
    activation). Builds once per (shapes, weights, target) and caches."""
    layer, x = _cached_layer("dense_conv2d", x, weight, bias, None, None, activation, target,
                             stride=stride, padding=padding, dilation=dilation, groups=groups)
    return layer(x)
