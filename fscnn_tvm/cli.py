"""The ``fscnn-tvm`` command line."""
from __future__ import annotations

import argparse
import os
import sys


def _layer(args):
    from . import bench, compare
    result = compare.compare_layer(args.in_ch, args.out_ch, args.size, args.kernel, args.stride, args.padding,
                                   args.batch, args.sparsity, args.threads, budget_s=args.budget,
                                   target=args.target)
    print(compare.format_layer_report(result))
    if args.json:
        bench.dump_json(args.json, result)
        print(f"wrote {args.json}")


def _block(text):
    try:
        bo, bi = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"block must look like 8x1, got {text!r}") from None
    if bo < 1 or bi < 1:
        raise argparse.ArgumentTypeError(f"block sides must be positive, got {text!r}")
    return bo, bi


def load_model(args):
    """(model or ExportedProgram, example inputs, name) from --model/--program, pruned as asked."""
    from . import prune, zoo
    from .torch_export import load_program
    if args.program:
        program = load_program(args.program)
        example = tuple(t for t in program.example_inputs[0]) if program.example_inputs else None
        return program, example, os.path.basename(args.program)
    model, shape = zoo.get_model(args.model)
    if args.sparsity > 0:
        prune.prune_model(model, args.sparsity, args.prune, args.block)
    return model, (zoo.example_input(shape, args.batch),), f"{args.model}_s{round(args.sparsity * 100)}"


def _import(args):
    import torch

    from . import bench, compare, compile as build, import_torch
    threads = bench.set_threads(args.threads)
    model, example, name = load_model(args)
    imported = import_torch(model, example, args.threshold, args.fmt, args.block, args.target,
                            measure=not args.no_measure, dynamic_batch=args.dynamic_batch)
    print(imported)
    compiled = build(imported, tuning_log=args.tuning_log, tune_command=compare.tune_command(
        args.model, args.program, args.sparsity, args.prune, args.block, args.fmt, args.threshold, args.batch,
        not args.no_measure, args.target))
    if example is not None:
        module = model.module() if isinstance(model, torch.export.ExportedProgram) else model
        with torch.no_grad():
            ref = module(*example)
        refs = ref if isinstance(ref, (tuple, list)) else (ref,)
        outs = compiled(*example)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for i, (got, want) in enumerate(zip(outs, refs)):
            bench.check_close(f"output {i}", got, want.numpy())
        print("output matches PyTorch (relative error <= 1e-4)")
        if args.time:
            with torch.no_grad():
                t_torch = bench.measure(lambda: module(*example), budget_s=args.time)
            t_ours = bench.measure(compiled.runner(*example), budget_s=args.time)
            print(f"end to end, {threads} threads, median of {t_ours.runs}/{t_torch.runs} runs: "
                  f"fscnn-tvm {t_ours.median_ms:.2f} ms, PyTorch {t_torch.median_ms:.2f} ms, "
                  f"speedup {t_torch.median_ms / t_ours.median_ms:.2f}x (default schedules, untuned)")
    if args.profile and example is None:
        print("--profile: the program holds no example inputs to run it on")
    elif args.profile:
        rows = compiled.profile(*example)
        total = sum(ms for _, _, ms in rows)
        print(f"where the time goes ({total:.2f} ms a call, each function without its callees):")
        for fn, calls, ms in rows[:args.profile]:
            print(f"  {ms:8.3f} ms {100 * ms / total:5.1f} %  x{calls:g}  {fn}")
    out = args.out or f"{name}.so"
    compiled.export_library(out)
    print(f"wrote {out}")


def _tune(args):
    from . import bench, import_torch, tuning
    bench.set_threads(args.threads)
    model, example, name = load_model(args)
    imported = import_torch(model, example, args.threshold, args.fmt, args.block, args.target,
                            measure=not args.no_measure)
    print(imported)
    log_dir = args.log or os.path.join("tuning_logs", name)
    rpc = (args.rpc, args.rpc_key) if args.rpc else None
    if args.dense:  # the all-dense module sparse is compared against gets tuned too, into the same log
        print(f"tuning the dense module's conv/matmul ops, {args.trials} trials, log {log_dir}")
        baseline = import_torch(model, example, target=args.target, sparse=False)
        tuning.tune(baseline, trials=args.trials, log_dir=log_dir, rpc=rpc, progress=sys.stdout)
    print(f"tuning {len(imported.kernels)} sparse kernel(s){' and the dense ops beside them' if args.dense else ''}, "
          f"{args.trials} trials, log {log_dir}")
    result = tuning.tune(imported, trials=args.trials, log_dir=log_dir, rpc=rpc, dense=args.dense,
                         progress=sys.stdout)
    print(bench.table(result.summary(imported.target), ["task", "layers", "new_trials", "records", "best_ms"]))
    print(f"log: {log_dir} (use with: fscnn-tvm import ... --tuning-log {log_dir})")


def _compare(args):
    from . import bench, compare
    if len(args.batch) > 1 and (args.json or args.markdown or args.plot):
        raise ValueError("--json/--markdown/--plot name one file; with several batch sizes the files go to "
                         "--out-dir as <model>_b<batch>.*")
    rates = []
    for batch in args.batch:
        result = compare.compare_model(args.model, args.program, args.input_size, args.sparsity, args.fmt,
                                       args.block, args.prune, args.tuning_log, args.trials, batch, args.threads,
                                       args.budget, args.threshold, args.target, per_layer=args.per_layer,
                                       progress=sys.stdout, measure=not args.no_measure)
        print()
        print(compare.format_model_report(result))
        os.makedirs(args.out_dir, exist_ok=True)
        base = os.path.join(args.out_dir, result["model"] + f"_b{batch}")
        json_path, md_path = args.json or base + ".json", args.markdown or base + ".md"
        png_path = args.plot or base + ".png"
        bench.dump_json(json_path, result)
        with open(md_path, "w") as f:
            f.write(compare.markdown_report(result))
        compare.plot(result, png_path)
        print(f"\nwrote {json_path}, {md_path}\nplot: {png_path}")
        rates += [{"batch": batch, "sparsity": p["sparsity"], **{k: p["end_to_end"][k] for k in RATE_COLUMNS}}
                  for p in result["points"]]
    if len(args.batch) > 1:
        print("\nEnd to end by batch size")
        print(bench.table(rates, ["batch", "sparsity", *RATE_COLUMNS]))


def _logs(args):
    from . import tuning_log
    if not os.path.isdir(args.dir):
        raise FileNotFoundError(f"{args.dir} is not a directory written by a tuning job")
    damaged = (tuning_log.repair if args.action == "repair" else tuning_log.damaged_lines)(args.dir)
    for name, numbers in damaged.items():
        print(f"{os.path.join(args.dir, name)}: {len(numbers)} damaged line(s): {', '.join(map(str, numbers))}")
    if not damaged:
        print(f"{args.dir}: every line loads")
    elif args.action == "repair":
        print(f"rewritten without them; the originals are kept as *.bad in {args.dir}")
    return 1 if damaged and args.action == "check" else 0


def _schedules(args):
    from . import bench, records
    from .target import mcpu_lanes, resolve_target
    target = resolve_target(args.target)
    mcpu = str(target.attrs.get("mcpu", ""))
    lanes = mcpu_lanes(mcpu)
    if args.model is None and args.program is None:
        rows = [{"set": s.name, "tuned on": s.tuned_on, "cpu": s.mcpu, "lanes": s.lanes, "records": s.records,
                 "applies here": "yes" if s.lanes == lanes else "no"} for s in records.shipped_sets()]
        print(bench.table(rows, ["set", "tuned on", "cpu", "lanes", "records", "applies here"]))
        print(f"this CPU: {mcpu or '?'} ({lanes} float32 lanes): {sum(r['applies here'] == 'yes' for r in rows)} of "
              f"{len(rows)} sets apply")
        return
    name, sparse, missing = shipped_coverage(args, target)
    print(f"{name}: {len(sparse) - len(missing)} of {len(sparse)} sparse kernels have a shipped record for this CPU "
          f"({mcpu or '?'}, {lanes} float32 lanes)" + (f"; default schedules: {', '.join(missing)}" if missing else ""))


def shipped_coverage(args, target) -> tuple[str, list, list]:
    """(model name, its sparse kernels, those without a shipped record for ``target``) for the
    model ``args`` describe (--model/--program and how to prune and import it)."""
    from . import import_torch, records
    model, example, name = load_model(args)
    imported = import_torch(model, example, args.threshold, args.fmt, args.block, target,
                            measure=not args.no_measure)
    _, untuned = records.schedule_kernels(imported, records.shipped_database(target))
    sparse = records.sparse_kernels(imported)
    return name, sparse, [k for k in sparse if k in untuned]


RATE_COLUMNS = ["tvm_sparse_ms", "best_dense_ms", "sparse_images_per_s", "best_dense_images_per_s", "speedup"]


def _batch_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batch list must look like 1,8,32, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive integers, got {text!r}")
    return values


def _count(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch_range(text):
    values = _batch_list(text)
    if len(values) != 2 or values[0] >= values[1]:
        raise argparse.ArgumentTypeError(f"dynamic batch must look like 1,64 (lowest < highest), got {text!r}")
    return tuple(values)


def _sparsity_list(text):
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sparsity list must look like 0.5,0.9, got {text!r}") from None
    for value in values:
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1], got {value}")
    if not values:
        raise argparse.ArgumentTypeError("give at least one sparsity")
    return values


def _sparsity(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fscnn-tvm", description="Sparse CNN inference on CPUs with TVM")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layer", help="one pruned conv layer: sparse vs PyTorch dense vs TVM dense")
    p.add_argument("--in-ch", type=int, default=64)
    p.add_argument("--out-ch", type=int, default=64)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--padding", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sparsity", type=_sparsity, default=0.9)
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per engine")
    p.add_argument("--target", default=None, help="TVM target, e.g. 'llvm -mcpu=znver3' (default: from the host's CPU flags)")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.set_defaults(func=_layer)

    p = sub.add_parser("import", help="import a zoo model or a saved torch.export program, rewrite pruned "
                                      "layers to sparse kernels, compile, check against PyTorch, export")
    _source_args(p, _sparsity)
    p.add_argument("--time", type=float, default=1.0, help="seconds to time each engine end to end (0: skip)")
    p.add_argument("--out", default=None, help="shared library to write (default <model>_s<sparsity>.so)")
    p.add_argument("--profile", type=_count, default=0, metavar="N",
                   help="print the N functions that take the most time in a call (kernels, pooling, ...)")
    p.add_argument("--tuning-log", default=None, help="apply the records of this tuning log directory")
    p.add_argument("--dynamic-batch", type=_batch_range, default=None, metavar="LO,HI",
                   help="one library for every batch size from LO to HI (checked and timed at --batch)")
    p.set_defaults(func=_import)

    p = sub.add_parser("tune", help="autotune a model's sparse kernels (and dense ops) with meta_schedule")
    _source_args(p, _sparsity)
    p.add_argument("--trials", type=int, default=64,
                   help="measured candidates for the sparse module and again for the dense module it is compared "
                        "against (resumes an existing log)")
    p.add_argument("--log", default=None, help="log directory (default tuning_logs/<model>_s<sparsity>)")
    p.add_argument("--no-dense", dest="dense", action="store_false", help="tune the sparse kernels only (no dense op, no dense module)")
    p.add_argument("--rpc", default=None, help="tracker host:port to measure on RPC devices")
    p.add_argument("--rpc-key", default="fscnn", help="device key registered with the tracker")
    p.set_defaults(func=_tune)

    p = sub.add_parser("compare", help="PyTorch dense vs TVM dense vs TVM sparse, end to end and per layer, "
                                       "over sparsity levels; table, JSON, Markdown and a plot")
    _source_args(p, _sparsity_list, batches=True)
    p.add_argument("--input-size", type=int, default=None,
                   help="VGG16 input size: 32 or 224 (the other zoo models take 224)")
    p.add_argument("--tuning-log", default=None, help="tuning log directory to use (and extend with --trials)")
    p.add_argument("--trials", type=int, default=0, help="tuning trials for each of the dense and sparse modules "
                                                         "(0: no tuning: given log or default schedules)")
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timed runs per engine and layer")
    p.add_argument("--no-per-layer", dest="per_layer", action="store_false", help="end to end only")
    p.add_argument("--out-dir", default="compare_results", help="where JSON, Markdown and PNG go by default")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--plot", default=None)
    p.set_defaults(func=_compare)

    p = sub.add_parser("logs", help="check a tuning log directory for lines TVM cannot load, or repair it")
    p.add_argument("action", choices=["check", "repair"],
                   help="check: report damaged lines, exit 1 if any, change nothing; repair: rewrite the log "
                        "without them, the originals kept as *.bad")
    p.add_argument("dir", help="tuning log directory")
    p.set_defaults(func=_logs)

    p = sub.add_parser("schedules", help="the tuning records shipped in the package and which apply to this CPU; "
                                         "with --model or --program, how many of its sparse kernels they cover")
    _source_args(p, _sparsity, model_default=None)
    p.set_defaults(func=_schedules)
    return parser


def _source_args(p, sparsity, batches=False, model_default="vgg16_cifar"):
    """Where the model comes from and how it is pruned and imported: shared by import, tune,
    compare and schedules."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=model_default,
                     help="zoo model name" + (f" (default {model_default})" if model_default else ""))
    src.add_argument("--program", default=None, help="a .pt2 file written by torch.export.save (used as it is)")
    p.add_argument("--sparsity", type=sparsity, default=0.9 if sparsity is _sparsity else [0.9],
                   help="prune zoo models to this sparsity" + (" (comma-separated list)" if sparsity is not _sparsity
                                                               else ""))
    p.add_argument("--prune", choices=["layer", "global", "block"], default="layer",
                   help="magnitude pruning per layer or global, or whole-block pruning")
    p.add_argument("--block", type=_block, default=None, help="block shape for BSR / block pruning, e.g. 8x1")
    p.add_argument("--fmt", choices=["auto", "csr", "bsr"], default="auto")
    p.add_argument("--threshold", type=_sparsity, default=0.5, help="rewrite layers at least this sparse")
    p.add_argument("--no-measure", action="store_true",
                   help="rewrite every conv over the threshold; by default one runs sparse only where its "
                        "sparse kernel is faster than the dense kernel, timed on this CPU")
    if batches:
        p.add_argument("--batch", type=_batch_list, default=[1], help="batch size(s), comma-separated: each one "
                                                                      "compiled and timed, images/s reported")
    else:
        p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores)")
    p.add_argument("--target", default=None, help="TVM target, e.g. 'llvm -mcpu=znver3' (default: from CPU flags)")



def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, TypeError, NotImplementedError, FileNotFoundError, RuntimeError) as err:
        print(f"fscnn-tvm: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
