"""Markdown of the whole-model section (model.py): the device it ran on, then
per allocator setting the training and eval tables with ratios to stock,
issue 10's targets (CPU targets: judged on the CPU only), and the profile of
the fused step by phase and layer.
"""

from __future__ import annotations

# Issue 10's targets (ratios against stock eager, same run).
TARGETS = {
    "train_step": 7.0,  # fused training step at batch 1000
    "infer_1": 8.0,  # for_inference() at batch 1
    "infer_1000": 12.0,  # for_inference() at batch 1000
    "epoch_s": 0.5,  # seconds per 60-step epoch (the CLI's baseline recipe; here synthetic data)
}


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    v = s * 1e3
    return f"{v * 1e3:.0f} µs" if v < 1 else (f"{v:.2f} ms" if v < 100 else f"{v:.0f} ms")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _targets(a: dict) -> list[tuple[str, str, str]]:
    rows = []
    f = a["train"].get("fused", {})
    v = f.get("step_vs_stock")
    rows.append(
        ("training step >= 7x stock", _x(v), "-" if v is None else ("yes" if v >= TARGETS["train_step"] else "**no**"))
    )
    e = (f.get("epoch") or {}).get("median_s")
    rows.append(
        (
            "epoch (60 steps, synthetic data) <= 0.5 s",
            "-" if e is None else f"{e:.2f} s",
            "-" if e is None else ("yes" if e <= TARGETS["epoch_s"] else "**no**"),
        )
    )
    for b, key in (("1", "infer_1"), ("1000", "infer_1000")):
        v = a["infer"].get("inference", {}).get("batches", {}).get(b, {}).get("vs_stock")
        rows.append(
            (
                f"for_inference() at batch {b} >= {TARGETS[key]:g}x stock",
                _x(v),
                "-" if v is None else ("yes" if v >= TARGETS[key] else "**no**"),
            )
        )
    return rows


def _device_line(cfg: dict) -> str:
    device = cfg.get("device", "cpu")  # sections recorded before the device was a setting ran on the CPU
    if device == "cpu":
        return "Device: cpu."
    text = f"Device: {device} ({cfg['gpu']}); every time read after torch.cuda.synchronize(), TF32 off."
    skipped = ", ".join(f"`{a}`" for a in cfg["allocators_not_for_device"])
    if skipped:
        text += f" Allocator setting {skipped} not run: it changes glibc's malloc, which holds no {device} tensors."
    return text


def render(section: dict) -> str:
    cfg = section["config"]
    on_cpu = cfg.get("device", "cpu") == "cpu"
    lines = [
        "## Whole model (FashionCNN, separate process per implementation)",
        "",
        _device_line(cfg),
        "",
        f"Best of {cfg['rounds']} rounds (each round: one process per implementation, order rotated); "
        f"{cfg['threads']} threads; training batch {cfg['batch']}, Adam lr 0.01, synthetic uint8 data "
        f"normalised per step; epoch = {cfg['epoch_steps']} steps. `vs stock` = stock eager time / this time, "
        "same allocator setting. `first call`: the first step or forward (for torch.compile: a cold compile). "
        "torch.compile: "
        + (f"one round, `{cfg['compile_timed_in']}` allocator only." if cfg["compile_timed_in"] else "not timed."),
        "",
    ]
    for alloc, a in section["allocators"].items():
        env = " ".join(f"{k}={v}" for k, v in cfg["allocator_env"][alloc].items()) or "glibc defaults"
        lines += [
            f"### Allocator: {alloc} ({env})",
            "",
            "| training | step (median) | vs stock | epoch | vs stock | first call |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for impl, t in a["train"].items():
            if t["status"] != "ok":
                lines.append(f"| {impl} | {t['status'].upper()}: {t.get('reason') or '; '.join(t['errors'])} | | | | |")
                continue
            lines.append(
                f"| {impl} | {_ms(t['step']['median_s'])} | {_x(t.get('step_vs_stock'))} | "
                f"{t['epoch']['median_s']:.2f} s | {_x(t.get('epoch_vs_stock'))} | {t['first_call_s']:.2f} s |"
            )
        if a["infer"]:
            lines += [
                "",
                "| eval forward (no_grad) | "
                + " | ".join(f"batch {b} | vs stock" for b in cfg["infer_batches"])
                + " |",
                "|---|" + "---:|---:|" * len(cfg["infer_batches"]),
            ]
        for impl, t in a["infer"].items():
            cells = []
            for b in cfg["infer_batches"]:
                row = t["batches"].get(str(b))
                if row is None:
                    cells += ["FAILED: " + "; ".join(t["errors"]), ""]
                elif row["status"] != "ok":
                    cells += [f"REFUSED: {row['reason']}", ""]
                else:
                    cells += [_ms(row["forward"]["median_s"]), _x(row.get("vs_stock"))]
            name = "for_inference()" if impl == "inference" else impl
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if on_cpu:
            lines += ["", "| target (issue 10) | measured | met? |", "|---|---:|---|"]
            lines += [f"| {t} | {m} | {ok} |" for t, m, ok in _targets(a)]
        else:
            lines += ["", "Issue 10's targets are CPU targets: not judged on this device."]
        prof = a["profile"]
        if prof is None:
            lines += ["", "Profile: not run (training step and epoch only)."]
        elif "error" in prof:
            lines += ["", f"Profile: ERROR {prof['error']}"]
        else:
            per = prof["self_cpu_s_per_step"]
            total = sum(per.values())
            host = "" if on_cpu else "; on the GPU: the host's Python, dispatch and launch time, not the GPU's"
            lines += [
                "",
                f"Fused training step by phase and layer (torch.profiler self CPU time per step{host}, "
                f"{prof['steps']} steps; profiled wall time {_ms(prof['wall_per_step_s'])}/step):",
                "",
                "| phase \\| layer | ms/step | share |",
                "|---|---:|---:|",
            ]
            for k, v in sorted(per.items(), key=lambda kv: -kv[1]):
                if v / total >= 0.005:
                    lines.append(f"| {k.replace('|', '/')} | {v * 1e3:.2f} | {100 * v / total:.0f}% |")
        lines.append("")
    lines.append(f"Whole-model section: {section['duration_s']:.0f} s")
    return "\n".join(lines) + "\n"
