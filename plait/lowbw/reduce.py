"""The mean of a flat vector over ranks with quantized traffic, identical bits on every rank.

Reduce-scatter of quantized pieces, a local fp32 sum, an all-gather of the re-quantized
result: rank j owns a contiguous run of whole scale groups, receives every rank's quantized
copy of that run in one all_to_all, sums them in float32 in rank order, quantizes the mean
again and all-gathers it. Every rank, the owner too, decodes the mean from the gathered bytes,
so all ranks hold the same bits: DiLoCo workers never drift apart. A plain all-reduce of
quantized values cannot do this (the sum of int4 values overflows int4, and summing decoded
values in ring order gives each rank a different rounding).

Bytes sent per rank (``sent_bytes``): the all_to_all sends every piece but one's own,
``sum_j b_j - b_rank``, and the all-gather sends the own run padded to the largest,
``(n - 1) * max_j b_j``, where ``b_j = wire_bytes(kind, elements of run j, groups of run j)``.
For 'none' with equal runs that is a ring all-reduce's ``2 (n - 1) / n * 4 * numel``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.lowbw.quantize import dequantize, divisor, from_bytes, quantize, to_bytes, wire_bytes

# torch 2.13 renamed all_gather_into_tensor (the old name warns); older versions lack the new one.
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


class ErrorFeedback:
    """The part of each vector that quantization dropped, kept per caller-given key (one per
    flat buffer) and added back before its next quantization, so nothing is lost for good:
    the sum of what was sent trails the sum of the inputs by one residual, not by a growing
    bias."""

    def __init__(self) -> None:
        self._residuals: dict[str, torch.Tensor] = {}

    def residual(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """The float32 residual for ``key`` (zeros the first time), shaped and placed like
        ``like``; pass it to ``quantized_mean``, which updates it in place."""
        res = self._residuals.get(key)
        if res is None:
            res = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        elif res.shape != like.shape:
            raise ValueError(f"error-feedback residual {key!r} has shape {tuple(res.shape)}, "
                             f"the vector has {tuple(like.shape)}")
        else:
            res = res.to(like.device)  # a checkpoint loaded on the CPU
        self._residuals[key] = res
        return res

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Key -> residual tensor (float32), for a checkpoint: each rank's residual is its own."""
        return dict(self._residuals)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._residuals = {key: value.detach().float().clone() for key, value in state.items()}


def split_runs(groups: torch.Tensor, n: int) -> tuple[list[int], list[int]]:
    """(groups per run, elements per run) of ``n`` contiguous runs of whole groups, each cut
    at the group boundary nearest to an equal share of elements; runs may be empty when
    there are fewer groups than ranks."""
    ends = torch.cat([torch.zeros(1, dtype=torch.int64), groups.cpu().to(torch.int64).cumsum(0)])
    targets = torch.arange(1, n, dtype=torch.int64) * ends[-1]  # in units of 1/n element: exact
    scaled = ends * n
    right = torch.searchsorted(scaled, targets).clamp(max=len(ends) - 1)
    left = (right - 1).clamp(min=0)
    nearer = torch.where(targets - scaled[left] <= scaled[right] - targets, left, right)
    cuts = [0, *nearer.tolist(), len(groups)]
    counts = [b - a for a, b in zip(cuts, cuts[1:])]
    sizes = [int(ends[b] - ends[a]) for a, b in zip(cuts, cuts[1:])]
    return counts, sizes


def _run_bytes(kind: str, counts: list[int], sizes: list[int]) -> list[int]:
    """Wire bytes of each run's quantized piece."""
    return [wire_bytes(kind, size, count) for size, count in zip(sizes, counts)]


def sent_bytes(kind: str, groups: torch.Tensor, n: int, rank: int) -> int:
    """Bytes rank ``rank`` of ``n`` sends in one ``quantized_mean`` (padding included)."""
    if n == 1:
        return 0
    b = _run_bytes(kind, *split_runs(groups, n))
    return sum(b) - b[rank] + (n - 1) * max(b)


def _roundtrip(x: torch.Tensor, groups: torch.Tensor, kind: str) -> torch.Tensor:
    return dequantize(quantize(x, groups, kind), groups)


def quantized_mean(flat: torch.Tensor, groups: torch.Tensor, kind: str, group: dist.ProcessGroup | None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 mean over the ranks of ``group`` of each rank's 1-D ``flat`` (same numel
    and ``groups`` everywhere), bit-identical on every rank. With ``residual`` (float32, like
    flat) the rank sends flat + residual and keeps what quantizing it dropped in ``residual``.
    ``group`` None or of size 1: the local round trip, no communication."""
    if flat.dim() != 1:
        raise ValueError(f"quantized_mean takes a 1-D vector, got shape {tuple(flat.shape)}")
    target = flat.float() if residual is None else flat.float() + residual
    n = 1 if group is None else dist.get_world_size(group)
    if n == 1 or flat.numel() == 0:
        out = _roundtrip(target, groups, kind)
        if residual is not None:
            residual.copy_(target - out)
        return out

    me = dist.get_rank(group)
    counts, sizes = split_runs(groups, n)
    run_groups = groups.split(counts)
    pieces = [quantize(x, g, kind) for x, g in zip(target.split(sizes), run_groups)]
    if residual is not None:
        residual.copy_(target - torch.cat([dequantize(q, g) for q, g in zip(pieces, run_groups)]))

    # Reduce-scatter: piece j to rank j, one exchange of uneven byte counts.
    nbytes = _run_bytes(kind, counts, sizes)
    mine = nbytes[me]
    received = torch.empty(n * mine, dtype=torch.uint8, device=flat.device)
    dist.all_to_all_single(received, torch.cat([to_bytes(q) for q in pieces]), [mine] * n, nbytes, group=group)
    total = torch.zeros(sizes[me], device=flat.device)
    for src in range(n):  # rank order: the same float32 sum on every run
        piece = from_bytes(received[src * mine:(src + 1) * mine], kind, sizes[me], counts[me])
        total += dequantize(piece, run_groups[me])

    # All-gather of the re-quantized mean, each run padded to the largest.
    width = max(nbytes)
    own = torch.zeros(width, dtype=torch.uint8, device=flat.device)
    own[:mine] = to_bytes(quantize(total / divisor(n, flat.device), run_groups[me], kind))
    gathered = torch.empty(n * width, dtype=torch.uint8, device=flat.device)
    _all_gather(gathered, own, group=group)
    return torch.cat([
        dequantize(from_bytes(gathered[j * width:j * width + nbytes[j]], kind, sizes[j], counts[j]), run_groups[j])
        for j in range(n)
    ])
