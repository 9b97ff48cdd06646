"""Copy the best record per workload of a tuning log into schedules/<name>/, with the CPU it
was tuned on, so `fscnn_tvm.compile` uses it when the user passes no log.

    python scripts/ship_schedules.py tuning_logs/vgg16_cifar_b1 vgg16_cifar_b1
"""
import os
import sys

from fscnn_tvm import tuning
from fscnn_tvm.runtime import SHIPPED
from fscnn_tvm.target import resolve_target

if __name__ == "__main__":
    log_dir, name = sys.argv[1:3]
    dest = os.path.join(SHIPPED, name)
    print(f"shipped {tuning.ship(log_dir, dest, resolve_target())} records to {dest}")
