"""The PyTorch side of an import: ``torch.export`` of a module (or a saved program) with errors
that say what failed, the float32-only check, and the layer names for the report."""
from __future__ import annotations

import os


def export_torch(model, example_inputs, batch_range=None):
    """``torch.export`` with errors that say what failed; with ``batch_range`` (lo, hi), the
    first dimension of every input is one symbolic batch dimension in that range."""
    import torch
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise TypeError("example_inputs: a torch.nn.Module is traced on example inputs; pass a tensor or a tuple "
                        "of tensors (or pass a torch.export.ExportedProgram instead of the module)")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs \
            or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError(f"example_inputs: expected a tensor or a tuple of tensors, got {example_inputs!r:.80}")
    example_inputs = tuple(example_inputs)
    dynamic_shapes = None
    if batch_range is not None:
        example_inputs, dynamic_shapes = _dynamic_batch(example_inputs, batch_range)
    # Traced in eval mode (BatchNorm on running statistics, dropout off: inference), then each
    # module's own flag is put back: the model is the user's, and may be training.
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            with torch.no_grad():
                model(*example_inputs)
        except Exception as err:
            shapes = [tuple(t.shape) for t in example_inputs]
            raise ValueError(f"the model does not run on example inputs of shape {shapes}: "
                             f"{type(err).__name__}: {err}") from None
        try:
            return torch.export.export(model, example_inputs, dynamic_shapes=dynamic_shapes)
        except Exception as err:
            if dynamic_shapes is not None and "Constraints violated" in str(err):
                raise ValueError("dynamic_batch: the model's forward fixes its batch size (e.g. a reshape to a "
                                 "constant batch, or an op that needs one), so it cannot run every batch in "
                                 f"{batch_range}: {str(err).splitlines()[0]}") from None
            raise ValueError(f"torch.export could not capture the model ({type(err).__name__}): "
                             f"{str(err).splitlines()[0] if str(err) else ''}. Make forward() traceable "
                             "(no data-dependent Python control flow) or export it yourself and pass "
                             "the ExportedProgram") from None
    finally:
        for module, training in modes.items():
            module.training = training


def _dynamic_batch(example_inputs, batch_range):
    """Example inputs for a dynamic-batch export (torch.export specialises a dimension it sees
    as 1: the first sample is repeated to a batch of at least 2) and the shared batch Dim."""
    import torch
    batches = {int(t.shape[0]) for t in example_inputs if t.dim()}
    if len(batches) != 1 or any(t.dim() == 0 for t in example_inputs):
        raise ValueError(f"example_inputs: with dynamic_batch every input's first dimension is the batch, and "
                         f"they must agree; got shapes {[tuple(t.shape) for t in example_inputs]}")
    lo, hi = batch_range
    size = min(max(2, lo), hi)
    examples = tuple(t if t.shape[0] == size else t[:1].expand(size, *t.shape[1:]).contiguous()
                     for t in example_inputs)
    batch = torch.export.Dim("batch", min=lo, max=hi)
    return examples, tuple({0: batch} for _ in examples)


def check_float32(model):
    """Only float32 models import: half-precision weights and quantized modules failed deep in
    torch.export or TVM's frontend, with errors that did not say so."""
    import torch
    if isinstance(model, torch.export.ExportedProgram):
        tensors, modules = {**model.state_dict, **model.constants}.items(), []
    elif isinstance(model, torch.nn.Module):
        tensors, modules = [*model.named_parameters(), *model.named_buffers()], model.named_modules()
    else:
        return  # export_torch names a model of the wrong type
    quantized = [name or "the model itself" for name, m in modules
                 if type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))]
    if quantized:
        raise ValueError(f"model: quantized modules ({', '.join(quantized[:3])}) are not supported; fscnn-tvm runs "
                         "float32 models and gets its speed from sparsity: prune the float model instead of "
                         "quantizing it")
    other = {name: t.dtype for name, t in tensors
             if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32}
    if other:
        name, dtype = next(iter(other.items()))
        raise ValueError(f"model: only float32 models are supported, {name} is {dtype} ({len(other)} tensors "
                         "are not float32); convert the model with model.float() (and its inputs with .float())")


def load_program(path):
    """A saved ``torch.export`` program (.pt2)."""
    import torch
    if not os.path.exists(path):
        raise FileNotFoundError(f"program: {path} does not exist")
    try:
        return torch.export.load(path)
    except Exception as err:
        raise ValueError(f"program: {path} is not a torch.export program saved with torch.export.save "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None


def layer_names(program) -> list[str]:
    """Module paths of conv/linear weights in graph order, to name report rows."""
    params = program.graph_signature.inputs_to_parameters
    names = []
    for node in program.graph.nodes:
        if node.op == "call_function" and any(k in str(node.target) for k in ("conv2d", "linear")):
            w = node.args[1] if len(node.args) > 1 else None
            label = params.get(getattr(w, "name", ""), getattr(w, "name", str(node.name)))
            names.append(label.removesuffix(".weight"))
    return names
