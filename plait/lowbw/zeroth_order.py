"""Zeroth-order training with shared randomness (SPSA / MeZO, and "Just One Byte (per
gradient)", Zelikman et al. 2023): the pieces a worker needs, on plain tensors.

For each of ``zo_samples`` directions k of a step:

- z_k is a standard normal vector over the trained parameters. Every worker regenerates it from
  the same seed (``direction_seed``: the run's seed, the step, k), tensor by tensor
  (``tensor_seed``: the tensor's name and the offset of this rank's shard in it), so z is never
  stored or sent, and a sharded worker draws, shard by shard, the same z as an unsharded one;
- the worker measures its directional derivative g_k = (L(θ + εz) − L(θ − εz)) / 2ε with two
  forward passes: perturb in place, evaluate, perturb the other way, evaluate, restore
  (``perturb_``). Memory is that of inference plus the largest tensor's z;
- g_k travels quantized (``quantize`` / ``dequantize``): ``bits``-bit signed integers on a
  scale every worker knows without sending it (``SharedScale``: from the averages all workers
  already agree on), with stochastic rounding, so the quantized value is unbiased;
- every worker applies θ ← θ − η · mean_k(ḡ_k) z_k, ḡ_k the average over workers.

For a loss whose third derivative vanishes (a quadratic) the central difference is exactly
∇L·z, and E[(∇L·z) z] = ∇L: the estimate is unbiased (tests/unit/test_zeroth_order.py).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch


def _hash64(*parts: object) -> int:
    """A 63-bit seed from ``parts``: the same on every machine and Python (no ``hash()`` salt)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def direction_seed(seed: int, step: int, sample: int) -> int:
    """The seed of direction ``sample`` of optimizer step ``step``: shared by every worker."""
    return _hash64("plait-zo", seed, step, sample)


def tensor_seed(direction: int, name: str, offset: tuple[int, ...]) -> int:
    """The seed of the part of z that lies in tensor ``name`` starting at ``offset`` (this rank's
    shard of it; all zeros when unsharded)."""
    return _hash64(direction, name, tuple(offset))


@dataclass
class Piece:
    """One tensor this rank perturbs: its local data, its name, and where it starts in the
    full tensor (a shard's offset, or zeros)."""

    name: str
    data: torch.Tensor
    offset: tuple[int, ...]


def direction(piece: Piece, direction_seed_: int) -> torch.Tensor:
    """z restricted to ``piece`` (float32, on its device), regenerated from the seeds."""
    generator = torch.Generator(device=piece.data.device)
    generator.manual_seed(tensor_seed(direction_seed_, piece.name, piece.offset))
    return torch.randn(piece.data.shape, generator=generator, device=piece.data.device, dtype=torch.float32)


@torch.no_grad()
def perturb_(pieces: list[Piece], direction_seed_: int, scale: float) -> None:
    """θ ← θ + scale · z in place, one tensor at a time (z is never held whole)."""
    for piece in pieces:
        piece.data.add_(direction(piece, direction_seed_).to(piece.data.dtype), alpha=scale)


def qmax_of(bits: int) -> int:
    """The largest level: 2^(bits-1) - 1, and 1 for one bit (whose levels are -1 and +1)."""
    return max((1 << (bits - 1)) - 1, 1)


def quantize(value: float, scale: float, bits: int, uniform: float) -> int:
    """``value`` / ``scale`` as a ``bits``-bit signed level in [-qmax, qmax] (one bit: -1 or +1),
    rounded to a neighbour with the probability that makes it unbiased (``uniform`` in [0, 1)),
    and clipped at the ends."""
    qmax = qmax_of(bits)
    x = max(-qmax, min(qmax, value / scale))
    if bits == 1:  # levels -1 and +1: +1 with probability (x + 1) / 2
        return 1 if uniform < (x + 1) / 2 else -1
    return max(-qmax, min(qmax, math.floor(x + uniform)))


def dequantize(q: int, scale: float) -> float:
    return q * scale


class SharedScale:
    """The quantization step every worker derives alike: ``headroom`` root-mean-squares of the
    averaged directional derivatives seen so far (an exponential average), over ``qmax``. All its
    inputs are the exchanged averages, identical on every worker, so it is never sent. Before
    the first average exists there is no scale (``ready`` False): the first exchange is sent
    unquantized and seeds it."""

    def __init__(self, bits: int, headroom: float = 4.0, decay: float = 0.9):
        self.qmax = qmax_of(bits)
        self.headroom, self.decay = headroom, decay
        self.mean_square: float | None = None

    @property
    def ready(self) -> bool:
        return self.mean_square is not None and self.mean_square > 0

    @property
    def scale(self) -> float:
        return self.headroom * math.sqrt(self.mean_square) / self.qmax

    def observe(self, averages: list[float]) -> None:
        """Fold this step's averaged derivatives in (the same list on every worker)."""
        square = sum(a * a for a in averages) / max(len(averages), 1)
        self.mean_square = square if self.mean_square is None else self.decay * self.mean_square + (1 - self.decay) * square

    def state_dict(self) -> dict:
        return {"mean_square": self.mean_square}

    def load_state_dict(self, state: dict) -> None:
        self.mean_square = state["mean_square"]
