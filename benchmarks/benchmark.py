"""MiniMind-V's speed against upstream v1's own code, on this machine, in one run: training (benchmarks/train.py),
one stream's decoding (benchmarks/decode.py) and the API under concurrent clients (benchmarks/serving.py).

  python benchmarks/benchmark.py --upstream_dir /tmp/upstream_bench/mmv1     # 27M; about 25 minutes on 2 cores
  python benchmarks/benchmark.py --quick                                      # tiny sizes: the machinery, ~2 min

--upstream_dir is the tree ../shared/bench/upstream_v1_harness.sh builds from a local copy of
jingyaogong/minimind-v (commit b671c1a): upstream's own scripts and model code, generated data and a random CLIP
tower. Every upstream row is upstream's code, unchanged, in a process of its own; so is every row of ours. With
--quick (the test suite) a small stand-in tree can be given, or the upstream rows are left out.

Prints each section's table, then one JSON line (also written to --out; benchmarks/results/ keeps the runs
BENCHMARKS.md quotes), with the machine's CPU model and flags.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode  # noqa: E402
import serving  # noqa: E402
import train  # noqa: E402
from harness import record  # noqa: E402

from model.cli import HelpFormatter  # noqa: E402

SECTIONS = ("train", "decode", "serving")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--upstream_dir", help="upstream v1's tree, as upstream_v1_harness.sh builds it")
    p.add_argument("--upstream_python", help="the Python that runs upstream's training script (default: "
                   "../venv/bin/python beside --upstream_dir)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and counts: checks the machinery, not speed")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="what to measure")
    p.add_argument("--size", default="27m", help="model config of every section")
    p.add_argument("--workdir", help="data, models and outputs (default: a new temporary directory)")
    p.add_argument("--out", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="minimind-bench-")
    t0 = time.time()
    common = ["--workdir"]
    size = "tiny" if args.quick else args.size
    upstream = ["--upstream_dir", args.upstream_dir] if args.upstream_dir else []
    plans = {
        "train": (train, (["--quick"] if args.quick else ["--size", size]) + upstream + (
            ["--upstream_python", args.upstream_python] if args.upstream_python else [])),
        "decode": (decode, ["--size", size] + upstream + (["--tokens", "16", "--repeats", "1"] if args.quick else [])),
        "serving": (serving, ["--size", size] + (["--clients", "1", "2", "--tokens", "16", "--samples", "2",
                                                   "--skip_memory", "--dtypes", "auto"] if args.quick else []))}
    res, tables = {"quick": args.quick}, []
    for name in args.sections:
        module, argv_ = plans[name]
        if name == "train" and not (args.quick or args.upstream_dir):
            print("train: skipped (it needs --upstream_dir, whose data both scripts train on)", file=sys.stderr)
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        res[name] = module.measure(module.parse_args(argv_ + common + [os.path.join(work, name)]))
        tables.append(module.table(res[name]))
        print(tables[-1], file=sys.stderr, flush=True)
    res["wall_s"] = time.time() - t0
    print("\n\n".join(tables))
    record(res, args.out)


if __name__ == "__main__":
    main()
