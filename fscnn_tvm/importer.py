"""PyTorch model -> Relax -> conv/linear layers rewritten to our kernels.

``torch.export`` then TVM's Relax frontend give one dataflow block of Relax calls. Each layer
*chain* found in it (``chains``: conv2d or linear and the ops folded into it) goes to ``emit``:
one ``call_tir`` of the sparse or dense kernel (bias, residual and activation fused), or dense
Relax ops; a batched model's first layers run depth-first in chunks of images (``chunks``).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import tvm

from . import chunks, pick
from .chains import find_chains, fused_expansions
from .emit import (bias_of, choose_format, conv_args_of, dense_reason, emit_dense, emit_sparse, grouped_kernel,
                   kernel_view, raced_convs, races_csr_when_dense, runs_dense_kernel, static_shape)
from .bench import table
from .torch_export import check_float32, layer_names, export_torch

@dataclass
class LayerReport:
    name: str
    kind: str
    weight_shape: tuple
    sparsity: float
    fmt: str
    rewritten: bool
    reason: str = ""
    fused: list = field(default_factory=list)
    # What it takes to run this layer alone (per-layer timing): BatchNorm already folded in.
    x_shape: tuple = field(default=(), repr=False)
    weight: object = field(default=None, repr=False)
    bias: object = field(default=None, repr=False)
    activation: str | None = field(default=None, repr=False)
    conv_args: dict = field(default_factory=dict, repr=False)  # stride, padding (t, l, b, r), dilation, groups
    block: tuple | None = field(default=None, repr=False)


@dataclass
class ImportedModel:
    mod: object  # tvm.IRModule; our kernels unscheduled (``compile`` schedules them)
    report: list
    input_shapes: list
    num_outputs: int
    target: object
    kernels: dict = field(default_factory=dict)  # function name -> emit.Kernel
    notes: list = field(default_factory=list)  # lines for the report about the import as a whole
    batch_range: tuple | None = None  # (lo, hi) of a dynamic-batch module (input_shapes' batch is None)

    def __str__(self):
        rows = [{"layer": r.name, "kind": r.kind, "shape": "x".join(map(str, r.weight_shape)),
                 "sparsity": r.sparsity, "format": r.fmt if r.rewritten else "dense",
                 "sparse": "yes" if r.rewritten else "no", "fused": "+".join(r.fused),
                 "reason": r.reason} for r in self.report]
        sparse = sum(r.rewritten for r in self.report)
        return (table(rows, ["layer", "kind", "shape", "sparsity", "format", "sparse", "fused", "reason"])
                + f"\n{sparse} of {len(self.report)} conv/linear layers run sparse"
                + "".join(f"\nnote: {n}" for n in self.notes))


def import_torch(model, example_inputs=None, sparsity_threshold=0.5, fmt="auto", block=None,
                 target=None, sparse=True, measure=True, dynamic_batch=None) -> ImportedModel:
    """Import a ``torch.nn.Module`` (with ``example_inputs``) or a ``torch.export``
    ExportedProgram, and rewrite each pruned conv/linear layer to the sparse kernels.
    Convs that stay dense run our dense kernel. ``measure``: a conv at or over the threshold runs
    sparse only if its sparse kernel is faster than the dense one, timed here (when the target is
    this machine; else the threshold alone decides). ``sparse=False`` rewrites nothing (BatchNorm
    is still folded): the dense baseline. ``dynamic_batch=(lo, hi)`` (``True``: (1, 64)): one
    module for every batch size in that range, the batch dimension of every input symbolic (a
    program exported with a dynamic batch dimension of its own keeps it without this)."""
    import torch
    from tvm import relax

    from .target import caches, on_host, resolve_target
    if isinstance(sparsity_threshold, bool) or not isinstance(sparsity_threshold, (int, float)) \
            or not 0.0 <= sparsity_threshold <= 1.0:
        raise ValueError(f"sparsity_threshold: must be a number in [0, 1], got {sparsity_threshold!r}")
    if fmt not in ("auto", "csr", "bsr"):
        raise ValueError(f"fmt: expected 'auto', 'csr' or 'bsr', got {fmt!r}")
    target = resolve_target(target)
    check_float32(model)
    notes = []
    batch_range = batch_range_of(dynamic_batch)
    if isinstance(model, torch.export.ExportedProgram):
        if batch_range is not None:
            raise ValueError("dynamic_batch: a torch.export program's dynamic dimensions are fixed when it is exported; "
                             "export it with dynamic_shapes (dimension 0 a torch.export.Dim) or pass the module")
        program = model
    else:
        program = export_torch(model, example_inputs, batch_range)
        if any(m.training for m in model.modules()):
            notes.append("the model is in training mode: it was imported as in eval mode, BatchNorm folded with its "
                         "running statistics (the model's mode is unchanged)")
    mod = _translate(program)
    main = mod["main"]
    bindings, chains, absorbed = find_chains(main)
    names = layer_names(program)
    segments, traced = [], {}
    if program is not model and batch_range is None:
        def trace(chunk):  # the model traced on one chunk; a model that runs at its batch size only: None
            try:
                return _translate(export_torch(model, tuple(t[:chunk] for t in _as_tuple(example_inputs))))["main"]
            except ValueError:
                return None
        cache = caches(target)
        # (an expansion computed inside the depthwise kernel after it is never a tensor: no cut there)
        inside = {e.last_var for e in fused_expansions(bindings, chains, 0, len(bindings), main.body.body).values()}
        segments, traced = chunks.checked_plan(main, absorbed | inside, cache.l2 * cache.cores, trace, cache.cores)
    if segments:
        notes.append("images run depth-first in chunks: " + ", ".join(
            f"ops {seg.start + 1}-{seg.end + 1} of {len(bindings)} {seg.chunk} at a time" for seg in segments)
            + " (the batch's activations there exceed the L2 caches)")

    if measure and sparse and on_host(target):
        pick.prebuild(_timed_convs(bindings, chains, segments, traced, sparsity_threshold, fmt, block), target)
    # Layers are numbered in graph order (their names and report rows), whichever function emits them.
    layer_index = {i: k for k, i in enumerate(i for i, b in enumerate(bindings) if b.var in chains)}
    rows = {}

    def emit(bindings_, lo, hi, chains_, absorbed_, remap):
        # (pointwise convs computed inside the depthwise kernel after them: emitted with it)
        fusions = fused_expansions(bindings_, chains_, lo, hi, main.body.body)
        inside = {e.last_var for e in fusions.values()}
        position = {b.var: i for i, b in enumerate(bindings_)}
        for i in range(lo, hi):
            b = bindings_[i]
            if b.var in absorbed_ or b.var in inside:
                continue
            if b.var in chains_:
                chain, expansion = chains_[b.var], fusions.get(b.var)
                chain.x = _substitute(chain.x, remap)
                chain.residual = None if chain.residual is None else _substitute(chain.residual, remap)
                chain.head = _substitute(chain.head, remap)
                if expansion is not None:
                    expansion.x = _substitute(expansion.x, remap)
                remap[b.var] = _emit_chain(bb, chain, layer_index[i], names, sparsity_threshold if sparse else None,
                                           fmt, block, target, funcs, kernels, report, measure and on_host(target),
                                           expansion)
                rows[layer_index[i]] = report.pop()
                if expansion is not None:
                    e_index = layer_index[position[expansion.last_var]]
                    rows[e_index] = _expansion_row(expansion, _layer_name(names, e_index, "conv2d"),
                                                   rows[layer_index[i]].name, sparsity_threshold if sparse else None)
            else:
                remap[b.var] = bb.emit(_substitute(b.value, remap))

    bb = relax.BlockBuilder()
    report, funcs, kernels = [], {}, {}
    batch = chunks.batch_of(main.params[0].ty)
    functions = [chunks.segment_function(bb, f"chunk{k}", traced[seg.chunk], seg, find_chains, emit, batch)
                 for k, seg in enumerate(segments)]
    params = [relax.Var(p.name, p.ty) for p in main.params]
    with bb.function("main", params):
        with bb.dataflow():
            remap = dict(zip(main.params, params))
            done = 0
            for seg, func in zip(segments, functions):
                emit(bindings, done, seg.start, chains, absorbed, remap)
                inputs = params if seg.start == 0 else [remap[bindings[seg.start - 1].var]]
                last = bindings[seg.end].var.ty
                remap[bindings[seg.end].var] = chunks.call_in_chunks(bb, func, inputs, seg.chunk, last.shape,
                                                                     str(last.dtype))
                done = seg.end + 1
            emit(bindings, done, len(bindings), chains, absorbed, remap)
            out = bb.emit_output(_substitute(main.body.body, remap))
        bb.emit_func_output(out)
    report = [rows[k] for k in sorted(rows)]
    num_outputs = len(main.ret_ty.fields) if hasattr(main.ret_ty, "fields") else 1
    shapes = [tuple(int(d) if isinstance(d, tvm.tirx.IntImm) else None for d in p.ty.shape) for p in main.params]
    if any(s and s[0] is None for s in shapes) and batch_range is None:  # the program's own dynamic batch
        bounds = [main.attrs[key] if main.attrs is not None and key in main.attrs else {}
                  for key in ("tir_var_lower_bound", "tir_var_upper_bound")]
        name = str(next(p.ty.shape[0] for p in main.params if not isinstance(p.ty.shape[0], tvm.tirx.IntImm)))
        batch_range = (int(bounds[0].get(name, 1)), int(bounds[1].get(name, 2**31 - 1)))
    return ImportedModel(bb.get(), report, shapes, num_outputs, target, kernels, notes, batch_range)


def _translate(program):
    """TVM's Relax module of a torch.export program, with an error that names the frontend."""
    from tvm.relax.frontend.torch import from_exported_program
    try:
        with warnings.catch_warnings():
            # torch's run_decompositions, called by the frontend, deep-copies its tree specs and
            # warns about its own deprecated LeafSpec check on every import.
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning, module="copyreg")
            return from_exported_program(program, keep_params_as_input=False)
    except Exception as err:
        raise ValueError(f"TVM's Relax frontend could not translate the program "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def _as_tuple(example_inputs) -> tuple:
    return (example_inputs,) if hasattr(example_inputs, "shape") else tuple(example_inputs)


def batch_range_of(dynamic_batch) -> tuple | None:
    """(lo, hi) from ``import_torch``'s ``dynamic_batch``, or None."""
    if dynamic_batch is None or dynamic_batch is False:
        return None
    if dynamic_batch is True:
        return 1, 64
    if isinstance(dynamic_batch, (tuple, list)) and len(dynamic_batch) == 2 \
            and all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in dynamic_batch) \
            and 1 <= dynamic_batch[0] < dynamic_batch[1]:
        return int(dynamic_batch[0]), int(dynamic_batch[1])
    raise ValueError(f"dynamic_batch: expected True or (lo, hi) with 1 <= lo < hi (one batch size needs no "
                     f"dynamic batch: import with an example of that size), got {dynamic_batch!r}")


def _timed_convs(bindings, chains, segments, traced, threshold, fmt, block) -> list[tuple]:
    """``emit.raced_convs`` of the chains ``emit`` will emit: ``main``'s outside the segments, and
    each segment's traced program's inside it (their inputs have the chunk's batch)."""
    emitted = [chains[b.var] for i, b in enumerate(bindings)
               if b.var in chains and not any(seg.start <= i <= seg.end for seg in segments)]
    for seg in segments:
        seg_bindings, seg_chains, _ = find_chains(traced[seg.chunk])
        emitted += [seg_chains[b.var] for b in seg_bindings[seg.start:seg.end + 1] if b.var in seg_chains]
    return raced_convs(emitted, threshold, fmt, block)


def _layer_name(names, index, kind) -> str:
    return names[index] if index < len(names) else f"{kind}{index}"


def _expansion_row(chain, name: str, depthwise: str, threshold: float | None) -> LayerReport:
    """The report row of a pointwise conv computed inside a depthwise conv's kernel: sparse
    (its nonzeros only) where pruned over the threshold."""
    sparsity = 1.0 - np.count_nonzero(chain.weight) / chain.weight.size
    sparse = threshold is not None and sparsity >= threshold
    return LayerReport(name, chain.kind, tuple(chain.weight.shape), float(sparsity),
                       f"{'ell' if sparse else 'dense'} (fused)", sparse,
                       f"computed inside the depthwise kernel of {depthwise}", list(chain.fused),
                       static_shape(chain.x), chain.weight, bias_of(chain), chain.activation, conv_args_of(chain))


def _emit_chain(bb, chain, index, names, threshold, fmt, block, target, funcs, kernels, report, measure,
                expansion=None):
    name = _layer_name(names, index, chain.kind)
    shape = tuple(chain.weight.shape) if chain.weight is not None else \
        tuple(int(s) for s in chain.head.args[1].ty.shape)
    sparsity = 1.0 - np.count_nonzero(chain.weight) / chain.weight.size if chain.weight is not None else 0.0
    reason, note = dense_reason(chain, threshold), ""
    if reason is None or (measure and races_csr_when_dense(chain, threshold)):
        layer_fmt, layer_block = choose_format(chain.weight, fmt, block)
        if measure and runs_dense_kernel(chain):
            x_shape, conv_args = kernel_view(chain)
            sparse_ms, dense_ms = pick.time_conv(chain.weight, x_shape, bias_of(chain), chain.activation, layer_fmt,
                                                 layer_block, target, "sparse" if reason is None else "dense",
                                                 **conv_args)
            if reason is None and dense_ms < sparse_ms:
                reason = f"dense kernel faster here: {dense_ms:.3g} ms vs {sparse_ms:.3g} ms sparse"
            elif reason is not None and sparse_ms < dense_ms:
                reason, note = None, f"{reason}, but the CSR kernel is faster here: {sparse_ms:.3g} ms vs " \
                                     f"{dense_ms:.3g} ms dense"
    if reason is None:
        out = emit_sparse(bb, chain, layer_fmt, layer_block, target, funcs, kernels, name)
        label = layer_fmt + (f" {layer_block[0]}x{layer_block[1]}" if layer_block else "")
        shared = next(k.spec for k in kernels.values() if name in k.layers).ell_shape[2]
        label += f" ({shared} channels per row)" if layer_fmt == "csr" and shared > 1 else ""
    else:
        grouped = "tvm"
        if chain.kind == "conv2d" and chain.weight is not None and int(chain.head.attrs.groups) > 1:
            grouped, how = grouped_kernel(chain, target, measure)
            reason += f": {how}" if how else ""
        out = emit_dense(bb, chain, target, funcs, kernels, name, grouped, expansion) if chain.weight is not None \
            else bb.emit(chain.head)
        label, layer_block = "dense", None
    report.append(LayerReport(name, chain.kind, shape, float(sparsity), label, reason is None, reason or note,
                              list(chain.fused), static_shape(chain.x), chain.weight,
                              None if chain.bias is None else np.asarray(chain.bias, np.float32).reshape(-1),
                              chain.activation, conv_args_of(chain), layer_block if reason is None else None))
    return out


def _substitute(expr, remap):
    """``expr`` with its free vars replaced by their re-emitted versions."""
    from tvm import relax

    @relax.expr_functor.mutator
    class Rebind(relax.PyExprMutator):
        def visit_var_(self, var):
            return remap.get(var, var)

        def visit_dataflow_var_(self, var):
            return remap.get(var, var)

    return Rebind().visit_expr(expr)
