"""The kernels a module holds, whatever their kind: one entry point each for the unscheduled
function, the default schedule, the tuner's design spaces and the lowering, chosen by the
spec's type (``ops.KernelSpec`` sparse, ``dense.DenseConvSpec`` dense, ``winograd.WinogradSpec``,
``depthwise.DepthwiseSpec``)."""
from __future__ import annotations

import dataclasses

import tvm

from . import convpool, dense, depthwise, ops, schedule, winograd
from .decisions import SampledDecisions
from .geometry import DYNAMIC
from .lowering import kernel_func
from .target import masked_stores

# TVM's OpPatternKind kOpaque: a function Relax's FuseOps never fuses with its neighbours.
OPAQUE = 8

# Kernels of a single structure: (module with prim_func/default_schedule, its schedule function).
_SINGLE = {dense.DenseConvSpec: (dense, dense.schedule_dense),
           winograd.WinogradSpec: (winograd, winograd.schedule_winograd),
           depthwise.DepthwiseSpec: (depthwise, depthwise.schedule_depthwise)}


def _single(spec):
    """(module, schedule function) of a kernel of a single structure, or None (sparse)."""
    pooled = isinstance(spec, dense.DenseConvSpec) and spec.pool
    return (convpool, convpool.schedule_pooled) if pooled else _SINGLE.get(type(spec))


def prim_func(spec) -> tvm.tirx.PrimFunc:
    return (_single(spec) or (ops,))[0].prim_func(spec)


def default_schedule(func: tvm.tirx.PrimFunc, spec) -> tvm.s_tir.Schedule:
    return (_single(spec) or (schedule,))[0].default_schedule(func, spec)


def design_spaces(func: tvm.tirx.PrimFunc, spec) -> list:
    """One schedule with sampled decisions per structural variant of the kernel."""
    if _single(spec):
        return [_single(spec)[1](func, spec, SampledDecisions())]
    return [schedule.schedule_sparse(func, spec, SampledDecisions(), v) for v in schedule.variants(spec)]


def batched(spec, batch):
    """``spec`` for another batch size (``geometry.DYNAMIC``: every batch size)."""
    changes = {"batch": batch} if isinstance(spec, ops.KernelSpec) else {}
    if spec.geo is not None:
        changes["geo"] = dataclasses.replace(spec.geo, batch=batch)
    return dataclasses.replace(spec, **changes)


def tuned_as(spec):
    """The spec a kernel is tuned and its records looked up as: a dynamic-batch kernel as its
    batch-1 twin (the schedules never split the batch loop), a kernel that adds a residual as
    its twin without (the epilogue's loops are the same), a sparse kernel with a pool after its
    epilogue as its twin without: the twin's trace replays on it."""
    batch = spec.batch if isinstance(spec, ops.KernelSpec) else spec.geo.batch
    spec = batched(spec, 1) if batch == DYNAMIC else spec
    if isinstance(spec, ops.KernelSpec) and spec.pool:  # (``records.best_schedule`` then places the pool)
        spec = dataclasses.replace(spec, pool=0)
    return dataclasses.replace(spec, residual=False) if getattr(spec, "residual", False) else spec


def lower(sch: tvm.s_tir.Schedule, target=None) -> tvm.tirx.PrimFunc:
    """A scheduled kernel as it runs on ``target`` (``lowering.lower_sparse`` passes dense
    kernels through)."""
    return kernel_func(sch, target is not None and masked_stores(target))
