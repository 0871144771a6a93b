"""One run per run dir: a run holds an exclusive lock on ``run.dir/.lock`` from before its
ranks start until it ends, so a second run into the same folder stops with one line instead
of mixing its config, checkpoints and metrics with the first's.

The lock is ``flock``: the kernel drops it when its holder exits, however it exits, so a
killed run never leaves the folder locked. One process per job holds it, the one that
starts the ranks (or runs them itself); under torchrun, global rank 0, once per restart.
On Linux, ``flock`` on NFS is forwarded to the server, so nodes sharing a run dir see it.
The file holds the holder's pid and host, to name it in the error; it is never removed (a
new holder could lock a fresh file while an old one still held the removed one).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator

from plait.errors import ConfigError

LOCK_NAME = ".lock"


class RunDirInUse(ConfigError):
    """Another plait run holds ``run.dir``."""


def _holder(fd: int) -> str:
    try:
        pid, host = os.pread(fd, 256, 0).decode().split()
    except (OSError, UnicodeDecodeError, ValueError):
        return "pid unknown"
    return f"pid {pid}" if host == socket.gethostname() else f"pid {pid} on {host}"


def lock_run_dir(run_dir: str) -> int:
    """Take ``run_dir``'s lock (creating the folder) and return its file descriptor: the lock
    lasts until it is closed or this process ends. Raises RunDirInUse, having written
    nothing, when another run holds it."""
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise RunDirInUse(
            f"run.dir '{run_dir}' is in use by another plait run ({holder}); wait for it to end, "
            "or set another --run.dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def hold_run_dir(run_dir: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock while inside (see ``lock_run_dir``)."""
    fd = lock_run_dir(run_dir)
    try:
        yield
    finally:
        os.close(fd)
