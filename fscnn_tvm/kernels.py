"""The kernels a module holds, whatever their kind: one entry point each for the unscheduled
function, the default schedule, the tuner's design spaces and the lowering, chosen by the
spec's type (``ops.KernelSpec`` sparse, ``dense.DenseConvSpec`` dense, ``depthwise.DepthwiseSpec``)."""
from __future__ import annotations

import tvm

from . import dense, depthwise, ops
from .decisions import SampledDecisions

# Kernels of a single structure: (module with prim_func/default_schedule, its schedule function).
_SINGLE = {dense.DenseConvSpec: (dense, dense.schedule_dense),
           depthwise.DepthwiseSpec: (depthwise, depthwise.schedule_depthwise)}


def prim_func(spec) -> tvm.tirx.PrimFunc:
    module = _SINGLE.get(type(spec), (ops,))[0]
    return module.prim_func(spec)


def default_schedule(func: tvm.tirx.PrimFunc, spec) -> tvm.s_tir.Schedule:
    module = _SINGLE.get(type(spec), (ops,))[0]
    return module.default_schedule(func, spec)


def design_spaces(func: tvm.tirx.PrimFunc, spec) -> list:
    """One schedule with sampled decisions per structural variant of the kernel."""
    if type(spec) in _SINGLE:
        return [_SINGLE[type(spec)][1](func, spec, SampledDecisions())]
    return [ops.schedule_sparse(func, spec, SampledDecisions(), v) for v in ops.variants(spec)]


def lower(sch: tvm.s_tir.Schedule) -> tvm.tirx.PrimFunc:
    """A scheduled kernel as it runs (``ops.lower_sparse`` passes dense kernels through)."""
    return ops.kernel_func(sch)
