"""Tensor intrinsics for CPU tuning jobs, without TVM's minute-long import of all of them.

meta_schedule's ``TuneContext`` imports ``tvm.s_tir.tensor_intrin``, whose ``__init__`` parses the
tensor intrinsics of every target TVM knows as TVMScript (CUDA alone takes 23 s): 66-84 s on our
2-core machines at the start of every tuning job, for intrinsics a CPU job never uses. Its schedule
rules use the x86 and Arm ones only, so those are imported (about 5 s) into the package, created
without running its ``__init__``; the other submodules still import on demand (the package keeps
its path)."""
from __future__ import annotations

import importlib
import importlib.util
import sys

PACKAGE = "tvm.s_tir.tensor_intrin"
CPU_MODULES = ("x86", "arm_cpu")


def import_cpu_intrinsics() -> None:
    """Register the CPU tensor intrinsics; a no-op when the package is already imported."""
    if PACKAGE in sys.modules:
        return
    import tvm.s_tir
    package = importlib.util.module_from_spec(importlib.util.find_spec(PACKAGE))
    sys.modules[PACKAGE] = package
    tvm.s_tir.tensor_intrin = package
    try:
        for name in CPU_MODULES:
            importlib.import_module(f"{PACKAGE}.{name}")
    except BaseException:
        del sys.modules[PACKAGE]  # leave TVM's own import to run in full
        raise
