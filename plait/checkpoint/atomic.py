"""Crash-safe writes: a file or folder appears complete under its final name, or not at all.

Everything plait writes that another run may read (data caches, tokenizers, checkpoints, the
``latest`` pointer, Hugging Face folders) goes through this module. Data is written under a temp
name in the same folder as the target, because ``os.replace`` is only atomic within one file
system, and renamed into place once complete.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import IO


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", durable: bool = True) -> Iterator[IO]:
    """Yield a temp file in ``path``'s folder; on success it is renamed onto ``path``.

    On any error the temp file is removed and ``path`` is left untouched, so a killed run (or
    two ranks writing the same cache) never leaves a half-written file behind. ``durable=False``
    skips the fsync: for status files rewritten every second, whose readers only need them whole.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; caches are shared like any other file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def temp_folder_for(path: str) -> str:
    """The fixed temp name ``<path>.tmp`` of folder ``path``: every rank of a collective save
    can name it, and readers skip names ending in ``.tmp``."""
    return path.rstrip("/") + ".tmp"


def fresh_folder(tmp: str) -> None:
    """Create the empty folder ``tmp``, removing what a save that died half way left there."""
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)


def publish_folder(tmp: str, path: str, merge: Sequence[str] = ()) -> None:
    """Rename the finished folder ``tmp`` onto ``path``, replacing a folder already there.

    With ``merge`` (file names of ``tmp``, in order) and ``path`` a non-empty folder, those
    files are renamed into it one by one instead and its other files are kept: put the file
    that marks the folder complete last.
    """
    if merge and os.path.isdir(path) and os.listdir(path):
        for name in merge:
            os.replace(os.path.join(tmp, name), os.path.join(path, name))
        return
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_folder(path: str, fixed_temp: bool = False, merge: Sequence[str] = ()) -> Iterator[str]:
    """Yield a temp folder beside ``path``; on success it is published onto ``path``
    (:func:`publish_folder`, with ``merge``). The temp folder is removed whatever happens.

    The temp folder is ``.<name>.tmp-XXXXXXXX`` (hidden, unique), or with ``fixed_temp``
    :func:`temp_folder_for`'s ``<name>.tmp``.
    """
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if fixed_temp:
        tmp = temp_folder_for(path)
        fresh_folder(tmp)
    else:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; give it a normal folder's mode
    try:
        yield tmp
        publish_folder(tmp, target, merge)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe_write_error(exc: OSError) -> str:
    """One line for a failed write: "no space left on device" for a full disk (what to do about
    it is then plain), the system's words otherwise; with the file when the error names it."""
    what = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc) or type(exc).__name__)
    return f"{what} writing '{exc.filename}'" if exc.filename else what
