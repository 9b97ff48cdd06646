"""Copy the best record per workload of a tuning log into schedules/<name>/, with the CPU it
was tuned on, so `fscnn_tvm.compile` uses it when the user passes no log.

    python scripts/ship_schedules.py tuning_logs/vgg16_cifar_b1 vgg16_cifar_b1
"""
import json
import os
import shutil
import sys

from fscnn_tvm import tuning
from fscnn_tvm.runtime import SHIPPED
from fscnn_tvm.target import resolve_target
from tvm.s_tir import meta_schedule as ms


def main(log_dir: str, name: str):
    dest = os.path.join(SHIPPED, name)
    shutil.rmtree(dest, ignore_errors=True)
    os.makedirs(dest)
    pruned = ms.database.JSONDatabase(work_dir=dest)
    tuning.open_database(log_dir).dump_pruned(pruned)  # the best record of each workload
    target = resolve_target()
    with open(os.path.join(dest, "target.json"), "w") as f:
        json.dump({"mcpu": str(target.attrs.get("mcpu", "")), "target": str(target)}, f, indent=1)
    records = sum(1 for line in open(os.path.join(dest, "database_tuning_record.json")) if line.strip())
    print(f"shipped {records} records to {dest}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
