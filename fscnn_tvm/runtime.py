"""Compiled models: build an imported Relax module, run it on numpy/torch inputs, export it
to a shared library and load it back (loading needs TVM and numpy only, not torch)."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time

import numpy as np
import tvm
from tvm import relax

from . import unscheduled, vmbuild
from .records import resolve_database, schedule_kernels, sparse_kernels
from .target import resolve_target
from .tuning_log import open_database

log = logging.getLogger("fscnn_tvm")


class CompiledModel:
    """Callable on numpy arrays or torch tensors; returns numpy (a tuple for several outputs)."""

    def __init__(self, executable, input_shapes=None, batch_range=None):
        self.executable = executable
        # A dynamic-batch model: each input's batch dimension is None, any batch in batch_range.
        self.input_shapes = input_shapes
        self.batch_range = None if batch_range is None else tuple(int(b) for b in batch_range)
        # A VM keeps the registers of the call in progress in the VM object itself: two threads
        # calling one VM corrupt each other's frames (register-file check failures, then a
        # segfault). Each thread gets its own VM, made on its first call, so calls from several
        # threads run concurrently.
        self._local = threading.local()
        self._main()  # a module that is not a Relax executable fails here, not on the first call

    def _main(self):
        """The calling thread's entry function."""
        local = self._local
        if not hasattr(local, "main"):
            local.vm = relax.VirtualMachine(self.executable, tvm.cpu())
            local.main = local.vm["main"]
        return local.main

    def _inputs(self, inputs):
        arrays = []
        for i, x in enumerate(inputs):
            if hasattr(x, "detach"):
                x = x.detach().cpu().numpy()
            x = np.ascontiguousarray(x, dtype=np.float32)
            if self.input_shapes and i < len(self.input_shapes):
                self._check_shape(i, x.shape, self.input_shapes[i])
            arrays.append(tvm.runtime.tensor(x))
        if self.input_shapes and len(arrays) != len(self.input_shapes):
            raise ValueError(f"expected {len(self.input_shapes)} input(s), got {len(arrays)}")
        batches = {int(a.shape[0]) for a, s in zip(arrays, self.input_shapes or []) if s and s[0] is None}
        if len(batches) > 1:
            raise ValueError(f"inputs: every input's batch dimension must be the same, got {sorted(batches)}")
        return arrays

    def _check_shape(self, i, shape, expected):
        shape, expected = tuple(shape), tuple(expected)
        if not expected or expected[0] is not None:
            if shape != expected:
                raise ValueError(f"input {i}: shape {shape}, but the model was compiled for {expected}")
            return
        lo, hi = self.batch_range
        if len(shape) != len(expected) or shape[1:] != expected[1:]:
            raise ValueError(f"input {i}: shape {shape}, but the model was compiled for (batch, "
                             f"{', '.join(map(str, expected[1:]))}) with a batch of {lo} to {hi}")
        if not lo <= shape[0] <= hi:
            raise ValueError(f"input {i}: batch {shape[0]} is outside the range the model was compiled for "
                             f"({lo} to {hi}); import it with dynamic_batch=({min(lo, shape[0])}, "
                             f"{max(hi, shape[0])})")

    def runner(self, *inputs):
        """A no-argument callable running the model on ``inputs`` (converted once), for timing;
        it runs on the VM of the thread that calls it."""
        args = self._inputs(inputs)
        return lambda: self._main()(*args)

    def profile(self, *inputs, runs: int = 5, warmup: int = 2) -> list[tuple[str, float, float]]:
        """Where a call's time goes: (function, calls per run, ms per run) for every function the
        VM calls (our kernels, TVM's functions, the VM's builtins), slowest first, each timed
        without the functions it calls in turn (a batch's chunk function without its kernels),
        so the times add up to the call. Timed on a VM of its own through its instrument hook,
        which adds a few microseconds per call."""
        if isinstance(runs, bool) or not isinstance(runs, int) or runs < 1:
            raise ValueError(f"runs: must be a positive int, got {runs!r}")
        args = self._inputs(inputs)
        vm = relax.VirtualMachine(self.executable, tvm.cpu())
        main = vm["main"]
        for _ in range(max(1, warmup)):  # (the first call also checks the inputs)
            _checked_call(main, args)
        own, calls, stack = {}, {}, []  # stack: [name, start, time spent in callees]

        def instrument(func, name, before_run, ret_value, *call_args):
            now = time.perf_counter()
            if before_run:
                stack.append([name, now, 0.0])
                return
            name, start, inner = stack.pop()
            if stack:
                stack[-1][2] += now - start
            own[name] = own.get(name, 0.0) + now - start - inner
            calls[name] = calls.get(name, 0) + 1

        vm.set_instrument(instrument)
        for _ in range(runs):
            main(*args)
        rows = [(name, calls[name] / runs, own[name] * 1e3 / runs) for name in own]
        return sorted(rows, key=lambda row: -row[2])

    def __call__(self, *inputs):
        args = self._inputs(inputs)
        return _to_numpy(_checked_call(self._main(), args))

    def export_library(self, path):
        """Write a shared library; ``fscnn_tvm.load(path)`` runs it without torch. Beside it,
        ``path + ".inputs"`` holds the input shapes and the library's sha256, which ``load``
        checks: a truncated library would otherwise kill the loading process (SIGBUS)."""
        path = str(path)
        if not path.endswith(".so"):
            raise ValueError(f"export_library: {path} must end in .so (a shared library is what load() reads)")
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"export_library: directory {directory} does not exist")
        # Both files go to temporary names first and the library is renamed last: a failed
        # export leaves no library, and an earlier export stays whole until the new one is.
        if not os.access(directory, os.W_OK):
            raise PermissionError(f"export_library: directory {directory} is not writable")
        lib_tmp = os.path.join(directory, f".{os.path.basename(path)[:-3]}.{os.getpid()}-{threading.get_ident()}.so")
        side_tmp = lib_tmp + ".inputs"
        try:
            self.executable.export_library(lib_tmp)
            with open(side_tmp, "w") as f:
                json.dump({"input_shapes": [list(s) for s in self.input_shapes] if self.input_shapes else None,
                           "batch_range": list(self.batch_range) if self.batch_range else None,
                           "sha256": _sha256(lib_tmp)}, f)
            os.replace(side_tmp, _sidecar_path(path))
            os.replace(lib_tmp, path)
        finally:
            for leftover in (lib_tmp, side_tmp):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(leftover)


def _checked_call(main, args):
    try:
        return main(*args)
    except Exception as err:  # noqa: BLE001 - only the VM's input checks are translated
        raise _input_error(err, args) or err


def _input_error(err, args):
    """A ValueError for the VM's own input checks (a library loaded without its sidecar has no
    shapes to check against beforehand), or None for any other error."""
    text = str(err)
    found = re.search(r"loc=param\[(\d+)\], param=(\w+), annotation=R\.Tensor\(\(([^)]*)\)", text)
    if "match_cast error" in text and found and int(found.group(1)) < len(args):
        index, name, shape = int(found.group(1)), found.group(2), found.group(3)
        return ValueError(f"input {index} ('{name}'): shape {tuple(args[index].shape)}, but the model was "
                          f"compiled for ({shape})")
    found = re.search(r"expects (\d+) arguments", text)
    if found:
        return ValueError(f"expected {found.group(1)} input(s), got {len(args)}")
    return None


def _sidecar_path(path):
    return str(path) + ".inputs"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_sidecar(path):
    """(input shapes or None, batch range or None, sha256 or None) from a library's sidecar;
    older exports wrote only the list of shapes."""
    sidecar = _sidecar_path(path)
    if not os.path.exists(sidecar):
        return None, None, None
    try:
        with open(sidecar) as f:
            meta = json.load(f)
        if isinstance(meta, list):
            meta = {"input_shapes": meta}
        shapes, batch_range, digest = meta.get("input_shapes"), meta.get("batch_range"), meta.get("sha256")
        shapes = None if shapes is None else [tuple(None if n is None else int(n) for n in s) for s in shapes]
        if any(s and s[0] is None for s in shapes or []) != (batch_range is not None):
            raise ValueError("a dynamic batch dimension needs a batch range, and a batch range one")
        batch_range = None if batch_range is None else tuple(int(b) for b in batch_range)
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{sidecar} (the input shapes and checksum of {path}) is damaged ({err}); re-export the "
                         f"library, or delete this file to load it unchecked") from None
    return shapes, batch_range, digest


def _to_numpy(result):
    if isinstance(result, tvm.runtime.Tensor):
        return result.numpy()
    outs = tuple(_to_numpy(r) for r in result)
    return outs[0] if len(outs) == 1 else outs


def compile(imported, target=None, tuning_log=None, use_shipped=True, tune_command=None,  # noqa: A001
            warn_untuned=True) -> CompiledModel:
    """Build an ``ImportedModel`` for the target it was imported for (or ``target``). With
    ``tuning_log`` (a directory written by ``fscnn_tvm.tune``, or an open database) the best
    records are applied to the sparse kernels and the dense ops; without one, the records
    shipped in the package for this CPU are used (``use_shipped=False``: none). What has no
    record keeps its default schedule, with one warning naming the sparse kernels concerned
    and how to tune them: ``tune_command`` (e.g. the ``fscnn-tvm tune`` command line of a zoo
    model), else the Python calls. ``warn_untuned=False``: no warning (for a caller that warned
    about the same kernels already, e.g. in the sparse import of the same model)."""
    target = resolve_target(target) if target is not None else imported.target
    looked_up = tuning_log is not None or use_shipped  # else no record was wanted: nothing to warn about
    db, label = resolve_database(tuning_log, target) if looked_up else (None, "")
    mod, untuned = schedule_kernels(imported, db)
    sparse = sparse_kernels(imported)
    missing = [name for name in untuned if name in sparse]
    if warn_untuned and looked_up and missing:
        where = label if tuning_log is not None else "the schedules shipped for this CPU"
        log.warning("%d of %d sparse kernels have no tuned record in %s and run their default schedule: %s%s. "
                    "Tune them with: %s", len(missing), len(sparse), where,
                    ", ".join(missing[:5]), ", ..." if len(missing) > 5 else "",
                    tune_command or _python_tune_command(len(missing)))
    return CompiledModel(compile_module(mod, target, db), imported.input_shapes, imported.batch_range)


def _python_tune_command(kernels: int) -> str:
    log_dir = "tuning_logs/my_model"
    return (f"fscnn_tvm.tune(imported, trials={max(64, 32 * kernels)}, log_dir={log_dir!r}), then "
            f"fscnn_tvm.compile(imported, tuning_log={log_dir!r})")


def compile_module(mod, target, tuning_log=None):
    """Build a Relax module; with a tuning log (a directory or an open database) its records
    are applied to the dense ops. Operators no record schedules are parallelised (below); the
    TIR functions compile on every core (``vmbuild``)."""
    from tvm.relax.backend.cpu_generic import pipeline as passes  # (its __init__ omits one of the four)
    from tvm.relax.transform import MetaScheduleApplyDatabase

    db = open_database(str(tuning_log)) if isinstance(tuning_log, (str, os.PathLike)) else tuning_log

    # TVM's own CPU pipeline plus the two steps of meta_schedule's compile_relax: fuse exactly
    # as tuning's task extraction did (so records match), then apply the records.
    with target, (db if db is not None else contextlib.nullcontext()), tvm.transform.PassContext(opt_level=3):
        mod = tvm.transform.Sequential(passes.library_dispatch_passes(target)
                                       + passes.legalize_passes(target))(mod)
        if db is not None:
            mod = MetaScheduleApplyDatabase()(mod)
        mod = unscheduled.parallelize(mod, target)
        mod = tvm.transform.Sequential(passes.dataflow_lower_passes(target)
                                       + passes.finalize_passes(target))(mod)
        return vmbuild.build(mod, target)


def load(path) -> CompiledModel:
    """Load a library written by ``CompiledModel.export_library``, checked against the sha256
    written beside it (a library exported without one loads unchecked)."""
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    shapes, batch_range, digest = _read_sidecar(path)
    if digest is not None and _sha256(path) != digest:
        raise ValueError(f"{path} is damaged or changed since export (its sha256 differs from the one in "
                         f"{_sidecar_path(path)}); re-export it")
    try:
        lib = tvm.runtime.load_module(path)
    except Exception as err:
        raise ValueError(f"{path} is not a compiled fscnn-tvm library ({str(err).splitlines()[0]})") from None
    return CompiledModel(lib, shapes, batch_range)
