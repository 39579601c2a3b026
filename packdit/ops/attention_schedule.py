"""Work schedule of :mod:`packdit.ops.attention`: which rows each kernel program computes.

Segments. Every kernel works on *segments*: segment s attends query rows ``q_start + i * row_stride``
(``i < q_len``) to key rows ``k_start + j * row_stride`` (``j < k_len``). A sample (mode "full"), a frame
(mode "spatial": H*W rows, row stride 1) and a spatial position across frames (mode "temporal": T rows,
row stride H*W) are all segments, so the factorized modes read the packed raster layout in place.

Groups. The segments of one sample in one mode have equal lengths and equally spaced starts, so a sample
is one *group* of ``num_segs`` segments (segment s starts ``s * seg_stride`` rows after segment 0) and the
schedule is O(samples), not O(segments): 2,000 videos of 3,600 spatial positions each are 2,000 groups,
not 7.2M temporal segments. A group table is ``(GROUP_FIELDS, G)`` int32 on the device, one column per
group, in the order programs take them (most expensive first, so the long videos start in the first wave
and the short images fill the tail); field ``f`` of group ``g`` sits at ``table[f, g]``.

Tiles. A group is cut into tiles of ``block`` rows; a tile table maps each program id to its group (a
program finds its tile as ``program id - tile_start[group]``). Two tilings:

* ``pack == 1``: ``split = ceil(len / block)`` tiles per segment, tile rows ``i`` in
  ``[part * block, part * block + block)`` of one segment.
* ``pack > 1`` (self-attention segments of at most PACK_ROWS / 2 rows, e.g. the T = 5..33 frames of a
  temporal segment): ``pack = PACK_ROWS // len`` segments share a tile, frame-major: tile row r is row
  ``r // pack`` of segment ``r % pack``, so a tile reads ``pack`` consecutive raster rows per frame. Scores
  are masked block-diagonally (query row r sees key c iff ``r % pack == c % pack``), derived from the
  group fields, no mask tensor. PACK_ROWS = 64 is the smallest key block of any kernel configuration, so
  one key block holds all keys of a packed tile and the packed tile is the kernel's single masked block.
* Single-row segments (``q_len == k_len == 1``: images in the temporal mode, 1x1 frames, 1-token samples)
  have out = v: ``pack = block`` of them form a tile that the kernels compute row by row, without MMA.

Tile size. Mode "full" and "spatial": the largest of TILE_SIZES whose padded rows
``sum_s ceil(L_s / block) * block`` exceed the useful rows by at most MAX_PADDING; larger tiles read each K/V
block once per more query rows (K/V traffic halves per doubling), smaller ones waste fewer padded rows. A tile
of 16 or 32 rows is below wgmma's M of 64 rows per warpgroup and runs mma.sync, whose rows cost about
MMA_SYNC_ROW_COST = 1.5 times as much (compiled for sm_90, bf16: the forward loop issues 1.3-2.2 instructions
per MMA clock at 16/32 rows against 0.7-1.1 at 64, D = 64/72/128), so 64 rows replace it when they pad at most
that much more. A 144p 16:9 image is 9 x 16 = 144 tokens: 128-row tiles give 256 rows (44% padding), 32-row
tiles 160 (10%), 64-row tiles 192 <= 1.5 x 160: a batch of such images runs at 64 rows; 16-token frames stay at
16. A mix that also holds 480p (1,590 tokens) and 720p (3,600) images pads under 8% at 128 and keeps 128, as
does a video (17 x 1,590 tokens: 0.4%). The 1/8 threshold and the 1.5 are starting values, from static code,
for the GPU benchmark to tune. Mode "temporal": the one of PACKED_TILE_SIZES with the larger useful score area
(see :func:`score_area`), i.e. 64 for T <= 64.

Key tiles (the dK/dV programs) have at least WGMMA_ROWS = 64 rows whatever the query tile: keys are the M side
of the key-major backward's MMAs. Compiled for sm_90 (bf16, atomic dQ), 16- and 32-row key tiles run mma.sync
at issue/MMA 1.4-1.7 and spill 24-320 B per thread inside the loop at D = 72 and 128; 64-row tiles run wgmma at
0.8-1.2 without spilling. Frames of at most 32 rows (mode "spatial") share a key tile as temporal segments do.

Host metadata. The schedule is built on the host from the layout's host tuples (``PackedSeqs.seqlens``,
``PackedSeqs.grids``, cached at pack time) with numpy, O(samples), and only the group table is copied to
the device (a host->device copy, which does not wait for the GPU); the per-tile table is computed on the
device from it. So a training step reads nothing back from the GPU. Plain ``cu_seqlens`` without a layout
carry no host lengths: :func:`device_schedule` then builds mode "full" from device ops with tile tables
sized by an upper bound (surplus programs exit at once).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["MODES", "AttentionSchedule", "host_schedule", "device_schedule", "score_area", "GROUP_FIELDS"]

MODES = ("full", "spatial", "temporal")
TILE_SIZES = (128, 64, 32, 16)
PACKED_TILE_SIZES = (128, 64)
MAX_PADDING = 1 / 8
PACK_ROWS = 64
WGMMA_ROWS = 64
MMA_SYNC_ROW_COST = 1.5
# Fields of a group table, in row order (see the module docstring). TILE_START: the first program of the
# group; PACK: segments per tile; SPLIT: tiles per segment.
GROUP_FIELDS = ("tile_start", "q_start", "k_start", "q_len", "k_len", "num_segs", "seg_stride", "row_stride",
                "pack", "split")


@dataclasses.dataclass(frozen=True)
class AttentionSchedule:
    """Query-side (forward, dQ) and key-side (dK/dV) programs of one layout and mode.

    Attributes:
        q_groups, k_groups: ``(len(GROUP_FIELDS), G)`` int32 group tables, device.
        q_tiles, k_tiles: ``(programs,)`` int32, the group of each program (G for surplus programs), device.
        block_m, block_kt: query / key tile rows.
        max_q_len, max_k_len: longest query / key segment (bounds on the device path). max_k_len is the
            forward's autotuning key; at most PACK_ROWS, every forward / dQ tile's keys fit one key block (max_q_len:
            every dK/dV tile's queries one query block per head), and those programs loop over heads.
        keys_uncovered: some key rows are in no key tile (keys of an empty query segment, or unknown on the
            device path): their dK/dV are zero-filled first.
    """

    q_groups: Tensor
    q_tiles: Tensor
    k_groups: Tensor
    k_tiles: Tensor
    block_m: int
    block_kt: int
    max_q_len: int
    max_k_len: int
    keys_uncovered: bool

    def as_tuple(self) -> tuple:
        """The fields in order (no copies, unlike ``dataclasses.astuple``)."""
        return tuple(getattr(self, field.name) for field in dataclasses.fields(self))


# ---------------------------------------------------------------------------------------------- host side
@dataclasses.dataclass(frozen=True)
class _Groups:
    """One entry per group (int64 numpy arrays); ``packable``: self-attention segments that may share tiles."""

    q_start: np.ndarray
    k_start: np.ndarray
    q_len: np.ndarray
    k_len: np.ndarray
    num_segs: np.ndarray
    seg_stride: np.ndarray
    row_stride: np.ndarray
    packable: bool


def _groups(mode: str, q_lens: np.ndarray, k_lens: np.ndarray, grids: np.ndarray | None) -> _Groups:
    """The groups of ``mode`` over samples of ``q_lens`` / ``k_lens`` tokens and ``grids`` (B, 3)."""
    q_start = np.concatenate([[0], np.cumsum(q_lens)[:-1]]).astype(np.int64)
    k_start = np.concatenate([[0], np.cumsum(k_lens)[:-1]]).astype(np.int64)
    ones = np.ones_like(q_lens)
    if mode == "full":
        return _Groups(q_start, k_start, q_lens, k_lens, ones, np.zeros_like(q_lens), ones, packable=False)
    frames, hw = grids[:, 0], grids[:, 1] * grids[:, 2]
    if mode == "spatial":      # T segments (frames) of HW contiguous rows
        return _Groups(q_start, q_start, hw, hw, frames, hw, ones, packable=True)
    return _Groups(q_start, q_start, frames, frames, hw, ones, hw, packable=True)  # HW segments of T rows


def _packing(g: _Groups, length: np.ndarray, active: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``(pack, split)`` per group for tiles of ``block`` rows over segments of ``length`` rows; inactive groups
    get ``split = 0`` (no tiles)."""
    single = (g.q_len == 1) & (g.k_len == 1)
    shared = min(block, PACK_ROWS) // np.maximum(length, 1) if g.packable else 1
    pack = np.maximum(np.minimum(np.where(single, block, shared), g.num_segs), 1)
    split = np.where(pack > 1, 1, -(-length // block))
    return pack, np.where(active, split, 0)


def _tile_counts(g: _Groups, length: np.ndarray, active: np.ndarray, block: int) -> np.ndarray:
    pack, split = _packing(g, length, active, block)
    return -(-g.num_segs // pack) * split


def _wgmma_if_cheaper(size: int, padded_rows) -> int:
    """``size``, or WGMMA_ROWS where ``size`` is an mma.sync tile and WGMMA_ROWS pad at most MMA_SYNC_ROW_COST
    times its rows (``padded_rows(block)``: the rows computed with tiles of ``block``)."""
    if size < WGMMA_ROWS and padded_rows(WGMMA_ROWS) <= MMA_SYNC_ROW_COST * padded_rows(size):
        return WGMMA_ROWS
    return size


def _padding_tile(g: _Groups, length: np.ndarray, active: np.ndarray) -> int:
    """Largest of TILE_SIZES whose padded rows exceed the useful rows by at most MAX_PADDING, 64 rows instead of
    16/32 when they cost less (single-row segments, computed row by row, do not count)."""
    counted = active & ~((g.q_len == 1) & (g.k_len == 1))
    useful = int((length * g.num_segs)[counted].sum())

    def padded_rows(size):
        return int(_tile_counts(g, length, counted, size).sum()) * size

    size = next((size for size in TILE_SIZES if padded_rows(size) <= useful * (1 + MAX_PADDING)), TILE_SIZES[-1])
    return _wgmma_if_cheaper(size, padded_rows)


def _score_area(g: _Groups, block: int, block_n: int) -> tuple[int, int]:
    """``(useful, computed)`` query x key score entries of the forward over ``g`` (see :func:`score_area`)."""
    active = (g.q_len > 0) & ((g.q_len > 1) | (g.k_len > 1))
    pack, split = _packing(g, g.q_len, active, block)
    tiles = -(-g.num_segs // pack) * split
    key_blocks = -(-g.k_len // np.maximum(block_n // pack, 1))
    useful = int((g.q_len * g.k_len * g.num_segs)[active].sum())
    return useful, int((tiles * key_blocks).sum()) * block * block_n


def _temporal_tile(g: _Groups) -> int:
    """The one of PACKED_TILE_SIZES with the larger useful fraction of computed scores (larger on a tie)."""
    def fraction(size):
        useful, computed = _score_area(g, size, max(size, PACK_ROWS))
        return useful / computed if computed else 1.0

    return max(PACKED_TILE_SIZES, key=fraction)


def _table(g: _Groups, length: np.ndarray, active: np.ndarray, cost: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """``(group table (fields, G) int32, number of tiles)`` of one side, most expensive groups first."""
    pack, split = _packing(g, length, active, block)
    order = np.argsort(-np.where(active, cost, -1), kind="stable")
    counts = (-(-g.num_segs // pack) * split)[order]
    fields = (g.q_start, g.k_start, g.q_len, g.k_len, g.num_segs, g.seg_stride, g.row_stride, pack, split)
    table = np.stack([np.cumsum(counts) - counts, *(f[order] for f in fields)]).astype(np.int32)
    return table.reshape(len(GROUP_FIELDS), -1), int(counts.sum())


def _tile_groups(table: Tensor, num_tiles: int) -> Tensor:
    """``(num_tiles,)`` int32: the group of each program, from the group table's tile starts (device ops)."""
    tiles = torch.arange(num_tiles, device=table.device, dtype=torch.int32)
    group = torch.searchsorted(table[0], tiles, right=True) - 1
    # Surplus programs of an upper-bound table map to the last group, past its tiles: the kernels exit there.
    return group.clamp_(min=0).to(torch.int32)


def _host_tables(mode: str, q_lens, k_lens, grids) -> tuple[np.ndarray, int, np.ndarray, int, int, int, int, int, int]:
    """The host part of :func:`host_schedule`: ``(q table, q tiles, k table, k tiles, block_m, block_kt,
    max_q_len, max_k_len, covered key rows)``, numpy on O(samples) entries."""
    q = np.fromiter(q_lens, dtype=np.int64)
    k = q if k_lens is None else np.fromiter(k_lens, dtype=np.int64)
    grid = None if mode == "full" else np.fromiter(itertools.chain.from_iterable(grids), dtype=np.int64).reshape(-1, 3)
    g = _groups(mode, q, k, grid)
    q_active = (g.q_len > 0) & (g.num_segs > 0)
    k_active = q_active & (g.k_len > 0)
    if mode == "temporal":
        block_m = block_kt = _temporal_tile(g)
    else:
        block_m = _padding_tile(g, g.q_len, q_active)
        block_kt = max(WGMMA_ROWS, block_m if k_lens is None else _padding_tile(g, g.k_len, k_active))
    q_table, num_q_tiles = _table(g, g.q_len, q_active, g.k_len, block_m)
    k_table, num_k_tiles = _table(g, g.k_len, k_active, g.q_len, block_kt)
    covered = int((g.k_len * g.num_segs)[k_active].sum())
    return (q_table, num_q_tiles, k_table, num_k_tiles, block_m, block_kt, int(g.q_len.max(initial=0)),
            int(g.k_len.max(initial=0)), covered)


def host_schedule(mode: str, q_lens: Sequence[int], k_lens: Sequence[int] | None, grids, num_k: int,
                  device: torch.device) -> AttentionSchedule:
    """The schedule from host lengths (and host grids ``(T, H, W)`` for the factorized modes; ``k_lens`` None for
    self-attention). The caller has checked the layout. Host work is numpy over the samples; the device gets the
    group tables (host->device copies) and builds the tile tables from them (two small device ops)."""
    q_table, num_q_tiles, k_table, num_k_tiles, block_m, block_kt, max_q_len, max_k_len, covered = _host_tables(
        mode, q_lens, k_lens, grids)
    q_groups = torch.from_numpy(q_table).to(device, non_blocking=True)
    k_groups = torch.from_numpy(k_table).to(device, non_blocking=True)
    return AttentionSchedule(q_groups, _tile_groups(q_groups, num_q_tiles), k_groups,
                             _tile_groups(k_groups, num_k_tiles), block_m, block_kt, max_q_len, max_k_len,
                             covered < num_k)


def score_area(grids: Sequence[Sequence[int]], mode: str = "temporal", block_n: int = PACK_ROWS) -> dict:
    """Useful vs computed query x key scores of the forward kernel on a layout of ``grids`` (T, H, W), no
    tokens dropped, with key blocks of ``block_n`` columns: ``{"useful", "computed", "fraction",
    "block_m"}``. Computed = sum over tiles of tile rows x key columns of its key blocks; useful = the
    scores attention needs (``sum_s q_len * k_len``). Single-row segments (out = v, no MMA) count in
    neither."""
    grid = np.asarray(grids, dtype=np.int64).reshape(-1, 3)
    lengths = grid.prod(1)
    g = _groups(mode, lengths, lengths, grid)
    active = (g.q_len > 0) & (g.num_segs > 0)
    block = _temporal_tile(g) if mode == "temporal" else _padding_tile(g, g.q_len, active)
    useful, computed = _score_area(g, block, max(block_n, PACK_ROWS) if mode == "temporal" else block_n)
    return {"useful": useful, "computed": computed, "fraction": useful / computed if computed else 1.0,
            "block_m": block}


# ---------------------------------------------------------------------------------------------- device side
def _tile_for_longest(max_len: int) -> int:
    """Tile size from the longest segment alone: the largest of TILE_SIZES that it fills at least 4 times, 64
    instead of 16/32 rows when cheaper for it (a 144-token image gets 64, as under the padding rule; 1,024+
    tokens get 128)."""
    size = next((size for size in TILE_SIZES if max_len >= 4 * size), TILE_SIZES[-1])
    return _wgmma_if_cheaper(size, lambda block: -(-max_len // block) * block)


def _device_table(q_start: Tensor, k_start: Tensor, q_len: Tensor, k_len: Tensor, length: Tensor, active: Tensor,
                  cost: Tensor, block: int, capacity: int) -> tuple[Tensor, Tensor]:
    """Mode "full" group table (one segment per group, no packing) and an upper-bound tile table from device
    tensors (see _table)."""
    order = torch.argsort(torch.where(active, cost, -1), descending=True, stable=True)
    split = torch.where(active, (length + block - 1) // block, 0)[order]
    ones = torch.ones_like(q_len)
    fields = (q_start[order], k_start[order], q_len[order], k_len[order], ones, torch.zeros_like(q_len), ones, ones,
              split)
    table = torch.stack([torch.cumsum(split, 0) - split, *fields]).to(torch.int32)
    return table, _tile_groups(table, capacity)


def device_schedule(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, num_q: int, num_k: int, max_seqlen_q: int,
                    max_seqlen_k: int) -> AttentionSchedule:
    """Mode "full" schedule of plain ``cu_seqlens`` from device ops only (no device->host copy, no value
    checks): tile sizes from the ``max_seqlen`` bucket, tile tables sized by the upper bound
    ``ceil(N / block) + B`` (each segment adds at most one partial tile), dK/dV zero-filled first."""
    q_start, k_start = cu_seqlens_q[:-1].long(), cu_seqlens_k[:-1].long()
    q_len, k_len = cu_seqlens_q[1:].long() - q_start, cu_seqlens_k[1:].long() - k_start
    num_segments = q_len.shape[0]
    block_m, block_kt = _tile_for_longest(max_seqlen_q), max(WGMMA_ROWS, _tile_for_longest(max_seqlen_k))
    q_active = q_len > 0
    k_active = q_active & (k_len > 0)
    q_groups, q_tiles = _device_table(q_start, k_start, q_len, k_len, q_len, q_active, k_len, block_m,
                                      -(-num_q // block_m) + num_segments)
    k_groups, k_tiles = _device_table(q_start, k_start, q_len, k_len, k_len, k_active, q_len, block_kt,
                                      -(-num_k // block_kt) + num_segments)
    return AttentionSchedule(q_groups, q_tiles, k_groups, k_tiles, block_m, block_kt, max_seqlen_q, max_seqlen_k,
                             True)
