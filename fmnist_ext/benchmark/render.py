"""The benchmark report as markdown (what is printed, and --markdown).

Times are medians in ms; `vs stock` is stock's time over the implementation's
in the same row; REFUSED and skipped rows carry their one-line reason.
"""

from __future__ import annotations

from .blocks import BLOCKS
from .model_render import render as render_section


def fmt_ms(s: float | None) -> str:
    if s is None:
        return "-"
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _sig(v: float | None, suffix: str = "") -> str:
    """Compact, no exponent: 1234, 12.3, 1.23, 0.012."""
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}{suffix}"
    if v >= 1:
        return f"{v:.2f}{suffix}" if v < 10 else f"{v:.1f}{suffix}"
    return f"{v:.2g}{suffix}" if v > 0 else f"0{suffix}"


def render_markdown(report: dict) -> str:
    """The whole report: header, ceilings, one table per block, compile times, whole model."""
    m = report["machine"]
    cfg = report["config"]
    ks = m["kernels_status"]
    lines = ["# fmnist_ext benchmark", ""]
    gpu = f", {m['cuda_device']}" if m.get("cuda_device") else ""
    git = m["git"]
    commit = (git["commit"][:12] + (" (dirty)" if git["dirty"] else "")) if git["commit"] else "unknown"
    lines.append(
        f"{m['date']} | {m['cpu_model']} ({m['cpu_affinity'] or m['cpu_count']} usable cores{gpu}) | "
        f"device {cfg['device']}, {cfg['threads']} threads | torch {m['torch']} | "
        f"fused: {'compiled' if m['fused_uses_compiled_kernels'] else 'REFERENCE FALLBACK'}"
        f"{' (' + ks['cpu_isa'] + ')' if cfg['device'] == 'cpu' and ks.get('cpu_isa') else ''} | commit {commit}"
        f"{' | QUICK run' if cfg['quick'] else ''}"
    )
    if not m["fused_uses_compiled_kernels"]:
        lines += [
            "",
            f"**Warning: the fused op runs the pure-PyTorch reference ({ks.get('not_loaded_reason') or 'no compiled kernel for this device'}).**",
        ]
    p = report["peaks"]
    lines += [
        "",
        f"Machine ceilings (measured now): sgemm {p['sgemm']['n']}^3 **{p['sgemm']['gflops']:.1f} GFLOP/s**; "
        f"copy {p['copy']['bytes'] / 2 / (1 << 20):.0f} MiB **{p['copy']['gbps']:.1f} GB/s** (read+write).",
        "",
        "Times are medians (ms); `vs stock` = stock time / this time in the same row (>1 is faster). "
        "GFLOP/s counts 2*Cout*Hconv*Wconv*Cin*k*k per image for the forward, the same again for the weight "
        "gradient and again for the input gradient; GB/s counts minimal bytes (see JSON `config`).",
    ]
    by_block: dict[int, list[dict]] = {}
    for r in report["rows"]:
        by_block.setdefault(r["block"], []).append(r)
    for bi, rows in by_block.items():
        lines += ["", f"## {BLOCKS[bi].describe()}", ""]
        lines.append("| batch | pass | impl | median ms | vs stock | GFLOP/s | % sgemm | GB/s | % copy |")
        lines.append("|---:|---|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            if r["status"] != "ok":
                label = "REFUSED" if r["status"] == "refused" else "skipped"
                lines.append(f"| {r['batch']} | {r['pass']} | {r['impl']} | {label}: {r['reason']} | | | | | |")
                continue
            fpf, fpb = r.get("frac_peak_flops"), r.get("frac_peak_bw")
            lines.append(
                f"| {r['batch']} | {r['pass']} | {r['impl']} | {fmt_ms(r['median_s'])} | "
                f"{_sig(r.get('speedup_vs_stock'), 'x')} | {_sig(r['gflops'])} | "
                f"{_sig(None if fpf is None else 100 * fpf)} | {_sig(r['gbps'])} | "
                f"{_sig(None if fpb is None else 100 * fpb)} |"
            )
    comp = [r for r in report["rows"] if r["impl"] == "compile" and r.get("compile_s") is not None]
    if comp:
        ci = report["config"].get("compile_info") or {}
        init = f" One-time start-up before the first row: {ci['init_s']:.1f} s." if ci.get("init_s") is not None else ""
        lines += [
            "",
            "## torch.compile: compile time (first call of the row, seconds)",
            "",
            f"Cold compiles (fresh inductor cache dir, graph caches off).{init}",
            "",
        ]
        lines.append("| block | batch | pass | compile s |")
        lines.append("|---:|---:|---|---:|")
        for r in comp:
            lines.append(f"| {r['block']} | {r['batch']} | {r['pass']} | {r['compile_s']:.2f} |")
    skipped = {r["reason"] for r in report["rows"] if r["impl"] == "compile" and r["status"] == "skipped"}
    if skipped:
        lines += ["", "torch.compile skipped: " + "; ".join(sorted(skipped))]
    section = report.get("whole_model")
    if section and "skipped" in section:
        lines += ["", "## Whole model", "", f"skipped: {section['skipped']}"]
    elif section:
        lines += ["", render_section(section).rstrip("\n")]
    elif report["config"].get("whole_model"):
        lines += ["", f"Whole model: {report['config']['whole_model']}."]
    lines += ["", f"Total benchmark time: {report['duration_s']:.0f} s"]
    return "\n".join(lines) + "\n"
