"""Runs the fused forward and backward of both model blocks once, as training
runs them, for compute-sanitizer (scripts/gpu_check.sh): the self-check's
training cases (fmnist_ext.selfcheck.training_cases): each block at the
training batch with training's output masks (block 1: no grad_input), and at
1,001 images with the plans made for 4 SMs (FMNIST_CUDA_SM_COUNT: many
grad_weight chunks per block, a last chunk and block holding one image).
Only the fused op's kernels run on the device beyond the data's copies (no
stock reference: the sanitizer checks our kernels).

    python scripts/gpu_check/blocks.py [--batch 1000] [--device cuda]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import fmnist_ext
from fmnist_ext import selfcheck


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=selfcheck.TRAINING_BATCH, help="training batch size (default 1000)")
    ap.add_argument("--device", default="cuda", help="cuda (default), or cpu for a dry run")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    for i, case in enumerate(selfcheck.training_cases(args.batch)):
        x, w, b, g = (t.float().to(device) for t in selfcheck.case_tensors(case, seed=i))
        x.requires_grad_(case.grad_input)
        w.requires_grad_()
        b.requires_grad_()
        if case.sms is not None:
            os.environ["FMNIST_CUDA_SM_COUNT"] = str(case.sms)
        else:
            os.environ.pop("FMNIST_CUDA_SM_COUNT", None)
        y = fmnist_ext.conv_relu_maxpool2d(x, w, b, case.padding, case.pool)
        grads = torch.autograd.grad(y, [t for t in (x, w, b) if t.requires_grad], g)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        sums = " ".join(f"{float(t.double().abs().sum()):.6g}" for t in (y.detach(), *grads))
        print(f"{case.name}: sms={case.sms or 'device'} grad_input={case.grad_input} |sums| {sums}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
