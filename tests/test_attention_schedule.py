"""The attention schedule (packdit.ops.attention_schedule): every query and key row is in exactly one tile, a tile
sees exactly its segments' keys, tile sizes follow their rules, the host part is fast, and the temporal tile
packing's useful score area is what it is reported to be."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import cu_seqlens_of, random_grids

from packdit.ops import attention_schedule as sched

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import workloads  # noqa: E402

FIELDS = {name: i for i, name in enumerate(sched.GROUP_FIELDS)}


def _tile_work(groups: np.ndarray, tiles: np.ndarray, tile: int, block: int):
    """What a kernel program computes for ``tile`` (the kernels' _tile_of and _rows, in numpy): None for a surplus
    program, else ``{query or key row: the key rows it attends to}`` over the tile's rows."""
    group = groups[:, tiles[tile]]
    f = {name: int(group[i]) for name, i in FIELDS.items()}
    split, pack = f["split"], f["pack"]
    local = tile - f["tile_start"]
    seg_block = local // max(split, 1)
    first = (local - seg_block * split) * block
    seg0 = seg_block * pack
    if split == 0 or seg0 >= f["num_segs"]:
        return None
    work = {}
    for r in range(block):
        frame, seg = first + r // pack, seg0 + r % pack
        if frame < f["q_len"] and seg < f["num_segs"]:
            start = seg * f["seg_stride"]
            keys = tuple(f["k_start"] + start + j * f["row_stride"] for j in range(f["k_len"]))
            work[f["q_start"] + start + frame * f["row_stride"]] = keys
    return work


def _segments(mode: str, grids, lengths):
    """{query row: key rows} of every token, from the mode's definition."""
    starts = np.concatenate([[0], np.cumsum(lengths)])
    keys = {}
    for b, (t, h, w) in enumerate(grids):
        rows = np.arange(starts[b], starts[b + 1])
        if mode == "full":
            groups = [rows]
        elif mode == "spatial":
            groups = list(rows.reshape(t, h * w)) if len(rows) else []
        else:
            groups = list(rows.reshape(t, h * w).T) if len(rows) else []
        for members in groups:
            for row in members:
                keys[int(row)] = tuple(int(k) for k in members)
    return keys


def _check_cover(schedule: sched.AttentionSchedule, want: dict, num_rows: int):
    for groups, tiles, block in ((schedule.q_groups, schedule.q_tiles, schedule.block_m),
                                 (schedule.k_groups, schedule.k_tiles, schedule.block_kt)):
        groups, tiles = groups.cpu().numpy(), tiles.cpu().numpy()
        seen = {}
        for tile in range(len(tiles)):
            work = _tile_work(groups, tiles, tile, block)
            for row, keys in (work or {}).items():
                assert row not in seen, f"row {row} in tiles {seen[row]} and {tile}"
                seen[row] = tile
                assert keys == want[row], f"row {row}: keys {keys[:5]}... != {want[row][:5]}..."
        assert set(seen) == set(range(num_rows))


@pytest.mark.parametrize("mode", sched.MODES)
@pytest.mark.parametrize("seed", range(4))
def test_every_row_once_with_its_keys(mode, seed):
    rng = random.Random(seed)
    grids = random_grids(rng, rng.randint(1, 9), max_t=40 if mode == "temporal" else 4, max_hw=6)
    if seed == 0:
        grids += [(1, 1, 1), (1, 9, 8), (5, 1, 1), (1, 1, 17)]
    lengths = [t * h * w for t, h, w in grids]
    schedule = sched.host_schedule(mode, lengths, None, grids, sum(lengths), torch.device("cpu"))
    _check_cover(schedule, _segments(mode, grids, lengths), sum(lengths))


def test_device_schedule_covers_every_row_and_surplus_programs_exit():
    lengths = [0, 1, 70, 9, 0, 200, 1]
    cu = cu_seqlens_of(lengths)
    schedule = sched.device_schedule(cu, cu, sum(lengths), sum(lengths), 256, 256)
    assert schedule.q_tiles.shape[0] > sum(-(-n // schedule.block_m) for n in lengths)  # an upper bound
    _check_cover(schedule, _segments("full", [(1, 1, n) for n in lengths], lengths), sum(lengths))


def test_longest_segments_first_and_single_rows_last():
    grids = [(1, 2, 2), (3, 4, 4), (1, 1, 1), (9, 2, 2)]
    schedule = sched.host_schedule("temporal", [t * h * w for t, h, w in grids], None, grids, 82, torch.device("cpu"))
    k_len = schedule.q_groups[FIELDS["k_len"]].tolist()
    assert k_len == sorted(k_len, reverse=True) and k_len[0] == 9
    assert schedule.q_groups[FIELDS["pack"]].tolist()[-2:] == [4, 1]  # images: single rows, block_m per tile


def test_tile_sizes():
    """Padding rule for full / spatial (144-token images: 64 rows, 32 pad less but run mma.sync; 30 tokens: 32,
    16 tokens: 16; with 1,590- and 3,600-token images: 128); temporal: 64-row tiles packing 64 // T positions
    while T <= 64. The device path picks from the longest segment alone, by the same costs."""
    def block(mode, grids):
        return sched.host_schedule(mode, [t * h * w for t, h, w in grids], None, grids, 0, torch.device("cpu")).block_m

    assert block("full", [(1, 9, 16)] * 8) == 64   # 192 padded rows <= 1.5 x 160 at 32
    assert block("full", [(1, 5, 6)] * 8) == 32    # 512 > 1.5 x 256
    assert block("full", [(1, 4, 4)] * 8) == 16
    assert [sched._tile_for_longest(n) for n in (16, 100, 144, 300, 1024)] == [16, 64, 64, 64, 128]
    assert block("full", [(1, 9, 16), (1, 30, 53), (1, 45, 80)]) == 128
    assert block("spatial", [(17, 30, 53)]) == 128
    assert block("temporal", [(17, 30, 53), (1, 30, 53)]) == 64
    assert block("temporal", [(100, 4, 4)]) == 128
    schedule = sched.host_schedule("temporal", [17 * 6], None, [(17, 2, 3)], 102, torch.device("cpu"))
    assert schedule.q_groups[FIELDS["pack"], 0] == 3  # 64 // 17 positions per tile, frame-major


@pytest.mark.parametrize("mode", ["full", "spatial"])
def test_key_tiles_have_at_least_64_rows(mode):
    """Query tiles follow the padding rule, key tiles (dK/dV) never drop below wgmma's 64 rows; frames of at most
    32 rows share a key tile (mode "spatial"), samples never do (mode "full"). Also on the device path."""
    grids = [(2 if mode == "spatial" else 1, 4, 4)] * 4  # 16-token samples / frames
    lengths = [t * h * w for t, h, w in grids]
    schedule = sched.host_schedule(mode, lengths, None, grids, sum(lengths), torch.device("cpu"))
    assert (schedule.block_m, schedule.block_kt) == (32 if mode == "spatial" else 16, 64)  # 2 frames per 32 rows
    assert schedule.k_groups[FIELDS["pack"]].tolist() == [2 if mode == "spatial" else 1] * 4  # a sample's 2 frames
    cross = sched.host_schedule(mode, lengths, [9] * 4, grids, 36, torch.device("cpu"))
    assert cross.block_kt == 64
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    assert sched.device_schedule(cu, cu, 18, 18, 9, 9).block_kt == 64


def test_host_schedule_of_2000_mixed_samples_takes_under_2_ms():
    """The host part (numpy over the samples) for 2,000 samples of the video mix, ~30M tokens, best of 20 runs;
    the device part is two host->device copies and two small device ops."""
    shapes = workloads.latent_shapes("video-mix", 2000, seed=0)
    grids = tuple(workloads.patch_grid(s) for s in shapes)
    lengths = tuple(t * h * w for t, h, w in grids)
    for mode in sched.MODES:
        best = float("inf")
        for _ in range(20):
            start = time.perf_counter()
            sched._host_tables(mode, lengths, None, grids)
            best = min(best, time.perf_counter() - start)
        assert best < 2e-3, f"{mode}: {best * 1e3:.2f} ms"


def test_score_area_counts_computed_and_useful_scores():
    """T = 17 frames: 3 positions per 64-row tile, one 64-key block; 9 positions -> 3 tiles."""
    area = sched.score_area([(17, 3, 3)], "temporal")
    assert area["useful"] == 9 * 17 * 17 and area["computed"] == 3 * 64 * 64 and area["block_m"] == 64
    assert sched.score_area([(1, 30, 40)], "temporal")["computed"] == 0  # images: no MMA at all
    # the mixes' temporal layers (131k-token packs): reported by the benchmarks, bounded by T / 64 per tile
    for mix in ("video-mix", "long-videos"):
        shapes = workloads.take_tokens(mix, 131072, seed=0)
        area = sched.score_area([workloads.patch_grid(s) for s in shapes])
        assert 0.2 < area["fraction"] < 0.52, area
