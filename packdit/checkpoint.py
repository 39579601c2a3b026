"""Crash-safe checkpoints.

``save`` writes to a temporary file in the destination folder, flushes it to disk and renames it over
the destination (``os.replace`` is atomic on POSIX), so a crash mid-save leaves the previous checkpoint
intact, never a half-written one. ``load`` turns a truncated or corrupt file into a
:class:`CheckpointError` that names the file and its size, instead of an unpickling traceback.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

__all__ = ["CheckpointError", "save", "load"]


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or not a torch checkpoint."""


def save(obj, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file + fsync + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, *, map_location=None, weights_only: bool = True):
    """``torch.load`` with a clear :class:`CheckpointError` for a missing, truncated or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except (RuntimeError, EOFError, ValueError, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) is truncated or corrupt: {exc}"
        ) from exc
