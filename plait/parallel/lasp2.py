"""LASP-2 (Sun et al., 2025): sequence parallelism for GLA layers on the ``cp`` mesh dim.

A GLA layer's output at a token depends on the past only through the state entering its
piece of the sequence, and a state is small (heads x d_k x d_v) whatever the length. So each
cp rank, for each piece of the sequence it holds (one piece with a contiguous split, two with
zigzag):

1. runs the chunked form from a zero state: its piece's output without the past, and the
   piece's *summary*: its own state at the piece's end (M) and how an entering state decays
   over the piece (D, a d_k vector; 0 if a document starts inside);
2. all-gathers the summaries: one collective per layer;
3. scans them in sequence order, S_{p+1} = Diag(D_p) S_p + M_p, to get the state entering each
   of its pieces, and adds that state's contribution to its outputs (``carry_in``).

Backward mirrors it with one all-gather of the gradients of the entering states: with every
rank's dS and the gathered summaries, each rank runs the reverse scan and keeps its own dD and dM.

Wire bytes per layer and rank, per micro-batch of b sequences, P pieces per rank, h heads on
this rank (heads / tp), element size e (summaries travel in fp32 whatever the model's dtype):
forward (cp − 1) · P · b · h · (d_k · d_v + d_k) · e; backward (cp − 1) · P · b · h · d_k · d_v · e.
Neither depends on the sequence length.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from plait.models.gla import use_compiled
from plait.models.linear_attention import carry_in, chunked, document_resets, piece_decay
from plait.parallel.sequence_layout import SequenceLayout, all_gather_rows


def _scan(decays: list[torch.Tensor], summaries: list[torch.Tensor]) -> list[torch.Tensor]:
    """The state entering each piece, in sequence order (the first enters at zero)."""
    entering = [torch.zeros_like(summaries[0])]
    for decay, summary in zip(decays[:-1], summaries[:-1]):
        entering.append(decay[..., None] * entering[-1] + summary)
    return entering


def _by_piece(local: torch.Tensor, layout: SequenceLayout, group) -> list[torch.Tensor]:
    """All-gather each rank's (pieces, ...) rows; returns every piece's row in sequence order."""
    pieces = local.shape[0]
    rows = all_gather_rows(local.flatten(1), layout.cp, group)
    ordered = [None] * layout.n_chunks
    for owner in range(layout.cp):
        for slot, piece in enumerate(layout.rank_chunks(owner)):
            ordered[piece] = rows[owner * pieces + slot]
    return ordered


class _EnteringStates(torch.autograd.Function):
    """(D, M) of this rank's pieces, (P, b, h, d_k) and (P, b, h, d_k, d_v) -> the states
    entering them, (P, b, h, d_k, d_v); one all-gather forward, one backward."""

    @staticmethod
    def forward(ctx, decay, summary, layout: SequenceLayout, rank: int, group):
        state_size = summary[0].numel()
        rows = _by_piece(torch.cat([summary.flatten(1), decay.flatten(1)], dim=1), layout, group)
        summaries = [row[:state_size].view(summary.shape[1:]) for row in rows]
        decays = [row[state_size:].view(decay.shape[1:]) for row in rows]
        entering = _scan(decays, summaries)
        ctx.save_for_backward(*decays, *entering)
        ctx.layout, ctx.rank, ctx.group = layout, rank, group
        return torch.stack([entering[p] for p in layout.rank_chunks(rank)])

    @staticmethod
    def backward(ctx, grad_entering):
        n = ctx.layout.n_chunks
        decays, entering = ctx.saved_tensors[:n], ctx.saved_tensors[n:]
        direct = [row.view(grad_entering.shape[1:]) for row in _by_piece(grad_entering, ctx.layout, ctx.group)]
        # adjoint[p]: the total gradient of the state entering piece p; adjoint[n], the state
        # after the last piece, is read by nothing. S_{p+1} = D_p ⊙ S_p + M_p, so M_p's
        # gradient is adjoint[p + 1] and D_p's is Σ_{d_v} adjoint[p + 1] ⊙ S_p.
        adjoint = [None] * n + [torch.zeros_like(direct[0])]
        for p in range(n - 1, -1, -1):
            adjoint[p] = direct[p] + decays[p][..., None] * adjoint[p + 1]
        mine = ctx.layout.rank_chunks(ctx.rank)
        grad_summary = torch.stack([adjoint[p + 1] for p in mine])
        grad_decay = torch.stack([(adjoint[p + 1] * entering[p]).sum(-1) for p in mine])
        return grad_decay, grad_summary, None, None, None


class Lasp2:
    """``GatedLinearAttention.core`` under cp: (q, k, v, log gates) of the local tokens and the
    whole sequence's document keys -> the local output."""

    def __init__(self, layout: SequenceLayout, cp_rank: int, group: dist.ProcessGroup, chunk: int, kernel: str):
        self.layout, self.rank, self.group = layout, cp_rank, group
        self.chunk, self.kernel = chunk, kernel

    @torch.compiler.disable  # a collective inside a custom autograd Function
    def __call__(self, q, k, v, g, keys):
        compiled = use_compiled(self.kernel, q.device)
        pieces = self.layout.rank_chunks(self.rank)
        length = q.shape[2] // len(pieces)
        resets = document_resets(keys)
        local, decays, summaries, runs = [], [], [], []
        for slot, piece in enumerate(pieces):
            run = slice(slot * length, (slot + 1) * length)
            span = slice(piece * length, (piece + 1) * length)
            r = None if resets is None else resets[:, span]
            out, summary = chunked(q[:, :, run], k[:, :, run], v[:, :, run], g[:, :, run], r, self.chunk,
                                   compiled=compiled)
            local.append(out)
            summaries.append(summary)
            decays.append(piece_decay(g[:, :, run], r))
            runs.append((run, r))
        entering = _EnteringStates.apply(torch.stack(decays), torch.stack(summaries), self.layout, self.rank,
                                         self.group)
        outs = [out + carry_in(q[:, :, run], g[:, :, run], r, state).to(out.dtype)
                for out, (run, r), state in zip(local, runs, entering.unbind(0))]
        return torch.cat(outs, dim=2)
