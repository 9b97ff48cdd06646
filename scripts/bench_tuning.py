"""What tuning buys: VGG16-CIFAR at 90 % sparsity, tuned (dense and sparse modules, each with
--trials meta_schedule trials, XGBoost cost model) vs the default-schedule sparse module, vs
tuned TVM dense and PyTorch dense, end to end, in one process, outputs checked equal first.

    python scripts/bench_tuning.py --trials 300            # ~6-7 minutes of tuning on 2 cores
    python scripts/bench_tuning.py --log tuning_logs/x     # reuse (and resume) a log
"""
import argparse
import time

import torch

import fscnn_tvm
from fscnn_tvm import bench, prune, tuning, zoo


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg16_cifar")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--trials", type=int, default=300, help="for each of the dense and the sparse module")
    p.add_argument("--log", default=None, help="default tuning_logs/bench_<model>_s<sparsity>")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budget", type=float, default=2.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    threads = bench.set_threads(args.threads)
    log_dir = args.log or f"tuning_logs/bench_{args.model}_s{round(args.sparsity * 100)}"
    model, shape = zoo.get_model(args.model)
    prune.prune_magnitude(model, args.sparsity)
    x = zoo.example_input(shape)
    sparse = fscnn_tvm.import_torch(model, (x,))
    dense = fscnn_tvm.import_torch(model, (x,), sparse=False)
    start = time.time()
    tuning.tune(dense, trials=args.trials, log_dir=log_dir, progress=None)
    tuning.tune(sparse, trials=args.trials, log_dir=log_dir, dense=False, progress=None)
    tune_s = time.time() - start
    engines = {
        "pytorch dense": None,
        "tvm dense (tuned)": fscnn_tvm.compile(dense, tuning_log=log_dir),
        "tvm sparse (default schedules)": fscnn_tvm.compile(sparse, use_shipped=False),
        "tvm sparse (tuned)": fscnn_tvm.compile(sparse, tuning_log=log_dir),
    }
    with torch.no_grad():
        ref = model(x).numpy()
        rows = []
        for name, compiled in engines.items():
            run = (lambda: model(x)) if compiled is None else compiled.runner(x)
            if compiled is not None:
                bench.check_close(name, compiled(x), ref)
            t = bench.measure(run, budget_s=args.budget)
            rows.append({"engine": name, "median_ms": t.median_ms, "min_ms": t.min_ms, "max_ms": t.max_ms})
    tuned = rows[-1]["median_ms"]
    for r in rows:
        r["tuned_sparse_speedup"] = r["median_ms"] / tuned
    print(f"{args.model} at {args.sparsity:.0%}, {threads} threads, tuning {args.trials}+{args.trials} trials "
          f"({tune_s:.0f} s this run; a resumed log tunes only what is missing), log {log_dir}")
    print(bench.table(rows, ["engine", "median_ms", "min_ms", "max_ms", "tuned_sparse_speedup"]))
    if args.json:
        bench.dump_json(args.json, {"rows": rows, "machine": bench.machine_info(threads), "tune_s": tune_s})


if __name__ == "__main__":
    main()
