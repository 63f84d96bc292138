"""A/B of the training-mode BatchNorm fold (fmnist_ext/bn_fold.py) on the fused step.

Two fused FashionCNNs in one process, one with bn1 folded into conv block 2
(the default) and one with the fold switched off (bn1 as a layer), trained
step by step in alternation (ABAB..., the order flipped every step) so that
the machine's drift hits both alike. A step is zero_grad, forward,
cross-entropy, backward and Adam at batch 1000 on synthetic data.

    cd /tmp && python /path/to/scripts/bench_bn_fold.py [--steps 150] [--threads 2]
    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=10000000000 python ...   # the "tuned" allocator

Run it outside the checkout so the installed build (with the compiled
kernels) is imported, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fmnist_ext import bn_fold
from fmnist_ext.model import FashionCNN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="timed steps per variant (default 150)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--batch", type=int, default=1000, help="batch size (default 1000)")
    args = parser.parse_args()
    for name, least, why in (
        ("steps", 1, ""),
        ("threads", 1, ""),
        ("batch", 2, " (BatchNorm trains on 2 images or more)"),
    ):
        if getattr(args, name) < least:
            parser.error(f"--{name} must be at least {least}{why}")
    torch.set_num_threads(args.threads)
    fold, never = bn_fold.applies, (lambda *a: False)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    models = {}
    for name in ("off", "on"):
        torch.manual_seed(0)
        m = FashionCNN("fused").train()
        models[name] = (m, torch.optim.Adam(m.parameters(), lr=0.01))

    def step(name: str) -> None:
        bn_fold.applies = fold if name == "on" else never
        m, opt = models[name]
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()

    for _ in range(5):
        step("off")
        step("on")
    times = {"off": [], "on": []}
    for i in range(args.steps):
        for name in ("off", "on") if i % 2 == 0 else ("on", "off"):
            t = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t)
    bn_fold.applies = fold
    for name, ts in times.items():
        ts = sorted(ts)
        print(
            f"fold {name:3s}: median {statistics.median(ts) * 1e3:6.2f} ms  "
            f"p10 {ts[len(ts) // 10] * 1e3:6.2f}  p90 {ts[9 * len(ts) // 10] * 1e3:6.2f}"
        )
    paired = [a / b for a, b in zip(times["off"], times["on"])]
    print(
        f"off/on: ratio of medians {statistics.median(times['off']) / statistics.median(times['on']):.3f}, "
        f"median of paired ratios {statistics.median(paired):.3f}"
    )


if __name__ == "__main__":
    main()
