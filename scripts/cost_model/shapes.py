"""The two blocks of the model at a batch size, and the FMAs and minimum
memory traffic their convolutions need, from the shapes alone (float32
tensors, int64 pool indices as stock max_pool2d keeps them).

Used by cuda_cost.py for the FMA term of the fused kernels (the counter sees
memory accesses, not arithmetic: the FMAs are the convolution's, so the fused
forward's padded channels are not in them) and by stock.py for the stock
sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

F32 = 4
I64 = 8


@dataclass(frozen=True)
class Block:
    name: str
    n: int
    cin: int
    h: int
    w: int
    cout: int
    k: int
    pool: int
    grad_input: bool  # does backward compute grad_input (block 1: the model's input, no)

    @property
    def oh(self) -> int:
        return self.h - self.k + 1

    @property
    def ow(self) -> int:
        return self.w - self.k + 1

    @property
    def ph(self) -> int:
        return self.oh // self.pool

    @property
    def pw(self) -> int:
        return self.ow // self.pool

    @property
    def taps(self) -> int:
        return self.cin * self.k * self.k

    def x_bytes(self) -> int:
        return self.n * self.cin * self.h * self.w * F32

    def w_bytes(self) -> int:
        return (self.cout * self.taps + self.cout) * F32

    def conv_bytes(self) -> int:
        return self.n * self.cout * self.oh * self.ow * F32

    def pooled_bytes(self) -> int:
        return self.n * self.cout * self.ph * self.pw * F32

    def index_bytes(self) -> int:
        return self.n * self.cout * self.ph * self.pw * I64

    def conv_fmas(self) -> int:
        """Dense convolution over every output position (stock conv, dgrad, wgrad)."""
        return self.n * self.cout * self.oh * self.ow * self.taps

    def pooled_conv_fmas(self) -> int:
        """The positions the pool reads (the fused forward's work)."""
        return self.n * self.cout * self.ph * self.pool * self.pw * self.pool * self.taps

    def patch_dgrad_fmas(self) -> int:
        """The fused grad_input from winner patches: per (output, input)
        channel pair and pool cell, the (pool + k - 1)^2 products of the
        cell's shifted filter (with its zeros) on every lane (32 images)."""
        return self.n * self.cout * self.cin * self.ph * self.pw * (self.pool + self.k - 1) ** 2

    def dense_wgrad_slots(self) -> int:
        """FMA issue slots of the fused dense grad_weight (kernels_backward_weight.cuh):
        a warp takes one image and splits its gh rows into 32 // (cin * k)
        bands; per row of a band and position, cout * k FMAs and one bias add
        per bias round (ceil(cout / (cin * k)) channels per lane), on all 32
        lanes of the warp."""
        gh, gw = self.ph * self.pool, self.pw * self.pool
        band_rows = -(-gh // (32 // (self.cin * self.k)))
        bias_rounds = -(-self.cout // (self.cin * self.k))
        return self.n * band_rows * gw * (self.cout * self.k + bias_rounds) * 32

    def winner_fmas(self) -> int:
        """One tap sweep per pool winner (the fused grad_input and grad_weight)."""
        return self.n * self.cout * self.ph * self.pw * self.taps


def model_blocks(n: int) -> list[Block]:
    return [
        Block("block1", n, 1, 28, 28, 6, 5, 2, grad_input=False),
        Block("block2", n, 6, 12, 12, 12, 5, 2, grad_input=True),
    ]
