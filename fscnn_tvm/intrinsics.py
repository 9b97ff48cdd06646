"""Tensor intrinsics for CPU tuning jobs, without TVM's minute-long import of all of them.

meta_schedule's ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, whose ``__init__`` parses the
tensor intrinsics of every target TVM knows as TVMScript (CUDA alone takes 23 s): 66-84 s on our
2-core machines at the start of every tuning job, for intrinsics a CPU job never uses. Its schedule
rules for a CPU use that CPU family's only (x86: 0.7 s; Arm: 3.5 s), so that module is imported
into the package, created without running its ``__init__``; the other submodules still import
on demand (the package keeps its path)."""
from __future__ import annotations

import importlib
import importlib.util
import platform
import sys

PACKAGE = "tvm.s_tir.tensor_intrin"


def cpu_module(target) -> str:
    """The intrinsics module of ``target``'s CPU family (by its triple; the host's without one)."""
    triple = str(target.attrs.get("mtriple", "")) or platform.machine()
    return "arm_cpu" if triple.startswith(("aarch64", "arm")) else "x86"


def import_cpu_intrinsics(target) -> None:
    """Register the tensor intrinsics of ``target``'s CPU family."""
    module = f"{PACKAGE}.{cpu_module(target)}"
    if PACKAGE in sys.modules:  # ours (another family's module may be missing) or TVM's whole import
        importlib.import_module(module)
        return
    import tvm.s_tir
    package = importlib.util.module_from_spec(importlib.util.find_spec(PACKAGE))
    sys.modules[PACKAGE] = package
    tvm.s_tir.tensor_intrin = package
    try:
        importlib.import_module(module)
    except BaseException:
        del sys.modules[PACKAGE]  # leave TVM's own import to run in full
        raise
