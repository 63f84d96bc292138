"""Issue 21's speed check: the benchmark's per-block rows of two builds of
fmnist_ext side by side, on one torch, in one run: each round runs the block
rows once per build (each in its own process; the order alternates between
rounds), and the table gives the median over rounds of each row's fused and
stock medians.

    python docs/pending/ab_blocks.py NAME=SITE_DIR NAME=SITE_DIR [--rounds 3] [benchmark args...]

SITE_DIR holds an unpacked wheel (its fmnist_ext/ with _C.so)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    args = sys.argv[1:]
    builds = [a.split("=", 1) for a in args if "=" in a and not a.startswith("-")]
    rest = [a for a in args if not ("=" in a and not a.startswith("-"))]
    rounds = 3
    if "--rounds" in rest:
        i = rest.index("--rounds")
        rounds = int(rest[i + 1])
        del rest[i : i + 2]
    bench = rest or ["--device", "cpu", "--no-model", "--impls", "fused", "--batch-sizes", "1,64,1000"]
    times: dict[tuple, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, site in builds if r % 2 == 0 else builds[::-1]:
                out = Path(tmp) / f"{name}-{r}.json"
                env = {**os.environ, "PYTHONPATH": site, "FMNIST_REQUIRE_COMPILED": "1"}
                cmd = [sys.executable, "-m", "fmnist_ext.benchmark", *bench, "--json", str(out)]
                subprocess.run(cmd, env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL)
                report = json.loads(out.read_text())
                status = report.get("kernels") or report.get("status") or {}
                for row in report["rows"]:
                    if row.get("status") != "ok":
                        continue
                    key = (row["block"], row["batch"], row["pass"])
                    times.setdefault(key, {}).setdefault(f"{name} {row['impl']}", []).append(row["median_s"])
                print(f"round {r + 1}: {name} done ({status.get('built_against_torch', '')})", file=sys.stderr)
    cols = sorted({c for v in times.values() for c in v})
    print("| block | batch | pass | " + " | ".join(f"{c} (ms)" for c in cols) + " |")
    print("|---|---|---|" + "---|" * len(cols))
    for key in sorted(times):
        cells = [f"{min(times[key][c]) * 1e3:.3f}" if c in times[key] else "" for c in cols]
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
