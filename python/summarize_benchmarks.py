"""Side-by-side headline table from benchmark JSON files (for BENCHMARKS.md).

    python python/summarize_benchmarks.py default.json tuned-malloc.json [--batch 1000]

Each JSON comes from one run of python/benchmark.py; the columns are those
runs (e.g. the default glibc allocator and MALLOC_MMAP_THRESHOLD_ set), and
every ratio in a column was measured side by side within that run. The model
rows: the in-process model benchmark of older runs (schema
fmnist_ext.benchmark/1, e.g. docs/benchmarks/cpu-*.json), or the whole-model
section (python -m fmnist_ext.benchmark.model) of later ones, which measures
both allocator settings itself in every run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PASSES = (("fwd", "forward"), ("fwd+bwd", "fwd+bwd, no input grad"), ("fwd+bwd+dx", "fwd+bwd with input grad"))


def _row(data: dict, block: int, batch: int, pas: str, impl: str) -> dict | None:
    for r in data["rows"]:
        if r["block"] == block and r["batch"] == batch and r["pass"] == pas and r["impl"] == impl:
            return r
    return None


def _cell(data: dict, block: int, batch: int, pas: str) -> str:
    fused = _row(data, block, batch, pas, "fused")
    stock = _row(data, block, batch, pas, "stock")
    comp = _row(data, block, batch, pas, "compile")
    if not fused or not stock or fused["status"] != "ok":
        return "n/a"
    text = f"{fused['median_s'] * 1e3:.2f} vs {stock['median_s'] * 1e3:.2f} ms = **{fused['speedup_vs_stock']:.1f}x**"
    if comp and comp["status"] == "ok":
        text += f"; torch.compile {comp['median_s'] * 1e3:.2f} ms (fused {comp['median_s'] / fused['median_s']:.1f}x faster)"
    return text


def _inprocess(d: dict, impl: str, what: str) -> float:
    return d["model"]["impls"][impl][what]["median_s"]


def _section(allocator: str):
    def get(d: dict, impl: str, what: str) -> float:
        return d["whole_model"]["allocators"][allocator]["train"][impl][what]["median_s"]

    return get


def _model_rows(runs: list[tuple[str, dict]]) -> list[tuple[str, object]]:
    """The model rows the runs have: the in-process model benchmark of
    schema-1 runs (rows "model"), and the whole-model section of later ones,
    per allocator setting it measured (rows "model, <allocator> allocator")."""
    rows: list[tuple[str, object]] = []
    if any(d.get("model") for _, d in runs):
        rows.append(("model", _inprocess))
    allocators: list[str] = []
    for _, d in runs:
        for a in (d.get("whole_model") or {}).get("allocators") or {}:
            if a not in allocators:
                allocators.append(a)
    rows += [(f"model, {a} allocator", _section(a)) for a in allocators]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", type=Path, help="benchmark JSON files (one column each)")
    parser.add_argument("--batch", type=int, default=1000)
    args = parser.parse_args(argv)
    runs = [(p.stem, json.loads(p.read_text())) for p in args.json]
    print("| block | pass | " + " | ".join(name for name, _ in runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    for block in (1, 2):
        for pas, label in PASSES:
            cells = [_cell(d, block, args.batch, pas) for _, d in runs]
            print(f"| {block} | {label} | " + " | ".join(cells) + " |")
    for label, get in _model_rows(runs):
        for what in ("step", "epoch"):
            cells = []
            for _, d in runs:
                try:
                    f, st = get(d, "fused", what), get(d, "stock", what)
                    cells.append(f"{f * 1e3:.1f} vs {st * 1e3:.1f} ms = **{st / f:.2f}x**")
                except (KeyError, TypeError):
                    cells.append("n/a")
            print(f"| {label} | training {what} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
