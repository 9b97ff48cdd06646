"""CPU target selection.

TVM's own host detection (``llvm_get_system_cpu``) reads CPUID, which a hypervisor may not
match: under KVM it can report ``znver4`` (AVX-512) while the guest kernel masks AVX-512, and
code built for it dies with "Illegal instruction". So the default target is derived from the
feature flags the OS reports in /proc/cpuinfo.
"""
from __future__ import annotations

import difflib
import functools
import json
import os
import platform
import re
from dataclasses import dataclass

import tvm

from ._threads import cores

ENV_VAR = "FSCNN_TVM_TARGET"


def cpu_info() -> dict:
    """Vendor, model name and feature flags of the first CPU, as the OS reports them."""
    info = {"vendor": "", "model": platform.processor() or platform.machine(), "flags": set()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return info
    for key, field in (("vendor", "vendor_id"), ("model", "model name")):
        m = re.search(rf"^{field}\s*:\s*(.*)$", text, re.M)
        if m:
            info[key] = m.group(1).strip()
    m = re.search(r"^(flags|Features)\s*:\s*(.*)$", text, re.M)
    if m:
        info["flags"] = set(m.group(2).split())
    return info


def num_cores() -> int:
    return cores()


def isa(flags: set) -> str:
    """The widest x86 vector ISA the OS lets us use: 'avx512', 'avx2', 'sse' or 'generic'."""
    if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    if "sse4_2" in flags:
        return "sse"
    return "generic"


_MCPU = {  # (vendor is AMD, isa) -> an LLVM CPU whose feature set that ISA covers
    (True, "avx512"): "znver4", (True, "avx2"): "znver3",
    (False, "avx512"): "skylake-avx512", (False, "avx2"): "haswell",
    (True, "sse"): "x86-64-v2", (False, "sse"): "x86-64-v2",
}


def host_target_dict() -> dict:
    info = cpu_info()
    target = {"kind": "llvm", "num-cores": num_cores()}
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        mcpu = _MCPU.get(("AMD" in info["vendor"], isa(info["flags"])))
        if mcpu:
            target["mcpu"] = mcpu
    elif machine in ("aarch64", "arm64"):
        target["mtriple"] = "aarch64-linux-gnu"
        target["mattr"] = ["+neon"]
    return target


def _parse_target_string(text: str) -> dict:
    """Accept the classic 'llvm -mcpu=znver3 -num-cores 2' form that TVM 0.27 rejects."""
    parts = text.split()
    target: dict = {"kind": parts[0]}
    i = 1
    while i < len(parts):
        key = parts[i].lstrip("-")
        if "=" in key:
            key, value = key.split("=", 1)
        elif i + 1 < len(parts) and not parts[i + 1].startswith("-"):
            i += 1
            value = parts[i]
        else:
            value = "true"
        target[key] = int(value) if value.isdigit() else (value.split(",") if key == "mattr" else value)
        i += 1
    return target


def resolve_target(target=None) -> tvm.target.Target:
    """A CPU ``tvm.target.Target`` from None (env var FSCNN_TVM_TARGET, else the host), a
    Target, a dict, or a string ('llvm -mcpu=znver3' or a JSON dict). Always has num-cores."""
    if target is None:
        target = os.environ.get(ENV_VAR) or None
    if target is None:
        spec = host_target_dict()
    elif isinstance(target, tvm.target.Target):
        spec = None
        result = target
    elif isinstance(target, dict):
        spec = dict(target)
    elif isinstance(target, str):
        text = target.strip()
        if not text:
            raise ValueError("target: empty string; pass e.g. 'llvm -mcpu=znver3' or None for the host")
        spec = json.loads(text) if text.startswith("{") else _parse_target_string(text)
    else:
        raise ValueError(f"target: expected None, str, dict or tvm.target.Target, got {type(target).__name__}")
    if spec is not None:
        spec.setdefault("num-cores", num_cores())
        try:
            result = tvm.target.Target(spec)
        except Exception as err:
            raise ValueError(f"target: TVM rejects {spec!r}: {str(err).splitlines()[-1]}") from None
    if result.kind.name != "llvm":
        raise ValueError(f"target: kind {result.kind.name!r} is not supported; fscnn-tvm targets CPUs ('llvm')")
    if "num-cores" not in result.attrs:
        raise ValueError("target: needs 'num-cores' (meta_schedule refuses targets without it)")
    _check_mcpu(result)
    return result


def _check_mcpu(target: tvm.target.Target):
    """TVM accepts any mcpu; LLVM only prints a line at build time and builds generic code."""
    mcpu, triple = str(target.attrs.get("mcpu", "")), str(target.attrs.get("mtriple", ""))
    if not mcpu or tvm.target.codegen.llvm_is_valid_cpu(mcpu, triple):
        return
    known = tvm.target.codegen.llvm_get_cpu_archlist(tvm.target.Target({"kind": "llvm", "mtriple": triple}
                                                                        if triple else "llvm"))
    close = difflib.get_close_matches(mcpu, [str(c) for c in known], n=3)
    llvm = f"TVM's LLVM {tvm.target.codegen.llvm_version_major()}" + (f" for mtriple={triple!r}" if triple else "")
    raise ValueError(f"target: mcpu={mcpu!r} is not a CPU that {llvm} knows"
                     + (f" (did you mean {', '.join(close)}?)" if close else "")
                     + "; list them with: python -c \"import tvm; print(*tvm.target.codegen.llvm_get_cpu_archlist("
                     "tvm.target.Target('llvm')))\", or leave mcpu out for this machine's")


def features(target: tvm.target.Target) -> frozenset:
    """The CPU features LLVM enables for ``target`` (its ``mcpu``/``mattr``)."""
    return _features(str(target))


@functools.lru_cache(maxsize=64)
def _features(target_json: str) -> frozenset:
    return frozenset(tvm.target.codegen.llvm_get_cpu_features(tvm.target.Target(target_json)))


def masked_stores(target: tvm.target.Target) -> bool:
    """Whether ``target`` stores part of a vector cheaply: AVX-512's mask registers (AVX2's
    ``vmaskmovps`` took ~30 cycles a store on Zen 3)."""
    return "avx512f" in features(target)


def vector_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of the widest SIMD register the target's features allow."""
    found = features(target)
    if "avx512f" in found:
        return 16
    return 8 if "avx" in found else 4


def vector_registers(target: tvm.target.Target) -> int:
    """SIMD registers of the target's CPU: 32 with AVX-512 and on AArch64, else 16."""
    aarch64 = str(target.attrs.get("mtriple", "")).startswith("aarch64")
    return 32 if aarch64 or "avx512f" in features(target) else 16


def mcpu_lanes(mcpu: str) -> int:
    """float32 lanes of one SIMD register of an LLVM CPU name (4 when unknown)."""
    spec = {"kind": "llvm", "num-cores": 1}
    if mcpu and tvm.target.codegen.llvm_is_valid_cpu(mcpu, ""):
        spec["mcpu"] = mcpu
    return vector_lanes(tvm.target.Target(spec))


@dataclass(frozen=True)
class Caches:
    """Data cache bytes per core and the cache line, for the kernels' blocking policies."""
    l1d: int
    l2: int
    line: int
    cores: int


# For a target that is not this machine: the smallest per-core caches of the x86 CPUs with
# AVX2 or AVX-512 (Zen 2-5, Haswell and later), so blocking errs towards bands that fit,
# and their 64-byte line.
CROSS_CACHES = (32 << 10, 512 << 10, 64)


def on_host(target: tvm.target.Target) -> bool:
    """Whether ``target`` is this machine's CPU (only then do timings and caches here apply to it)."""
    return target.kind.name == "llvm" and str(target.attrs.get("mcpu", "")) == host_target_dict().get("mcpu", "")


# Describes the caches of the CPU a target that is not this machine is built for, as
# "L1D,L2,LINE" (per core; bytes, or with K / M: "32K,1M,64"). Shipped record sets name the
# caches they were tuned with, so they can be re-tuned, and checked, from another machine.
CACHES_ENV = "FSCNN_TVM_CACHES"


def caches(target: tvm.target.Target) -> Caches:
    """Per-core L1d and L2 sizes and the line size from the OS when ``target`` is this
    machine's CPU, else from $FSCNN_TVM_CACHES or CROSS_CACHES; cores from the target's num-cores."""
    cores = int(target.attrs.get("num-cores", 1))
    return Caches(*(sysfs_caches() if on_host(target) else cross_caches()), cores)


def cross_caches() -> tuple[int, int, int]:
    """(L1d, L2, line) of a CPU that is not this machine: $FSCNN_TVM_CACHES, else CROSS_CACHES."""
    text = os.environ.get(CACHES_ENV, "").strip()
    if not text:
        return CROSS_CACHES
    try:
        sizes = tuple(_bytes(part.strip().upper()) for part in text.split(","))
    except (ValueError, IndexError):  # (an empty part: "32K,,64")
        sizes = ()
    if len(sizes) != 3 or min(sizes) <= 0:
        raise ValueError(f"${CACHES_ENV}={text!r}: expected L1D,L2,LINE per core, e.g. 32K,1M,64")
    return sizes


@functools.lru_cache(maxsize=4)
def sysfs_caches(root: str = "/sys/devices/system/cpu/cpu0/cache") -> tuple[int, int, int]:
    """(L1d, L2, line) bytes per core of the first CPU as sysfs describes them (a cache shared
    by several CPUs counts its share); CROSS_CACHES for what sysfs does not say."""
    sizes = dict(zip((1, 2, "line"), CROSS_CACHES))
    for index in sorted(os.listdir(root)) if os.path.isdir(root) else ():
        try:
            read = functools.partial(_read, os.path.join(root, index))
            level, kind = int(read("level")), read("type")
            if level in (1, 2) and kind in ("Data", "Unified"):
                sizes[level] = _bytes(read("size")) // max(1, len(_cpu_list(read("shared_cpu_list"))))
            if level == 1 and kind == "Data":
                sizes["line"] = int(read("coherency_line_size"))
        except (OSError, ValueError):
            continue
    return sizes[1], sizes[2], sizes["line"]


def _read(directory: str, name: str) -> str:
    with open(os.path.join(directory, name)) as f:
        return f.read().strip()


def _bytes(text: str) -> int:
    """'512K' / '2048K' / '1M' (sysfs cache sizes) as bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def _cpu_list(text: str) -> list[int]:
    """'0-1,4' -> [0, 1, 4]."""
    cpus = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus
