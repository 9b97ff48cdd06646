"""Copy the best record per workload of a tuning log into schedules/<name>/, with the CPU it
was tuned for (``target.json``), so `fscnn_tvm.compile` uses it when the user passes no log.

    python scripts/ship_schedules.py tuning_logs/vgg16_cifar_s90_avx512 vgg16_cifar_s90_avx512
    python scripts/ship_schedules.py LOG NAME --target 'llvm -mcpu=znver3'   # records tuned for AVX2

``--target`` must be the target the log was tuned for (default: this host's).
``scripts/tune_shipped.sh`` re-tunes and re-ships everything in schedules/.
"""
import argparse
import os

from fscnn_tvm import tuning
from fscnn_tvm.runtime import SHIPPED
from fscnn_tvm.target import resolve_target

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log_dir")
    p.add_argument("name")
    p.add_argument("--target", default=None)
    args = p.parse_args()
    dest = os.path.join(SHIPPED, args.name)
    print(f"shipped {tuning.ship(args.log_dir, dest, resolve_target(args.target))} records to {dest}")
