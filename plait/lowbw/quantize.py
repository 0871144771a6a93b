"""Quantized outer gradients: symmetric absmax per group of elements, int8 or int4 (or fp16).

One float32 scale per group; ``scale = absmax / qmax`` so an element is off by at most
scale/2 after a round trip. Groups are either fixed blocks of the flat vector or the rows of
each tensor (the last dim: a row of a weight matrix shares one input's magnitude). Pure torch
ops, so the same code runs on CPU and CUDA and the bytes on the wire are this module's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANT_KINDS = ("none", "fp16", "int8", "int4")
SCALE_MODES = ("block", "row")
_QMAX = {"int8": 127, "int4": 7}
_INT4_OFFSET = 8  # an int4 value v in [-7, 7] is stored as the nibble v + 8 in [1, 15]
_SCALE_BYTES = 4  # float32


def _check_kind(kind: str) -> None:
    if kind not in QUANT_KINDS:
        raise ValueError(f"quant kind {kind!r} is not one of {QUANT_KINDS}")


def scale_groups(shapes: list[torch.Size], mode: str, block: int) -> torch.Tensor:
    """Lengths (int64, 1-D, CPU) of the groups of a flat concatenation of tensors of these
    shapes that each get one scale: 'block' = consecutive runs of ``block`` elements of the
    flat vector (the last one shorter), 'row' = each row of each tensor (the last dim; a 0-/1-D
    tensor is one row). Empty groups are left out; the lengths sum to the total numel."""
    if mode not in SCALE_MODES:
        raise ValueError(f"scale mode {mode!r} is not one of {SCALE_MODES}")
    total = sum(torch.Size(s).numel() for s in shapes)
    if mode == "block":
        if block < 1:
            raise ValueError(f"scale block {block} must be >= 1")
        lengths = torch.full((total // block,), block, dtype=torch.int64)
        rest = torch.tensor([total % block] if total % block else [], dtype=torch.int64)
        return torch.cat([lengths, rest])
    parts = []
    for shape in map(torch.Size, shapes):
        row = shape[-1] if len(shape) > 1 else shape.numel()
        if row:
            parts.append(torch.full((shape.numel() // row,), row, dtype=torch.int64))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


@dataclass
class Quantized:
    """What travels: ``payload`` is uint8 (int8: one value per byte as two's complement,
    int4: two nibbles per byte, low nibble first), float16 (fp16) or float32 (none);
    ``scales`` float32, one per group (None for none/fp16); ``numel`` the values encoded."""

    kind: str
    payload: torch.Tensor
    scales: torch.Tensor | None
    numel: int


def _group_index(groups: torch.Tensor, numel: int, device: torch.device) -> torch.Tensor:
    """Each of the ``numel`` elements' group number (int64): lets per-group work run as single
    tensor ops. ``output_size`` spares CUDA a sync to learn the length."""
    groups = groups.to(device)
    return torch.repeat_interleave(torch.arange(len(groups), device=device), groups, output_size=numel)


def divisor(value: float, device: torch.device) -> torch.Tensor:
    """``value`` as a float32 tensor on ``device``: CUDA divides by a Python number as a product
    with its reciprocal, one ulp off CPU's true division; a tensor divisor divides on both."""
    return torch.tensor(float(value), device=device)


def quantize(x: torch.Tensor, groups: torch.Tensor, kind: str) -> Quantized:
    """Encode the flat float ``x`` (any float dtype, any device) with one scale per group of
    ``groups`` (lengths summing to x.numel()); zero groups get scale 0."""
    _check_kind(kind)
    x = x.detach().reshape(-1).float()
    if kind == "none":
        return Quantized(kind, x.clone(), None, x.numel())
    if kind == "fp16":
        return Quantized(kind, x.half(), None, x.numel())
    qmax = _QMAX[kind]
    index = _group_index(groups, x.numel(), x.device)
    absmax = torch.zeros(len(groups), device=x.device).scatter_reduce(0, index, x.abs(), "amax")
    scales = absmax / divisor(qmax, x.device)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a zero group holds only zeros
    values = torch.round(x / safe[index]).clamp_(-qmax, qmax)
    if kind == "int8":
        payload = values.to(torch.int8).view(torch.uint8)
    else:
        nibbles = (values + _INT4_OFFSET).to(torch.uint8)
        if nibbles.numel() % 2:
            nibbles = torch.cat([nibbles, nibbles.new_full((1,), _INT4_OFFSET)])
        payload = nibbles[0::2] | (nibbles[1::2] << 4)
    return Quantized(kind, payload, scales, x.numel())


def dequantize(q: Quantized, groups: torch.Tensor) -> torch.Tensor:
    """The float32 values ``q`` encodes (q.numel of them, on q's device)."""
    _check_kind(q.kind)
    if q.kind in ("none", "fp16"):
        return q.payload.float()
    if q.kind == "int8":
        values = q.payload.view(torch.int8).float()
    else:
        nibbles = torch.stack([q.payload & 15, q.payload >> 4], dim=1).reshape(-1)[: q.numel]
        values = nibbles.float() - _INT4_OFFSET
    return values * q.scales[_group_index(groups, q.numel, q.payload.device)]


def _payload_bytes(kind: str, numel: int) -> int:
    return {"none": 4 * numel, "fp16": 2 * numel, "int8": numel, "int4": (numel + 1) // 2}[kind]


def wire_bytes(kind: str, numel: int, n_groups: int) -> int:
    """Length in bytes of ``to_bytes`` of ``numel`` values in ``n_groups`` groups."""
    _check_kind(kind)
    return _payload_bytes(kind, numel) + (_SCALE_BYTES * n_groups if kind in _QMAX else 0)


def to_bytes(q: Quantized) -> torch.Tensor:
    """One flat uint8 tensor on q's device: the payload bytes, then the scale bytes."""
    parts = [q.payload.reshape(-1).view(torch.uint8)]
    if q.scales is not None:
        parts.append(q.scales.reshape(-1).view(torch.uint8))
    return torch.cat(parts)


def _as(buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``buf`` (uint8) reinterpreted as ``dtype``; copied first when its address is not aligned
    to the dtype (a piece cut out of a received buffer at an odd offset)."""
    if buf.storage_offset() % dtype.itemsize or buf.data_ptr() % dtype.itemsize:
        buf = buf.clone()
    return buf.view(dtype)


def from_bytes(buf: torch.Tensor, kind: str, numel: int, n_groups: int) -> Quantized:
    """The inverse of ``to_bytes``: ``buf`` must hold exactly wire_bytes(kind, numel, n_groups)."""
    want = wire_bytes(kind, numel, n_groups)
    if buf.dtype != torch.uint8 or buf.numel() != want:
        raise ValueError(f"{kind} buffer of {numel} values in {n_groups} groups must be {want} uint8 bytes, "
                         f"got {buf.numel()} of {buf.dtype}")
    split = _payload_bytes(kind, numel)
    payload = {"none": torch.float32, "fp16": torch.float16}.get(kind)
    payload = buf[:split] if payload is None else _as(buf[:split], payload)
    scales = _as(buf[split:], torch.float32) if kind in _QMAX else None
    return Quantized(kind, payload, scales, numel)
