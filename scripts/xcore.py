"""How far apart the cores a benchmark runs on are: the round trip of a cache line between them
(``xcore_probe.c``, built with the system's C compiler on first use).

Seen on this project's 2-vCPU KVM guests (AMD EPYC Zen 4): the round trip read ~60 ns for minutes,
then ~330 ns for minutes (the host had moved a vCPU to another chiplet), back and forth. In the far
placement every line one core writes and the other reads costs ~5x more: MobileNetV2 at 90 % ran
3.2 -> 6.7 ms with us, 4.2 -> 6.8 with ONNX Runtime, 3.3 -> 5.0 with DeepSparse. A ratio between
engines then depends on which placement each engine's rounds met, so the benchmarks label every
round with a probe and report the placements apart.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import statistics
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "xcore_probe.c")
CACHE = os.path.expanduser(os.environ.get("FSCNN_TVM_CACHE", "~/.cache/fscnn-tvm"))
# A round trip this many times the fastest one seen marks the far placement: the two that changed our
# times read ~60 and ~330 ns; readings of 100-270 ns came with the near placement's times.
FAR_FACTOR = 4.0


def probe_binary() -> tuple[str | None, str]:
    """The built probe's path (built on first use), or None and the reason."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    path = os.path.join(CACHE, f"xcore_probe-{digest}")
    if os.path.exists(path):
        return path, ""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        return None, "no C compiler (cc or gcc) to build scripts/xcore_probe.c"
    os.makedirs(CACHE, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    build = subprocess.run([cc, "-O2", "-pthread", "-o", tmp, SOURCE], capture_output=True, text=True)
    if build.returncode != 0:
        return None, f"building the probe failed: {(build.stderr.strip().splitlines() or [''])[-1]}"
    os.replace(tmp, path)  # (atomic: a concurrent run sees the whole binary or none)
    return path, ""


def round_trip_ns(binary: str, trips: int = 20000, repeats: int = 3) -> float | None:
    """The round trip (ns) between the first two CPUs this process may use: the fastest of
    ``repeats`` probes (a thread of another engine still spinning on one of the CPUs inflates a
    probe, never deflates it), or None where there are fewer than two CPUs or the probe fails."""
    cpus = [str(c) for c in sorted(os.sched_getaffinity(0))[:2]]
    if len(cpus) < 2:
        return None
    readings = []
    for _ in range(repeats):
        try:
            run = subprocess.run([binary, *cpus, str(trips)], capture_output=True, text=True, timeout=10)
            readings.append(float(run.stdout) if run.returncode == 0 else None)
        except (subprocess.TimeoutExpired, ValueError):
            readings.append(None)
    return min((r for r in readings if r is not None), default=None)


def placements(latencies: list[float | None], fastest: float | None) -> list[str | None]:
    """Each round's placement, "near" or "far" (None where it was not probed), against the
    fastest round trip seen (``fastest``; this list's own when None)."""
    seen = [v for v in latencies if v is not None]
    base = min(seen + ([fastest] if fastest else []), default=None)
    return [None if v is None else "far" if v > FAR_FACTOR * base else "near" for v in latencies]


def split_medians(samples: dict[str, list[float]], labels: list[str | None]) -> dict[str, dict[str, float]]:
    """Per placement that holds at least one round: each engine's median over its rounds there."""
    out = {}
    for place in ("near", "far"):
        rounds = [i for i, lab in enumerate(labels) if lab == place]
        if rounds:
            out[place] = {name: statistics.median(ts[i] for i in rounds) for name, ts in samples.items()}
    return out
