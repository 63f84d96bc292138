"""The benchmarked conv blocks of the seed CNN and their cost model.

FLOP convention (per image, the dense computation stock performs):
  forward      F = 2 * C_out * H_conv * W_conv * C_in * k * k   (H_conv, W_conv:
               the un-pooled convolution output; bias, ReLU and pooling are
               not counted)
  weight grad  ~ F;  input grad ~ F
  so fwd = F, fwd+bwd = 2F, fwd+bwd+dx = 3F. An implementation that skips work
  (the fused backward only visits pool winners) is credited with the same
  FLOPs, so its GFLOP/s is an "effective" rate.
Byte convention (minimal traffic of separate forward and backward ops, each
reading its operands once and writing its results once; saved activations or
indices are not counted):
  forward      read input, weight, bias; write pooled output
  backward     read grad_output, input, weight; write grad_weight, grad_bias
               (+ write grad_input for fwd+bwd+dx)
"""

from __future__ import annotations

from dataclasses import dataclass

PASSES = ("fwd", "fwd+bwd", "fwd+bwd+dx")
PASS_DOC = {
    "fwd": "forward under torch.no_grad()",
    "fwd+bwd": "forward + backward for weight and bias (input.requires_grad=False)",
    "fwd+bwd+dx": "forward + backward for input, weight and bias",
}


@dataclass(frozen=True)
class BlockSpec:
    index: int
    cin: int
    cout: int
    hw: int  # input height = width
    k: int = 5
    pool: int = 2
    padding: int = 0

    @property
    def conv_hw(self) -> int:
        return self.hw + 2 * self.padding - self.k + 1

    @property
    def out_hw(self) -> int:
        return self.conv_hw // self.pool

    def describe(self) -> str:
        return (
            f"block {self.index}: [B,{self.cin},{self.hw},{self.hw}], conv {self.cin}->{self.cout} "
            f"{self.k}x{self.k}, relu, maxpool {self.pool}"
        )

    def flops(self, batch: int, pass_name: str) -> int:
        fwd = 2 * self.cout * self.conv_hw * self.conv_hw * self.cin * self.k * self.k * batch
        return fwd * {"fwd": 1, "fwd+bwd": 2, "fwd+bwd+dx": 3}[pass_name]

    def bytes_moved(self, batch: int, pass_name: str, itemsize: int = 4) -> int:
        x = batch * self.cin * self.hw * self.hw
        w = self.cout * self.cin * self.k * self.k
        b = self.cout
        y = batch * self.cout * self.out_hw * self.out_hw
        n = x + w + b + y  # forward
        if pass_name != "fwd":
            n += y + x + w + w + b  # backward: read g, x, w; write dw, db
        if pass_name == "fwd+bwd+dx":
            n += x  # write dx
        return n * itemsize


BLOCKS = {1: BlockSpec(1, cin=1, cout=6, hw=28), 2: BlockSpec(2, cin=6, cout=12, hw=12)}
