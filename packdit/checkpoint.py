"""Crash-safe, integrity-checked checkpoints (POSIX).

File format: the ``torch.save`` zip archive followed by a 56-byte trailer::

    archive   the torch.save bytes (L bytes)
    length    8 bytes, L little-endian
    sha256    32 bytes, of the archive
    magic     16 bytes, b"packdit-ckpt-v1\\n"

Zip readers find an archive from its end-of-central-directory record and ignore what follows it, so
``torch.load(path)`` still reads a packdit checkpoint as is; ``load`` verifies the trailer first.

``save`` writes to a temporary ``.<name>.packdit-XXXXXXXX.tmp`` in the destination folder, holding an
exclusive ``flock`` on it from creation until it is renamed over the destination (``os.replace`` is
atomic on POSIX), fsyncs the file and then the folder. A crash mid-save leaves the previous
checkpoint intact, never a half-written one. A killed save leaves its temporary behind, unlocked: the
next ``save`` to the same destination deletes every temporary of that destination whose lock it can
take (their writers are gone), and never touches a live writer's or another destination's. (On a file
system without ``flock`` no temporary is ever deleted: none can be told from a live one.)

``load`` turns every malformed file (missing, not a regular file, truncated, any flipped byte, not
written by ``save``, not loadable by ``torch.load``) into a :class:`CheckpointError` naming the file,
its size and what is wrong.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import struct
import tempfile
from pathlib import Path

import torch

__all__ = ["CheckpointError", "save", "load"]

_MAGIC = b"packdit-ckpt-v1\n"
_TRAILER = struct.Struct("<Q32s16s")  # archive length, sha256 of the archive, magic
_READ_CHUNK = 16 << 20                # bytes hashed per read when verifying


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or not written by :func:`save`."""


class _HashingWriter:
    """A write-only file object that hashes and counts what ``torch.save`` writes through it."""

    def __init__(self, file):
        self.file, self.sha256, self.size = file, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}.packdit-"


def _create_locked_temporary(path: Path) -> tuple[int, str]:
    """A new temporary file for ``path``, locked; retried if a sweeper removed it before the lock was taken."""
    while True:
        fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return fd, tmp
        except (BlockingIOError, FileNotFoundError):
            pass  # a concurrent save's sweep took the fresh file before us and deletes it
        except OSError:
            return fd, tmp  # no locks on this file system: nobody can sweep this temporary either
        os.close(fd)


def _remove_stale_temporaries(path: Path, keep: str) -> None:
    """Delete the temporaries of ``path`` (not ``keep``) whose writer no longer holds their lock."""
    pattern = re.compile(re.escape(_temporary_prefix(path)) + r"[A-Za-z0-9_]+\.tmp")  # no '.': not another target's
    for candidate in path.parent.iterdir():
        if not pattern.fullmatch(candidate.name) or str(candidate) == keep:
            continue
        try:
            fd = os.open(candidate, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            candidate.unlink(missing_ok=True)
        except OSError:
            pass  # a live save holds it (or the file system has no locks): not ours to delete
        finally:
            os.close(fd)


def save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` plus a checksum trailer to ``path`` atomically (temp file + fsync + rename).

    Also deletes stale temporaries of ``path`` left by killed saves. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_locked_temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            _remove_stale_temporaries(path, keep=tmp)
            archive = _HashingWriter(f)
            torch.save(obj, archive)
            f.write(_TRAILER.pack(archive.size, archive.sha256.digest(), _MAGIC))
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)  # under the lock: a sweeper never sees this temporary unlocked
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)  # make the rename itself durable
        finally:
            os.close(folder)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _verify(path: Path, size: int) -> None:
    """CheckpointError unless ``path`` ends with a trailer whose length and sha256 match its archive."""
    def corrupt(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path} ({size} bytes) is truncated or corrupt: {what}")

    with open(path, "rb") as f:
        if size < _TRAILER.size:
            raise corrupt(f"shorter than the {_TRAILER.size}-byte checksum trailer packdit.checkpoint.save writes")
        f.seek(size - _TRAILER.size)
        length, recorded, magic = _TRAILER.unpack(f.read(_TRAILER.size))
        if magic != _MAGIC:
            raise corrupt("no packdit checksum trailer at its end (a file not written by packdit.checkpoint.save, "
                          "e.g. by torch.save, loads with torch.load)")
        if length != size - _TRAILER.size:
            raise corrupt(f"the trailer records a {length}-byte archive, the file holds {size - _TRAILER.size} bytes")
        f.seek(0)
        sha256 = hashlib.sha256()
        while chunk := f.read(min(_READ_CHUNK, length - f.tell())):
            sha256.update(chunk)
    if sha256.digest() != recorded:
        raise corrupt(f"sha256 of the archive is {sha256.hexdigest()}, the trailer records {recorded.hex()}")


def load(path: str | os.PathLike, *, map_location=None, weights_only: bool = True):
    """``torch.load`` of a :func:`save` checkpoint after verifying its checksum.

    Raises :class:`CheckpointError` (naming the file and what is wrong) for a missing file, a
    non-regular file, a truncated or modified one, a file without the trailer, or one ``torch.load``
    refuses (e.g. an object ``weights_only=True`` does not allow).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: not a regular file")
    size = path.stat().st_size
    try:
        _verify(path, size)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path} ({size} bytes) cannot be read: {exc}") from exc
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as exc:  # the bytes are the ones saved: report why torch.load refuses them
        raise CheckpointError(
            f"checkpoint {path} ({size} bytes) passed its checksum but torch.load failed: {type(exc).__name__}: {exc}"
        ) from exc
