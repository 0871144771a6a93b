"""Size and CRC32 of each checkpoint file, taken by the rank that writes it, while it writes it.

The manifest lists every file of a checkpoint with its size and CRC32. Were rank 0 to read the
whole folder back to checksum it, a save would cost O(checkpoint) on one rank, after every
rank's write: the slowest part of a save on a cluster, and in an asynchronous save the time a
background reader takes from rank 0's training (every other rank then waits for rank 0). So
DCP writes through :class:`SummingFileSystem`, which checksums the bytes on their way to the
file (still in the CPU cache), and the ranks hand their sums to rank 0 (:mod:`.store`).
"""

from __future__ import annotations

import io
import os
import threading
import zlib
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

# A file's manifest entry: {"bytes": size, "crc32": CRC32 of its content}.
FileSum = dict[str, int]


def file_crc32(path: str) -> int:
    """CRC32 of the file at ``path``, read back in 4 MiB pieces."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return crc


def file_sum(path: str, known: FileSum | None = None) -> FileSum:
    """The manifest entry of the file at ``path``: ``known`` (taken as it was written) when its
    size is the file's on disk, else read back."""
    size = os.path.getsize(path)
    if known is not None and known["bytes"] == size:
        return known
    return {"bytes": size, "crc32": file_crc32(path)}


class _SummingStream(io.RawIOBase):
    """A file opened for writing that checksums what is written; sequential writes only (DCP
    and torch.save never seek a stream they write: a seek would make the running sum wrong,
    and this stream has none)."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self._raw = raw
        self.crc = 0
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)  # releases the GIL on large buffers
        self.size += view.nbytes
        return self._raw.write(view)

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        super().close()  # flushes through to the file first
        self._raw.close()


class SummingFileSystem(FileSystem):
    """DCP's local file system that notes the size and CRC32 of every file it writes, under
    the path the file has at the end (DCP renames its metadata file into place)."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, FileSum] = {}
        self._lock = threading.Lock()  # DCP may write files from several threads

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as raw:
            stream = _SummingStream(raw)
            yield stream
        with self._lock:  # only once the file was written whole and closed
            self.sums[os.fspath(path)] = {"bytes": stream.size, "crc32": stream.crc}

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:
            if os.fspath(path) in self.sums:
                self.sums[os.fspath(new_path)] = self.sums.pop(os.fspath(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        super().rm_file(path)
        with self._lock:
            self.sums.pop(os.fspath(path), None)

    def relative_sums(self, folder: str) -> dict[str, FileSum]:
        """The sums of the files written, keyed by their path relative to ``folder``."""
        with self._lock:
            return {os.path.relpath(path, folder): entry for path, entry in self.sums.items()}


@contextmanager
def no_record_crc32() -> Iterator[None]:
    """torch.save skips the CRC32 it computes for each record of its zip format while DCP
    writes shards: the manifest's sum covers the same bytes, and that second pass over the
    data was about 40% of a shard write's CPU time (torch.load does not need it). A process-
    wide torch setting; a concurrent torch.save elsewhere in this process merely writes its
    records without that CRC too, and still loads."""
    saved = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(saved)


def summing_writer(folder: str) -> tuple[FileSystemWriter, SummingFileSystem]:
    """A DCP writer into ``folder`` (DCP's defaults: one file per rank, fsynced) and the file
    system that notes what it wrote."""
    writer = FileSystemWriter(folder)
    writer.fs = summing = SummingFileSystem()
    return writer, summing
