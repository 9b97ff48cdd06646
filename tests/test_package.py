"""The built wheel: it holds every shipped record set, and installed from it (unpacked first on
sys.path, the source checkout not importable) the shipped records load and a zoo model's
kernels find theirs."""
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fscnn_tvm import records

pytestmark = pytest.mark.slow  # ~20 s on 2 cores: a wheel build, then a zoo model imported from it

REPO = Path(__file__).resolve().parents[1]
FILES = ("database_workload.json", "database_tuning_record.json", records.TARGET_FILE)

# Runs from the unpacked wheel. The venv's editable install of the checkout is a meta-path
# finder that would answer for anything the wheel lacks: it is removed first.
FROM_WHEEL = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
import fscnn_tvm
from fscnn_tvm import records
from fscnn_tvm.cli import main
from fscnn_tvm.target import resolve_target
assert fscnn_tvm.__file__.startswith(sys.argv[1]), fscnn_tvm.__file__
db = records.shipped_database(resolve_target(None))
print("shipped records:", len(db.get_all_tuning_records()) if db is not None else 0)
sys.exit(main(["schedules", "--model", "vgg16_cifar", "--sparsity", "0.9", "--no-measure"]))
"""


def test_the_wheel_ships_every_set_and_its_records_apply(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(REPO / "fscnn_tvm", source / "fscnn_tvm", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    [wheel] = (tmp_path / "dist").glob("fscnn_tvm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    sets = [s.name for s in records.shipped_sets()]
    assert len(sets) >= 10
    missing = [f"{s}/{f}" for s in sets for f in FILES if f"fscnn_tvm/schedules/{s}/{f}" not in names]
    assert not missing and "fscnn_tvm/schedules/README.md" in names, missing

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    run = subprocess.run([sys.executable, "-c", FROM_WHEEL, str(site)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert int(re.search(r"shipped records: (\d+)", run.stdout).group(1)) > 0, run.stdout
    tuned, total = map(int, re.search(r"(\d+) of (\d+) sparse kernels have a shipped record", run.stdout).groups())
    assert 0 < tuned <= total, run.stdout
