"""Counted collectives: every collective this process issues, with op, mesh dim, bytes and times.

``install()`` hooks four places, because no single Python-visible point sees them all:

1. ``ProcessGroup`` methods (``allreduce``, ``all_gather_single``/``_allgather_base``, ``send``...).
   Every ``torch.distributed.*`` call lands here whoever makes it: plait, FSDP2, pipelining
   P2P, DeviceMesh setup. Patching the methods rather than ``dist.*`` also catches callers
   that hold the functions by name (pipelining compares ``P2POp.op is dist.isend``).
2. ``torch.ops._c10d_functional.*``: functional collectives (DTensor redistribution, TP,
   DDP's Python reducer) reach the process group from C++, so they are counted at the op.
3. DDP's C++ Reducer all-reduces gradient buckets without Python. At each DDP's first
   forward we register a comm hook doing exactly what the built-in one does (divide by n,
   all-reduce, sum) through ``dist.all_reduce``, so (1) counts it. Skipped if a hook is set.
4. ``torch.distributed._broadcast_coalesced``: DDP's parameter/buffer broadcast (C++ too).

Not counted: collectives issued from C++ elsewhere (a built-in C++ DDP comm hook, DDP's
bucket-order sync when it rebuilds buckets, NCCL-internal traffic), ``.default`` overloads of
functional ops called directly (as inductor-compiled graphs do), and DDP instances that ran
their first forward before install().

Units: bytes, and seconds from ``time.perf_counter()``. ``start`` is when the call was issued;
``end`` is when this process saw it finish: return of ``Work.wait()``, of ``wait_tensor``
(functional collectives), of the DDP bucket future's callback, or else of the issuing call.
On CUDA these are host times (CUDA events would cost a sync), i.e. how long the host waited.

Slow links can be emulated (``configure_emulation``): a collective on mesh dim d is held until
its emulated link would have delivered it, and ``end`` is taken after the hold. Each dim is one
link per direction that carries one transfer at a time, so a transfer starts when the link is
free (DDP's buckets queue behind each other as on a real link) and takes ``wire_bytes /
bandwidth[d]`` (a recv: its payload's), plus ``latency[d]``. The hold happens where the host
waits, so async collectives still overlap compute: in ``Work.wait()`` and ``wait_tensor``, in
the issuing call for synchronous ones, and for DDP's buckets at the end of backward (DDP's own
wait point). The hold sleeps the thread that waits, so a collective waited on from a
background thread slows only that thread. Collectives issued inside ``paused()``, on groups of
one rank, or whose handle is never waited on from Python are not held.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import time
import weakref
from typing import Any, Iterator

import torch
import torch.distributed as dist

_perf = time.perf_counter
# Bytes each rank sends per payload byte under ring algorithms. Rooted ops (broadcast, reduce,
# gather, scatter) are averaged over ranks: a pipelined chain moves the payload through n-1
# links whatever the tree, so (n-1)/n per rank. all_to_all is exact when its splits are known.
_RING = {
    "all_reduce": lambda n: 2 * (n - 1) / n, "send": lambda n: 1.0, "recv": lambda n: 0.0,
    "barrier": lambda n: 0.0,
    **dict.fromkeys(["all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "gather", "scatter"],
                    lambda n: (n - 1) / n),
}

# ProcessGroup method -> (op, index of the payload argument: the output for gathers, the input
# for reductions to shards and all_to_all, the per-rank chunk for gather/scatter). Names differ
# across torch versions (2.13 renamed _allgather_base to all_gather_single); missing ones are skipped.
_PG_METHODS = {
    **dict.fromkeys(["allreduce", "allreduce_coalesced"], ("all_reduce", 0)),
    **dict.fromkeys(["allgather", "_allgather_base", "all_gather_single", "allgather_coalesced",
                     "allgather_into_tensor_coalesced", "all_gather_single_coalesced"], ("all_gather", 0)),
    **dict.fromkeys(["reduce_scatter", "_reduce_scatter_base", "reduce_scatter_single",
                     "reduce_scatter_tensor_coalesced", "reduce_scatter_single_coalesced"], ("reduce_scatter", 1)),
    **dict.fromkeys(["alltoall_base", "all_to_all_single", "alltoall"], ("all_to_all", 1)),
    **dict.fromkeys(["recv", "recv_anysource"], ("recv", 0)),
    "broadcast": ("broadcast", 0), "reduce": ("reduce", 0), "gather": ("gather", 1), "scatter": ("scatter", 0),
    "send": ("send", 0), "barrier": ("barrier", None),
}
# torch.ops._c10d_functional op -> (op, payload arg, group arg, arg holding group_size to
# multiply by (all-gather output = input x n), arg holding input_split_sizes).
_FUNC_OPS = {
    **dict.fromkeys(["all_reduce", "all_reduce_", "all_reduce_coalesced", "all_reduce_coalesced_"],
                    ("all_reduce", 0, 2, None, None)),
    **dict.fromkeys(["broadcast", "broadcast_"], ("broadcast", 0, 2, None, None)),
    **dict.fromkeys(["all_gather_into_tensor", "all_gather_into_tensor_out", "all_gather_into_tensor_coalesced"],
                    ("all_gather", 0, 2, 1, None)),
    **dict.fromkeys(["reduce_scatter_tensor", "reduce_scatter_tensor_coalesced"], ("reduce_scatter", 0, 3, None, None)),
    "all_to_all_single": ("all_to_all", 0, 3, None, 2),
    "isend": ("send", 0, 3, None, None), "irecv": ("recv", 0, 3, None, None),
}


class Record:
    """One collective on mesh dim ``dim``. ``bytes``: the payload (all_gather: the output;
    reduce_scatter, all_to_all: the input; gather/scatter: this rank's chunk; others: the
    tensor). ``wire_bytes``: what this rank sends (see _RING). ``start``/``end``: perf_counter
    seconds. ``seq``: this process's issue order. ``deadline``: when the emulated link delivers
    it (perf_counter seconds), 0.0 when not emulated."""

    __slots__ = ("seq", "op", "dim", "bytes", "wire_bytes", "group_size", "start", "end", "deadline", "thread")

    def __init__(self, seq, op, dim, nbytes, wire, size, start):
        self.seq, self.op, self.dim, self.bytes, self.wire_bytes = seq, op, dim, nbytes, wire
        self.group_size, self.start, self.end, self.deadline = size, start, start, 0.0
        self.thread = threading.get_ident()  # who issued it: see forget_own()

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}


_seq = itertools.count()
MAX_RECORDS = 1 << 18  # a run that never calls step_summary() keeps only the latest ones
_records: collections.deque[Record] = collections.deque(maxlen=MAX_RECORDS)
_blocked: dict[int, Record] = {}  # seq -> record the host is inside right now (issuing or waiting)
# id(Work or output tensor) -> (weakref to it, record). A weak reference: holding NCCL works
# would hold their tensors; comparing the referent guards against a reused id.
_handles: dict[int, tuple] = {}
_names: dict[Any, str] = {}  # ProcessGroup or group name -> mesh dim name
_info: dict[Any, tuple] = {}  # ProcessGroup or group name -> (dim, size, rank), filled on first use
_totals: collections.Counter = collections.Counter()  # dim -> wire bytes since install, never reset

class _Paused(threading.local):
    """How deep this thread is in ``paused()``: a background thread's collectives stay counted
    (and emulated) while the main thread reduces its metrics. ``hidden``: this thread is in
    ``background()``."""

    depth = 0
    hidden = False


_pause = _Paused()
# Link emulation: (bandwidth bytes/s, latency s) per dim name ("*": every dim), or None when off.
_emulation: tuple[dict[str, float], dict[str, float]] | None = None
_link_free: dict[tuple[str, bool], float] = {}  # (dim, inbound) -> when its emulated link is free
_link_lock = threading.Lock()
_originals: list[tuple[Any, str, Any]] = []  # (owner, attribute, original) to undo install()
_MISSING = object()


def register_group(group: dist.ProcessGroup, name: str) -> None:
    """Name ``group``'s collectives ``name``; a later name for the same group wins."""
    _names[group] = name
    with contextlib.suppress(Exception):
        _names[group.group_name] = name  # functional collectives pass the group by name
    _info.clear()


def register_mesh(mesh) -> None:
    """Name each dim's process group by the DeviceMesh's dim name (``dim<i>`` if unnamed)."""
    names = mesh.mesh_dim_names or tuple(f"dim{i}" for i in range(mesh.ndim))
    for index, name in enumerate(names):
        register_group(mesh.get_group(index), name)


def _resolve(key) -> tuple:
    try:
        group = key if not isinstance(key, str) else dist.distributed_c10d._resolve_process_group(key)
        name = _names.get(group) or _names.get(getattr(group, "group_name", None))
        if name is None:
            world = dist.distributed_c10d._get_default_group()
            name = "world" if group is world or group.group_name == world.group_name else "other"
        return name, group.size(), group.rank()
    except Exception:  # an unknown or destroyed group: still count it
        return "other", 1, 0


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.nbytes  # numel x element size, whatever the strides
    if isinstance(x, (list, tuple)):
        return sum(map(_nbytes, x))
    return 0


def _begin(op: str, key, payload, splits=None) -> Record:
    """Start a record; inside ``paused()`` it is only tracked as in flight (the hang monitor
    must see plait's own bookkeeping collectives too), not counted as traffic."""
    info = _info.get(key)
    if info is None:
        info = _info[key] = _resolve(key)
    dim, n, rank = info
    wire = _RING[op](n) * payload if n > 1 or op == "send" else 0
    if splits and op == "all_to_all" and sum(splits):  # exact: all but the chunk kept locally
        wire = payload * (1 - splits[rank] / sum(splits))
    rec = Record(next(_seq), op, dim, payload, round(wire), n, _perf())
    if not _pause.depth:
        _records.append(rec)
        _totals[dim] += rec.wire_bytes
        emulation = _emulation  # one read: configure_emulation may rebind it meanwhile
        if emulation is not None and n > 1:
            rec.deadline = _deadline(rec, *emulation)
    if not _pause.hidden:
        _blocked[rec.seq] = rec
    return rec


def configure_emulation(bandwidth: dict[str, float], latency: dict[str, float]) -> None:
    """Emulate slow links from now on: ``bandwidth`` in bytes/s and ``latency`` in seconds per
    mesh dim name, key ``"*"`` for every dim not named (plait.config.parse_link_values gives
    these). A dim in neither is not slowed; two empty dicts turn emulation off (the default)."""
    global _emulation
    with _link_lock:
        _link_free.clear()
        _emulation = (dict(bandwidth), dict(latency)) if bandwidth or latency else None


def _deadline(rec: Record, bandwidth: dict[str, float], latency: dict[str, float]) -> float:
    """When the emulated link of ``rec.dim`` delivers ``rec`` (perf_counter seconds); 0.0 when
    that dim is not emulated. Books the link (one transfer at a time per direction)."""
    rate = bandwidth.get(rec.dim, bandwidth.get("*"))
    delay = latency.get(rec.dim, latency.get("*", 0.0))
    if rate is None and not delay:
        return 0.0
    inbound = rec.op == "recv"  # a recv sends nothing but takes as long to arrive
    seconds = (rec.bytes if inbound else rec.wire_bytes) / rate if rate else 0.0
    with _link_lock:
        free = max(rec.start, _link_free.get((rec.dim, inbound), 0.0)) + seconds
        _link_free[(rec.dim, inbound)] = free
    return free + delay


def _hold(rec: Record) -> None:
    """Sleep until ``rec``'s emulated deadline: the emulation never shortens the real time."""
    while rec.deadline and (left := rec.deadline - _perf()) > 0:
        time.sleep(left)


def _issued(rec: Record, handle) -> None:
    """The issuing call returned; ``handle`` (Work or tensor) will report completion if waited.
    Without a handle to wait on, the call was the wait: the emulated link holds it here."""
    ref = None
    if handle is not None:
        with contextlib.suppress(TypeError):  # not weak-referenceable: it ends with the issuing call
            ref = weakref.ref(handle)
    if ref is None:
        _hold(rec)
    rec.end = _perf()
    _blocked.pop(rec.seq, None)
    if ref is not None:  # only now: another thread may wait on it as soon as it is in _handles
        if len(_handles) > 1 << 16:  # handles nobody waits for, with no reset() to drop them
            _handles.clear()
        _handles[id(handle)] = (ref, rec)


def _waited(handle, wait, *args, **kwargs):
    entry = _handles.pop(id(handle), None)
    if entry is None or entry[0]() is not handle:
        return wait(handle, *args, **kwargs)
    with _blocking(entry[1]) as rec:
        out = wait(handle, *args, **kwargs)
        _hold(rec)
        return out


@contextlib.contextmanager
def _blocking(rec: Record) -> Iterator[Record]:
    """The host waits for ``rec`` inside: in_flight() shows it, and its end is taken after."""
    if not _pause.hidden:
        _blocked[rec.seq] = rec
    try:
        yield rec
    finally:
        rec.end = max(rec.end, _perf())
        _blocked.pop(rec.seq, None)


def _pg_wrapper(method, op: str, index):
    def counted(self, *args, **kwargs):
        try:  # bookkeeping must never break the collective itself
            payload = _nbytes(args[index]) if index is not None and len(args) > index else 0
            rec = _begin(op, self, payload, args[3] if op == "all_to_all" and len(args) > 3 else None)
        except Exception:
            return method(self, *args, **kwargs)
        work = None
        try:
            work = method(self, *args, **kwargs)
            return work
        finally:
            _issued(rec, work)

    counted.__wrapped__ = method
    return counted


class _CountedOp:
    """Stands in for ``torch.ops._c10d_functional.<name>``: counts the call, runs the real op.
    Attribute access (``.default``) goes to the real packet, so identity checks still hold."""

    def __init__(self, packet, spec):
        self._packet, self._spec = packet, spec

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_packet", "_spec"):  # copy/pickle probes
            raise AttributeError(name)
        return getattr(self._packet, name)

    def __call__(self, *args, **kwargs):
        if _pause.depth or torch.compiler.is_compiling():
            return self._packet(*args, **kwargs)
        op, pi, gi, mi, si = self._spec
        try:  # bookkeeping must never break the collective itself
            payload = _nbytes(args[pi]) * (args[mi] if mi is not None else 1)
            key = args[gi] if len(args) > gi else kwargs.get("group_name")
            rec = _begin(op, key, payload, args[si] if si is not None else None)
        except Exception:
            return self._packet(*args, **kwargs)
        out = None
        try:
            out = self._packet(*args, **kwargs)
            return out
        finally:
            _issued(rec, out if isinstance(out, torch.Tensor) else None)


class _WaitOp(_CountedOp):
    def __call__(self, tensor, *args, **kwargs):
        return _waited(tensor, self._packet, *args, **kwargs)


def _ddp_allreduce_hook(group: dist.ProcessGroup, bucket):  # no return annotation: DDP checks it
    """torch's ``default_hooks.allreduce_hook`` (the built-in behaviour), plus the end time.
    An emulated link holds the bucket at the end of backward, where DDP waits for it: the
    future's callback may run inline on the backward thread, where a hold would stop compute."""
    tensor = bucket.buffer()
    tensor.div_(group.size())
    work = dist.all_reduce(tensor, group=group, async_op=True)
    entry = _handles.pop(id(work), None)
    rec = entry[1] if entry is not None else None
    at_backward_end = False
    if rec is not None and rec.deadline:
        with contextlib.suppress(RuntimeError):  # outside a backward pass: hold in the callback
            torch.autograd.Variable._execution_engine.queue_callback(lambda: _settle(rec))
            at_backward_end = True

    def done(fut):
        if rec is not None:
            if not at_backward_end:
                _hold(rec)
            rec.end = max(rec.end, _perf())
        return fut.value()[0]

    return work.get_future().then(done)


def _settle(rec: Record) -> None:
    with _blocking(rec):
        _hold(rec)


def _ddp_pre_forward_wrapper(method):
    def pre_forward(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        # After DDP's own lazy init (which may register optimizer-overlap hooks), before backward.
        if not self.__dict__.get("_plait_comm_hooked"):
            self.__dict__["_plait_comm_hooked"] = True
            hooks = getattr(self, "_comm_hooks", None)
            if getattr(self, "reducer", None) is not None and hooks == [] \
                    and not getattr(self, "_use_python_reducer", False):
                try:
                    self.register_comm_hook(self.process_group, _ddp_allreduce_hook)
                except RuntimeError:  # a built-in C++ hook is registered: leave it, uncounted
                    if hooks and hooks[-1][0] is _ddp_allreduce_hook:
                        hooks.pop()
        return out

    pre_forward.__wrapped__ = method
    return pre_forward


def _patch(owner, name: str, make) -> None:
    original = getattr(owner, name, None)
    if original is None:
        return  # not in this torch version
    # Undo must restore the raw class attribute (a pybind instancemethod), not the unbound
    # function getattr returns, or the restored method stops binding ``self``.
    _originals.append((owner, name, vars(owner).get(name, _MISSING)))
    setattr(owner, name, make(original))


def install() -> None:
    """Start counting every collective this process issues (idempotent, process-wide)."""
    if _originals:
        return
    import torch.distributed._functional_collectives  # noqa: F401  (its import-time op registrations first)
    from torch.nn.parallel import DistributedDataParallel

    for method, (op, index) in _PG_METHODS.items():
        _patch(dist.ProcessGroup, method, lambda m, op=op, i=index: _pg_wrapper(m, op, i))
    _patch(dist.Work, "wait", lambda w: lambda self, *a, **k: _waited(self, w, *a, **k))
    ns = torch.ops._c10d_functional
    for name, spec in _FUNC_OPS.items():
        with contextlib.suppress(AttributeError, RuntimeError):
            _patch(ns, name, lambda packet, spec=spec: _CountedOp(packet, spec))
    with contextlib.suppress(AttributeError, RuntimeError):
        _patch(ns, "wait_tensor", lambda packet: _WaitOp(packet, None))
    _patch(DistributedDataParallel, "_pre_forward", _ddp_pre_forward_wrapper)
    # _broadcast_coalesced(process_group, tensors, ...) has a ProcessGroup method's shape.
    _patch(dist, "_broadcast_coalesced", lambda f: _pg_wrapper(f, "broadcast", 0))


def uninstall() -> None:
    """Undo install() (DDP hooks already registered stay: they are the built-in math)."""
    while _originals:
        owner, name, original = _originals.pop()
        if original is _MISSING:
            delattr(owner, name)  # it was inherited (or created lazily): unshadow it
        else:
            setattr(owner, name, original)


def installed() -> bool:
    return bool(_originals)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Leave the collectives this thread issues inside uncounted and not emulated (plait's own
    bookkeeping: metric reductions, barriers). Per thread, not process-wide."""
    _pause.depth += 1
    try:
        yield
    finally:
        _pause.depth -= 1


@contextlib.contextmanager
def background() -> Iterator[None]:
    """For a thread whose collectives are not the training's (a checkpoint written in the
    background on its own group): uncounted, not emulated, and never in ``in_flight()``, where
    its long waits for slower ranks would read as the training hanging in a collective."""
    _pause.hidden = True
    try:
        with paused():
            yield
    finally:
        _pause.hidden = False


def records() -> list[Record]:
    """The records since the last reset, in issue order."""
    return list(_records)


def in_flight() -> list[Record]:
    """Collectives the host is blocked in right now (issuing or waiting), oldest first: what
    a hang monitor reports. Async work on the device that nobody waits for is not here."""
    return sorted(list(_blocked.values()), key=lambda r: r.seq)  # list(): one atomic copy


def total_wire_bytes(dim: str) -> int:
    """Wire bytes this process has sent on ``dim`` since install (any thread, never reset):
    a caller takes the difference around its own collectives."""
    return _totals[dim]


def reset() -> None:
    """Drop the records, forget unwaited handles, and re-resolve group names on next use."""
    global _records
    _records = collections.deque(maxlen=MAX_RECORDS)  # rebound: a summary in progress keeps its own
    _handles.clear()
    _info.clear()


def forget_own() -> None:
    """Drop the records this thread issued, and its unwaited handles, keeping other threads':
    at a step's start the trainer forgets its own validation and checkpoint traffic since the
    last step, while a background exchange issued meanwhile stays counted (in the step that
    sums it) and its emulated wait stays due."""
    global _records
    me = threading.get_ident()
    # Rebind first, then filter the old records: another thread's append lands in the new deque.
    old, _records = _records, collections.deque(maxlen=MAX_RECORDS)
    _records.extendleft(reversed([r for r in list(old) if r.thread != me]))
    for key, (_, rec) in list(_handles.items()):
        if rec.thread == me:
            _handles.pop(key, None)


_clear = reset  # step_summary's ``reset`` argument shadows the function


def step_summary(reset: bool = True) -> dict[str, Any]:
    """Totals since the last reset: ``comm_bytes`` (wire bytes sent by this rank) and
    ``comm_payload_bytes`` per mesh dim, ``comm_op_bytes`` (wire bytes per "dim/op"), ``comm_s`` (sum of end - start over the records, in
    seconds: overlapping async collectives each count, so it can exceed wall time), the same
    per mesh dim in ``comm_dim_s``, and ``comm_count``. Resets afterwards unless ``reset=False``."""
    recs = _records
    if reset:
        _clear()
    recs = list(recs)  # one atomic copy: other threads may still be appending
    wire: dict[str, int] = {}
    payload: dict[str, int] = {}
    by_op: dict[str, int] = {}
    dim_s: dict[str, float] = {}
    for rec in recs:
        wire[rec.dim] = wire.get(rec.dim, 0) + rec.wire_bytes
        by_op[f"{rec.dim}/{rec.op}"] = by_op.get(f"{rec.dim}/{rec.op}", 0) + rec.wire_bytes
        payload[rec.dim] = payload.get(rec.dim, 0) + rec.bytes
        dim_s[rec.dim] = dim_s.get(rec.dim, 0.0) + rec.end - rec.start
    return {"comm_bytes": wire, "comm_payload_bytes": payload, "comm_op_bytes": by_op, "comm_s": float(sum(dim_s.values())),
            "comm_dim_s": dim_s, "comm_count": len(recs)}
