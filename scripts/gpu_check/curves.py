"""Compares the loss curves of two training runs (eager and --cuda-graphs) from
their metrics.jsonl: per epoch the train loss, test loss and test accuracy of
both, and their differences. The two runs differ only by rounding (the
graphed Adam is capturable, the same kernels run in the same order
otherwise), which training amplifies over 1,200 steps: the verdict asks the
same final test accuracy to within --acc points and every epoch's train loss
to within --rel of each other; the printed differences are the measurement.

    python scripts/gpu_check/curves.py EAGER/metrics.jsonl GRAPHED/metrics.jsonl [--acc 0.01] [--rel 0.05]
"""

from __future__ import annotations

import argparse
import json
import sys


def read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eager")
    ap.add_argument("graphed")
    ap.add_argument("--acc", type=float, default=0.01, help="largest final test-accuracy difference (default 0.01)")
    ap.add_argument("--rel", type=float, default=0.05, help="largest relative train-loss difference (default 0.05)")
    args = ap.parse_args(argv)
    a, b = read(args.eager), read(args.graphed)
    if not a or len(a) != len(b):
        print(f"FAIL: {len(a)} eager epochs, {len(b)} graphed")
        return 1
    worst = 0.0
    print("epoch  train loss eager/graphed (rel diff)   test acc eager/graphed   epoch s eager/graphed")
    for ea, eb in zip(a, b):
        rel = abs(ea["train_loss"] - eb["train_loss"]) / max(abs(ea["train_loss"]), 1e-12)
        worst = max(worst, rel)
        print(
            f"{ea['epoch']:>5}  {ea['train_loss']:.6f}/{eb['train_loss']:.6f} ({rel:.1e})   "
            f"{ea['test_acc']:.4f}/{eb['test_acc']:.4f}   {ea['epoch_time_s']:.2f}/{eb['epoch_time_s']:.2f}"
        )
    dacc = abs(a[-1]["test_acc"] - b[-1]["test_acc"])
    ok = worst <= args.rel and dacc <= args.acc
    print(
        f"{'PASS' if ok else 'FAIL'}: largest train-loss difference {worst:.2e} (limit {args.rel}), "
        f"final test accuracy difference {dacc:.4f} (limit {args.acc})"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
