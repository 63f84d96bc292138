"""The speedup chart (--png): one panel per implementation and block, bars per
batch size and pass, speedup over stock on a log axis; refused rows are
marked, not drawn. The file is written atomically (format from the extension).
"""

from __future__ import annotations

from pathlib import Path

from .. import atomic
from .blocks import BLOCKS, PASS_DOC, PASSES


def render_png(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    blocks = sorted({r["block"] for r in rows})
    impls = [i for i in report["config"]["impls"] if i != "stock"]
    batches = report["config"]["batch_sizes"]
    passes = list(PASSES)
    colors = {"fwd": "#4C72B0", "fwd+bwd": "#DD8452", "fwd+bwd+dx": "#55A868"}
    nr, nc = max(len(impls), 1), max(len(blocks), 1)
    fig, axes = plt.subplots(nr, nc, figsize=(6.5 * nc, 3.4 * nr + 0.8), squeeze=False)
    width = 0.8 / len(passes)
    index = {(r["block"], r["batch"], r["pass"], r["impl"]): r for r in rows}
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def fmt_x(v: float) -> str:
        return f"{v:.2f}" if v < 10 else f"{v:.0f}"

    for i, impl in enumerate(impls):
        for j, bi in enumerate(blocks):
            ax = axes[i][j]
            shown: list[float] = []
            for k, ps in enumerate(passes):
                xs, ys = [], []
                for bx, batch in enumerate(batches):
                    r = index.get((bi, batch, ps, impl))
                    x = bx + (k - (len(passes) - 1) / 2) * width
                    if r is None:
                        continue
                    if r["status"] != "ok" or not r.get("speedup_vs_stock"):
                        ax.text(
                            x,
                            1.0,
                            "REFUSED" if r["status"] == "refused" else "n/a",
                            rotation=90,
                            ha="center",
                            va="bottom",
                            fontsize=7,
                            color="red",
                        )
                        continue
                    xs.append(x)
                    ys.append(r["speedup_vs_stock"])
                shown += ys
                bars = ax.bar(xs, ys, width, label=ps, color=colors[ps])
                for rect, v in zip(bars, ys):
                    ax.text(
                        rect.get_x() + rect.get_width() / 2,
                        v,
                        fmt_x(v),
                        ha="center",
                        va="bottom" if v >= 1 else "top",
                        fontsize=7,
                    )
            ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            ax.set_yscale("log")
            lo = min([0.5, *shown]) / 1.6
            hi = max([2.0, *shown]) * 1.8
            ax.set_ylim(lo, hi)
            mantissas = (1, 2, 5) if hi / lo < 300 else (1,)
            ticks = [m * 10.0**e for e in range(-3, 6) for m in mantissas if lo <= m * 10.0**e <= hi]
            ax.set_yticks(ticks)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xticks(range(len(batches)))
            ax.set_xticklabels([str(b) for b in batches])
            ax.set_xlabel("batch size")
            ax.set_ylabel("speedup over stock (x, log)")
            ax.set_title(f"{impl}: {BLOCKS[bi].describe()}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[ps]) for ps in passes]
    fig.legend(
        handles, [f"{ps}: {PASS_DOC[ps]}" for ps in passes], loc="lower center", ncol=1, fontsize=8, frameon=False
    )
    m = report["machine"]
    fig.suptitle(
        f"fmnist_ext speedup over stock eager - {report['config']['device']}, {report['config']['threads']} threads, "
        f"torch {m['torch']}{' (QUICK run)' if report['config']['quick'] else ''}",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0.1 if nr == 1 else 0.06, 1, 0.97))
    atomic.save_figure(fig, path, dpi=110)
    plt.close(fig)
