"""Tuning jobs register the CPU tensor intrinsics without TVM's import of every target's."""
import subprocess
import sys

SCRIPT = """
import sys, time
from fscnn_tvm.intrinsics import PACKAGE, import_cpu_intrinsics
start = time.time()
import tvm
import_cpu_intrinsics(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"}))
from tvm.s_tir import TensorIntrin
from tvm.s_tir.meta_schedule import TuneContext
TensorIntrin.get("dot_16x4_vnni")  # x86, used by the default rules on CPUs with VNNI
assert PACKAGE + ".cuda" not in sys.modules
TuneContext()  # its own import of the package finds it done
assert PACKAGE + ".cuda" not in sys.modules
import importlib.util
assert importlib.util.find_spec(PACKAGE + ".cuda") is not None  # other targets' still import on demand
assert PACKAGE + ".arm_cpu" not in sys.modules  # an x86 job does without Arm's (3.5 s)
import_cpu_intrinsics(tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}))  # later, an Arm one
TensorIntrin.get("dot_4x4_i8i8s32_neon")
print(round(time.time() - start, 1))
"""


def test_cpu_intrinsics_only():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
