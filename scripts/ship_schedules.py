"""Copy the best record per workload of a tuning log into the package's shipped sets
(fscnn_tvm/schedules/<name>/), with the CPU it was tuned for and the model's `fscnn-tvm tune`
arguments (``target.json``), so `fscnn_tvm.compile` uses it when the user passes no log.

    python scripts/ship_schedules.py tuning_logs/vgg16_cifar_s90_avx512 vgg16_cifar_s90_avx512 \
        --tuned-on '--model vgg16_cifar --sparsity 0.9'
    python scripts/ship_schedules.py LOG NAME --target 'llvm -mcpu=znver3' --tuned-on '...'  # records tuned for AVX2

``--target`` must be the target the log was tuned for (default: this host's). Run it from a
source checkout: it writes into the package's own folder.
``scripts/tune_shipped.sh`` re-tunes and re-ships every shipped set.
"""
import argparse
import os
from importlib import resources

from fscnn_tvm import records
from fscnn_tvm.target import resolve_target

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log_dir")
    p.add_argument("name")
    p.add_argument("--target", default=None)
    p.add_argument("--tuned-on", default="", help="the `fscnn-tvm tune` arguments of the model the log was tuned on")
    args = p.parse_args()
    with resources.as_file(records.SHIPPED) as shipped:
        dest = os.path.join(shipped, args.name)
        count = records.ship(args.log_dir, dest, resolve_target(args.target), args.tuned_on)
    print(f"shipped {count} records to {dest}")
