"""Estimated H200 time of the fused CUDA kernels and of the stock sequence,
without a GPU: the table in BENCHMARKS.md, "CUDA cost counter".

Runs the counting build of the execution harness (tests/cuda_emulation,
counter.h) on the model's two blocks (block 1: [N,1,28,28], conv 1->6 5x5,
pool 2; block 2: [N,6,12,12], conv 6->12 5x5, pool 2; random normal data)
forward and backward, with the launch plans of a 132-SM H200, and turns each
launch's measured counts (shared-memory wavefronts, global sectors, distinct
DRAM sectors, barriers) into an estimated time with the model and figures of
cost_model/h200.py; the stock sequence is estimated by cost_model/stock.py.
These are model estimates, never measured on a GPU.

    python scripts/cuda_cost.py [--json OUT] [--batches 1000,10000]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "cuda_emulation"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "cost_model"))
import driver  # noqa: E402
from h200 import SMS, launch_time  # noqa: E402
from shapes import Block, model_blocks  # noqa: E402
from stock import stock_rows  # noqa: E402

REGISTERS = json.loads((Path(__file__).resolve().parent / "cost_model" / "ptxas_sm90.json").read_text())["kernels"]


def short_kernel(full: str) -> str:
    """The kernel's name as ptxas_sm90.json keys it: 'forward_kernel<float, float, unsigned char, 2>'."""
    m = re.search(r"conv_relu_maxpool2d_(\w+<[^()]*>)", full)
    return m.group(1) if m else full


def display(kernel: str) -> str:
    """'forward_kernel<float, float, unsigned char, 2>' -> 'forward_kernel<2>' (the table's)."""
    return re.sub(r"<float, float, unsigned char(, )?", "<", kernel).replace("<>", "")


def fused_fmas(b: Block, kernel: str) -> float:
    """The convolution FMAs of a fused kernel (shapes.py; not counted)."""
    if kernel.startswith("forward"):
        return b.pooled_conv_fmas()
    if kernel.startswith("backward_weight_dense"):
        return b.dense_wgrad_slots()
    if kernel.startswith("backward_input_patch"):
        # A block's 32 lanes are 32 images: a partly filled last block's idle
        # lanes still take issue slots.
        return b.patch_dgrad_fmas() * (32 * -(-b.n // 32)) / b.n
    if kernel.startswith(("backward_input", "backward_weight")):
        return b.winner_fmas()
    return 0


def parse_counts(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        head, kernel = line.split(" kernel=", 1)
        c = {k: int(v) for k, v in (kv.split("=") for kv in head.split())}
        c["kernel"] = short_kernel(kernel)
        rows.append(c)
    return rows


def run_harness(exe: Path, d: Path, name: str) -> None:
    r = subprocess.run([str(exe), str(d), name], capture_output=True, text=True)
    if r.returncode != 0 or "ran 1 cases" not in r.stdout:
        raise SystemExit(f"counting harness failed on {name}:\n{r.stdout}\n{r.stderr[-4000:]}")


def measure_block(exe: Path, d: Path, b: Block, seed: int) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((b.n, b.cin, b.h, b.w), generator=gen)
    w = torch.randn((b.cout, b.cin, b.k, b.k), generator=gen) / b.k
    bias = torch.randn((b.cout,), generator=gen)
    meta = dict(op="fwd", dtype="f32", pool=b.pool, pad=(0, 0), sms=SMS, seed=seed, bias=1)
    name = f"{b.name}_{b.n}"
    driver.write_case(d, f"{name}_fwd", meta, dict(x=x, w=w, b=bias))
    run_harness(exe, d, f"{name}_fwd")
    ind = driver.read_tensor(d / f"{name}_fwd.ind", torch.uint8)
    go = torch.randn(ind.shape, generator=gen)
    mask = (int(b.grad_input), 1, 1)
    driver.write_case(d, f"{name}_bwd", dict(meta, op="bwd", mask=mask), dict(x=x, w=w, go=go, idx=ind))
    run_harness(exe, d, f"{name}_bwd")
    rows = []
    for direction in ("fwd", "bwd"):
        for c in parse_counts(d / f"{name}_{direction}.counts"):
            regs = REGISTERS[c["kernel"]]["registers"]
            t = launch_time(c, regs, fused_fmas(b, c["kernel"]))
            distinct = max(1, c["dram_read_sectors"] + c["dram_write_sectors"])
            rows.append(
                {"block": b.name, "dir": direction, "registers": regs, "reread_ratio": c["global_sectors"] / distinct}
                | c
                | t
            )
    return rows


def print_table(batch: int, fused: list[dict], stock: list[dict]) -> None:
    print(f"\n== batch {batch} (H200 model estimates, not measured) ==")
    hdr = (
        f"{'block':7}{'dir':4}{'fused kernel':46}{'blk':>6}{'k/SM':>5}{'wf/req':>7}{'sect/req':>9}"
        f"{'smem':>8}{'l1':>8}{'dram':>8}{'fma':>8}{'est us':>9}"
    )
    print(hdr)
    for r in fused:
        wf = r["shared_wavefronts"] / max(1, r["shared_requests"])
        sr = r["global_sectors"] / max(1, r["global_requests"])
        print(
            f"{r['block']:7}{r['dir']:4}{display(r['kernel']):46}{r['blocks']:>6}{r['blocks_per_sm']:>5}{wf:>7.2f}{sr:>9.2f}"
            f"{r['t_smem_us']:>8.1f}{r['t_l1_us']:>8.1f}{r['t_dram_us']:>8.1f}{r['t_fma_us']:>8.1f}{r['time_us']:>9.1f}"
        )
    print(f"{'block':7}{'dir':4}{'stock kernel':46}{'MB':>12}{'dram':>34}{'fma':>8}{'est us':>9}")
    for r in stock:
        print(
            f"{r['block']:7}{r['dir']:4}{r['kernel']:46}{r['bytes'] / 1e6:>12.2f}"
            f"{r['t_dram_us']:>34.1f}{r['t_fma_us']:>8.1f}{r['time_us']:>9.1f}"
        )
    for blk in sorted({r["block"] for r in fused}):
        for direction in ("fwd", "bwd"):
            f = sum(r["time_us"] for r in fused if r["block"] == blk and r["dir"] == direction)
            s = sum(r["time_us"] for r in stock if r["block"] == blk and r["dir"] == direction)
            print(f"  {blk} {direction}: fused {f:8.1f} us   stock {s:8.1f} us")
    f = sum(r["time_us"] for r in fused)
    s = sum(r["time_us"] for r in stock)
    print(f"  total (both blocks, fwd + bwd): fused {f:.1f} us, stock {s:.1f} us, fused/stock {f / s:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the rows and totals here")
    ap.add_argument("--batches", default="1000,10000", help="comma-separated batch sizes")
    args = ap.parse_args()
    batches = [int(v) for v in args.batches.split(",")]
    result = {"sms": SMS, "model": "scripts/cost_model/h200.py", "totals": {}, "fused": [], "stock": []}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        exe = driver.build_counter(d)
        for batch in batches:
            fused, stock = [], []
            for i, b in enumerate(model_blocks(batch)):
                fused += measure_block(exe, d, b, seed=i + 1)
                stock += stock_rows(b)
            print_table(batch, fused, stock)
            result["totals"][str(batch)] = {
                "fused_us": sum(r["time_us"] for r in fused),
                "stock_us": sum(r["time_us"] for r in stock),
            }
            result["fused"] += [dict(r, batch=batch) for r in fused]
            result["stock"] += [dict(r, batch=batch) for r in stock]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
