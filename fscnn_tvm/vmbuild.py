"""The last step of a model's build, on every core: TVM's ``relax.build`` turns the Relax
functions into VM bytecode and compiles *all* TIR functions as one LLVM module, on one thread;
LLVM's optimisation and code generation for ResNet-50's ~100 kernels took 20 of the 25 s of
``compile``. Here the TIR functions are split into one module per core, each built (TVM's TIR
pipeline, then LLVM, which TVM runs without the GIL) and code-generated on its own thread; the
first module imports the others, and the VM finds each function through those imports (an
exported library links them all into one shared object)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import tvm
from tvm import relax
from tvm.relax import vm_build

from . import _threads
from .pipeline import PIPELINE
from .target import on_host


def parts(tir_mod, count: int) -> list[tvm.IRModule]:
    """``tir_mod``'s functions dealt round-robin into at most ``count`` modules (in name
    order: a model's kernels and its small ops interleave, so each part gets a share of both)."""
    funcs = sorted(tir_mod.functions.items(), key=lambda gf: gf[0].name_hint)
    groups = [dict(funcs[i::count]) for i in range(min(count, len(funcs)))]
    return [tvm.IRModule(group, attrs=tir_mod.attrs) for group in groups]


def _build_part(part: tvm.IRModule, target, context) -> tvm.runtime.Module:
    with context, target:  # (both are per thread: the worker enters the caller's)
        lib = tvm.tirx.build(part, target=target, pipeline=PIPELINE)
    if on_host(target):  # LLVM generates code on the first lookup: here, on this thread
        lib.get_function(next(iter(part.functions)).name_hint)
    return lib


def build(mod: tvm.IRModule, target, threads: int | None = None) -> relax.VMExecutable:
    """``relax.build`` of a module whose Relax pipeline has run (``mod`` as the pipeline left
    it), with the TIR functions compiled on ``threads`` threads (default: this process's cores).
    Call inside the target's context and the build's PassContext."""
    attrs = dict(mod.attrs) if mod.attrs else {}
    builder = relax.ExecBuilder()
    mod = vm_build._vmcodegen(builder, mod, "bytecode")
    tir_mod = vm_build._filter_tir(mod)
    lib = None
    if tir_mod is not None:
        threads = threads or _threads.cores()
        context = tvm.transform.PassContext.current()
        with ThreadPoolExecutor(threads) as pool:
            libs = list(pool.map(lambda part: _build_part(part, target, context), parts(tir_mod, threads)))
        lib = libs[0]
        for other in libs[1:]:
            lib.import_module(other)
    params = dict(attrs.get("const_name_to_constant", {}))
    return relax.VMExecutable(vm_build._ffi_api.VMLink(builder, target, lib, list(attrs.get("external_mods", [])),
                                                       params))
