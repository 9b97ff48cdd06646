"""Compiled models: build an imported Relax module, run it on numpy/torch inputs, export it
to a shared library and load it back (loading needs TVM and numpy only, not torch)."""
from __future__ import annotations

import json
import os

import numpy as np
import tvm
from tvm import relax

from .target import resolve_target


class CompiledModel:
    """Callable on numpy arrays or torch tensors; returns numpy (a tuple for several outputs)."""

    def __init__(self, executable, input_shapes=None):
        self.executable = executable
        self.vm = relax.VirtualMachine(executable, tvm.cpu())
        self.input_shapes = input_shapes

    def _inputs(self, inputs):
        arrays = []
        for i, x in enumerate(inputs):
            if hasattr(x, "detach"):
                x = x.detach().cpu().numpy()
            x = np.ascontiguousarray(x, dtype=np.float32)
            if self.input_shapes and i < len(self.input_shapes) and tuple(x.shape) != tuple(self.input_shapes[i]):
                raise ValueError(f"input {i}: shape {x.shape}, but the model was compiled for "
                                 f"{tuple(self.input_shapes[i])}")
            arrays.append(tvm.runtime.tensor(x))
        if self.input_shapes and len(arrays) != len(self.input_shapes):
            raise ValueError(f"expected {len(self.input_shapes)} input(s), got {len(arrays)}")
        return arrays

    def runner(self, *inputs):
        """A no-argument callable running the model on ``inputs`` (converted once), for timing."""
        args = self._inputs(inputs)
        return lambda: self.vm["main"](*args)

    def __call__(self, *inputs):
        return _to_numpy(self.vm["main"](*self._inputs(inputs)))

    def export_library(self, path):
        """Write a shared library; ``fscnn_tvm.load(path)`` runs it without torch."""
        self.executable.export_library(str(path))
        if self.input_shapes:
            with open(_shapes_path(path), "w") as f:
                json.dump([list(s) for s in self.input_shapes], f)


def _shapes_path(path):
    return str(path) + ".inputs"


def _to_numpy(result):
    if isinstance(result, tvm.runtime.Tensor):
        return result.numpy()
    outs = tuple(_to_numpy(r) for r in result)
    return outs[0] if len(outs) == 1 else outs


def compile(imported, target=None, tuning_log=None) -> CompiledModel:  # noqa: A001 - the public name
    """Build an ``ImportedModel`` for the target it was imported for (or ``target``)."""
    if tuning_log is not None:
        raise NotImplementedError("tuning_log: applying tuning records is not implemented yet "
                                  "(the autotuning issue); compile without it to use default schedules")
    target = resolve_target(target) if target is not None else imported.target
    return CompiledModel(tvm.compile(imported.mod, target=target), imported.input_shapes)


def load(path) -> CompiledModel:
    """Load a library written by ``CompiledModel.export_library``."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    try:
        lib = tvm.runtime.load_module(path)
    except Exception as err:
        raise ValueError(f"{path} is not a compiled fscnn-tvm library ({str(err).splitlines()[0]})") from None
    shapes = None
    if os.path.exists(_shapes_path(path)):
        with open(_shapes_path(path)) as f:
            shapes = [tuple(s) for s in json.load(f)]
    return CompiledModel(lib, shapes)
