"""Side-by-side comparisons: sparse (our kernels) vs PyTorch dense vs TVM dense."""
from __future__ import annotations

import numpy as np

from . import bench
from .ops import SparseLayer


def random_pruned_conv(out_ch, in_ch, k, sparsity, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out_ch, in_ch, k, k)).astype(np.float32)
    w[rng.random(w.shape) < sparsity] = 0.0
    return w


def tvm_dense_conv2d(x_shape, weight, stride, padding, target):
    """TVM's own dense conv2d: Relax ``nn.conv2d`` through the default pipeline, no tuning
    (the tuning issue adds a meta_schedule-tuned dense baseline)."""
    import tvm
    from tvm import relax
    x_var = relax.Var("x", relax.TensorType(x_shape, "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x_var]):
        with bb.dataflow():
            y = bb.emit_output(bb.emit(relax.op.nn.conv2d(x_var, relax.const(weight), strides=stride,
                                                          padding=padding)))
        bb.emit_func_output(y)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target=target), tvm.cpu())
    return lambda x: vm["main"](x)


def compare_layer(in_ch=64, out_ch=64, size=56, kernel=3, stride=1, padding=1, batch=1, sparsity=0.9,
                  threads=None, seed=0, budget_s=1.0, formats=(("csr", None), ("bsr", (4, 1)), ("bsr", (8, 1))),
                  target=None, with_tvm_dense=True) -> dict:
    """Time one conv layer on every engine; outputs are checked against PyTorch first."""
    import torch
    import tvm
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
        run = tvm_dense_conv2d(x.shape, w, stride, padding, layer.target)
        x_dev = tvm.runtime.tensor(x)
        engines["tvm dense (untuned)"] = lambda: run(x_dev)
        outputs["tvm dense (untuned)"] = run(x_dev).numpy()
    for name, out in outputs.items():
        bench.check_close(name, out, ref)
    rows = []
    for name, fn in engines.items():
        t = bench.measure(fn, budget_s=budget_s)
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
