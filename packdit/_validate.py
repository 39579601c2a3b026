"""Input validation shared by every packdit op.

A packed batch is where silent corruption hides: one off-by-one in ``cu_seqlens`` mixes two samples'
tokens and nothing crashes. Ops therefore validate their layout before launching, cheaply:

* shape/dtype/device/contiguity checks are host-only and run on every call;
* value checks that need a device->host copy (``cu_seqlens`` monotone, ``grid`` consistent with the
  lengths, ``positions`` inside the grid) run **once per layout object**: the result is memoized on
  the :class:`~packdit.PackedSeqs` (``seqs.cached``), so a 28-layer model pays for them once per batch,
  and re-run only if one of the layout's tensors is written in place (its version counter moves).

Checks are on by default. Turn them off with ``PACKDIT_CHECKS=0`` in the environment, or for a block
of code with ``with packdit.checks(False): ...`` (e.g. a hot loop after the first step has validated
the data pipeline). Every error names the argument, the segment and the expected vs actual value.
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["checks", "checks_enabled", "validate_cu_seqlens", "validate_offsets", "validate_seqs", "check_grid",
           "mark_validated", "is_validated", "MAX_TOKENS"]

MAX_TOKENS = 2**31 - 1
"""Tokens of one packed batch, and cells of one patch grid: every index into either is int32."""

_state = threading.local()


def checks_enabled() -> bool:
    """Whether validation runs: the innermost ``checks(...)`` block, else ``PACKDIT_CHECKS`` (default on)."""
    override = getattr(_state, "enabled", None)
    if override is not None:
        return override
    return os.environ.get("PACKDIT_CHECKS", "1").strip().lower() not in ("0", "false", "off", "no")


@contextlib.contextmanager
def checks(enabled: bool) -> Iterator[None]:
    """Turn packdit's input validation on or off inside a ``with`` block (thread-local, nestable)."""
    previous = getattr(_state, "enabled", None)
    _state.enabled = bool(enabled)
    try:
        yield
    finally:
        _state.enabled = previous


def check_grid(grid: Sequence[int], name: str) -> tuple[int, int, int]:
    """One sample's patch grid as three Python ints ``(T, H, W)``, or ValueError naming ``name``.

    Refuses what the int32 layout cannot hold: raster indices ``t*H*W + h*W + w`` (and ``H*W``, each side)
    must fit int32, or positions come out negative, so a grid spans at most ``MAX_TOKENS`` cells."""
    try:
        entry = tuple(operator.index(s) for s in grid)
    except TypeError:
        entry = None
    if entry is None or len(entry) != 3 or min(entry) < 0:
        raise ValueError(f"{name}: expected (T, H, W) of non-negative ints, got {grid}")
    cells = max(entry[0] * entry[1] * entry[2], entry[1] * entry[2], *entry)
    if cells > MAX_TOKENS:
        raise ValueError(f"{name}: (T, H, W) = {entry} spans {cells} cells; raster indices are int32, so a grid "
                         f"(and each frame and side of it) spans at most {MAX_TOKENS}")
    return entry


def _first_bad(mask: Tensor) -> int:
    return int(mask.nonzero()[0, 0])


def validate_cu_seqlens(cu_seqlens: Tensor, num_tokens: int, name: str = "cu_seqlens") -> list[int]:
    """Check ``cu_seqlens`` is an int32 ``(B+1,)`` prefix sum over ``num_tokens`` tokens; return it as a host list.

    One device->host copy: call it once per layout, not per layer.
    """
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"{name}: expected an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"{name}: expected shape (B+1,) with B >= 0, got {tuple(cu_seqlens.shape)}")
    host = cu_seqlens.tolist()
    validate_offsets(host, num_tokens, name)
    return host


def validate_offsets(offsets: Sequence[int], num_tokens: int, name: str = "cu_seqlens",
                     max_seqlen: int | None = None) -> None:
    """Check host segment offsets (a list or a 1-D numpy array, e.g. ``cu_seqlens`` copied to the host):
    ``offsets[0] == 0``, non-decreasing, ``offsets[-1] == num_tokens`` and, when given, no segment longer
    than ``max_seqlen``. The one check of ``cu_seqlens`` values, whoever holds them."""
    offsets = offsets.tolist() if hasattr(offsets, "tolist") else list(offsets)
    if offsets[0] != 0:
        raise ValueError(f"{name}: expected non-decreasing offsets starting at {name}[0] = 0, got {offsets[0]}")
    longest = 0
    for b in range(len(offsets) - 1):
        length = offsets[b + 1] - offsets[b]
        if length < 0:
            raise ValueError(f"{name}: expected non-decreasing offsets, but segment {b} has negative length: "
                             f"{name}[{b}] = {offsets[b]} > {name}[{b + 1}] = {offsets[b + 1]}")
        longest = max(longest, length)
    if offsets[-1] != num_tokens:
        raise ValueError(f"{name}: last entry must be the number of tokens: expected {name}[-1] = {num_tokens}, "
                         f"got {offsets[-1]}")
    if max_seqlen is not None and longest > max_seqlen:
        raise ValueError(f"{name}: a segment has {longest} tokens, more than max_seqlen={max_seqlen}")


_LAYOUT_TENSORS = ("cu_seqlens", "grid", "positions", "segment_ids")


def _tensor_versions(seqs) -> tuple:
    """Which tensors the layout holds and their version counters, which every in-place write bumps (host
    reads, no sync)."""
    return tuple((id(t), getattr(t, "_version", None)) for t in (getattr(seqs, f) for f in _LAYOUT_TENSORS))


def mark_validated(seqs) -> None:
    """Record that ``seqs`` is consistent as its tensors are now (a layout built consistent by construction)."""
    if not torch.compiler.is_compiling():
        seqs._cache["validated"] = _tensor_versions(seqs)


def is_validated(seqs) -> bool:
    """Whether ``seqs`` was validated and none of its tensors has been written in place since."""
    return not torch.compiler.is_compiling() and seqs._cache.get("validated") == _tensor_versions(seqs)


def validate_seqs(seqs, name: str = "seqs", *, always: bool = False) -> None:
    """Full consistency check of a :class:`~packdit.PackedSeqs`, memoized on the object.

    Checks: int32 tensors on one device; ``cu_seqlens`` a prefix sum over N tokens; ``grid`` (B, 3) of
    non-negative sizes whose raster indices fit int32, each length ``<= T*H*W`` (``==`` unless tokens were
    dropped); ``max_seqlen`` an int, the true maximum; ``segment_ids`` the sample of each token;
    ``positions`` inside each sample's grid; ``sample_ndims`` empty or one 3 or 4 per sample.

    Runs while checks are on (or with ``always``, for the oracles) and not under ``torch.compile``
    (validate a layout before handing it to a compiled step). The result is memoized against the version
    counters of the layout's tensors: a layout built by :meth:`~packdit.PackedSeqs.from_grids` is valid by
    construction and costs nothing, a hand-built one (or one made with ``dataclasses.replace``, which starts
    an empty cache) is checked on first use, with a few device->host copies, and one whose tensors were
    written in place since is checked again, its memoized metadata dropped first.
    """
    if torch.compiler.is_compiling() or not (always or checks_enabled()):
        return
    versions = _tensor_versions(seqs)
    previous = seqs._cache.get("validated")
    if previous == versions:
        return
    if previous is not None:  # written in place since: everything memoized from the old values is stale
        seqs._cache.clear()
    for field in _LAYOUT_TENSORS:
        t = getattr(seqs, field)
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}.{field}: expected an int32 tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise ValueError(f"{name}.{field}: expected dtype int32, got {t.dtype}")
        if t.device != seqs.cu_seqlens.device:
            raise ValueError(f"{name}.{field}: expected device {seqs.cu_seqlens.device} like cu_seqlens, "
                             f"got {t.device}")
    if seqs.segment_ids.dim() != 1:
        raise ValueError(f"{name}.segment_ids: expected shape (N,), got {tuple(seqs.segment_ids.shape)}")
    n = seqs.segment_ids.shape[0]
    cu = validate_cu_seqlens(seqs.cu_seqlens, n, f"{name}.cu_seqlens")
    num_segments = len(cu) - 1
    if seqs.grid.shape != (num_segments, 3):
        raise ValueError(f"{name}.grid: expected shape ({num_segments}, 3), got {tuple(seqs.grid.shape)}")
    if seqs.positions.shape != (n, 3):
        raise ValueError(f"{name}.positions: expected shape ({n}, 3), got {tuple(seqs.positions.shape)}")
    if seqs.sample_ndims and (len(seqs.sample_ndims) != num_segments
                              or any(d not in (3, 4) for d in seqs.sample_ndims)):
        raise ValueError(f"{name}.sample_ndims: expected () or {num_segments} entries of 3 or 4, "
                         f"got {seqs.sample_ndims}")
    lengths = [cu[b + 1] - cu[b] for b in range(num_segments)]
    longest = max(lengths, default=0)
    if isinstance(seqs.max_seqlen, bool) or not isinstance(seqs.max_seqlen, int) or seqs.max_seqlen != longest:
        raise ValueError(f"{name}.max_seqlen: expected the int {longest} (the longest segment), "
                         f"got {seqs.max_seqlen!r}")
    grids = [check_grid(g, f"{name}.grid[{b}]") for b, g in enumerate(seqs.grid.tolist())]
    for b, ((t, h, w), length) in enumerate(zip(grids, lengths)):
        full = t * h * w
        if length > full or (length < full and not seqs.dropped):
            want = f"<= {full}" if seqs.dropped else f"= {full}"
            raise ValueError(f"{name}: segment {b} has {length} tokens but its grid (T, H, W) = ({t}, {h}, {w}) "
                             f"needs length {want}")
    expected_ids = torch.repeat_interleave(
        torch.arange(num_segments, dtype=torch.int32, device=seqs.cu_seqlens.device), seqs.lengths, output_size=n
    )
    bad = seqs.segment_ids != expected_ids
    if bool(bad.any()):
        i = _first_bad(bad)
        raise ValueError(f"{name}.segment_ids: token {i} says segment {int(seqs.segment_ids[i])}, "
                         f"cu_seqlens puts it in segment {int(expected_ids[i])}")
    if n:
        grid_of_token = seqs.grid[expected_ids.long()]
        bad = ((seqs.positions < 0) | (seqs.positions >= grid_of_token)).any(dim=1)
        if bool(bad.any()):
            i = _first_bad(bad)
            raise ValueError(f"{name}.positions: token {i} of segment {int(expected_ids[i])} is at (t, h, w) = "
                             f"{tuple(seqs.positions[i].tolist())}, outside its grid "
                             f"{tuple(grid_of_token[i].tolist())}")
    seqs._cache.update(validated=versions, seqlens=tuple(lengths), grids=tuple(grids))
