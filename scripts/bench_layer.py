"""Benchmark one pruned conv layer: sparse (CSR, BSR) vs PyTorch dense vs TVM dense.

Same options as ``fscnn-tvm layer`` (run with --help); this script is that command.
"""
import sys

from fscnn_tvm.cli import main

if __name__ == "__main__":
    sys.exit(main(["layer", *sys.argv[1:]]))
