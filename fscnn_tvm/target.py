"""CPU target selection.

TVM's own host detection (``llvm_get_system_cpu``) reads CPUID, which a hypervisor may not
match: under KVM it can report ``znver4`` (AVX-512) while the guest kernel masks AVX-512, and
code built for it dies with "Illegal instruction". So the default target is derived from the
feature flags the OS reports in /proc/cpuinfo.
"""
from __future__ import annotations

import json
import os
import platform
import re

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
    return result


def vector_lanes(target: tvm.target.Target) -> int:
    """float32 lanes of one SIMD register for the target's CPU."""
    return mcpu_lanes(str(target.attrs.get("mcpu", "")))


def vector_registers(target: tvm.target.Target) -> int:
    """SIMD registers of the target's CPU: 32 with AVX-512 and on AArch64, else 16."""
    aarch64 = str(target.attrs.get("mtriple", "")).startswith("aarch64")
    return 32 if aarch64 or vector_lanes(target) >= 16 else 16


def mcpu_lanes(mcpu: str) -> int:
    """float32 lanes of one SIMD register of an LLVM CPU name (4 when unknown)."""
    if mcpu in ("znver4", "znver5", "skylake-avx512", "icelake-server", "sapphirerapids", "cascadelake"):
        return 16
    if mcpu in ("znver3", "znver2", "znver1", "haswell", "broadwell", "skylake", "alderlake"):
        return 8
    return 4
