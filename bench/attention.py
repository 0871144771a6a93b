"""Attention over packed documents: the fused path against the dense reference, side by side.

Part 1, one process: one layer's attention core, forward + backward, on a window of
``--seq`` tokens holding ``--docs`` packed documents with log-normal lengths. ``fused`` attends
each document with the fused causal SDPA kernel; ``reference`` is the dense path plait had
before (one (batch, 1, s, s) boolean mask for SDPA). Printed: the median seconds of each over
alternating rounds and their ratio; the peak resident memory each adds (VmHWM, reset before
each); and the largest tensor any operation produced, which for the dense path is the s × s
mask or scores.

Part 2, ``--cp`` gloo ranks: ring attention over the same window and documents, zigzag
chunks, one layer forward + backward, with each kernel: the fused one (each block pair on
``_scaled_dot_product_flash_attention_for_cpu`` and its backward, one rectangle per shared
document) and the reference one (explicit fp32 matmuls, logsumexp, masked_fill). Printed: the
slowest rank's median seconds, their ratio, and the bytes each saves for backward.

    OMP_NUM_THREADS=1 .venv/bin/python bench/attention.py [--seq 8192] [--docs 16] [--cp 4] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

from plait.launch import spawn
from plait.models.attention import causal_attention, document_keys
from plait.parallel.context_parallel import SequenceLayout
from plait.parallel.ring_attention import ChunkPlan, ring_attention

KERNELS = ("fused", "reference")


def packed_positions(seq: int, docs: int, seed: int = 0) -> torch.Tensor:
    """(1, seq) position ids of ``docs`` documents with log-normal lengths filling the window."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.empty(docs).log_normal_(0.0, 1.0, generator=gen)
    lengths = (weights / weights.sum() * seq).floor().clamp(min=1).long()
    lengths[-1] += seq - int(lengths.sum())
    return torch.cat([torch.arange(int(n)) for n in lengths])[None]


def qkv(args, tokens: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, args.heads, tokens, args.head_dim)] + [(1, args.kv_heads, tokens, args.head_dim)] * 2
    return [torch.randn(shape, generator=gen).requires_grad_() for shape in shapes]


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (bytes) any operation produces inside the mode."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_added(fn) -> int:
    """Bytes of resident memory ``fn`` adds at its peak (VmHWM reset first)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets the peak resident set to the current one
    before = _status("VmRSS")
    fn()
    return _status("VmHWM") - before


def one_process(args) -> dict:
    positions = packed_positions(args.seq, args.docs)
    keys = document_keys(positions)
    q, k, v = qkv(args, args.seq)

    def step(kernel: str):
        out = causal_attention(q, k, v, keys, kernel=kernel)
        out.sum().backward()

    # Peaks first, the fused path before any dense one has grown the heap.
    peaks = {kernel: peak_added(lambda: step(kernel)) for kernel in KERNELS}
    seconds: dict[str, list[float]] = {kernel: [] for kernel in KERNELS}
    for _ in range(args.rounds):
        for kernel in KERNELS:
            start = time.perf_counter()
            step(kernel)
            seconds[kernel].append(time.perf_counter() - start)
    result = {}
    for kernel in KERNELS:
        with LargestTensor() as mode:
            step(kernel)
        result[kernel] = {"seconds": statistics.median(seconds[kernel]), "peak": peaks[kernel], "largest": mode.largest}
    return result


def saved_bytes(fn) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def ring_rank(args) -> dict:
    torch.set_num_threads(1)
    cp, rank = dist.get_world_size(), dist.get_rank()
    layout = SequenceLayout(cp, zigzag=True)
    keys = document_keys(packed_positions(args.seq, args.docs))
    index = layout.token_index(rank, args.seq)
    q, k, v = (x.detach()[:, :, index].requires_grad_() for x in qkv(args, args.seq))
    plan = ChunkPlan(layout.rank_chunks(rank), tuple(layout.rank_chunks(r) for r in range(cp)), keys)

    def forward(kernel: str) -> torch.Tensor:
        return ring_attention(q, k, v, plan, dist.group.WORLD, kernel=kernel)

    seconds: dict[str, list[float]] = {kernel: [] for kernel in KERNELS}
    for _ in range(args.rounds):
        for kernel in KERNELS:
            dist.barrier()
            start = time.perf_counter()
            forward(kernel).sum().backward()
            seconds[kernel].append(time.perf_counter() - start)
    return {kernel: {"seconds": statistics.median(seconds[kernel]), "saved": saved_bytes(lambda: forward(kernel))}
            for kernel in KERNELS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--cp", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    lengths = torch.unique_consecutive(document_keys(packed_positions(args.seq, args.docs))[0],
                                       return_counts=True)[1].tolist()
    print(f"window {args.seq:,} tokens, {args.docs} documents (log-normal lengths {min(lengths)}..{max(lengths)}), "
          f"{args.heads} heads ({args.kv_heads} KV), head_dim {args.head_dim}, {torch.get_num_threads()} thread(s)")
    mib = 2**20
    one = one_process(args)
    print("\n1) one process, one layer's attention forward + backward")
    print(f"   {'kernel':<10}{'seconds':>9}{'peak added MiB':>16}{'largest tensor MiB':>20}")
    for kernel in KERNELS:
        row = one[kernel]
        print(f"   {kernel:<10}{row['seconds']:>9.3f}{row['peak'] / mib:>16.1f}{row['largest'] / mib:>20.1f}")
    print(f"   reference / fused: {one['reference']['seconds'] / one['fused']['seconds']:.2f}x; an s x s bool mask "
          f"is {args.seq * args.seq / mib:.0f} MiB, fp32 scores per head {args.seq * args.seq * 4 / mib:.0f} MiB")
    ranks = spawn(ring_rank, args.cp, (args,))
    print(f"\n2) ring attention, cp={args.cp}, zigzag, document masks, one layer forward + backward")
    print(f"   {'kernel':<10}{'slowest rank s':>15}{'saved/rank MiB':>16}")
    slowest = {kernel: max(r[kernel]["seconds"] for r in ranks) for kernel in KERNELS}
    for kernel in KERNELS:
        saved = max(r[kernel]["saved"] for r in ranks)
        print(f"   {kernel:<10}{slowest[kernel]:>15.3f}{saved / mib:>16.1f}")
    print(f"   reference / fused: {slowest['reference'] / slowest['fused']:.2f}x")


if __name__ == "__main__":
    main()
