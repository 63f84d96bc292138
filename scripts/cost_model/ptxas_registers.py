"""Generates scripts/cost_model/ptxas_sm90.json: the registers per thread
that ptxas gives each __global__ kernel of
csrc/cuda/kernels_global.cuh compiled for sm_90 (H200), read from
`nvcc -Xptxas -v`. The cost model (h200_model.py) reads the file to get
blocks per SM; rerun this after changing a kernel:

    python scripts/cost_model/ptxas_registers.py [--nvcc PATH]

Instantiates exactly the float variants that csrc/cuda/op_body.h launches
for the model's blocks (pool 2, uint8 indices) in a scratch .cu file.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "ptxas_sm90.json"
ARCH = "sm_90"

# op_body.h's float launches for pool 2 (uint8 indices).
INSTANTIATIONS = """
#include <cstdint>
#include "cuda/kernels_global.cuh"
namespace fmnist_ext { namespace cuda {
using U8 = uint8_t;
template __global__ void conv_relu_maxpool2d_forward_kernel<float, float, U8, 2>(FwdArgs<float, U8>);
template __global__ void conv_relu_maxpool2d_forward_tiled_kernel<float, float, U8>(FwdArgs<float, U8>);
template __global__ void conv_relu_maxpool2d_forward_direct_kernel<float, float, U8>(FwdArgs<float, U8>, int64_t);
template __global__ void conv_relu_maxpool2d_backward_input_kernel<float, float, U8, 1>(BwdInputArgs<float, U8>);
template __global__ void conv_relu_maxpool2d_backward_input_kernel<float, float, U8, 4>(BwdInputArgs<float, U8>);
template __global__ void conv_relu_maxpool2d_backward_input_patch_kernel<float, float, U8>(
    BwdInputArgs<float, U8>);
template __global__ void conv_relu_maxpool2d_backward_input_direct_kernel<float, float, U8>(
    BwdInputArgs<float, U8>, int64_t);
template __global__ void conv_relu_maxpool2d_backward_weight_kernel<float, float, U8>(
    BwdWeightArgs<float, float, U8>);
template __global__ void conv_relu_maxpool2d_backward_weight_dense_kernel<float, float, U8, 6, 24>(
    BwdWeightArgs<float, float, U8>);
template __global__ void conv_relu_maxpool2d_backward_weight_dense_kernel<float, float, U8, 12, 8>(
    BwdWeightArgs<float, float, U8>);
template __global__ void conv_relu_maxpool2d_backward_weight_direct_kernel<float, float, U8>(
    BwdWeightArgs<float, float, U8>, int64_t);
template __global__ void conv_relu_maxpool2d_reduce_partials_kernel<float, float, U8>(
    BwdWeightArgs<float, float, U8>, int64_t);
}}
"""


def demangle(names: list[str]) -> list[str]:
    r = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return r.stdout.splitlines()


def short_name(demangled: str) -> str:
    """'void fmnist_ext::cuda::conv_relu_maxpool2d_forward_kernel<float, ...>(...)' ->
    'forward_kernel<float, float, unsigned char, 2>' (the harness's launch names, shortened)."""
    m = re.search(r"conv_relu_maxpool2d_(\w+<[^()]*>)", demangled)
    return m.group(1) if m else demangled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nvcc", default=shutil.which("nvcc"))
    args = ap.parse_args()
    if not args.nvcc:
        raise SystemExit("nvcc not found (pass --nvcc)")
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "kernels_sm90.cu"
        src.write_text(INSTANTIATIONS)
        cmd = [args.nvcc, f"-arch={ARCH}", "-std=c++20", "-O3", "-Xptxas", "-v", f"-I{ROOT / 'csrc'}"]
        cmd += ["-c", str(src), "-o", str(Path(d) / "k.o")]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"nvcc failed:\n{r.stderr}")
    version = [
        ln for ln in subprocess.run([args.nvcc, "--version"], capture_output=True, text=True).stdout.splitlines()
    ]
    version = next((ln.strip() for ln in version if "release" in ln), "?")
    kernels = {}
    current = None
    for line in r.stderr.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            kernels[current] = {"registers": int(m.group(1))}
    names = sorted(kernels)
    table = {short_name(dm): kernels[mn] for mn, dm in zip(names, demangle(names))}
    expected = INSTANTIATIONS.count("template __global__")
    if len(table) != expected:
        raise SystemExit(f"expected {expected} kernels in ptxas's output, got {sorted(table)}:\n{r.stderr}")
    OUT.write_text(
        json.dumps(
            {"arch": ARCH, "nvcc": version, "command": " ".join(["nvcc", *cmd[1:6]]), "kernels": table}, indent=1
        )
        + "\n"
    )
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
