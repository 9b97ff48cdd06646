"""Every performance target of the project measured in one run: measured vs target, PASS/FAIL.

Speedup = the best dense engine (min of PyTorch eager and TVM dense with tuned records) / our
sparse module, side by side in one process, same thread count, outputs checked equal first
(compare.py). Uses the records shipped in fscnn_tvm/schedules/ for this CPU, so no tuning job is needed;
kernels without a record run their default schedule, and the report says which schedules ran.

Rows (targets from the performance issue; "layers" means every such layer of the model):
  VGG16-224, 90 % unstructured: 3x3 convs geomean >= 4x and min >= 2.5x; end to end >= 4x.
  ResNet-50, 90 %: 1x1 convs and stride-2 3x3 convs geomean >= 3x (min shown); end to end >= 2.5x.
  VGG16-224, 60 %: every 3x3 conv and end to end faster than the best dense (> 1x).
  VGG16-224, 90 % in 8x1 blocks (BSR): every 3x3 conv >= 6x (geomean shown).
  Memory at 90 %: the weights the compiled sparse module holds (ELL values + offsets) <= 20 % of
  the dense bytes of the same layers; CSR storage with int32 and with int16 indices shown too.

    python scripts/bench_targets.py                 # ~9 min on 2 cores
    python scripts/bench_targets.py --only memory,vgg16_90 --budget 0.3
Writes scripts/results/targets.{md,json} (a subset: targets_<suites>.{md,json}).
"""
import argparse
import multiprocessing
import os
import sys

import numpy as np

from fscnn_tvm import bench, compare

HERE = os.path.dirname(os.path.abspath(__file__))


def geomean(values):
    return float(np.exp(np.mean(np.log(values)))) if values else float("nan")


def conv_speedups(point, kernel, stride=None):
    """Speedups of the sparse conv layers with this kernel size (and stride)."""
    rows = [r for r in point["layers"] if r["kind"] == "conv2d" and r["format"] != "dense"
            and r["shape"].endswith(f"x{kernel}x{kernel}") and (stride is None or r["stride"][0] == stride)]
    return [r["speedup"] for r in rows]


def row(name, measured, op, target, note=""):
    ok = measured >= target if op == ">=" else (measured > target if op == ">" else measured <= target)
    return {"target": name, "measured": round(float(measured), 3), "goal": f"{op} {target}",
            "result": "PASS" if ok else "FAIL", "note": note}


def info(name, measured, note=""):
    return {"target": name, "measured": round(float(measured), 3), "goal": "", "result": "info", "note": note}


def run_model(name, model, sparsity, budget, **kw):
    print(f"== {name}", flush=True)
    return compare.compare_model(model, sparsities=(sparsity,), budget_s=budget, progress=sys.stdout, **kw)


def vgg16_90(budget):
    res = run_model("VGG16-224, 90 % unstructured", "vgg16", 0.9, budget, fmt="csr")
    p = res["points"][0]
    s = conv_speedups(p, 3)
    return res, [row("VGG16-224 90 %: 3x3 convs, geomean speedup", geomean(s), ">=", 4.0, f"{len(s)} layers"),
                 row("VGG16-224 90 %: 3x3 convs, min speedup", min(s), ">=", 2.5),
                 row("VGG16-224 90 %: end to end speedup", p["end_to_end"]["speedup"], ">=", 4.0)]


def resnet50_90(budget):
    res = run_model("ResNet-50, 90 %", "resnet50", 0.9, budget, fmt="csr")
    p = res["points"][0]
    one, s2 = conv_speedups(p, 1), conv_speedups(p, 3, stride=2)
    return res, [row("ResNet-50 90 %: 1x1 convs, geomean speedup", geomean(one), ">=", 3.0,
                     f"{len(one)} layers, min {min(one):.2f}x"),
                 row("ResNet-50 90 %: stride-2 3x3 convs, geomean speedup", geomean(s2), ">=", 3.0,
                     f"{len(s2)} layers, min {min(s2):.2f}x"),
                 row("ResNet-50 90 %: end to end speedup", p["end_to_end"]["speedup"], ">=", 2.5)]


def vgg16_60(budget):
    res = run_model("VGG16-224, 60 % unstructured", "vgg16", 0.6, budget, fmt="csr")
    p = res["points"][0]
    s = conv_speedups(p, 3)
    return res, [row("VGG16-224 60 %: 3x3 convs, min speedup (break-even)", min(s), ">", 1.0,
                     f"geomean {geomean(s):.2f}x"),
                 row("VGG16-224 60 %: end to end speedup (break-even)", p["end_to_end"]["speedup"], ">", 1.0)]


def vgg16_bsr(budget):
    res = run_model("VGG16-224, 90 % in 8x1 blocks (BSR)", "vgg16", 0.9, budget, fmt="bsr", block=(8, 1),
                    prune_mode="block")
    s = conv_speedups(res["points"][0], 3)
    return res, [row("VGG16-224 90 % 8x1 blocks: 3x3 convs, min speedup", min(s), ">=", 6.0,
                     f"geomean {geomean(s):.2f}x")]


def memory(_budget):
    """Bytes of the weights of the layers the importer made sparse, as the compiled module holds
    them (ELL table: values + offsets, row padding included) and as CSR."""
    import torch

    from fscnn_tvm import formats as F
    from fscnn_tvm import import_torch, ops, prune, zoo
    model, shape = zoo.get_model("vgg16")
    prune.prune_magnitude(model, 0.9)
    imported = import_torch(model, (torch.zeros(shape),))
    dense = kernel = csr32 = csr16 = 0
    widest = 0
    for r in imported.report:
        if not r.rewritten:
            continue
        csr = F.to_csr(r.weight)
        _, arrays = ops.kernel_inputs(r.kind, csr, r.x_shape, r.bias, r.activation, imported.target,
                                      **{k: v for k, v in r.conv_args.items() if k != "groups"})
        dense += r.weight.size * 4
        kernel += arrays[0].nbytes + arrays[1].nbytes
        csr32 += csr.data.nbytes + csr.indices.nbytes + csr.indptr.nbytes
        csr16 += csr.data.nbytes + csr.indices.size * 2 + csr.indptr.nbytes
        widest = max(widest, csr.cols)
    assert csr32 and kernel
    return {"dense_bytes": dense, "kernel_bytes": kernel, "csr_int32_bytes": csr32, "csr_int16_bytes": csr16}, [
        row("VGG16-224 90 %: sparse weights held by the module / dense", kernel / dense, "<=", 0.2,
            "ELL values + offsets (int32 for convs, int16 for linears), row padding included"),
        info("VGG16-224 90 %: CSR with int32 indices / dense", csr32 / dense),
        info("VGG16-224 90 %: CSR with int16 column indices / dense", csr16 / dense,
             f"widest layer has {widest} columns: int16 " + ("fits" if widest <= 32768 else "does NOT fit"))]


SUITES = {"memory": memory, "vgg16_90": vgg16_90, "resnet50_90": resnet50_90, "vgg16_60": vgg16_60,
          "vgg16_bsr": vgg16_bsr}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SUITES), help=f"comma-separated subset of {', '.join(SUITES)}")
    p.add_argument("--budget", type=float, default=0.5, help="seconds of timed runs per engine and layer")
    p.add_argument("--out", default=None, help="output path without extension (default "
                   "scripts/results/targets, or targets_<suites> for a subset, so a subset never "
                   "overwrites a full run's files)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        p.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    if args.out is None:
        subset = "" if set(names) == set(SUITES) else "_" + "_".join(names)
        args.out = os.path.join(HERE, "results", "targets" + subset)
    threads = bench.set_threads(None)
    rows, raw = [], {}
    # Each suite in a fresh process: run after VGG16 in one process, PyTorch's eager ResNet-50
    # measured 121 ms instead of 62 (state left behind by the earlier suite), which flattered us.
    spawn = multiprocessing.get_context("spawn")
    for name in names:
        with spawn.Pool(1) as pool:
            raw[name], suite_rows = pool.apply(SUITES[name], (args.budget,))
        rows += suite_rows
    machine = bench.machine_info(threads)
    schedules = {n: r.get("tuning_log") for n, r in raw.items() if isinstance(r, dict) and "tuning_log" in r}
    cols = ["target", "measured", "goal", "result", "note"]
    text = bench.table(rows, cols)
    head = (f"{machine['cpu']} ({machine['isa']}, {machine['cores']} cores), {machine['threads']} threads for every "
            f"engine, TVM {machine['tvm']}, PyTorch {machine['torch']}; schedules: {schedules}")
    print(head)
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    bench.dump_json(args.out + ".json", {"machine": machine, "rows": rows, "raw": raw})
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(["# Performance targets", "", head, "", bench.markdown_table(rows, cols)]) + "\n")
    print(f"wrote {args.out}.md and {args.out}.json")
    return 0 if all(r["result"] != "FAIL" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
