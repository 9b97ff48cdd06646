"""Side-by-side comparisons: sparse (our kernels) vs PyTorch dense vs TVM dense."""
from __future__ import annotations

import os
import shlex

import numpy as np

from . import bench
from .layer import SparseLayer


def random_pruned_conv(out_ch, in_ch, k, sparsity, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_ch, in_ch, k, k)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0.0
    return w


def compare_layer(in_ch=64, out_ch=64, size=56, kernel=3, stride=1, padding=1, batch=1, sparsity=0.9,
                  threads=None, seed=0, budget_s=1.0, formats=(("csr", None), ("bsr", (4, 1)), ("bsr", (8, 1))),
                  target=None, with_tvm_dense=True) -> dict:
    """Time one conv layer on every engine; outputs are checked against PyTorch first."""
    import torch
    threads = bench.set_threads(threads)
    w = random_pruned_conv(out_ch, in_ch, kernel, sparsity, seed)
    x = np.random.default_rng(seed + 1).standard_normal((batch, in_ch, size, size)).astype(np.float32)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    ref = torch.nn.functional.conv2d(xt, wt, None, stride, padding).numpy()
    engines = {"pytorch dense": lambda: torch.nn.functional.conv2d(xt, wt, None, stride, padding)}
    outputs = {"pytorch dense": ref}
    for fmt, block in formats:
        layer = SparseLayer("conv2d", w, x.shape, None, fmt, block, None, target, stride, padding)
        name = f"tvm sparse {fmt}" + (f" {block[0]}x{block[1]}" if block else "")
        engines[name] = layer.runner(x)
        outputs[name] = layer(x)
    if with_tvm_dense:
        from .importer import LayerReport
        spec = LayerReport("conv", "conv2d", w.shape, 0.0, "dense", False, x_shape=x.shape, weight=w,
                           conv_args={"stride": (stride, stride), "padding": (padding,) * 4, "dilation": (1, 1),
                                      "groups": 1})
        dense = _tvm_dense_layer(spec, layer.target, None)  # our dense kernel, default schedule
        engines["tvm dense (ours)"] = dense.runner(x)
        outputs["tvm dense (ours)"] = dense(x)
    for name, out in outputs.items():
        bench.check_close(name, out, ref)
    rows = []
    for name, t in bench.measure_interleaved(engines, budget_s=budget_s).items():
        rows.append({"engine": name, "median_ms": t.median_ms, "min_ms": t.min_ms, "max_ms": t.max_ms,
                     "runs": t.runs})
    best_dense = min(r["median_ms"] for r in rows if "dense" in r["engine"])
    torch_ms = rows[0]["median_ms"]
    for r in rows:
        r["vs_pytorch"] = torch_ms / r["median_ms"]
        r["vs_best_dense"] = best_dense / r["median_ms"]
    flops = 2.0 * batch * out_ch * ref.shape[2] * ref.shape[3] * in_ch * kernel * kernel
    return {"layer": {"in_ch": in_ch, "out_ch": out_ch, "size": size, "kernel": kernel, "stride": stride,
                      "padding": padding, "batch": batch, "sparsity": sparsity,
                      "actual_sparsity": float(1 - np.count_nonzero(w) / w.size), "dense_gflop": flops / 1e9},
            "machine": bench.machine_info(threads), "rows": rows}


def format_layer_report(result: dict) -> str:
    lay = result["layer"]
    m = result["machine"]
    head = (f"conv {lay['in_ch']}->{lay['out_ch']}, {lay['kernel']}x{lay['kernel']}, stride {lay['stride']}, "
            f"pad {lay['padding']}, {lay['size']}x{lay['size']}, batch {lay['batch']}, "
            f"sparsity {lay['actual_sparsity']:.3f}\n"
            f"{m['cpu']} ({m['isa']}), {m['threads']} threads for every engine; outputs checked equal first\n")
    return head + bench.table(result["rows"], ["engine", "median_ms", "min_ms", "max_ms", "runs",
                                               "vs_pytorch", "vs_best_dense"])


# ----------------------------------------------------------------------------- whole models

ENGINES = ("pytorch", "tvm_dense", "tvm_sparse")


def _torch_layer(layer):
    """PyTorch's dense conv2d / linear for one layer (BatchNorm folded in, as in both TVM modules)."""
    import torch
    import torch.nn.functional as tf
    w = torch.from_numpy(np.ascontiguousarray(layer.weight))
    b = None if layer.bias is None else torch.from_numpy(layer.bias)
    act = {"relu": torch.relu, "relu6": lambda t: t.clamp(0.0, 6.0)}.get(layer.activation, lambda t: t)
    if layer.kind == "linear":
        return lambda x: act(tf.linear(x, w, b))
    a = layer.conv_args
    top, left, bottom, right = a["padding"]
    return lambda x: act(tf.conv2d(tf.pad(x, (left, right, top, bottom)), w, b, a["stride"], 0, a["dilation"],
                                   a["groups"]))


def _tvm_dense_layer(layer, target, db):
    """One layer run dense as the whole dense model runs it: a conv on our dense or depthwise
    kernel, anything else as its own Relax module compiled like the model (same fused workload,
    so a model's tuning log applies)."""
    from .layer import DenseConvLayer, relax_layer_module
    from .runtime import CompiledModel, compile_module
    a = layer.conv_args
    if layer.kind == "conv2d" and (a["groups"] == 1 or (a["groups"] == layer.x_shape[1] and layer.weight.shape[1] == 1)):
        return DenseConvLayer(layer.weight, layer.x_shape, layer.bias, layer.activation, target, a["stride"],
                              a["padding"], a["dilation"], a["groups"])
    module = relax_layer_module(layer.x_shape, layer.kind, layer.weight, layer.bias, layer.activation, a)
    return CompiledModel(compile_module(module, target, db), [tuple(layer.x_shape)])


def _checked(fns: dict, ref, check, engines) -> dict:
    """Check every engine's output against ``ref``; returns name -> the callable to time."""
    fns = {name: fn for name, fn in fns.items() if name in engines}
    for name, (run, output) in fns.items():
        check(name, output(), ref)
    return {name: run for name, (run, _) in fns.items()}


# End to end, each engine gets E2E_ROUNDS rounds of ``budget_s``. On the shared 2-vCPU machine
# each engine has slow spells of 5-30 s, rarely together (TVM sparse ResNet-50: 21 or 37 ms;
# PyTorch's: 63 or 95-115 ms; both threads busy, no steal time seen by the guest): a few seconds
# of timing fall in one spell and the ratio swings with it; 20 rounds (30 s for three engines
# at 0.5 s) span several.
E2E_ROUNDS = 20


def compare_model(model_name="vgg16_cifar", program=None, input_size=None, sparsities=(0.9,), fmt="auto",
                  block=None, prune_mode="layer", tuning_log=None, trials=0, batch=1, threads=None,
                  budget_s=0.5, threshold=0.5, target=None, per_layer=True, progress=None,
                  check=bench.check_close, engines=ENGINES, measure=True) -> dict:
    """Prune (zoo models), import, tune or load logs, check, and time PyTorch dense, TVM dense
    and TVM sparse, end to end and per conv/linear layer, at each sparsity. ``engines`` can
    drop "tvm_dense" (e.g. when it is untuned and would only take time)."""
    import torch

    from . import import_torch, prune, tuning, zoo
    from .records import resolve_database
    from .runtime import compile as build
    from .target import resolve_target
    from .torch_export import load_program
    threads = bench.set_threads(threads)
    given_target, target = target, resolve_target(target)
    say = (lambda *a: print(*a, file=progress, flush=True)) if progress else (lambda *a: None)
    if program is None and model_name not in zoo.MODELS:
        raise ValueError(f"unknown model {model_name!r}; known models: {', '.join(sorted(zoo.MODELS))}")
    for s in sparsities:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"sparsity must be in [0, 1], got {s}")
    if tuning_log is not None and trials == 0 and not os.path.isdir(tuning_log):
        raise FileNotFoundError(f"tuning log {tuning_log} is not a directory written by a tuning job")
    name = os.path.splitext(os.path.basename(program))[0] if program else \
        model_name + (f"_{input_size}" if input_size else "")
    log_dir = tuning_log or (os.path.join("tuning_logs", f"{name}_b{batch}") if trials else None)
    result = {"model": name, "batch": batch, "fmt": fmt, "block": block, "prune": prune_mode, "trials": trials,
              "tuning_log": log_dir, "machine": bench.machine_info(threads), "points": []}
    # `fscnn-tvm tune` builds zoo models at their own input size only.
    zoo_size = program is None and input_size in (None, zoo.MODELS[model_name].input_shape[-1])
    if program is not None:  # used as it is (static shapes, so its own example shapes) at every level
        exported = load_program(program)
        gen = torch.Generator().manual_seed(0)
        example = tuple(torch.randn(t.shape, generator=gen) for t in exported.example_inputs[0])
    for sparsity in sparsities:
        if program is not None:
            model, source = exported.module(), exported
        else:  # a fresh model per level: pruning works in place
            model, shape = zoo.get_model(model_name, **({"input_size": input_size} if input_size else {}))
            example, source = (zoo.example_input(shape, batch),), model
            if sparsity > 0:
                prune.prune_model(model, sparsity, prune_mode, block)
        say(f"== sparsity {sparsity:.2f}: importing")
        sparse_imp = import_torch(source, example, threshold, fmt, block, target, measure=measure)
        dense_imp = import_torch(source, example, target=target, sparse=False)
        if trials:
            say(f"   tuning dense ({trials} trials) and sparse ({trials} trials) into {log_dir}")
            tuning.tune(dense_imp, trials=trials, log_dir=log_dir, progress=progress)
            if sparse_imp.kernels:
                tuning.tune(sparse_imp, trials=trials, log_dir=log_dir, dense=False, progress=progress)
        db, result["tuning_log"] = resolve_database(log_dir, target)
        sparse_mod = build(sparse_imp, tuning_log=log_dir, tune_command=tune_command(
            model_name if zoo_size else None, program, sparsity, prune_mode, block, fmt, threshold, batch, measure,
            given_target if isinstance(given_target, str) else None))
        fns = {"pytorch": (lambda: model(*example), lambda: _first_output(model(*example)).numpy()),
               "tvm_sparse": (sparse_mod.runner(*example), lambda: _first_output(sparse_mod(*example)))}
        if "tvm_dense" in engines:
            # One warning per model, the sparse import's: this one's kernels of ours are at most grouped convs.
            dense_mod = build(dense_imp, tuning_log=log_dir, warn_untuned=False)
            fns["tvm_dense"] = (dense_mod.runner(*example), lambda: _first_output(dense_mod(*example)))
        with torch.no_grad():
            ref = model(*example)
        ref = _first_output(ref).numpy()
        say("   timing end to end")
        with torch.no_grad():
            e2e = bench.measure_interleaved(_checked(fns, ref, check, engines), rounds=E2E_ROUNDS,
                                            budget_s=budget_s * E2E_ROUNDS, min_runs=E2E_ROUNDS)
        point = {"sparsity": sparsity, "model_sparsity": float(prune.model_sparsity(model)) if program is None else None,
                 "end_to_end": _with_rates(_row(e2e), batch), "layers": [], "report": [_report_row(r) for r in sparse_imp.report]}
        if per_layer:
            say("   timing each conv/linear layer")
            point["layers"] = _per_layer(sparse_imp, dense_imp, target, db, budget_s, check, engines)
        result["points"].append(point)
    _break_even(result)
    return result


def tune_command(model_name, program=None, sparsity=0.9, prune_mode="layer", block=None, fmt="auto", threshold=0.5,
                 batch=1, measure=True, target=None):
    """The ``fscnn-tvm tune`` command line that tunes the sparse kernels of a zoo model (or a
    saved program) pruned and imported as given, and how to apply its log; None when the
    command line cannot build that model (``model_name`` None: e.g. VGG16 at another input size)."""
    if program is None and model_name is None:
        return None
    if program is not None:  # used as it is: no pruning, its own batch
        name, args, options = os.path.splitext(os.path.basename(program))[0], ["--program", program], []
    else:
        name, args = f"{model_name}_s{round(sparsity * 100)}", ["--model", model_name, "--sparsity", f"{sparsity:g}"]
        options = [("--prune", prune_mode, "layer"), ("--batch", batch, 1)]
    options += [("--block", block and "x".join(map(str, block)), None), ("--fmt", fmt, "auto"),
                ("--threshold", threshold, 0.5), ("--target", target, None)]
    args += [str(v) for flag, value, default in options if value != default for v in (flag, value)]
    args += [] if measure else ["--no-measure"]
    log_dir = os.path.join("tuning_logs", name)
    return f"{shlex.join(['fscnn-tvm', 'tune', *args, '--log', log_dir])}, then add --tuning-log {log_dir}"


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _report_row(r):
    return {"layer": r.name, "kind": r.kind, "shape": list(r.weight_shape), "sparsity": r.sparsity,
            "format": r.fmt, "sparse": r.rewritten, "reason": r.reason}


def _row(timings: dict) -> dict:
    row = {f"{e}_ms": t.median_ms for e, t in timings.items()}
    row.update({f"{e}_min_ms": t.min_ms for e, t in timings.items()})
    row.update({f"{e}_max_ms": t.max_ms for e, t in timings.items()})
    best_dense = min(t.median_ms for e, t in timings.items() if e != "tvm_sparse")
    row["best_dense_ms"] = best_dense
    row["speedup"] = best_dense / row["tvm_sparse_ms"]
    return row


def _with_rates(row: dict, batch: int) -> dict:
    """``row`` with images per second beside the sparse and best dense times."""
    row["sparse_images_per_s"] = batch * 1e3 / row["tvm_sparse_ms"]
    row["best_dense_images_per_s"] = batch * 1e3 / row["best_dense_ms"]
    return row


def _per_layer(sparse_imp, dense_imp, target, db, budget_s, check, engines):
    """Every conv/linear layer on every engine. All layers are timed in the same alternating
    rounds, so each layer's median spans the whole group's time (minutes) instead of its own
    second or two, which one of the machine's slow spells could fill."""
    import torch

    from .layer import SparseLayer
    sparse_rows = {r.name: r for r in sparse_imp.report}
    rows, runs = [], {}
    for layer in dense_imp.report:
        if layer.weight is None:
            continue  # weight is a graph input: nothing to compare per layer
        x = np.random.default_rng(0).standard_normal(layer.x_shape).astype(np.float32)
        xt = torch.from_numpy(x)
        torch_fn = _torch_layer(layer)
        with torch.no_grad():
            ref = torch_fn(xt).numpy()
        sp = sparse_rows.get(layer.name)
        rewritten = sp is not None and sp.rewritten
        dense = _tvm_dense_layer(layer, target, db) if "tvm_dense" in engines or not rewritten else None
        if rewritten:
            fmt_name = sp.fmt.split()[0]
            sparse = SparseLayer(layer.kind, sp.weight, layer.x_shape, sp.bias, fmt_name, sp.block, sp.activation,
                                 target, tuning_db=db, **{k: v for k, v in sp.conv_args.items()})
            sparse_fns = (sparse.runner(x), lambda s=sparse: s(x))
        else:
            sparse_fns = (dense.runner(x), lambda d=dense: d(x))
        checked = _checked({"pytorch": (lambda f=torch_fn, t=xt: f(t), lambda: torch_fn(xt).numpy()),
                            "tvm_dense": (dense and dense.runner(x), lambda d=dense: d(x)),
                            "tvm_sparse": sparse_fns}, ref, check, engines)
        runs.update({(len(rows), engine): run for engine, run in checked.items()})
        rows.append({"layer": layer.name, "kind": layer.kind, "shape": "x".join(map(str, layer.weight_shape)),
                     "input": "x".join(map(str, layer.x_shape)), "sparsity": round(float(sp.sparsity if sp else 0.0), 3),
                     "format": sp.fmt if sp else "dense", "stride": list(layer.conv_args.get("stride", (1, 1)))})
    with torch.no_grad():
        timings = bench.measure_interleaved(runs, budget_s=budget_s, min_runs=5)
    for i, row in enumerate(rows):
        row.update(_row({engine: t for (j, engine), t in timings.items() if j == i}))
    return rows


def _break_even(result):
    """Lowest sparsity at which sparse beats the best dense, per layer and end to end."""
    points = sorted(result["points"], key=lambda p: p["sparsity"])
    wins = [p["sparsity"] for p in points if p["end_to_end"]["speedup"] > 1.0]
    result["break_even_end_to_end"] = min(wins) if wins else None
    per_layer = {}
    for p in points:
        for row in p["layers"]:
            per_layer.setdefault(row["layer"], None)
            # A layer left dense runs the same code in both modules: no break-even to report.
            if per_layer[row["layer"]] is None and row["format"] != "dense" and row["speedup"] > 1.0:
                per_layer[row["layer"]] = p["sparsity"]
    result["break_even_per_layer"] = per_layer


LAYER_COLUMNS = ["layer", "shape", "sparsity", "format", "pytorch_ms", "tvm_dense_ms", "tvm_sparse_ms", "speedup"]


def format_model_report(result: dict) -> str:
    m = result["machine"]
    lines = [f"{result['model']}, batch {result['batch']}, {m['cpu']} ({m['isa']}), {m['threads']} threads for "
             f"every engine, schedules: {result['tuning_log']}",
             "speedup = best dense (min of PyTorch, TVM dense) / TVM sparse; outputs checked equal first", ""]
    e2e = [{"sparsity": p["sparsity"], **p["end_to_end"]} for p in result["points"]]
    lines.append("End to end")
    lines.append(bench.table(e2e, ["sparsity", "pytorch_ms", "tvm_dense_ms", "tvm_sparse_ms", "speedup",
                                   "sparse_images_per_s", "best_dense_images_per_s"]))
    for p in result["points"]:
        if p["layers"]:
            lines += ["", f"Per layer at sparsity {p['sparsity']:.2f}", bench.table(p["layers"], LAYER_COLUMNS)]
    lines += ["", f"break-even sparsity end to end: {result['break_even_end_to_end']}"]
    if result["break_even_per_layer"]:
        lines.append("break-even sparsity per layer: " + ", ".join(
            f"{k}={v}" for k, v in result["break_even_per_layer"].items()))
    return "\n".join(lines)


def markdown_report(result: dict) -> str:
    m = result["machine"]
    parts = [f"# {result['model']}: sparse vs dense", "",
             f"{m['cpu']} ({m['isa']}, {m['cores']} cores), {m['threads']} threads for every engine, "
             f"TVM {m['tvm']}, PyTorch {m['torch']}, batch {result['batch']}, "
             f"schedules: {result['tuning_log']}.",
             "Speedup = best dense (min of PyTorch, TVM dense) / TVM sparse. Medians; outputs checked equal first.",
             "", "## End to end", "",
             bench.markdown_table([{"sparsity": p["sparsity"], **p["end_to_end"]} for p in result["points"]],
                      ["sparsity", "pytorch_ms", "tvm_dense_ms", "tvm_sparse_ms", "speedup"]),
             "", f"Break-even sparsity end to end: {result['break_even_end_to_end']}"]
    for p in result["points"]:
        if p["layers"]:
            parts += ["", f"## Per layer at sparsity {p['sparsity']:.2f}", "", bench.markdown_table(p["layers"], LAYER_COLUMNS)]
    return "\n".join(parts) + "\n"


def plot(result: dict, path: str):
    """Speedup over the best dense vs sparsity: one line per layer group (same weight shape),
    one for end to end, and the 1x line; with one sparsity, one bar per layer and end to end.
    Returns the (closed) figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    points = sorted(result["points"], key=lambda p: p["sparsity"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if len(points) == 1:  # lines over one x value would be a column of dots
        _layer_bars(ax, points[0])
    else:
        _group_lines(ax, points, plt)
    ax.axhline(1.0, color="red", linestyle="--", linewidth=1, label="1x (best dense)")
    ax.set_ylabel("speedup over best dense")
    ax.set_yscale("log")
    ax.set_title(f"{result['model']}: TVM sparse vs best dense ({result['machine']['threads']} threads)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def _group_lines(ax, points, plt):
    ax.set_prop_cycle(color=plt.cm.tab20(np.linspace(0, 1, 20)))  # more groups than tab10 has colours
    groups: dict = {}
    for p in points:
        for row in p["layers"]:
            groups.setdefault(f"{row['kind']} {row['shape']}", {}).setdefault(p["sparsity"], []).append(row["speedup"])
    for label, by_s in groups.items():
        sx = sorted(by_s)
        ax.plot(sx, [float(np.exp(np.mean(np.log(by_s[s])))) for s in sx], marker=".", linewidth=1, alpha=0.7,
                label=label)
    ax.plot([p["sparsity"] for p in points], [p["end_to_end"]["speedup"] for p in points], marker="o",
            color="black", linewidth=2.5, label="end to end")
    ax.set_xlabel("sparsity")


def _layer_bars(ax, point):
    rows = point["layers"]
    labels = [r["layer"] for r in rows] + ["end to end"]
    colors = ["tab:blue" if r["format"] != "dense" else "tab:gray" for r in rows] + ["black"]
    speedups = [r["speedup"] for r in rows] + [point["end_to_end"]["speedup"]]
    # From the 1x line: a win rises above it, a loss hangs below it.
    ax.bar(range(len(labels)), [s - 1.0 for s in speedups], bottom=1.0, color=colors)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=6)
    ax.set_xlabel(f"layer at sparsity {point['sparsity']:.2f} (grey: left dense)")
