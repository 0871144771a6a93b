"""Context parallelism on the ``cp_ring`` x ``cp_ulysses`` mesh dims (``parallel.cp*``).

Each sequence is cut into equal chunks and every cp rank keeps a few of them: with
``cp_shard = "zigzag"`` 2·cp chunks, rank r holding chunks r and 2·cp−1−r, so every rank has
the same causal-attention work (an early chunk sees few keys, its partner many); with
``"contiguous"`` cp chunks, one each. Everything but attention is per token and runs on the
local tokens unchanged (RoPE takes the local position ids). Attention is replaced by
``ContextParallelAttention``:

- ring: K/V blocks go around the cp ranks (plait/parallel/ring_attention.py);
- ulysses: all-to-all to head-sharded full sequences, attention with the single process's
  kernel (chunks put in sequence order first), all-to-all back (plait/parallel/ulysses.py);
- hybrid: Ulysses inside groups of ``cp_ulysses`` neighbouring ranks, then a ring across the
  groups over the union of each group's chunks.

Document masks: the model's mask builder is replaced by ``DocumentKeys``, which all-gathers
the position ids (one small collective per forward) and gives every token of the sequence a
document key (global index − position id, equal exactly within a document). Attention masks
each chunk pair from the keys, so documents of any length work.

Models stay plain: ``apply_context_parallel`` sets ``Llama.attention_mask`` and every
``Attention.core``; the trainer shards each batch with ``SequenceLayout.shard``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from plait.config import JobConfig, resolved_cp_shard
from plait.models.attention import causal_attention
from plait.models.gla import GatedLinearAttention
from plait.parallel.dims import ParallelDims
from plait.parallel.lasp2 import Lasp2
from plait.parallel.ring_attention import ChunkPlan, ring_attention
from plait.parallel.sequence_layout import SequenceLayout, all_gather_rows
from plait.parallel.ulysses import heads_to_sequence, sequence_to_heads


class DocumentKeys:
    """The mask builder under cp: local position ids -> (batch, seq) document keys of the whole
    sequence in sequence order, or None when no sequence holds more than one document."""

    def __init__(self, layout: SequenceLayout, group: dist.ProcessGroup):
        self.layout, self.group = layout, group

    def __call__(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        local = position_ids.contiguous()
        batch, tokens = local.shape
        gathered = all_gather_rows(local, self.layout.cp, self.group).view(self.layout.cp, batch, tokens)
        seq = tokens * self.layout.cp
        positions = torch.empty(batch, seq, dtype=local.dtype, device=local.device)
        for rank in range(self.layout.cp):
            positions[:, self.layout.token_index(rank, seq, local.device)] = gathered[rank]
        if not bool((positions[:, 1:] == 0).any()):
            return None
        return torch.arange(seq, device=local.device) - positions


class ContextParallelAttention:
    """``Attention.core`` under cp: (q, k, v, document keys) of the local tokens -> output."""

    def __init__(self, layout: SequenceLayout, cp_rank: int, ring: int, ulysses: int,
                 ring_group: dist.ProcessGroup | None, ulysses_group: dist.ProcessGroup | None, kernel: str):
        self.ring_group, self.ulysses_group, self.kernel = ring_group, ulysses_group, kernel
        # The cp mesh is ring-major: cp rank = ring index * ulysses + ulysses index. After the
        # all-to-all a rank holds its Ulysses group's chunks, in the group's rank order.
        def group_chunks(ring_index: int) -> tuple[int, ...]:
            members = range(ring_index * ulysses, (ring_index + 1) * ulysses)
            return tuple(c for member in members for c in layout.rank_chunks(member))

        self.query_chunks = group_chunks(cp_rank // ulysses)
        self.block_chunks = tuple(group_chunks(j) for j in range(ring))
        # Ulysses alone holds the whole sequence after its all-to-all, chunks in group order:
        # this permutation puts them in sequence order for the single-process kernel.
        self.order = torch.argsort(torch.tensor(self.query_chunks)) if ring == 1 else None

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        """Attention over the whole sequence with the single process's kernel (Ulysses)."""
        n = len(self.query_chunks)
        length = q.shape[2] // n
        chunked = lambda x: x.unflatten(2, (n, length))  # noqa: E731
        to_seq = lambda x: chunked(x)[:, :, self.order.to(x.device)].flatten(2, 3)  # noqa: E731
        out = causal_attention(to_seq(q), to_seq(k), to_seq(v), keys, self.kernel)
        back = torch.argsort(self.order).to(out.device)
        return chunked(out)[:, :, back].flatten(2, 3)

    @torch.compiler.disable  # collectives and a custom autograd Function: left out of compiled graphs
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        if self.ulysses_group is not None:
            q, k, v = (sequence_to_heads(x, self.ulysses_group) for x in (q, k, v))
        if self.ring_group is None:
            out = self._local(q, k, v, keys)
        else:
            plan = ChunkPlan(self.query_chunks, self.block_chunks, keys)
            out = ring_attention(q, k, v, plan, self.ring_group, kernel=self.kernel)
        if self.ulysses_group is not None:
            out = heads_to_sequence(out, self.ulysses_group)
        return out


def sequence_layout(cfg: JobConfig) -> SequenceLayout:
    return SequenceLayout(cfg.parallel.cp, zigzag=resolved_cp_shard(cfg) == "zigzag")


def apply_context_parallel(model: nn.Module, dims: ParallelDims, cfg: JobConfig) -> None:
    """Make ``model`` (a Llama or a pipeline stage of one, before activation checkpointing
    wraps its blocks) attend across the cp ranks; it then takes this rank's tokens only."""
    layout = sequence_layout(cfg)
    cp_group = dims.group("cp")
    ring_group = ulysses_group = None
    if dims.cp_ulysses == 1:
        ring_group = cp_group
    elif dims.cp_ring == 1:
        ulysses_group = cp_group
    else:
        ring_group, ulysses_group = dims.group("cp_ring"), dims.group("cp_ulysses")
    core = ContextParallelAttention(layout, dims.local_rank("cp"), dims.cp_ring, dims.cp_ulysses, ring_group,
                                    ulysses_group, cfg.model.attention_kernel)
    lasp2 = Lasp2(layout, dims.local_rank("cp"), cp_group, cfg.model.gla_chunk, cfg.model.gla_kernel)
    model.attention_mask = DocumentKeys(layout, cp_group)
    for block in model.layers.values():
        block.attention.core = lasp2 if isinstance(block.attention, GatedLinearAttention) else core
