"""The ``fscnn-tvm`` command line."""
from __future__ import annotations

import argparse
import sys


def _layer(args):
    from . import bench, compare
    result = compare.compare_layer(args.in_ch, args.out_ch, args.size, args.kernel, args.stride, args.padding,
                                   args.batch, args.sparsity, args.threads, budget_s=args.budget,
                                   target=args.target)
    print(compare.format_layer_report(result))
    if args.json:
        bench.dump_json(args.json, result)
        print(f"wrote {args.json}")


def _sparsity(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"sparsity must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fscnn-tvm", description="Sparse CNN inference on CPUs with TVM")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("layer", help="one pruned conv layer: sparse vs PyTorch dense vs TVM dense")
    p.add_argument("--in-ch", type=int, default=64)
    p.add_argument("--out-ch", type=int, default=64)
    p.add_argument("--size", type=int, default=56)
    p.add_argument("--kernel", type=int, default=3)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--padding", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sparsity", type=_sparsity, default=0.9)
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: all cores)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of timed runs per engine")
    p.add_argument("--target", default=None, help="TVM target, e.g. 'llvm -mcpu=znver3' (default: from the host's CPU flags)")
    p.add_argument("--json", default=None, help="write every number to this JSON file")
    p.set_defaults(func=_layer)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, NotImplementedError, FileNotFoundError) as err:
        print(f"fscnn-tvm: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
