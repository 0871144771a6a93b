"""Start the ranks: in this process, as N local processes on 127.0.0.1, or under torchrun.

Everything a user can get wrong is checked here, in the launching process, before any rank
starts (``preflight``), so a bad input costs one line and exit code 2, not N tracebacks.
"""

from __future__ import annotations

import os
import queue
import socket
import sys
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from plait.config import JobConfig, resolve_dp, torchrun_world_size, validate
from plait.errors import CheckpointError, ConfigError, PlaitError


def under_torchrun() -> bool:
    """True when torchrun (or Slurm + a rendezvous script) already set up the rank environment."""
    return torchrun_world_size() is not None


def pick_backend(cfg: JobConfig) -> str:
    if cfg.parallel.backend != "auto":
        return cfg.parallel.backend
    on_cuda = cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available())
    return "nccl" if on_cuda else "gloo"


def preflight(cfg: JobConfig, world_size: int, prepare: bool = True) -> JobConfig:
    """Validate everything that depends on files before ranks start; returns the config with
    ``model.vocab_size`` resolved. Builds the tokenizer and token caches as a side effect, so
    the ranks only read them."""
    from plait.data import prepare_data
    from plait.train import checkpoint as ckpt
    from plait.train.trainer import validation_batches, with_vocab

    validate(cfg, world_size)
    if cfg.train.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available; use 'cpu' or 'auto'")
    if cfg.parallel.backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend = 'nccl' needs CUDA devices; use 'gloo' or 'auto'")
    if cfg.checkpoint.resume:
        skipped: list[str] = []
        folder = ckpt.latest_good_checkpoint(cfg.run.dir, skipped)
        if folder is None:
            found = f": {skipped[0]}" if skipped else ""
            raise CheckpointError(f"--resume: no usable checkpoint in '{ckpt.checkpoint_root(cfg.run.dir)}'{found}")
        for problem in skipped:
            print(f"plait: warning: {problem}; resuming from {os.path.basename(folder)}", file=sys.stderr, flush=True)
    if not prepare:
        _check_initial_weights(cfg)
        return cfg
    bundle = prepare_data(cfg.data, cfg.train.seq_len, cfg.train.seed)
    validation_batches(cfg, bundle, 0, resolve_dp(cfg, world_size))  # raises if the split is too small
    vocab = bundle.tokenizer.vocab_size
    if cfg.model.vocab_size and cfg.model.vocab_size < vocab:
        raise ConfigError(
            f"model.vocab_size = {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({vocab}); use 0 to take the tokenizer's size"
        )
    cfg = with_vocab(cfg, vocab)
    _check_initial_weights(cfg)
    return cfg


def _check_initial_weights(cfg: JobConfig) -> None:
    from plait.train import checkpoint as ckpt

    if cfg.checkpoint.init_from and not cfg.checkpoint.resume:
        ckpt.initial_weights(cfg.checkpoint.init_from, cfg.model)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, Slurm's --cpus-per-task, a
    container's cpuset) where the platform reports one, else every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, fn: Callable, args: tuple, results,
            env: dict[str, str] | None = None) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **(env or {}),
    )
    # N ranks share this machine's cores; without this each would start one thread per core.
    torch.set_num_threads(max(1, usable_cores() // world))
    try:
        dist.init_process_group(backend, rank=rank, world_size=world)
        out = fn(*args)
        results.put((rank, out))
    except PlaitError as exc:
        print(f"plait: error on rank {rank}: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except BaseException as exc:
        traceback.print_exc()
        sys.stderr.flush()
        _report_error(rank, exc)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _report_error(rank: int, exc: BaseException) -> None:
    """Tell the monitor (if one watches) why this rank is failing: it tells a rank's own error
    from a lost peer's."""
    from plait.resilience.watchdog import monitor_store

    try:
        store = monitor_store(timeout_s=2.0)
        if store is not None:
            store.set(f"error/{rank}", f"{type(exc).__name__}: {exc}"[:2000])
    except Exception:
        pass  # the supervisor is gone; the exit code still tells


class RankFailed(RuntimeError):
    """A spawned rank exited with a non-zero code; ``exitcode`` is the first failure's."""

    def __init__(self, rank: int, exitcode: int):
        super().__init__(f"rank {rank} exited with code {exitcode}; the other ranks were stopped")
        self.rank, self.exitcode = rank, exitcode


def start_ranks(fn: Callable, nproc: int, args: tuple, backend: str, env: dict[str, str] | None = None):
    """Start ``nproc`` rank processes running ``fn(*args)`` in one process group on 127.0.0.1
    (``env`` added to their environment); returns (processes, the queue their results come on)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, nproc, port, backend, fn, args, results, env), daemon=False)
             for r in range(nproc)]
    for proc in procs:
        proc.start()
    return procs, results


def spawn(fn: Callable, nproc: int, args: tuple = (), backend: str = "gloo") -> list[Any]:
    """Run ``fn(*args)`` on ``nproc`` local ranks joined in one process group (127.0.0.1).

    Returns the list of each rank's return value. If any rank fails, all are stopped and
    RankFailed is raised: no rank is left running.
    """
    procs, results = start_ranks(fn, nproc, args, backend)
    outputs: dict[int, Any] = {}
    try:
        while len(outputs) < nproc:
            try:
                rank, out = results.get(timeout=0.2)
                outputs[rank] = out
                continue
            except queue.Empty:
                pass
            for rank, proc in enumerate(procs):
                if proc.exitcode not in (None, 0):
                    raise RankFailed(rank, proc.exitcode)
            if all(p.exitcode == 0 for p in procs) and len(outputs) < nproc:
                time.sleep(0.2)  # results may still be in flight in the queue's feeder thread
                while not results.empty():
                    rank, out = results.get()
                    outputs[rank] = out
                if len(outputs) < nproc:
                    raise RuntimeError("a rank exited without returning its result")
        for proc in procs:
            proc.join()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
    return [outputs[r] for r in range(nproc)]


def launch_training(cfg: JobConfig):
    """Run the training job for ``cfg`` in whichever way this process was started.

    Returns rank 0's TrainResult (this process's own under torchrun)."""
    from plait.train.trainer import run_training

    if under_torchrun():
        return _train_under_torchrun(cfg)
    cfg = preflight(cfg, cfg.parallel.nproc)
    if cfg.parallel.nproc == 1:
        return run_training(cfg)
    if cfg.resilience.watch:
        from plait.resilience.supervisor import supervise

        return supervise(run_training, cfg, pick_backend(cfg))[0]
    return spawn(run_training, cfg.parallel.nproc, (cfg,), pick_backend(cfg))[0]


def _train_under_torchrun(cfg: JobConfig):
    """One torchrun worker. Every rank checks the config and checkpoint; the data is prepared
    by rank 0 inside the trainer while the others wait, so no two ranks write the same cache
    file. After a torchrun restart the job resumes from its last good checkpoint, and plait's
    monitor (plait/resilience/agent.py) watches every attempt."""
    import dataclasses

    from plait.resilience.agent import finish_torchrun, join_torchrun, torchrun_attempt
    from plait.resilience.events import log_event
    from plait.resilience.watchdog import monitor_store
    from plait.train import checkpoint as ckpt
    from plait.train.trainer import run_training

    world, rank, restart = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), torchrun_attempt()
    if restart > 0 and ckpt.latest_good_checkpoint(cfg.run.dir) is not None:
        cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, resume=True))
    preflight(cfg, world, prepare=False)
    if rank == 0 and restart > 0:
        where = "its last good checkpoint" if cfg.checkpoint.resume else "the start (no checkpoint yet)"
        log_event(cfg.run.dir, "restart", rank=0, detail=f"torchrun restart {restart}, from {where}")
    monitor = join_torchrun(cfg.resilience, cfg.run.dir)
    if not dist.is_initialized():
        dist.init_process_group(pick_backend(cfg), **_attempt_store(restart, rank, world))
    try:
        result = run_training(cfg)
        dist.barrier()
        if rank == 0 and cfg.resilience.watch:
            log_event(cfg.run.dir, "done", rank=0, detail=f"torchrun attempt {restart}")
            finish_torchrun(monitor_store(), monitor)
        return result
    finally:
        dist.destroy_process_group()


def _attempt_store(restart: int, rank: int, world: int) -> dict[str, Any]:
    """init_process_group arguments that keep torchrun restarts apart. torchrun's agent store
    lives for the whole job at the same address, so after a restart the new workers would
    read the previous attempt's gloo addresses and fail to connect; a prefix per restart
    avoids that. Empty when the store is not torchrun's agent store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    from datetime import timedelta

    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                           timeout=timedelta(minutes=5))
    return {"store": dist.PrefixStore(f"plait/pg/{restart}/", client), "rank": rank, "world_size": world}
