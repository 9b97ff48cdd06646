"""The FSCNN report's experiment on our system, plus its conclusion put to the test.

1. VGG16 with fine-grained (unstructured, layer-wise magnitude) sparsity: our sparse module vs
   PyTorch dense across sparsity levels, end to end and per layer.
2. At the same sparsity, does block (structured, 8x1 = one AVX2 vector of output channels)
   sparsity beat unstructured, and by how much? Same model, block-pruned, BSR kernels.

TVM dense is timed too when it is tuned (--trials N or a log); untuned it is 100x slower than
either and only costs time, so it is left out. Writes Markdown, JSON and a PNG to --out.

    python scripts/reproduce_fscnn.py                       # VGG16-224, 0.5..0.95, default schedules
    python scripts/reproduce_fscnn.py --input-size 32 --trials 200
"""
import argparse
import os
import sys

from fscnn_tvm import bench, compare


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input-size", type=int, default=224, choices=[32, 224])
    p.add_argument("--sparsity", default="0.5,0.7,0.8,0.9,0.95")
    p.add_argument("--block-sparsity", default="0.8,0.9,0.95", help="levels for the block vs unstructured test")
    p.add_argument("--trials", type=int, default=0, help="tune dense and sparse modules (0: no tuning)")
    p.add_argument("--tuning-log", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)
    levels = [float(v) for v in args.sparsity.split(",")]
    block_levels = [float(v) for v in args.block_sparsity.split(",")]
    engines = compare.ENGINES if (args.trials or args.tuning_log) else ("pytorch", "tvm_sparse")
    common = dict(model_name="vgg16", input_size=args.input_size, tuning_log=args.tuning_log, trials=args.trials,
                  threads=args.threads, budget_s=args.budget, progress=sys.stdout, engines=engines)
    print("== unstructured (CSR)")
    unstructured = compare.compare_model(sparsities=levels, fmt="csr", prune_mode="layer", **common)
    print("== block 8x1 (BSR)")
    blocked = compare.compare_model(sparsities=block_levels, fmt="bsr", block=(8, 1), prune_mode="block", **common)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"fscnn_vgg16_{args.input_size}")
    compare.plot(unstructured, stem + "_unstructured.png")
    compare.plot(blocked, stem + "_block8x1.png")
    rows = []
    by_level = {p["sparsity"]: p for p in unstructured["points"]}
    for b in blocked["points"]:
        u = by_level.get(b["sparsity"])
        if u is None:
            continue
        rows.append({"sparsity": b["sparsity"], "unstructured_ms": u["end_to_end"]["tvm_sparse_ms"],
                     "block8x1_ms": b["end_to_end"]["tvm_sparse_ms"], "pytorch_ms": u["end_to_end"]["pytorch_ms"],
                     "block_over_unstructured": u["end_to_end"]["tvm_sparse_ms"] / b["end_to_end"]["tvm_sparse_ms"]})
    text = [compare.markdown_report(unstructured), "", "# Block 8x1 vs unstructured, same sparsity", "",
            "Same VGG16, same layers pruned to the same fraction, either unstructured (CSR kernels) or in whole 8x1 "
            "blocks (BSR kernels). `block_over_unstructured` > 1 means block sparsity is faster.", "",
            "| sparsity | PyTorch dense ms | unstructured ms | block 8x1 ms | block over unstructured |",
            "|---|---:|---:|---:|---:|"]
    text += [f"| {r['sparsity']} | {r['pytorch_ms']:.2f} | {r['unstructured_ms']:.2f} | {r['block8x1_ms']:.2f} | "
             f"{r['block_over_unstructured']:.2f}x |" for r in rows]
    text += ["", compare.markdown_report(blocked).replace("# vgg16", "# Block 8x1: vgg16", 1)]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(text))
    bench.dump_json(stem + ".json", {"unstructured": unstructured, "block8x1": blocked, "block_vs_unstructured": rows})
    print(compare.format_model_report(unstructured))
    print(bench.table(rows, ["sparsity", "pytorch_ms", "unstructured_ms", "block8x1_ms", "block_over_unstructured"]))
    print(f"wrote {stem}.md, {stem}.json, {stem}_unstructured.png, {stem}_block8x1.png")


if __name__ == "__main__":
    main()
