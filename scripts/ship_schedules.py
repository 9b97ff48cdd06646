"""Copy the best record per workload of a tuning log into the package's shipped sets
(fscnn_tvm/schedules/<name>/), with the CPU it was tuned for and the model's `fscnn-tvm tune`
arguments (``target.json``), so `fscnn_tvm.compile` uses it when the user passes no log.

    python scripts/ship_schedules.py tuning_logs/vgg16_cifar_s90_avx512 vgg16_cifar_s90_avx512 \
        --tuned-on '--model vgg16_cifar --sparsity 0.9'
    python scripts/ship_schedules.py LOG NAME --target 'llvm -mcpu=znver3' --tuned-on '...'  # records tuned for AVX2

``--target`` must be the target the log was tuned for (default: this host's). Run it from a
source checkout: it writes into the package's own folder.

    python scripts/ship_schedules.py --classes [NAME ...]

adds to shipped sets (all, or those named) each sparse kernel's record under its width class
(``records.add_width_classes``), so the set serves every pruning pattern of the model's shapes, not
only the pattern it was tuned on: the model is rebuilt from the set's ``tuned_on`` arguments.

    python scripts/ship_schedules.py --seed NAME LOG

starts tuning log LOG from set NAME's records of everything but the sparse kernels (whose
workloads change with the kernels' design; the tuning job records and searches them anew), so a
sparse-only re-tune keeps the set's dense records. ``scripts/tune_shipped.sh`` re-tunes and
re-ships every shipped set.
"""
import argparse
import os
from importlib import resources

from fscnn_tvm import records
from fscnn_tvm.target import resolve_target

def add_classes(name):
    """Re-ship set ``name`` with width-class records for the kernels of the model it was tuned on."""
    import shlex
    import tempfile

    import fscnn_tvm
    from fscnn_tvm import cli
    from fscnn_tvm.tuning_log import copy_records, open_database
    with resources.as_file(records.SHIPPED) as shipped:
        folder = os.path.join(shipped, name)
        [meta] = [s for s in records.shipped_sets(shipped) if s.name == name]
        target = resolve_target({"kind": "llvm", "mcpu": meta.mcpu, "num-cores": 2})
        args = cli.build_parser().parse_args(["tune"] + shlex.split(meta.tuned_on))
        model, example, _ = cli.load_model(args)
        imported = fscnn_tvm.import_torch(model, example, args.threshold, args.fmt, args.block, target, measure=False)
        with tempfile.TemporaryDirectory() as tmp:
            db = open_database(tmp, write=True)
            copy_records(open_database(folder), db)
            added = records.add_width_classes(db, [k.spec for k in imported.kernels.values()], target)
            count = records.ship(tmp, folder, target, meta.tuned_on)
    print(f"{name}: {added} width-class records added, {count} records shipped")


def seed(name, log_dir):
    """Start ``log_dir`` from set ``name``'s records of every workload that is not a sparse kernel."""
    from fscnn_tvm.tuning_log import copy_records, open_database
    kept = copy_records(open_database(str(records.SHIPPED / name)), open_database(log_dir, write=True),
                        keep=lambda record: "w_perm" not in {p.name for p in record.workload.mod["main"].params})
    print(f"{log_dir}: {kept} records of {name}'s dense ops")


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["--seed"]:
        seed(*sys.argv[2:4])
        sys.exit(0)
    if sys.argv[1:2] == ["--classes"]:
        with resources.as_file(records.SHIPPED) as shipped:
            names = sys.argv[2:] or [s.name for s in records.shipped_sets(shipped)]
        for name in names:
            add_classes(name)
        sys.exit(0)
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
