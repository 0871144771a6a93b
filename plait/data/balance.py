"""Length-balanced assignment of documents to data-parallel ranks and micro-batches.

Packing documents into fixed windows in corpus order (``naive``) gives every rank the same
token count but not the same work: with document-masked attention a packed sequence costs
``attn_coef * sum(s_i**2) + linear_coef * sum(s_i)`` FLOPs (s_i in tokens), so a rank that
draws the long documents is the one every other rank waits for at the gradient all-reduce.
``balance`` (FlexSP / ByteScale idea) instead chooses, from a pool of documents larger than a
step, which documents go to which rank's micro-batch so that the slowest rank's work is as low
as possible while the micro-batches stay nearly full. ``BalancedStream`` feeds it a shuffled
corpus step by step and carries what did not fit into the next step.

A piece is ``(doc_index, start, length)``: tokens ``[start, start + length)`` of a document.
Every piece attends only within itself (it is its own document for the attention mask).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from plait.config import ModelConfig
from plait.models.flops import forward_coefficients

Piece = tuple[int, int, int]  # (doc_index, start token, length in tokens)


def coefficients(
    dim: int, n_layers: int, ffn_dim: int, n_heads: int, n_kv_heads: int
) -> tuple[float, float]:
    """(attn_coef, linear_coef) of a Llama shape given field by field; see ``model_coefficients``."""
    return model_coefficients(
        ModelConfig(dim=dim, n_layers=n_layers, ffn_dim=ffn_dim, n_heads=n_heads, n_kv_heads=n_kv_heads)
    )


def model_coefficients(model: ModelConfig) -> tuple[float, float]:
    """(attn_coef, linear_coef) of a Llama model, in forward FLOPs (n_kv_heads 0 means n_heads):
    ``plait.models.flops.forward_coefficients``. Their ratio is all balancing depends on."""
    return forward_coefficients(model)


def work(lengths: Sequence[int], attn_coef: float, linear_coef: float) -> float:
    """Cost (FLOPs, in the coefficients' unit) of a packed sequence of documents of these
    token lengths under document-masked attention: attn_coef * sum(s**2) + linear_coef * sum(s)."""
    return float(sum(attn_coef * s * s + linear_coef * s for s in lengths))


def imbalance(rank_work: Sequence[float]) -> float:
    """max / mean of the ranks' work: how much longer the slowest rank runs than the average
    (1.0 = perfect; an idle step counts as balanced)."""
    mean = sum(rank_work) / len(rank_work)
    return max(rank_work) / mean if mean > 0 else 1.0


@dataclass
class Assignment:
    """One step's placement. ``ranks[r][m]`` is the list of pieces of rank r's micro-batch m.

    rank_work: per-rank work (coefficient units), summed over its micro-batches, since a rank
    runs its micro-batches one after another. imbalance: max / mean rank work (1.0 = perfect).
    padding_waste: 1 - tokens placed / (n_bins * capacity), a fraction. leftover: pieces of
    the input that were not placed (the caller carries them to the next step).
    """

    ranks: list[list[list[Piece]]]
    rank_work: list[float]
    imbalance: float
    padding_waste: float
    leftover: list[Piece] = field(default_factory=list)
    capacity: int = 0


def split(doc_lengths: Sequence[int], capacity: int) -> list[Piece]:
    """Every document as one piece, or, if longer than ``capacity`` tokens, as capacity-sized
    pieces (the last one shorter): a document is split only when no bin could hold it."""
    pieces = []
    for d, n in enumerate(doc_lengths):
        if n <= 0:
            continue
        for start in range(0, n, capacity):
            pieces.append((d, start, min(capacity, n - start)))
    return pieces


def _finish(ranks: list[list[list[Piece]]], capacity: int, a: float, b: float,
            leftover: list[Piece]) -> Assignment:
    rank_work = [sum(work([p[2] for p in mb], a, b) for mb in r) for r in ranks]
    placed = sum(p[2] for r in ranks for mb in r for p in mb)
    n_bins = sum(len(r) for r in ranks)
    return Assignment(
        ranks=ranks, rank_work=rank_work,
        imbalance=imbalance(rank_work),
        padding_waste=1.0 - placed / (n_bins * capacity),
        leftover=leftover, capacity=capacity,
    )


def naive(doc_lengths: Sequence[int], n_ranks: int, micro_per_rank: int, capacity: int,
          attn_coef: float, linear_coef: float) -> Assignment:
    """Baseline: concatenate documents in order, cut windows of ``capacity`` tokens (a document
    crossing a window boundary is split there), deal window k to rank k // micro_per_rank.
    Tokens past the step's n_ranks * micro_per_rank windows are returned as leftover."""
    n_bins = n_ranks * micro_per_rank
    bins: list[list[Piece]] = [[] for _ in range(n_bins)]
    leftover: list[Piece] = []
    k, used = 0, 0
    for d, n in enumerate(doc_lengths):
        start = 0
        while start < n:
            if k >= n_bins:
                leftover.append((d, start, n - start))
                break
            take = min(n - start, capacity - used)
            bins[k].append((d, start, take))
            start, used = start + take, used + take
            if used == capacity:
                k, used = k + 1, 0
    ranks = [bins[r * micro_per_rank:(r + 1) * micro_per_rank] for r in range(n_ranks)]
    return _finish(ranks, capacity, attn_coef, linear_coef, leftover)


def balance(doc_lengths: Sequence[int], n_ranks: int, micro_per_rank: int, capacity: int,
            attn_coef: float, linear_coef: float, refine_iters: int = 400) -> Assignment:
    """Place documents (token lengths) in n_ranks x micro_per_rank bins of ``capacity`` tokens
    minimizing the maximum per-rank work; documents longer than capacity are split first.
    What does not fit is returned as ``leftover`` pieces. See ``balance_pieces``."""
    return balance_pieces(split(doc_lengths, capacity), n_ranks, micro_per_rank, capacity,
                          attn_coef, linear_coef, refine_iters=refine_iters)


def balance_pieces(pieces: Sequence[Piece], n_ranks: int, micro_per_rank: int, capacity: int,
                   attn_coef: float, linear_coef: float, pinned: int = 0,
                   refine_iters: int = 400) -> Assignment:
    """``balance`` on pieces already no longer than ``capacity``.

    The first ``pinned`` pieces are placed before the others (if they fit) and never pushed
    back to leftover: the stream pins pieces that have waited too long, so no document starves.

    1. LPT: pieces by work, descending, each to the least-loaded rank that has a micro-batch
       with room, into that rank's emptiest micro-batch (spreads room for the big ones).
    2. Refinement: while the most-loaded rank can be lowered, move one of its pieces to another
       rank, swap it with a lighter piece of another rank, or swap it with a lighter leftover
       piece if that raises tokens per step time; then top up from leftover whatever does not
       raise the maximum (raises the mean, cuts padding). A last top-up also accepts pieces
       that raise the maximum less, relatively, than they add tokens.
    """
    a, b = attn_coef, linear_coef
    if any(p[2] > capacity or p[2] <= 0 for p in pieces):
        raise ValueError("every piece must have 1..capacity tokens; split documents first")

    def w(p: Piece) -> float:
        return a * p[2] * p[2] + b * p[2]

    bins: list[list[list[Piece]]] = [[[] for _ in range(micro_per_rank)] for _ in range(n_ranks)]
    used = [[0] * micro_per_rank for _ in range(n_ranks)]
    load = [0.0] * n_ranks
    where: dict[int, tuple[int, int]] = {}  # position in `pieces` -> (rank, micro-batch)
    is_pinned = [i < pinned for i in range(len(pieces))]
    leftover: list[int] = []

    def put(i: int, r: int, m: int) -> None:
        bins[r][m].append(pieces[i])
        used[r][m] += pieces[i][2]
        load[r] += w(pieces[i])
        where[i] = (r, m)

    def take(i: int) -> None:
        r, m = where.pop(i)
        bins[r][m].remove(pieces[i])
        used[r][m] -= pieces[i][2]
        load[r] -= w(pieces[i])

    def place_lpt(order: list[int]) -> None:
        for i in order:
            n = pieces[i][2]
            for r in sorted(range(n_ranks), key=lambda r: (load[r], r)):
                m = min(range(micro_per_rank), key=lambda m: (used[r][m], m))
                if capacity - used[r][m] >= n:
                    put(i, r, m)
                    break
            else:
                leftover.append(i)

    # Sort keys include the position so ties break deterministically.
    by_work = lambda i: (-w(pieces[i]), i)  # noqa: E731
    place_lpt(sorted(range(pinned), key=by_work))
    place_lpt(sorted(range(pinned, len(pieces)), key=by_work))

    def fits(r: int, m: int, gain: int) -> bool:
        return used[r][m] + gain <= capacity

    def improve() -> bool:
        """One change that lowers the most-loaded rank without making another exceed it."""
        hi = max(range(n_ranks), key=lambda r: (load[r], -r))
        top = load[hi]
        mine = sorted((i for i, (r, _) in where.items() if r == hi), key=by_work)
        others = sorted((r for r in range(n_ranks) if r != hi), key=lambda r: (load[r], r))
        for i in mine:  # move
            for r in others:
                if load[r] + w(pieces[i]) >= top:
                    break
                m = min(range(micro_per_rank), key=lambda m: (used[r][m], m))
                if fits(r, m, pieces[i][2]):
                    take(i)
                    put(i, r, m)
                    return True
        best: tuple[float, int, int] | None = None
        for i in mine:  # swap with another rank: the pair that leaves the lowest max of the two
            _, mi = where[i]
            for j, (r, mj) in where.items():
                d = w(pieces[i]) - w(pieces[j])
                if r == hi or d <= 0 or load[r] + d >= top:
                    continue
                ni, nj = pieces[i][2], pieces[j][2]
                if fits(hi, mi, nj - ni) and fits(r, mj, ni - nj):
                    new = max(top - d, load[r] + d)
                    if best is None or new < best[0]:
                        best = (new, i, j)
        if best is not None:
            _, i, j = best
            (_, mi), (r, mj) = where[i], where[j]
            take(i)
            take(j)
            put(i, r, mj)
            put(j, hi, mi)
            return True
        # Swap with a lighter leftover piece: this can shed tokens, so (unlike the moves above,
        # which keep the tokens) it must raise throughput, placed tokens / max rank work;
        # lowering the max alone would trade the bins down to ever shorter, emptier ones.
        tokens = sum(map(sum, used))
        second = max((load[r] for r in others), default=0.0)
        best_rate, choice = tokens / top, None
        for i in mine:
            if is_pinned[i]:
                continue
            _, mi = where[i]
            for j in leftover:
                d = w(pieces[i]) - w(pieces[j])
                if d <= 0 or not fits(hi, mi, pieces[j][2] - pieces[i][2]):
                    continue
                rate = (tokens + pieces[j][2] - pieces[i][2]) / max(top - d, second)
                if rate > best_rate * (1 + 1e-12):
                    best_rate, choice = rate, (i, j)
        if choice is not None:
            i, j = choice
            _, mi = where[i]
            leftover.remove(j)
            take(i)
            put(j, hi, mi)
            leftover.append(i)
            return True
        return False

    def top_up(raise_max: bool = False) -> None:
        """Place leftover pieces wherever they keep every rank at or below the current max;
        with ``raise_max``, also where they raise it by less than they add tokens (relative),
        i.e. where tokens per step time (placed tokens / max rank work) still goes up."""
        for i in sorted(leftover, key=by_work):
            top, n = max(load), pieces[i][2]
            tokens = sum(map(sum, used))
            for r in sorted(range(n_ranks), key=lambda r: (load[r], r)):
                new = load[r] + w(pieces[i])
                if new > top and not (raise_max and (tokens + n) * top > tokens * new):
                    break
                m = max((m for m in range(micro_per_rank) if fits(r, m, pieces[i][2])),
                        key=lambda m: (used[r][m], -m), default=None)  # best fit keeps room
                if m is not None:
                    leftover.remove(i)
                    put(i, r, m)
                    break

    for _ in range(refine_iters):
        if not improve():
            break
        top_up()
    top_up(raise_max=True)
    return _finish(bins, capacity, a, b, [pieces[i] for i in sorted(leftover)])


class BalancedStream:
    """Per-step balanced assignments over a shuffled corpus (one epoch per seed).

    Each step the pool is topped up, in a seeded random document order, to ``lookahead`` steps
    worth of tokens (lookahead * n_ranks * micro_per_rank * capacity). The pool is first in,
    first out: its oldest pieces, up to ``pin_fraction`` of a step's tokens, are pinned (placed
    first, never pushed back), and the rest is what the balancer may choose from to fill gaps
    and trade for heavy pieces. Pinning keeps the step's length mix the corpus's: otherwise the
    balancer would keep deferring the same kind of document (long ones, traded out of heavy
    ranks) and the pool would drift to all-long, un-balanceable steps, and it bounds how long
    any document waits. Iteration stops when every document has been placed. Pieces carry
    corpus document indices.
    """

    def __init__(self, doc_lengths: Sequence[int], n_ranks: int, micro_per_rank: int,
                 capacity: int, coefs: tuple[float, float], seed: int = 0,
                 lookahead: float = 2.0, pin_fraction: float = 0.95,
                 refine_iters: int = 400) -> None:
        self.doc_lengths = list(doc_lengths)
        self.n_ranks, self.micro_per_rank, self.capacity = n_ranks, micro_per_rank, capacity
        self.coefs, self.seed, self.lookahead = coefs, seed, lookahead
        self.pin_fraction, self.refine_iters = pin_fraction, refine_iters
        self.order = self._order(seed)
        self.cursor = 0  # next position in `order` to enter the pool
        self.pool: list[Piece] = []  # oldest first
        self.step = 0

    def _order(self, seed: int) -> list[int]:
        order = list(range(len(self.doc_lengths)))
        random.Random(seed).shuffle(order)
        return order

    def __iter__(self) -> Iterator[Assignment]:
        return self

    def __next__(self) -> Assignment:
        step_tokens = self.n_ranks * self.micro_per_rank * self.capacity
        tokens = sum(p[2] for p in self.pool)
        while tokens < self.lookahead * step_tokens and self.cursor < len(self.order):
            d = self.order[self.cursor]
            self.cursor += 1
            for _, start, n in split([self.doc_lengths[d]], self.capacity):
                self.pool.append((d, start, n))
                tokens += n
        if not self.pool:
            raise StopIteration
        pinned, acc = 0, 0
        for p in self.pool:
            if acc + p[2] > self.pin_fraction * step_tokens:
                break
            pinned, acc = pinned + 1, acc + p[2]
        out = balance_pieces(self.pool, self.n_ranks, self.micro_per_rank, self.capacity,
                             *self.coefs, pinned=pinned, refine_iters=self.refine_iters)
        self.pool = out.leftover  # in pool order, so still oldest first
        self.step += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume mid-epoch (the order is rebuilt from the seed)."""
        return {"seed": self.seed, "cursor": self.cursor, "step": self.step,
                "pool": [list(p) for p in self.pool]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            self.seed, self.order = state["seed"], self._order(state["seed"])
        self.cursor, self.step = state["cursor"], state["step"]
        self.pool = [(d, s, n) for d, s, n in state["pool"]]


__all__ = ["Assignment", "BalancedStream", "balance", "balance_pieces", "coefficients",
           "imbalance", "model_coefficients", "naive", "split", "work"]
