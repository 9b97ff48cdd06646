"""The kernels a module holds, whatever their kind: one entry point each for the unscheduled
function, the default schedule, the tuner's design spaces and the lowering, chosen by the
spec's type (``ops.KernelSpec`` sparse, ``dense.DenseConvSpec`` dense)."""
from __future__ import annotations

import tvm

from . import dense, ops
from .decisions import SampledDecisions


def prim_func(spec) -> tvm.tirx.PrimFunc:
    return dense.prim_func(spec) if isinstance(spec, dense.DenseConvSpec) else ops.prim_func(spec)


def default_schedule(func: tvm.tirx.PrimFunc, spec) -> tvm.s_tir.Schedule:
    if isinstance(spec, dense.DenseConvSpec):
        return dense.default_schedule(func, spec)
    return ops.default_schedule(func, spec)


def design_spaces(func: tvm.tirx.PrimFunc, spec) -> list:
    """One schedule with sampled decisions per structural variant of the kernel."""
    if isinstance(spec, dense.DenseConvSpec):
        return [dense.schedule_dense(func, spec, SampledDecisions())]
    return [ops.schedule_sparse(func, spec, SampledDecisions(), v) for v in ops.variants(spec)]


def lower(sch: tvm.s_tir.Schedule) -> tvm.tirx.PrimFunc:
    """A scheduled kernel as it runs (``ops.lower_sparse`` passes dense kernels through)."""
    return ops.kernel_func(sch)
