"""Our engine beside the peers a user would reach for: PyTorch (eager), ONNX Runtime and DeepSparse 1.8.

What a user gets: their own pruned model (a seed no shipped record was tuned on), `import_torch` +
`compile` with no tuning log, fp32, the same thread count for every engine. Each case is exported
to ONNX with the same weights; ONNX Runtime and DeepSparse run in worker processes of their own
(DeepSparse in its own virtualenv: it needs numpy < 2), PyTorch and our module in this one. Outputs
are checked against PyTorch first, then the engines are timed in alternating rounds (median of the
rounds' medians). Ratios are speedups: ours/X = X's time / our time. Each round starts with a probe
of the cores' cache-line round trip (``xcore.py``; built with the C compiler on first use, skipped
without one or with ``--no-probe``): a virtual machine's cores can sit near (~60 ns) or far (~330 ns)
apart and move between the two while the benchmark runs, and the engines do not slow alike there, so
rows whose rounds met both give the ratios in each as well.

    python scripts/bench_peers.py                         # the layer set at 50-95 %, batch 1
    python scripts/bench_peers.py --models vgg16,resnet50,mobilenet_v2 --batch 1,8
    python scripts/bench_peers.py --no-deepsparse         # the rest, when DeepSparse cannot be set up

DeepSparse's virtualenv is made on first use (``python3 -m venv`` + ``pip install deepsparse==1.8.0
onnx``) at $FSCNN_TVM_DEEPSPARSE_VENV or ~/.cache/fscnn-tvm/deepsparse-venv. ONNX Runtime needs
``pip install onnx onnxruntime`` in this environment; without it (or without DeepSparse) the script
says what is missing and compares the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import fscnn_tvm
from fscnn_tvm import bench, prune, zoo

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import xcore  # noqa: E402 - a sibling script

VENV = os.environ.get("FSCNN_TVM_DEEPSPARSE_VENV", os.path.expanduser("~/.cache/fscnn-tvm/deepsparse-venv"))
SEED = 20261129  # weights and pruning pattern: no shipped record was tuned on it
# An engine's threads may spin for a while after its last run and take the cores from the next
# engine: our MobileNetV2 at batch 8 ran 1.6x slower right after an ONNX Runtime run, and not
# after a 0.3 s pause (2 cores). So each engine's turn starts after that pause.
SETTLE_S = 0.3

# (name, in, out, size, kernel, stride): VGG16-224's 3x3 convs, ResNet-50's 1x1 and stride-2 convs, a 64->64@56.
LAYERS = [
    ("vgg 64@224", 64, 64, 224, 3, 1), ("vgg 64->128@112", 64, 128, 112, 3, 1), ("vgg 128@112", 128, 128, 112, 3, 1),
    ("vgg 128->256@56", 128, 256, 56, 3, 1), ("vgg 256@56", 256, 256, 56, 3, 1),
    ("vgg 256->512@28", 256, 512, 28, 3, 1), ("vgg 512@28", 512, 512, 28, 3, 1), ("vgg 512@14", 512, 512, 14, 3, 1),
    ("r50 256->64 1x1@56", 256, 64, 56, 1, 1), ("r50 64->256 1x1@56", 64, 256, 56, 1, 1),
    ("r50 512->128 1x1@28", 512, 128, 28, 1, 1), ("r50 128->512 1x1@28", 128, 512, 28, 1, 1),
    ("r50 128@28", 128, 128, 28, 3, 1), ("r50 1024->256 1x1@14", 1024, 256, 14, 1, 1),
    ("r50 2048->512 1x1@7", 2048, 512, 7, 1, 1),
    ("r50 128 s2@56", 128, 128, 56, 3, 2), ("r50 256 s2@28", 256, 256, 28, 3, 2), ("r50 512 s2@14", 512, 512, 14, 3, 2),
    ("64@56", 64, 64, 56, 3, 1),
]


class Worker:
    """A peer engine (``peers_worker.py``) in its own process; times itself."""

    def __init__(self, python, engine, onnx_path, batch, threads):
        self.name = engine
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([python, os.path.join(HERE, "peers_worker.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.ask(cmd="load", engine=engine, onnx=onnx_path, batch=batch, threads=threads)

    def ask(self, **request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith("@@"):
                reply = json.loads(line[2:])
                if not reply["ok"]:
                    raise RuntimeError(f"{self.name}: {reply['error']}")
                return reply
        raise RuntimeError(f"{self.name}: the worker process ended (exit code {self.proc.wait()})")

    def output(self, x_path, tmp):
        out = os.path.join(tmp, f"{self.name}.npy")
        self.ask(cmd="run", input=x_path, output=out)
        return np.load(out)

    def time(self, x_path, budget, warmup, min_runs):
        r = self.ask(cmd="time", input=x_path, budget=budget, warmup=warmup, min_runs=min_runs)
        return bench.Timing(r["median_ms"], r["min_ms"], r["max_ms"], r["runs"])

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


def deepsparse_python(setup: bool):
    """The DeepSparse virtualenv's python, made on first use; None (with the reason) if unavailable."""
    python = os.path.join(VENV, "bin", "python")
    if not os.path.exists(python) and setup:
        print(f"setting up DeepSparse 1.8 in {VENV} (once) ...", flush=True)
        ok = subprocess.run([sys.executable, "-m", "venv", VENV]).returncode == 0 \
            and subprocess.run([python, "-m", "pip", "install", "-q", "deepsparse==1.8.0", "onnx"]).returncode == 0
        if not ok:
            return None, f"could not install deepsparse==1.8.0 into {VENV}"
    if not os.path.exists(python):
        return None, f"no DeepSparse virtualenv at {VENV}"
    probe = subprocess.run([python, "-c", "import deepsparse"], capture_output=True, text=True)
    return (python, "") if probe.returncode == 0 else (None, f"deepsparse does not import in {VENV}")


def has_onnxruntime():
    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it
        import onnxruntime  # noqa: F401
        return True
    except ImportError:
        return False


def run_case(label, model, x, threads, peers, budget, rounds, tmp, probe=None):
    """Every engine on one case; returns the row of medians and ratios. ``probe`` (the built
    ``xcore_probe``): each round starts with a cross-core round trip, and where rounds met both
    placements of the cores the row also gives the ratios in each (``xcore``)."""
    with torch.no_grad():
        ref = model(x).numpy()
    imported = fscnn_tvm.import_torch(model, (x,))
    compiled = fscnn_tvm.compile(imported)
    ours = compiled.runner(x)
    bench.check_close("ours", compiled(x), ref, rtol=1e-3)
    x_path = os.path.join(tmp, "x.npy")
    np.save(x_path, x.numpy())
    workers = []
    if peers:
        onnx_path = os.path.join(tmp, "model.onnx")
        torch.onnx.export(model, (x,), onnx_path, opset_version=13, dynamo=False)
        for engine, python in peers.items():
            worker = Worker(python, engine, onnx_path, x.shape[0], threads)
            workers.append(worker)
            bench.check_close(engine, worker.output(x_path, tmp), ref, rtol=1e-3)

    def pytorch(warmup):
        with torch.no_grad():
            return bench.measure(lambda: model(x), warmup, 2, budget / rounds)

    engines = [("pytorch", pytorch), ("ours", lambda warmup: bench.measure(ours, warmup, 2, budget / rounds))] \
        + [(w.name, lambda warmup, w=w: w.time(x_path, budget / rounds, warmup, 2)) for w in workers]
    try:
        samples = {name: [] for name, _ in engines}
        latencies = []
        for r in range(rounds):
            if probe:  # (once the last engine's threads are idle: a spinning one inflates it)
                time.sleep(SETTLE_S)
                latencies.append(xcore.round_trip_ns(probe))
            else:
                latencies.append(None)
            # The order turns every round, so no engine always runs right after the same one (its
            # data may still fill the caches), and each starts once the last one's threads are idle.
            for name, time_it in engines[r % len(engines):] + engines[:r % len(engines)]:
                time.sleep(SETTLE_S)
                samples[name].append(time_it(3 if r == 0 else 1))
    finally:
        for w in workers:
            w.close()
    ms = {name: statistics.median(t.median_ms for t in ts) for name, ts in samples.items()}
    row = {"case": label, "sparse layers": f"{sum(r.rewritten for r in imported.report)}/{len(imported.report)}"}
    row.update({f"{name} ms": v for name, v in ms.items()})
    row.update(_ratios(ms))
    if probe:
        _label_placements(row, samples, latencies)
    return row


def _ratios(ms):
    out = {"ours/best dense": min(ms[n] for n in ("pytorch", "onnxruntime") if n in ms) / ms["ours"],
           "ours/pytorch": ms["pytorch"] / ms["ours"]}
    if "deepsparse" in ms:
        out["ds/pytorch"] = ms["pytorch"] / ms["deepsparse"]
        out["ours/ds"] = ms["deepsparse"] / ms["ours"]
    return out


_FASTEST = []  # the fastest cross-core round trip of this run, over all its cases


def _label_placements(row, samples, latencies):
    """The round trips into the row; where some rounds met the near and some the far placement,
    each placement's ratios (from its rounds' medians) beside the all-round ones."""
    seen = [v for v in latencies if v is not None]
    if not seen:
        return
    _FASTEST[:] = [min(seen + _FASTEST)]
    labels = xcore.placements(latencies, _FASTEST[0])
    row["xcore ns"] = statistics.median(seen)
    row["far rounds"] = f"{labels.count('far')}/{len(labels)}"
    row["rounds"] = [{"xcore ns": v, "placement": lab, **{f"{n} ms": ts[i].median_ms for n, ts in samples.items()}}
                     for i, (v, lab) in enumerate(zip(latencies, labels))]
    split = xcore.split_medians({n: [t.median_ms for t in ts] for n, ts in samples.items()}, labels)
    if len(split) == 2:
        for place, ms in split.items():
            for ratio, value in _ratios(ms).items():
                if ratio in ("ours/best dense", "ours/ds"):
                    row[f"{ratio} ({place})"] = value


def conv_case(cin, cout, size, k, stride, sparsity, batch):
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, k, stride, k // 2), torch.nn.ReLU()).eval()
    if sparsity > 0:
        prune.prune_magnitude(model, sparsity, keep_first_conv_dense=False)
    return model, torch.randn(batch, cin, size, size, generator=torch.Generator().manual_seed(SEED))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", default="0.5,0.7,0.9,0.95", help="comma-separated (layers and models)")
    p.add_argument("--layers", default="all", help="'all', 'none', or comma-separated substrings of layer names")
    p.add_argument("--models", default="", help="comma-separated zoo models, e.g. vgg16,resnet50,mobilenet_v2, or 'none'")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--budget", type=float, default=2.0, help="seconds per engine and case, over all rounds")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-deepsparse", action="store_true")
    p.add_argument("--no-onnxruntime", action="store_true")
    p.add_argument("--no-probe", action="store_true", help="do not label rounds by the cores' round trip")
    p.add_argument("--out", default=os.path.join(HERE, "results", "peers"))
    args = p.parse_args(argv)
    models = [] if args.models == "none" else [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in zoo.MODELS]
    if unknown:  # before the peers' set-up and any case, not after an hour of them
        p.error(f"--models: unknown {', '.join(unknown)}; known: {', '.join(sorted(zoo.MODELS))} (or 'none')")
    threads = bench.set_threads(args.threads)
    peers = {}
    if not args.no_onnxruntime:
        if has_onnxruntime():
            peers["onnxruntime"] = sys.executable
        else:
            print("ONNX Runtime: not compared (pip install onnx onnxruntime)", flush=True)
    if not args.no_deepsparse:
        if not has_onnxruntime():
            print("DeepSparse: not compared (exporting to ONNX needs: pip install onnx)", flush=True)
        else:
            python, why = deepsparse_python(setup=True)
            if python:
                peers["deepsparse"] = python
            else:
                print(f"DeepSparse: not compared ({why})", flush=True)
    probe = None
    if not args.no_probe:
        probe, why = xcore.probe_binary()
        if probe is None:
            print(f"cross-core probe: not run ({why})", flush=True)
    sparsities = [float(s) for s in args.sparsity.split(",") if s]
    batches = [int(b) for b in args.batch.split(",") if b]
    wanted = [] if args.layers == "none" else LAYERS if args.layers == "all" else \
        [lay for lay in LAYERS if any(s in lay[0] for s in args.layers.split(","))]
    rows = []
    columns = ["case", "sparse layers", "pytorch ms", "ours ms"] + [f"{n} ms" for n in peers] + \
        ["ours/best dense", "ours/pytorch"] + (["ds/pytorch", "ours/ds"] if "deepsparse" in peers else []) + \
        (["xcore ns", "far rounds", "ours/best dense (near)", "ours/best dense (far)"]
         + (["ours/ds (near)", "ours/ds (far)"] if "deepsparse" in peers else []) if probe else [])
    with tempfile.TemporaryDirectory() as tmp:
        cases = [(f"{name} {int(s * 100)}% b{b}", lambda lay=lay, s=s, b=b: conv_case(*lay[1:], s, b))
                 for b in batches for s in sparsities for lay in wanted for name in [lay[0]]]
        for name in models:
            for b in batches:
                for s in sparsities:
                    def make(name=name, s=s, b=b):
                        model, shape = zoo.get_model(name, seed=SEED % 2**31)
                        prune.prune_magnitude(model, s)
                        return model, zoo.example_input(shape, b, SEED)
                    cases.append((f"{name} {int(s * 100)}% b{b}", make))
        for label, make in cases:
            model, x = make()
            row = run_case(label, model, x, threads, peers, args.budget, args.rounds, tmp, probe)
            rows.append(row)
            print(bench.table([row], columns).splitlines()[-1] if len(rows) > 1 else bench.table([row], columns),
                  flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    summary = summarise(rows, sparsities)
    with open(args.out + ".md", "w") as f:
        f.write(f"{bench.machine_info(threads)['cpu']}, {threads} threads, fp32, untuned (seed {SEED})\n\n"
                + bench.markdown_table(rows, columns) + "\n")
        if summary:
            f.write("\n" + bench.markdown_table(summary, list(summary[0])) + "\n")
    bench.dump_json(args.out + ".json", {"machine": bench.machine_info(threads), "seed": SEED, "rows": rows,
                                         "summary": summary})
    if summary:
        print("\n" + bench.table(summary, list(summary[0])))
    print(f"\nwrote {args.out}.md and .json")


def summarise(rows, sparsities):
    """Geomean and minimum of each ratio per sparsity, over the rows at that sparsity."""
    out = []
    for s in sparsities:
        tag = f" {int(s * 100)}% "
        group = [r for r in rows if tag in r["case"] + " "]
        if not group:
            continue
        entry = {"sparsity": s, "cases": len(group)}
        for ratio in ("ours/best dense", "ours/pytorch", "ds/pytorch", "ours/ds"):
            values = [r[ratio] for r in group if ratio in r]
            if values:
                entry[f"{ratio} geomean"] = float(np.exp(np.mean(np.log(values))))
                entry[f"{ratio} min"] = min(values)
        out.append(entry)
    return out


if __name__ == "__main__":
    main()
