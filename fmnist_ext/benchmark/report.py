"""The report as markdown (printed, and --markdown) and the speedup chart (--png).
Every figure is a time measured in the run or a ratio of two such times; REFUSED,
skipped and failed entries carry their one-line reason."""

from __future__ import annotations

import itertools
from pathlib import Path

from .. import atomic
from .blocks import BLOCKS, PASSES


def _ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms * 1e3:.0f} µs" if ms < 1 else f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def _num(v: float | None, suffix: str = "") -> str:
    """Compact, no exponent: 1234, 12.3, 1.23, 0.012."""
    if v is None:
        return "-"
    return f"{v:.0f}{suffix}" if v >= 100 else f"{v:.3g}{suffix}" if v >= 1e-3 else f"0{suffix}"


def _not_ok(entry: dict) -> str:
    why = entry.get("reason") or "; ".join(dict.fromkeys(entry.get("errors", [])))
    return f"{entry['status'].upper()}: {why}"


def _table(head: str, rows: list[list[str]]) -> list[str]:
    """A markdown table: `head` as "name:align | ..." (align l or r), one list of cells per row."""
    cols = [c.rsplit(":", 1) for c in head.split(" | ")]
    lines = [
        "| " + " | ".join(name for name, _ in cols) + " |",
        "|" + "|".join("---:" if al == "r" else "---" for _, al in cols) + "|",
    ]
    return ["", *lines, *("| " + " | ".join(cells) + " |" for cells in rows)]


def render_markdown(report: dict) -> str:
    m, cfg, c = report["machine"], report["config"], report["ceilings"]
    git, ks = m["git"], m["kernels_status"]
    commit = f"{git['commit'][:12]}{' (dirty)' if git['dirty'] else ''}" if git["commit"] else "unknown"
    fused = "compiled kernels" if m["fused_uses_compiled_kernels"] else "PURE-PYTORCH REFERENCE"
    isa = f" ({ks['cpu_isa']})" if cfg["device"] == "cpu" and ks.get("cpu_isa") else ""
    gpu = f", {m['cuda_device']}" if m["cuda_device"] else ""
    out = [
        "# fmnist_ext benchmark",
        "",
        f"{m['date']} | {m['cpu_model']} ({m['cpu_affinity'] or m['cpu_count']} usable cores{gpu}) | device "
        f"{cfg['device']}, {cfg['threads']} threads | torch {m['torch']} | fused: {fused}{isa} | commit {commit}"
        + " | QUICK run"
        * cfg["quick"],
        "",
        f"Machine ceilings, measured in this run: sgemm {c['sgemm']['n']}^3 **{c['sgemm']['gflops']:.1f} GFLOP/s**; "
        f"copy **{c['copy']['gbps']:.1f} GB/s** (read + write).",
    ]
    if report["rows"]:
        out += [
            "",
            "Per block: medians of interleaved timings; `vs stock` = stock's time / this time in the same row "
            "(> 1: faster). GFLOP/s and GB/s count the dense work and minimal traffic (see blocks.py).",
        ]
    for bi in cfg["blocks"]:
        cells = [
            [
                str(r["batch"]),
                r["pass"],
                r["impl"],
                _ms(r["median_s"]),
                _num(r["speedup_vs_stock"], "x"),
                _num(r["gflops"]),
                _num(100 * r["frac_sgemm"]),
                _num(r["gbps"]),
                _num(100 * r["frac_copy"]),
            ]
            if r["status"] == "ok"
            else [str(r["batch"]), r["pass"], r["impl"], _not_ok(r), "", "", "", "", ""]
            for r in report["rows"]
            if r["block"] == bi
        ]
        out += ["", f"## {BLOCKS[bi].describe()}"]
        out += _table(
            "batch:r | pass:l | impl:l | median:r | vs stock:r | GFLOP/s:r | % sgemm:r | GB/s:r | % copy:r", cells
        )
    compiled = [r for r in report["rows"] if r.get("compile_s") is not None]
    if compiled:
        out += [
            "",
            "torch.compile, cold compile of each row's first call (start-up before the first row: "
            f"{cfg['compile_startup_s']:.1f} s):",
        ]
        cells = [[str(r["block"]), str(r["batch"]), r["pass"], f"{r['compile_s']:.2f}"] for r in compiled]
        out += _table("block:r | batch:r | pass:l | compile s:r", cells)
    section = report["whole_model"]
    if section is None or "skipped" in section:
        out += ["", f"## Whole model: {'not run (--no-model)' if section is None else section['skipped']}"]
    else:
        out += _whole_model(section)
    out += ["", f"Total benchmark time: {report['duration_s']:.0f} s"]
    return "\n".join(out) + "\n"


def _whole_model(section: dict) -> list[str]:
    cfg = section["config"]
    where = f"{cfg['device']} ({cfg['gpu']}; every time read after torch.cuda.synchronize())" if cfg["gpu"] else "cpu"
    compiled = f"one round, `{cfg['compile_timed_in']}` allocator only" if cfg["compile_timed_in"] else "not timed"
    out = [
        "",
        "## Whole model (FashionCNN, each implementation in its own process)",
        "",
        f"Device {where}, {cfg['threads']} threads. Best of {cfg['rounds']} round(s) (one process per implementation "
        f"and round, order rotated). Training: batch {cfg['batch']}, Adam lr 0.01, synthetic uint8 images "
        f"normalised per step, epoch = {cfg['epoch_steps']} steps. `vs stock`: stock eager's time / this time, "
        f"same allocator setting; `first call`: the first step or forward. torch.compile: {compiled}.",
    ]
    for alloc, a in section["allocators"].items():
        env = " ".join(f"{k}={v}" for k, v in cfg["allocators"][alloc].items()) or "glibc defaults"
        cells = [
            [
                impl,
                _ms(t["step"]["median_s"]),
                _num(t.get("step_vs_stock"), "x"),
                f"{t['epoch']['median_s']:.2f} s",
                _num(t.get("epoch_vs_stock"), "x"),
                f"{t['first_call_s']:.2f} s",
            ]
            if t["status"] == "ok"
            else [impl, _not_ok(t), "", "", "", ""]
            for impl, t in a["train"].items()
        ]
        out += ["", f"### Allocator: {alloc} ({env})"]
        out += _table("training:l | step:r | vs stock:r | epoch:r | vs stock:r | first call:r", cells)
        cells = []
        for impl, batches in a["infer"].items():
            cells.append(["for_inference()" if impl == "inference" else impl])
            for row in batches.values():
                ok = row["status"] == "ok"
                cells[-1] += (
                    [_ms(row["forward"]["median_s"]), _num(row["forward_vs_stock"], "x")] if ok else [_not_ok(row), ""]
                )
        if cells:
            out += _table(
                "eval forward (no_grad):l" + "".join(f" | batch {b}:r | vs stock:r" for b in cfg["infer_batches"]),
                cells,
            )
        prof = a.get("profile")
        if prof and "error" in prof:
            out += ["", f"Profile: ERROR {prof['error']}"]
        elif prof:
            per = prof["self_cpu_s_per_step"]
            total = sum(per.values())
            host = "" if cfg["device"] == "cpu" else "; on the GPU: the host's Python, dispatch and launch time"
            out += [
                "",
                f"Fused training step by phase and layer (torch.profiler self CPU time per step{host}; "
                f"{prof['steps']} steps, {_ms(prof['wall_per_step_s'])}/step wall under the profiler):",
            ]
            top = [(k, v) for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.005 * total]
            cells = [[k.replace("|", "/"), f"{v * 1e3:.2f}", f"{100 * v / total:.0f}%"] for k, v in top]
            out += _table("phase / layer:l | ms/step:r | share:r", cells)
    out += ["", f"Whole-model section: {section['duration_s']:.0f} s"]
    return out


def render_png(report: dict, path: Path) -> None:
    """Speedup over stock (log axis): one panel per implementation and block, bars per
    batch size and pass; a row not timed is marked, not drawn. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = {(r["impl"], r["block"], r["batch"], r["pass"]): r for r in report["rows"]}
    impls = [i for i in report["config"]["impls"] if i != "stock" and any(k[0] == i for k in rows)]
    blocks, batches = report["config"]["blocks"], report["config"]["batch_sizes"]
    colors = dict(zip(PASSES, ("#4C72B0", "#DD8452", "#55A868")))
    fig, axes = plt.subplots(
        max(len(impls), 1), len(blocks), figsize=(6.5 * len(blocks), 3.4 * max(len(impls), 1) + 1), squeeze=False
    )
    width = 0.8 / len(PASSES)
    for ax_row, impl in zip(axes, impls):
        for ax, bi in zip(ax_row, blocks):
            ys = [1.0]
            for (k, pass_name), (j, batch) in itertools.product(enumerate(PASSES), enumerate(batches)):
                r, x = rows.get((impl, bi, batch, pass_name)), j + (k - 1) * width
                if r is not None:
                    ok = r["status"] == "ok"
                    v = r["speedup_vs_stock"] if ok else 1.0
                    ys.append(v)
                    if ok:
                        ax.bar(x, v, width, color=colors[pass_name])
                    label = f"{v:.2f}" if v < 10 else f"{v:.0f}"
                    kw = {"va": "bottom" if v >= 1 else "top", "rotation": 0 if ok else 90, "color": "k" if ok else "r"}
                    ax.text(x, v, label if ok else r["status"].upper(), ha="center", fontsize=7, **kw)
            lo, hi = min(ys) / 2, max(ys) * 2
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set(yscale="log", ylim=(lo, hi), xlabel="batch size", ylabel="speedup over stock (x, log)")
            ax.set_yticks([t * 10.0**e for e in range(-3, 5) for t in (1, 2, 5) if lo <= t * 10.0**e <= hi])
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(range(len(batches)), [str(b) for b in batches])
            ax.set_title(f"{impl}: {BLOCKS[bi].describe()}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in PASSES]
    fig.legend(handles, [f"{p}: {doc}" for p, doc in PASSES.items()], loc="lower center", fontsize=8, frameon=False)
    cfg = report["config"]
    fig.suptitle(
        f"fmnist_ext speedup over stock eager - {cfg['device']}, {cfg['threads']} threads, torch "
        f"{report['machine']['torch']}{' (QUICK run)' if cfg['quick'] else ''}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.1 if len(impls) <= 1 else 0.06, 1, 0.97))
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)
