"""Layout-invariant initialization: any block of any parameter can be generated on its own.

A rank that holds rows 512..767 of the embedding, or columns 64..127 of ``wo``, must produce
exactly the values the single process puts there, without generating the whole model (a 70B
model does not fit on one rank). So random values are not drawn from one generator that walks
the model in order: each parameter is cut along its first dimension into fixed blocks of rows
(about 64K elements each, a function of the shape only), and every block has its own generator
seeded from (seed, parameter name, block index). A region then costs the blocks it overlaps.

The distribution is the one ``Llama.init_weights`` documents: normal(0, init_std) for
matrices, output projections of the residual branches scaled by 1/sqrt(2·layers) (GPT-2),
zero biases and unit norm weights.
"""

from __future__ import annotations

import hashlib
import math

import torch

from plait.config import ModelConfig

# Elements per block of rows: large enough that the per-generator cost is small, small enough
# that a region's overshoot into a neighbouring block costs little.
BLOCK_ELEMENTS = 1 << 16

# Parameters whose output feeds the residual stream directly (scaled init).
_RESIDUAL_OUTPUTS = ("wo.weight", "w2.weight", "experts.w2")

Region = tuple[slice, ...]


def full_region(shape: tuple[int, ...] | torch.Size) -> Region:
    """The region covering a whole tensor of ``shape``."""
    return tuple(slice(0, size) for size in shape)


def region_shape(region: Region) -> tuple[int, ...]:
    return tuple(piece.stop - piece.start for piece in region)


def _block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def normal_region(seed: int, name: str, shape: tuple[int, ...], region: Region, std: float) -> torch.Tensor:
    """The ``region`` of a normal(0, std) fp32 tensor of ``shape`` named ``name``: bitwise the
    same values whichever region (or the whole tensor) is asked for."""
    row_elements = math.prod(shape[1:])
    rows_per_block = max(1, BLOCK_ELEMENTS // max(row_elements, 1))
    first, stop = region[0].start, region[0].stop
    pieces = []
    for block in range(first // rows_per_block, -(-stop // rows_per_block)):
        block_start = block * rows_per_block
        block_rows = min(rows_per_block, shape[0] - block_start)
        gen = torch.Generator().manual_seed(_block_seed(seed, name, block))
        values = torch.empty((block_rows, *shape[1:]), dtype=torch.float32).normal_(0.0, std, generator=gen)
        lo, hi = max(first, block_start) - block_start, min(stop, block_start + block_rows) - block_start
        # Keep only this region's columns (and deeper dims) right away: a row-sharded
        # tensor's rows are generated whole, but only its own slice of them is kept.
        pieces.append(values[(slice(lo, hi), *region[1:])].clone())
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class InitWeights:
    """The weight source of a fresh run: ``source(name, region)`` returns that region of the
    parameter's initial value (fp32 CPU), for any layout's shard of it."""

    def __init__(self, cfg: ModelConfig, seed: int, shapes: dict[str, tuple[int, ...]]):
        self.cfg, self.seed, self.shapes = cfg, seed, shapes

    def std(self, name: str) -> float:
        if name.endswith(_RESIDUAL_OUTPUTS):
            return self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        return self.cfg.init_std

    def __call__(self, name: str, region: Region) -> torch.Tensor:
        shape = region_shape(region)
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith("bias"):
            return torch.zeros(shape)
        return normal_region(self.seed, name, self.shapes[name], region, self.std(name))
