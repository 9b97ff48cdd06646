"""A peer engine in its own process (and its own virtualenv: DeepSparse 1.8 needs numpy < 2).

Run by ``bench_peers.py``; stdlib and numpy only, besides the engine. Requests are JSON lines
on stdin; each reply is one JSON line on stdout prefixed with ``@@`` (engines print banners on
stdout too). Timing happens here, so a round measures the engine and not the pipe.
"""
import json
import statistics
import sys
import time

import numpy as np


def load(request):
    if request["engine"] == "deepsparse":
        import deepsparse
        engine = deepsparse.compile_model(request["onnx"], batch_size=request["batch"], num_cores=request["threads"])
        return lambda x: engine([x])[0]
    if request["engine"] == "onnxruntime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = request["threads"], 1
        session = ort.InferenceSession(request["onnx"], options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    raise ValueError(f"unknown engine {request['engine']!r}")


def measure(fn, x, warmup, budget_s, min_runs):
    for _ in range(warmup):
        fn(x)
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def main():
    run = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "load":
                run = load(request)
                reply = {"ok": True}
            elif request["cmd"] == "run":
                np.save(request["output"], np.asarray(run(np.load(request["input"]))))
                reply = {"ok": True}
            elif request["cmd"] == "time":
                times = measure(run, np.load(request["input"]), request["warmup"], request["budget"],
                                request["min_runs"])
                reply = {"ok": True, "median_ms": statistics.median(times), "min_ms": min(times),
                         "max_ms": max(times), "runs": len(times)}
            else:
                break
        except Exception as err:  # reported to the driver, which names the engine
            reply = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        print("@@" + json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
