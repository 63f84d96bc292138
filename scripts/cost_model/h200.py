"""The H200 figures of the CUDA cost model, in one place, with their sources,
and the model itself (estimated time of one kernel launch).

Figures (H200 SXM, GH100 die, compute capability 9.0):
  SMS = 132                  Hopper whitepaper (H100 SXM5: 132 SMs; H200 is
                             the same GH100 configuration with HBM3e)
  CLOCK_HZ = 1.98e9          max boost clock, 1980 MHz (H100/H200 SXM datasheets)
  FP32_FMA_PER_CLK_SM = 128  FP32 lanes per SM (Hopper whitepaper); check:
                             132 * 128 * 2 * 1.98e9 = 67 TFLOPS, the H200
                             datasheet's FP32 figure
  SMEM_BYTES_PER_CLK_SM = 128  32 banks x 4 bytes per clock (CUDA C++
                             Programming Guide, "Shared Memory" for cc 9.0):
                             one wavefront per clock
  L1_BYTES_PER_CLK_SM = 128  assumption: global requests served by L1/TEX at
                             the shared-memory pipe's 128 B/clk (4 sectors)
  DRAM_BYTES_PER_S = 4.8e12  HBM3e, H200 datasheet
  L2_BYTES = 50 MiB          Hopper whitepaper (GH100 as in H100 SXM5)
  SMEM_PER_SM = 228 KiB, SMEM_RESERVED_PER_BLOCK = 1 KiB, REGS_PER_SM = 65536,
  MAX_THREADS_PER_SM = 2048, MAX_BLOCKS_PER_SM = 32, register allocation in
  units of 256 per warp: CUDA C++ Programming Guide, Technical
  Specifications per Compute Capability (9.0), and the occupancy calculator
  LAUNCH_S = 2e-6            assumption (no NVIDIA figure): the gap between
                             back-to-back kernels of one stream without graphs
  On a GPU, scripts/gpu_check/peak_rates.cu (a gpu_check.sh step) measures
  FP32_FMA_PER_CLK_SM, the shared-memory wavefronts per clock and the figure
  the model lacks, mma.sync's TF32 rate, for comparison with these.

The model, per kernel launch, from the counted totals (counter.cpp):
  blocks per SM k = min over the limits of threads, registers (ptxas),
      shared memory (the launch plan's) and MAX_BLOCKS_PER_SM;
  waves = ceil(blocks / (SMS * k)) (reported; k > 1 only means the blocks
  of an SM share its pipes); the busiest SM serves b = ceil(blocks / SMS)
  blocks of the average block's work, one wave after another:
  t_smem = b * (shared wavefronts per block) * 128 / SMEM_BYTES_PER_CLK_SM / CLOCK_HZ
  t_l1   = b * (global sectors per block) * 32 / L1_BYTES_PER_CLK_SM / CLOCK_HZ
  t_fma  = b * (FMAs per block) / FP32_FMA_PER_CLK_SM / CLOCK_HZ
  t_dram = (distinct sectors read + written) * 32 / DRAM_BYTES_PER_S
           (every re-read of a sector within a launch is taken as an L2 hit;
            cuda_cost.py reports reread_ratio = sectors requested / distinct
            sectors, i.e. how much rests on that)
  time = max(t_smem, t_l1, t_fma, t_dram) + LAUNCH_S.
  Not modelled: latency (dependent load chains, barriers with few warps per
  SM), instruction issue other than FMAs, L2 bandwidth, clock throttling.
  The stock sequence's kernels (stock.py) get the same t_dram, t_fma and
  LAUNCH_S from their minimum traffic and FMAs, with all SMs busy.
"""

from __future__ import annotations

import math

SMS = 132
CLOCK_HZ = 1.98e9
FP32_FMA_PER_CLK_SM = 128
SMEM_BYTES_PER_CLK_SM = 128
L1_BYTES_PER_CLK_SM = 128
DRAM_BYTES_PER_S = 4.8e12
L2_BYTES = 50 * 2**20
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers, per warp
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
LAUNCH_S = 2e-6
SECTOR = 32
WAVEFRONT_BYTES = 128  # one shared-memory wavefront: 32 banks x 4 bytes


def blocks_per_sm(threads: int, smem: int, regs: int) -> int:
    warps = math.ceil(threads / 32)
    regs_per_warp = math.ceil(regs * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = [MAX_BLOCKS_PER_SM, MAX_THREADS_PER_SM // (warps * 32), REGS_PER_SM // (regs_per_warp * warps)]
    if smem > 0:
        limits.append(SMEM_PER_SM // (smem + SMEM_RESERVED_PER_BLOCK))
    return max(0, min(limits))


def dram_s(nbytes: float) -> float:
    return nbytes / DRAM_BYTES_PER_S


def fma_all_sms_s(fmas: float) -> float:
    return fmas / (SMS * FP32_FMA_PER_CLK_SM * CLOCK_HZ)


def launch_time(c: dict, regs: int, fmas: float) -> dict:
    """c: one launch's counts (counter.cpp's keys, plus threads and smem)."""
    blocks = c["blocks"]
    k = blocks_per_sm(c["threads"], c["smem"], regs)
    waves = math.ceil(blocks / (SMS * k))
    per_sm = math.ceil(blocks / SMS) / blocks  # the busiest SM's share of the launch's totals
    t = {
        "blocks_per_sm": k,
        "waves": waves,
        "t_smem_us": 1e6 * per_sm * c["shared_wavefronts"] * WAVEFRONT_BYTES / SMEM_BYTES_PER_CLK_SM / CLOCK_HZ,
        "t_l1_us": 1e6 * per_sm * c["global_sectors"] * SECTOR / L1_BYTES_PER_CLK_SM / CLOCK_HZ,
        "t_fma_us": 1e6 * per_sm * fmas / FP32_FMA_PER_CLK_SM / CLOCK_HZ,
        "t_dram_us": 1e6 * dram_s((c["dram_read_sectors"] + c["dram_write_sectors"]) * SECTOR),
    }
    t["time_us"] = max(t["t_smem_us"], t["t_l1_us"], t["t_fma_us"], t["t_dram_us"]) + 1e6 * LAUNCH_S
    return t


def stock_kernel_time(nbytes: float, fmas: float) -> dict:
    t = {"t_dram_us": 1e6 * dram_s(nbytes), "t_fma_us": 1e6 * fma_all_sms_s(fmas)}
    t["time_us"] = max(t["t_dram_us"], t["t_fma_us"]) + 1e6 * LAUNCH_S
    return t
