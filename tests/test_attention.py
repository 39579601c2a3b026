"""packdit.ops.attention.varlen_attention (Triton) against the float64 reference: forward, lse and every gradient,
in all modes, with GQA, cross-attention, RoPE, NaN-poisoned memory, determinism, torch.compile and bad inputs.

Accuracy rule (flash-attention's): the kernel's error vs the float64 oracle is at most twice the error of
the same computation in PyTorch at the kernel's precision, plus a small floor. Without a GPU the kernels
run in the Triton interpreter on fp32, so the shapes stay tiny (a few hundred tokens per test).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import random
from unittest import mock

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from helpers import assert_close, assert_within_2x, cu_seqlens_of, random_grids, random_seqlens

import packdit
from packdit import reference
from packdit.layout import PackedSeqs
from packdit.nn import PackedAttention, PackedCrossAttention
from packdit.ops import attention as attention_op
from packdit.ops import attention_schedule
from packdit.ops._attention_kernels import _frame_and_segment
from packdit.reference.rope import RoPE3D, apply_rope_3d

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FLOOR = 2e-6


# ---------------------------------------------------------------------------------------------- harness
def _poisoned(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A NaN-filled leaf buffer with 3 extra rows, 1 extra head and 8 extra head-dim columns, and the
    ``x``-valued view into it: any read outside the view poisons the result with NaN."""
    n, h, d = x.shape
    buffer = torch.full((n + 3, h + 1, d + 8), math.nan, dtype=x.dtype, device=x.device)
    buffer[:n, :h, :d] = x
    buffer.requires_grad_(True)
    return buffer, buffer[:n, :h, :d]


def _reference(q, k, v, cu_q, cu_k, *, mode, seqs, rope, scale=None):
    if rope is not None:
        q, k = apply_rope_3d(q, seqs.positions, rope), apply_rope_3d(k, seqs.positions, rope)
    return reference.varlen_attention(q, k, v, cu_q, cu_k, scale=scale, mode=mode,
                                      grid=seqs.grid if mode != "full" else None, return_lse=True)


def _forward_backward(fn, q, k, v, grad_out, grad_lse):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    finite = torch.isfinite(lse)
    (out * grad_out.to(out.dtype)).sum().add((lse.where(finite, 0) * grad_lse.to(lse.dtype)).sum()).backward()
    return out, lse, *(t.grad for t in leaves)


def check_against_reference(seqs: PackedSeqs, hq: int, hk: int, d: int, *, mode="full", rope=None,
                            cu_k=None, num_k=None, max_k=None, seed=0, dtype=torch.float32, scale=None,
                            plain_max_seqlen=None):
    """Forward, lse and dq/dk/dv of the kernel on NaN-poisoned views vs the oracle, with the 2x rule.
    ``plain_max_seqlen``: call with plain cu_seqlens (no layout) and this bound inside ``packdit.checks(False)``,
    i.e. on the device-built schedule, whose tile size follows the bound."""
    g = torch.Generator().manual_seed(seed)
    num_q = seqs.num_tokens
    num_k = num_q if num_k is None else num_k
    q, k, v, grad_out, grad_lse = (torch.randn(*shape, generator=g, dtype=torch.float64).to(DEVICE) for shape in (
        (num_q, hq, d), (num_k, hk, d), (num_k, hk, d), (num_q, hq, d), (hq, num_q)))
    cu_q = seqs.cu_seqlens

    def oracle(a, b, c):
        return _reference(a, b, c, cu_q, cu_k, mode=mode, seqs=seqs, rope=rope, scale=scale)

    want = _forward_backward(oracle, q, k, v, grad_out, grad_lse)
    torch_ = _forward_backward(oracle, *(t.to(dtype) for t in (q, k, v)), grad_out, grad_lse)

    buffers = [_poisoned(t.to(dtype)) for t in (q, k, v)]
    plain = plain_max_seqlen is not None
    with packdit.checks(not plain):
        out, lse = attention_op.varlen_attention(
            *(view for _, view in buffers), cu_q, plain_max_seqlen if plain else seqs.max_seqlen, cu_k, max_k,
            scale=scale, mode=mode, seqs=None if plain else seqs, rope=rope, return_lse=True)
    finite = torch.isfinite(lse)
    (out * grad_out.to(dtype)).sum().add((lse.where(finite, 0) * grad_lse.float()).sum()).backward()
    grads = []
    for (buffer, _), t in zip(buffers, (q, k, v)):
        n, h, dd = t.shape
        outside = buffer.grad.clone()
        outside[:n, :h, :dd] = 0
        assert not outside.any(), "gradient written outside the q/k/v views"
        grads.append(buffer.grad[:n, :h, :dd])
    got = (out, lse, *grads)
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), got, torch_, want):
        assert not torch.isnan(a).any(), f"{name}: NaN read from poisoned memory"
        if name == "lse":
            assert torch.equal(torch.isinf(a), torch.isinf(c)), "lse: -inf rows differ"
            a, b, c = (x.where(torch.isfinite(x), 0) for x in (a, b, c))
        assert_within_2x(a, b, c, floor=FLOOR if dtype == torch.float32 else 1e-3, name=name)
    return got


def _layout(rng: random.Random, n: int, *, max_t=3, max_hw=5, drop=False) -> PackedSeqs:
    grids = random_grids(rng, n, max_t=max_t, max_hw=max_hw) + [(1, 1, 2)]   # never an empty batch
    kept = None
    if drop:
        kept = []
        for t, h, w in grids:
            full = t * h * w
            kept.append(torch.tensor(sorted(rng.sample(range(full), rng.randint(0, full))), dtype=torch.int64)
                        if full and rng.random() < 0.5 else None)
    return PackedSeqs.from_grids(grids, kept=kept, device=DEVICE)


# ---------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("mode", ["full", "spatial", "temporal"])
@pytest.mark.parametrize("hq, hk, d, rope", [
    (2, 2, 16, None),
    (4, 2, 24, RoPE3D(100.0, (4, 6, 8))),
    (3, 1, 16, RoPE3D(10000.0, (2, 4, 4))),
])
def test_modes_match_reference(mode, hq, hk, d, rope):
    rng = random.Random(f"{mode}-{hq}-{d}")
    seqs = _layout(rng, rng.randint(3, 7))
    check_against_reference(seqs, hq, hk, d, mode=mode, rope=rope, seed=rng.randint(0, 99))


@pytest.mark.parametrize("seed", range(3))
def test_full_mode_random_layouts_with_dropped_tokens(seed):
    """1-12 samples, empty and single-token ones, token dropping (rope still uses the true positions)."""
    rng = random.Random(seed)
    seqs = _layout(rng, rng.randint(1, 12), max_hw=4, drop=True)
    rope = RoPE3D(500.0, (2, 2, 4)) if seed % 2 else None
    check_against_reference(seqs, 2, 1, 16, rope=rope, seed=seed, scale=0.4 if seed == 2 else None)


@pytest.mark.parametrize("d", [16, 64, 72, 96, 128])
def test_head_dims(d):
    seqs = PackedSeqs.from_grids([(1, 5, 7), (1, 1, 1), (2, 3, 3)], device=DEVICE)
    check_against_reference(seqs, 2, 1, d, rope=RoPE3D(10000.0, (8, 4, 4)) if d >= 64 else None, seed=d)


# Images (T = 1: single rows, out = v), videos of 2 to 40 frames: temporal tiles pack 64 // T positions.
FRAMES_1_TO_40 = [(1, 5, 6), (2, 2, 3), (5, 1, 4), (17, 2, 1), (33, 1, 2), (40, 2, 1), (1, 1, 1), (3, 2, 2)]


@pytest.mark.parametrize("mode, hq, hk, d", [("full", 4, 2, 24), ("spatial", 4, 2, 24), ("temporal", 4, 2, 24),
                                             ("temporal", 2, 1, 40)])
def test_images_and_videos_of_1_to_40_frames_in_one_pack(mode, hq, hk, d):
    """Tile packing (several segments per tile, block-diagonal mask), single-row segments, GQA, RoPE, and a head
    dim split into two column chunks (40 = 32 + 16)."""
    seqs = PackedSeqs.from_grids(FRAMES_1_TO_40, device=DEVICE)
    check_against_reference(seqs, hq, hk, d, mode=mode, rope=RoPE3D(100.0, (4, 6, 6)), seed=d)


@pytest.mark.parametrize("deterministic", [False, True])
def test_long_segments_full_blocks_tails_and_several_tiles(deterministic):
    """Segments of 200, 136, 64 and 3 rows in 64-row tiles (the device-built schedule under a 256-token bound):
    unmasked 64-row key / query blocks plus masked tails, several tiles per segment, head dim 72 (64 + 16 columns);
    dQ by atomics and by the dQ kernel."""
    seqs = PackedSeqs.from_grids([(1, 10, 20), (1, 8, 17), (1, 8, 8), (1, 1, 3)], device=DEVICE)
    assert attention_schedule._tile_for_longest(256) == 64
    try:
        packdit.use_deterministic(deterministic)
        check_against_reference(seqs, 2, 1, 72, seed=72, plain_max_seqlen=256)
    finally:
        packdit.use_deterministic(False)


def test_single_row_segments_copy_v():
    """Temporal attention of images: softmax over one key is 1, out = v exactly, lse = scale q.k."""
    seqs = PackedSeqs.from_grids([(1, 3, 5), (2, 2, 2)], device=DEVICE)
    q, k, v = (torch.randn(seqs.num_tokens, 2, 16, device=DEVICE) for _ in range(3))
    out, lse = attention_op.varlen_attention(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, mode="temporal", seqs=seqs,
                                        scale=0.3, return_lse=True)
    assert torch.equal(out[:15], v[:15])
    assert_close(lse[:, :15], 0.3 * (q[:15] * k[:15]).sum(-1).T, atol=1e-6, name="lse")


@pytest.mark.parametrize("hq, hk", [(4, 4), (4, 1)])
def test_cross_attention_with_unequal_packings(hq, hk):
    """Packed video queries x packed per-sample text keys: different lengths, empty query / key segments."""
    rng = random.Random(hq + hk)
    seqs = _layout(rng, 6)
    key_lengths = random_seqlens(rng, len(seqs), max_len=20)
    key_lengths[1] = 0
    cu_k = cu_seqlens_of(key_lengths, DEVICE)
    check_against_reference(seqs, hq, hk, 16, cu_k=cu_k, num_k=sum(key_lengths), max_k=max(key_lengths), seed=hq)


def test_each_sample_alone_gives_the_same_output():
    grids = [(2, 3, 4), (1, 1, 1), (1, 6, 5), (0, 2, 2), (3, 2, 2)]
    seqs = PackedSeqs.from_grids(grids, device=DEVICE)
    q, k, v = (torch.randn(seqs.num_tokens, 2, 16, device=DEVICE) for _ in range(3))
    rope = RoPE3D(100.0, (4, 4, 4))
    for mode in ("full", "spatial", "temporal"):
        packed = attention_op.varlen_attention(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, mode=mode, seqs=seqs,
                                               rope=rope)
        for b, (start, end) in enumerate(zip(seqs.cu_seqlens.tolist(), seqs.cu_seqlens.tolist()[1:])):
            if start == end:
                continue
            alone = PackedSeqs.from_grids([grids[b]], device=DEVICE)
            out = attention_op.varlen_attention(q[start:end], k[start:end], v[start:end], alone.cu_seqlens,
                                                alone.max_seqlen, mode=mode, seqs=alone, rope=rope)
            assert_close(out, packed[start:end], atol=2e-6, rtol=1e-5, name=f"{mode} sample {b}")


def test_zero_and_one_token_segments_and_empty_batch():
    cu = cu_seqlens_of([0, 1, 0, 2, 0], DEVICE)
    q, k, v = (torch.randn(3, 1, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    out, lse = attention_op.varlen_attention(q, k, v, cu, 2, return_lse=True)
    want, want_lse = reference.varlen_attention(q.detach(), k.detach(), v.detach(), cu, return_lse=True)
    assert_close(out, want, atol=1e-6, name="out")
    assert_close(lse, want_lse, atol=1e-6, name="lse")
    assert_close(out[0], v[0].detach(), atol=1e-6, name="a single token attends to itself")
    out.sum().backward()
    empty = torch.empty(0, 2, 16, device=DEVICE)
    out, lse = attention_op.varlen_attention(empty, empty, empty, cu_seqlens_of([0, 0], DEVICE), 0, return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)


@pytest.mark.parametrize("used", ["out", "lse"])
def test_gradient_through_one_output_alone(used):
    """A loss of ``out`` alone reaches the backward with ``grad_lse=None`` (no zero tensor, the delta kernel
    without the dlse read), a loss of ``lse`` alone with ``grad_out=None``; both gradients match the oracle."""
    seqs = PackedSeqs.from_grids([(2, 3, 2), (1, 1, 1), (1, 4, 5)], device=DEVICE)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(seqs.num_tokens, 2, 16, generator=g, dtype=torch.float64).to(DEVICE) for _ in range(3))
    weight = torch.randn(seqs.num_tokens, 2, 16, generator=g, dtype=torch.float64).to(DEVICE)

    def loss(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
        out, lse = fn(*leaves)
        (out * weight.to(out.dtype)).sum().backward() if used == "out" else lse.sum().backward()
        return [torch.zeros_like(t) if t.grad is None else t.grad for t in leaves]  # lse does not depend on v

    def oracle(a, b, c):
        return reference.varlen_attention(a, b, c, seqs.cu_seqlens, return_lse=True)

    calls = []
    bwd = attention_op.varlen_attention_bwd

    def spy(grad_out, grad_lse, *args):
        calls.append((grad_out is None, grad_lse is None))
        return bwd(grad_out, grad_lse, *args)

    with mock.patch.object(attention_op, "varlen_attention_bwd", spy):
        got = loss(lambda a, b, c: attention_op.varlen_attention(a, b, c, seqs.cu_seqlens, seqs.max_seqlen, seqs=seqs,
                                                                 return_lse=True), *(t.float() for t in (q, k, v)))
    assert calls == [(False, used == "out")], calls
    want = loss(oracle, q, k, v)
    torch_ = loss(oracle, *(t.float() for t in (q, k, v)))
    for name, a, b, c in zip(("dq", "dk", "dv"), got, torch_, want):
        assert_within_2x(a, b, c, floor=FLOOR, name=f"{name} of a loss of {used}")


def test_plain_cu_seqlens_without_checks_build_the_schedule_on_the_device():
    """Inside ``packdit.checks(False)`` plain cu_seqlens take the sync-free schedule (upper-bound tile tables
    whose surplus programs exit); results match the host schedule, cross-attention and gradients included."""
    lengths_q, lengths_k = [0, 1, 70, 9, 0], [3, 4, 12, 0, 0]
    cu_q, cu_k = cu_seqlens_of(lengths_q, DEVICE), cu_seqlens_of(lengths_k, DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for keys in (None, (cu_k, sum(lengths_k), max(lengths_k))):
        num_k = sum(lengths_q) if keys is None else keys[1]
        q = torch.randn(sum(lengths_q), 4, 16, device=DEVICE, generator=gen)
        k, v = (torch.randn(num_k, 2, 16, device=DEVICE, generator=gen) for _ in range(2))
        extra = () if keys is None else (keys[0], keys[2])

        def run(*inputs):
            return attention_op.varlen_attention(*inputs, cu_q, max(lengths_q), *extra, return_lse=True)

        grad = torch.randn_like(q)
        want = _forward_backward(run, q, k, v, grad, torch.zeros(4, q.shape[0], device=DEVICE))
        with packdit.checks(False), mock.patch.object(attention_schedule, "host_schedule") as host_schedule:
            got = _forward_backward(run, q, k, v, grad, torch.zeros(4, q.shape[0], device=DEVICE))
        host_schedule.assert_not_called()
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
            assert_close(a, b, atol=1e-6, rtol=1e-5, name=name)


@pytest.mark.parametrize("deterministic", [False, True])
def test_tiles_too_wide_for_shared_memory_run_in_parts(deterministic):
    """fp32 at D = 256: the sync-free schedule's 128-row tiles run as 2 forward and 4 backward programs each
    (the later parts of a short segment's tile empty); results match the host schedule's 16-row tiles."""
    lengths = [100, 40, 0, 7]
    max_seqlen = 512  # a bound, not the longest segment: the sync-free schedule tiles by 128 rows
    assert attention_schedule._tile_for_longest(max_seqlen) == 128
    assert attention_op._fwd_rows(128, 256, 4) == 64 and attention_op._bwd_rows(128, 256, 4) == 32
    cu = cu_seqlens_of(lengths, DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(sum(lengths), 2, 256, device=DEVICE, generator=gen)
    k, v = (torch.randn(sum(lengths), 1, 256, device=DEVICE, generator=gen) for _ in range(2))
    grad, grad_lse = torch.randn_like(q), torch.randn(2, q.shape[0], device=DEVICE, generator=gen)

    def run(*inputs):
        return attention_op.varlen_attention(*inputs, cu, max_seqlen, return_lse=True)

    try:
        packdit.use_deterministic(deterministic)
        want = _forward_backward(run, q, k, v, grad, grad_lse)
        with packdit.checks(False):
            got = _forward_backward(run, q, k, v, grad, grad_lse)
    finally:
        packdit.use_deterministic(False)
    # the two schedules sum the same terms in other orders (16- vs 128-row tiles): fp32 rounding of O(1) sums
    # over up to 100 keys x 256 columns, a few ulps
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert_close(a, b, atol=4e-6, rtol=1e-5, name=name)


def test_program_rows_are_powers_of_two_within_the_tile_budgets():
    """tl.arange needs a power of two: fp32 at D = 72 (80 columns) fits 102 rows in 32 KB, the kernels take 64."""
    for head_dim in range(1, 257):
        for itemsize in (2, 4):
            for rows_of, budget in ((attention_op._fwd_rows, attention_op._FWD_TILE_BYTES),
                                    (attention_op._bwd_rows, attention_op._BWD_TILE_BYTES)):
                rows = rows_of(128, head_dim, itemsize)
                columns = attention_op._head_columns(head_dim)
                assert rows & (rows - 1) == 0 and rows * columns * itemsize <= budget, (head_dim, itemsize, rows)
                assert rows == 128 or 2 * rows * columns * itemsize > budget, (head_dim, itemsize, rows)
    assert attention_op._bwd_rows(128, 72, 4) == 64


@triton.jit
def _frame_and_segment_of(Index, Packs, Frames, Segments, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    out = tl.program_id(1) * tl.num_programs(0) * BLOCK + offsets
    frame, segment = _frame_and_segment(tl.load(Index + offsets), tl.load(Packs + tl.program_id(1)))
    tl.store(Frames + out, frame)
    tl.store(Segments + out, segment)


def test_frame_and_segment_of_tile_positions_is_integer_divmod():
    """The kernels' fp32 divmod of tile positions by the segments per tile is integer divmod: in the kernel, for
    every position < 2**14 and a sample up to 2**20 - 1, packs 1..128; and in its error model, with the
    reciprocal 2 ulp off either way (a GPU's approximate division), at the positions nearest a multiple of the
    pack (kp - 1 and kp), every k up to 2**20."""
    index = torch.cat([torch.arange(2**14), torch.randint(2**14, 2**20, (2**14,), generator=torch.Generator()
                                                           .manual_seed(0)), torch.tensor([2**20 - 2, 2**20 - 1])])
    index = torch.nn.functional.pad(index, (0, -len(index) % 4096)).to(torch.int32).to(DEVICE)
    packs = torch.arange(1, 129, dtype=torch.int32, device=DEVICE)
    frames, segments = (torch.empty(len(packs), len(index), dtype=torch.int32, device=DEVICE) for _ in range(2))
    _frame_and_segment_of[(len(index) // 4096, len(packs))](index, packs, frames, segments, BLOCK=4096)
    want = index[None, :].long()
    assert torch.equal(frames.long(), want // packs[:, None]) and torch.equal(segments.long(), want % packs[:, None])

    for pack in range(2, 129):
        multiples = np.arange(1, 2**20 // pack + 1, dtype=np.int64) * pack
        for x in (multiples - 1, multiples[multiples < 2**20]):
            inverse = np.float32(1) / np.float32(pack)
            for ulps in (-2, -1, 1, 2):
                off = inverse
                for _ in range(abs(ulps)):
                    off = np.nextafter(off, np.float32(np.sign(ulps) * np.inf), dtype=np.float32)
                frame = ((x.astype(np.float32) + np.float32(0.5)) * off).astype(np.int32)
                assert np.array_equal(frame, x // pack), (pack, ulps)


# ---------------------------------------------------------------------------------------------- determinism
def test_dq_by_atomics_only_where_they_keep_the_key_tile():
    """Atomic dQ by default where the dK/dV program keeps its key tile with it; the dQ kernel where atomics would
    halve it (bf16: head dims 97-128 without GQA, up to 128 with it) and always in deterministic mode."""
    by_atomics = attention_op._dq_by_atomics
    assert by_atomics(128, 64, 2, 1) and by_atomics(128, 72, 2, 1) and by_atomics(128, 96, 2, 1)
    assert not by_atomics(128, 128, 2, 1) and not by_atomics(128, 72, 2, 2) and not by_atomics(128, 64, 2, 4)
    assert not by_atomics(128, 128, 2, 3) and not by_atomics(128, 96, 2, 2)
    assert by_atomics(64, 128, 2, 1) and by_atomics(64, 72, 2, 2)  # 64-row tiles: 64 keys either way
    assert by_atomics(128, 128, 4, 1)  # fp32 at D = 128: 64-row programs (_BWD_TILE_BYTES) either way
    assert by_atomics(128, 256, 2, 1)  # 32 keys either way
    for group in (1, 2):
        assert attention_op._dkdv_rows(128, 128, 2, group, True) == 64
        assert attention_op._dkdv_rows(128, 128, 2, group, False) == attention_op._dkdv_rows(128, 72, 2, group,
                                                                                             False) == 128


@contextlib.contextmanager
def _spied_launches():
    """Yields ``{kernel name: (grid, keyword arguments)}`` of the attention kernels' launches, which still run (a
    grid function gets the configuration the interpreter runs: the forward's programs take ``rows`` rows)."""
    kernels = attention_op._kernels()
    fwd_kernel = attention_op._fwd_kernel
    launched = {}

    class Spy:
        def __init__(self, name, kernel, meta=None):
            self.name, self.kernel, self.meta = name, kernel, meta

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched[self.name] = (grid(self.meta) if callable(grid) else grid, kwargs)
                return self.kernel[grid](*args, **kwargs)
            return launch

    names = ("attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(mock.patch.object(kernels, name, Spy(name, getattr(kernels, name))))

        def spied_forward(rows, deterministic):
            return Spy("attention_fwd_kernel", fwd_kernel(rows, deterministic), {"BLOCK_M": rows})

        stack.enter_context(mock.patch.object(attention_op, "_fwd_kernel", spied_forward))
        yield launched


@contextlib.contextmanager
def _deterministic(enabled: bool):
    try:
        packdit.use_deterministic(enabled)
        yield
    finally:
        packdit.use_deterministic(False)


@pytest.mark.parametrize("deterministic", [False, True])
def test_backward_takes_the_dq_kernel_where_atomics_halve_the_key_tile(deterministic):
    """GQA (2 query heads per kv head) on samples of 256 and 255 tokens, 128-row tiles: the default backward
    launches the dK/dV kernel on 128 keys without atomics, then the dQ kernel, and matches the oracle."""
    seqs = PackedSeqs.from_grids([(1, 16, 16), (1, 15, 17)], device=DEVICE)
    with _deterministic(deterministic), _spied_launches() as launched:
        check_against_reference(seqs, 2, 1, 16, seed=3)
    _, dkdv = launched["attention_bwd_dkdv_kernel"]
    assert "attention_bwd_dq_kernel" in launched
    assert dkdv["BLOCK_N"] == 128 and dkdv["DQ_MODE"] == "separate"
    # Keys of 255 and 256 rows: one head per program, the block loops pipelined.
    assert all(grid[1] == heads and not kwargs["ONE_BLOCK"] for (grid, kwargs), heads in zip(
        (launched[name] for name in ("attention_fwd_kernel", "attention_bwd_dkdv_kernel", "attention_bwd_dq_kernel")),
        (2, 1, 2)))


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dq_mode", ["single", "atomic", "separate"])
def test_one_block_launches_loop_over_heads(deterministic, dq_mode):
    """Temporal segments of 1-17 frames (every tile one key block): the forward, dK/dV and dQ programs loop over
    up to _ONE_BLOCK_HEADS heads (3 here): 10 query heads in programs of 3, 3, 3, 1 and 5 kv heads (GQA 2) in
    3 + 2, the single-row segments (images) too, and match the oracle with dQ added once by the dK/dV programs
    (the default: each key tile holds whole segments), added by fp32 atomics, or computed by the dQ kernel."""
    if dq_mode == "atomic" and deterministic:
        pytest.skip("deterministic mode never adds dQ by atomics")
    seqs = PackedSeqs.from_grids([(5, 2, 3), (1, 3, 4), (17, 1, 2), (3, 1, 1)], device=DEVICE)
    default = attention_op._dq_mode
    chosen = [] if dq_mode == "single" else [mock.patch.object(attention_op, "_dq_mode", lambda *args: dq_mode)]
    with (_deterministic(deterministic), mock.patch.object(attention_op, "_ONE_BLOCK_HEADS", 3),
          contextlib.ExitStack() as stack, _spied_launches() as launched):
        for patch in chosen:
            stack.enter_context(patch)
        check_against_reference(seqs, 10, 5, 16, mode="temporal", seed=4)
    assert default(64, 17, False, 16, 8, 2, deterministic) == "single"
    assert launched["attention_bwd_dkdv_kernel"][1]["DQ_MODE"] == dq_mode
    expected = {"attention_fwd_kernel": 4, "attention_bwd_dkdv_kernel": 2}
    if dq_mode == "separate":
        expected["attention_bwd_dq_kernel"] = 4
    assert {name: grid[1] for name, (grid, kwargs) in launched.items() if kwargs["ONE_BLOCK"]} == expected


def test_deterministic_backward_is_bitwise_reproducible_and_matches_default():
    seqs = PackedSeqs.from_grids([(2, 4, 5), (1, 3, 3), (1, 1, 2)], device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(seqs.num_tokens, 4, 16, device=DEVICE, generator=gen)
    k, v = (torch.randn(seqs.num_tokens, 2, 16, device=DEVICE, generator=gen) for _ in range(2))
    grad = torch.randn_like(q)
    rope = RoPE3D(100.0, (4, 4, 4))

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = attention_op.varlen_attention(*leaves, seqs.cu_seqlens, seqs.max_seqlen, seqs=seqs, rope=rope)
        out.backward(grad)
        return [t.grad for t in leaves]

    try:
        packdit.use_deterministic(True)
        first, second = grads(), grads()
    finally:
        packdit.use_deterministic(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for a, b, name in zip(first, grads(), ("dq", "dk", "dv")):
        assert_close(a, b, atol=1e-5, rtol=1e-5, name=f"deterministic vs atomic {name}")


@contextlib.contextmanager
def shuffled_program_order(seed: int):
    """Run each program of every Triton launch exactly once, in a random order: the interpreter otherwise runs
    them in grid order, so float atomics would look deterministic on the CPU."""
    from triton.runtime import interpreter

    builder, rng, order = interpreter.interpreter_builder, random.Random(seed), []
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx

    def shuffled_dim(x, y, z):
        order[:] = list(itertools.product(range(x), range(y), range(z)))
        rng.shuffle(order)
        set_dim(x, y, z)

    def shuffled_idx(x, y, z):
        _, ny, nz = builder.grid_dim
        set_idx(*order[(x * ny + y) * nz + z])

    with mock.patch.object(builder, "set_grid_dim", shuffled_dim), mock.patch.object(builder, "set_grid_idx",
                                                                                     shuffled_idx):
        yield


def test_deterministic_gradients_do_not_depend_on_program_order():
    """Deterministic mode: bitwise equal gradients for any program order; the default (atomic dQ) is not, which
    shows the shuffle can catch an order-dependent dQ. A 300-token sample in 64-row key tiles: 5 programs add
    into every dQ row."""
    seqs = PackedSeqs.from_grids([(1, 15, 20), (1, 3, 3)], device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q, k, v, grad = (torch.randn(seqs.num_tokens, 1, 16, device=DEVICE, generator=gen) for _ in range(4))

    def grads():
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        attention_op.varlen_attention(*leaves, seqs.cu_seqlens, seqs.max_seqlen, seqs=seqs).backward(grad)
        return [t.grad for t in leaves]

    try:
        packdit.use_deterministic(True)
        in_order = grads()
        with shuffled_program_order(0):
            for a, b, name in zip(in_order, grads(), ("dq", "dk", "dv")):
                assert torch.equal(a, b), f"deterministic {name} depends on the program order"
    finally:
        packdit.use_deterministic(False)
    atomic = grads()
    with shuffled_program_order(0):
        shuffled = grads()
    assert not torch.equal(atomic[0], shuffled[0]), "the shuffle should reorder the fp32 atomic dQ sums"
    assert torch.equal(atomic[1], shuffled[1]) and torch.equal(atomic[2], shuffled[2]), "dK/dV have one writer"


# ---------------------------------------------------------------------------------------------- modules
def _module_reference(module: PackedAttention, x, seqs):
    d, hq, hk = module.head_dim, module.num_heads, module.num_kv_heads
    q, k, v = module.qkv(x).split([hq * d, hk * d, hk * d], -1)
    q, k, v = q.unflatten(-1, (hq, d)), k.unflatten(-1, (hk, d)), v.unflatten(-1, (hk, d))
    q, k = module.q_norm(q), module.k_norm(k)
    out, _ = _reference(q, k, v, seqs.cu_seqlens, None, mode=module.mode, seqs=seqs, rope=module.rope)
    return module.proj(out.flatten(1))


@pytest.mark.parametrize("mode", ["full", "temporal"])
def test_packed_attention_module(mode):
    torch.manual_seed(0)
    module = PackedAttention(64, 4, num_kv_heads=2, qk_norm=True, rope=RoPE3D(100.0, (2, 4, 4)), mode=mode,
                             backend="triton").to(DEVICE)
    assert {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"} <= set(module.state_dict())
    seqs = PackedSeqs.from_grids([(2, 3, 3), (1, 4, 2)], device=DEVICE)
    x = torch.randn(seqs.num_tokens, 64, device=DEVICE)
    assert_close(module(x, seqs), _module_reference(module, x, seqs), atol=1e-5, rtol=1e-4, name=mode)


def test_packed_cross_attention_module():
    torch.manual_seed(0)
    module = PackedCrossAttention(32, 2, context_dim=24, qk_norm=True, backend="triton").to(DEVICE)
    seqs = PackedSeqs.from_grids([(1, 3, 3), (2, 2, 2)], device=DEVICE)
    context_cu = cu_seqlens_of([5, 3], DEVICE)
    x, context = torch.randn(seqs.num_tokens, 32, device=DEVICE), torch.randn(8, 24, device=DEVICE)
    q = module.q_norm(module.q(x).unflatten(-1, (2, 16)))
    k, v = module.kv(context).unflatten(-1, (4, 16)).split([2, 2], 1)
    want = module.proj(reference.varlen_attention(q, module.k_norm(k), v, seqs.cu_seqlens, context_cu).flatten(1))
    assert_close(module(x, seqs, context, context_cu, 5), want, atol=1e-5, rtol=1e-4)


def test_compile_fullgraph_one_graph_for_new_layouts():
    """One dynamo graph serves every layout: no graph break, no recompile when lengths / sample counts change,
    and the layers of a step share one schedule build."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(
        PackedAttention(48, 3, num_kv_heads=1, qk_norm=True, rope=RoPE3D(100.0, (4, 4, 4)), backend="triton")
        for _ in range(2)
    ).to(DEVICE)
    counter = CompileCounterWithBackend("aot_eager")

    def loss(x, seqs):
        for layer in layers:
            x = x + layer(x, seqs)
        return x.square().mean()

    compiled = torch.compile(loss, backend=counter, fullgraph=True, dynamic=True)
    # B >= 3 and N never 3 or 48: dynamo's duck sizing would equate cu_seqlens' B+1 with the positions'
    # 3 columns, or N with the model width, and recompile when they part.
    layouts = ([(1, 3, 5), (2, 2, 3), (1, 1, 1)], [(1, 2, 2), (2, 3, 3), (1, 1, 7), (1, 1, 2)],
               [(3, 2, 2), (1, 4, 5), (2, 1, 1), (1, 2, 1), (1, 1, 1)])
    # Float constants (rope theta, norm eps) stay Python floats: as SymFloats the custom op's float
    # arguments would be specialized on first use and dynamo would trace the frame twice.
    with torch._dynamo.config.patch(specialize_float=True), \
            mock.patch.object(attention_schedule, "host_schedule", wraps=attention_schedule.host_schedule) \
            as schedule_builds:
        for grids in layouts:
            seqs = PackedSeqs.from_grids(grids, device=DEVICE)
            x = torch.randn(seqs.num_tokens, 48, device=DEVICE, requires_grad=True)
            schedule_builds.reset_mock()
            compiled(x, seqs).backward()
            assert schedule_builds.call_count == 1, "layers of one step should share the schedule (CSE)"
            got = x.grad
            x.grad = None
            loss(x, seqs).backward()
            assert_close(got, x.grad, atol=1e-6, rtol=1e-5, name=f"{grids}")
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"


def test_hand_built_layout_is_validated_once_per_object():
    """A PackedSeqs built by hand (or modified) is checked when it first enters varlen_attention with checks on:
    a token tagged with another sample's id is refused; a valid one is checked once, then trusted."""
    good = PackedSeqs.from_grids([(1, 2, 3), (2, 2, 2)], device=DEVICE)
    q = torch.randn(good.num_tokens, 2, 16, device=DEVICE)

    def attend(seqs):
        return attention_op.varlen_attention(q, q, q, seqs.cu_seqlens, seqs.max_seqlen, mode="spatial", seqs=seqs)

    ids = good.segment_ids.clone()
    ids[2] = 1
    bad = dataclasses.replace(good, segment_ids=ids)  # a replaced layout starts unvalidated
    with pytest.raises(ValueError, match="segment_ids: token 2 says segment 1"):
        attend(bad)
    with packdit.checks(False):
        attend(bad)  # checks off: trusted
    rebuilt = dataclasses.replace(good)
    with mock.patch("packdit._validate.validate_cu_seqlens", wraps=packdit._validate.validate_cu_seqlens) as check:
        assert_close(attend(rebuilt), attend(good), atol=0, name="rebuilt layout")
        attend(rebuilt)
    assert check.call_count == 1


# ---------------------------------------------------------------------------------------------- errors
def _bad_inputs():
    cu = cu_seqlens_of([3, 2], DEVICE)
    q = torch.randn(5, 4, 16, device=DEVICE)
    kv = torch.randn(5, 2, 16, device=DEVICE)
    seqs = PackedSeqs.from_grids([(1, 1, 3), (1, 2, 1)], device=DEVICE)
    dropped = PackedSeqs.from_grids([(1, 2, 3)], kept=[torch.tensor([0, 1, 3, 4, 5])], device=DEVICE)
    return [
        ("k: expected torch.float16 .* like q", dict(q=q.half())),
        ("k: expected float16, bfloat16 or float32", dict(k=kv.double())),
        ("q: head_dim 12", dict(q=torch.randn(5, 4, 12, device=DEVICE))),
        ("q: head_dim 264", dict(q=torch.randn(5, 4, 264, device=DEVICE), k=torch.randn(5, 2, 264, device=DEVICE),
                          v=torch.randn(5, 2, 264, device=DEVICE))),
        ("not divisible", dict(k=torch.randn(5, 3, 16, device=DEVICE), v=torch.randn(5, 3, 16, device=DEVICE))),
        ("last .*contiguous", dict(q=torch.randn(5, 16, 4, device=DEVICE).transpose(1, 2))),
        ("cu_seqlens_q: expected a .* int32", dict(cu_seqlens_q=cu.long())),
        ("cu_seqlens_q: expected a tensor on", dict(cu_seqlens_q=torch.empty(3, dtype=torch.int32, device="meta"))),
        ("cu_seqlens_q: expected non-decreasing offsets, but segment 1 has negative length",
         dict(cu_seqlens_q=torch.tensor([0, 4, 3, 5], dtype=torch.int32, device=DEVICE), max_seqlen_q=4)),
        ("cu_seqlens_q: last entry must be the number of tokens: expected cu_seqlens_q.-1. = 5",
         dict(cu_seqlens_q=cu_seqlens_of([3, 1], DEVICE))),
        ("max_seqlen", dict(max_seqlen_q=2)),
        ("mode", dict(mode="diagonal")),
        ("seqs", dict(mode="spatial")),
        ("seqs: mode='temporal' needs a layout without dropped", dict(mode="temporal", seqs=dropped,
                                                                      cu_seqlens_q=dropped.cu_seqlens)),
        ("rope: applies to self-attention", dict(rope=RoPE3D(axes_dims=(2, 2, 2)), seqs=seqs,
                                                 cu_seqlens_k=cu, max_seqlen_k=3)),
        ("rope: axes_dims", dict(rope=RoPE3D(axes_dims=(8, 8, 8)), seqs=seqs)),
        ("cu_seqlens_k: expected 2 segments", dict(cu_seqlens_k=cu_seqlens_of([5], DEVICE), max_seqlen_k=5)),
    ]


@pytest.mark.parametrize("match, overrides", _bad_inputs(), ids=lambda x: x if isinstance(x, str) else "")
def test_errors_name_the_argument(match, overrides):
    args = dict(q=torch.randn(5, 4, 16, device=DEVICE), k=torch.randn(5, 2, 16, device=DEVICE),
                v=torch.randn(5, 2, 16, device=DEVICE), cu_seqlens_q=cu_seqlens_of([3, 2], DEVICE), max_seqlen_q=3)
    args.update(overrides)
    with pytest.raises(ValueError, match=match):
        attention_op.varlen_attention(**args)


def test_rope_definition():
    with pytest.raises(ValueError, match="axes_dims"):
        RoPE3D(axes_dims=(3, 2, 2))
    x = torch.randn(4, 1, 8, dtype=torch.float64)
    pos = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]], dtype=torch.int32)
    y = apply_rope_3d(x, pos, RoPE3D(10000.0, (2, 2, 2)))
    assert_close(y[0], x[0], atol=0, name="position 0 is the identity")
    assert_close(y[:, :, 6:], x[:, :, 6:], atol=0, name="dims past dt+dh+dw are unrotated")
    c, s = math.cos(2.0), math.sin(2.0)      # token 2: pair 1 (the h pair, frequency 1) turns by h = 2
    assert_close(y[2, 0, 2:4], torch.stack([x[2, 0, 2] * c - x[2, 0, 3] * s, x[2, 0, 2] * s + x[2, 0, 3] * c]))
    assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-12, name="rotations keep norms")


# ---------------------------------------------------------------------------------------------- larger / GPU
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(8))
def test_random_layouts_sweep(seed):
    rng = random.Random(100 + seed)
    mode = ("full", "spatial", "temporal")[seed % 3]
    seqs = _layout(rng, rng.randint(1, 12), max_t=4, max_hw=8)
    hk = rng.choice([1, 2, 5])
    rope = RoPE3D(10000.0, (4, 6, 6)) if seed % 2 else None
    with mock.patch.object(attention_op, "_ONE_BLOCK_HEADS", rng.choice([1, 2, 3, 8])):  # heads per head loop
        check_against_reference(seqs, hk * rng.choice([1, 2, 3]), hk, rng.choice([16, 32, 72]), mode=mode,
                                rope=rope, seed=seed)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["full", "spatial", "temporal"])
@pytest.mark.parametrize("d", [64, 72, 96, 128])
def test_gpu_half_precision(dtype, mode, d):
    rng = random.Random(d)
    seqs = _layout(rng, 10, max_t=5, max_hw=24)
    check_against_reference(seqs, 8, 2, d, mode=mode, rope=RoPE3D(10000.0, (16, 24, 24)), dtype=dtype, seed=d)


@pytest.mark.gpu
def test_gpu_cross_attention_and_long_segments():
    seqs = PackedSeqs.from_grids([(9, 24, 32), (1, 45, 80), (1, 9, 16)], device=DEVICE)
    cu_k = cu_seqlens_of([77, 120, 1], DEVICE)
    check_against_reference(seqs, 16, 16, 64, cu_k=cu_k, num_k=198, max_k=120, dtype=torch.bfloat16)


def test_forward_configs_of_one_block_launches():
    """Where every tile's keys fit one 64-key block (ONE_BLOCK) the pipelined loop runs over the program's heads:
    the autotuner gets 1, 2 and 3 stages there (1 stage on tiles of >= 64 rows, 3 up to 128 columns) and 64-key
    blocks only. Elsewhere the pipelined configurations alone, 128-key blocks where they fit the registers."""

    def kept(one_block, rows=64, columns=128):
        pruned = attention_op._prune_fwd_configs(attention_op.fwd_configs(rows), {}, BLOCK_D0=columns, BLOCK_D1=0,
                                                 ONE_BLOCK=one_block)
        return {(c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in pruned if c.kwargs["BLOCK_M"] == rows}

    assert kept(True) == kept(True, columns=64) == {(64, 4, 3), (64, 4, 2), (64, 4, 1)}
    assert kept(True, columns=256) == {(64, 4, 2), (64, 4, 1)}
    assert kept(True, rows=128) == {(64, 8, 3), (64, 8, 2), (64, 8, 1)}
    assert kept(True, rows=32) == {(64, 4, 3), (64, 4, 2)}  # mma.sync tiles: 1 stage spills at D = 72
    assert kept(False) == {(64, 4, 3)} and kept(False, rows=128) == {(64, 8, 3)}
    assert kept(False, columns=64) == {(64, 4, 3), (128, 4, 2)}


@pytest.mark.parametrize("columns", [64, 80, 128])
def test_forward_configs_offer_half_tile_programs_on_128_row_tiles(columns):
    """On 128-row tiles the autotuner weighs 128-row programs (8 warps) against two 64-row programs (4 warps), each
    with its own pipelined configurations; on smaller tiles a program takes the whole tile."""

    def kept(rows):
        pruned = attention_op._prune_fwd_configs(attention_op.fwd_configs(rows), {}, BLOCK_D0=columns, BLOCK_D1=0,
                                                 ONE_BLOCK=False)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in pruned}

    assert kept(128) == {(128, *c) for c in {(64, 8, 3)} | ({(128, 8, 2)} if columns <= 96 else set())} | {
        (64, *c) for c in {(64, 4, 3)} | ({(128, 4, 2)} if columns <= 64 else set())}
    assert {c[0] for c in kept(64)} == {64} and {c[0] for c in kept(32)} == {32}


@pytest.mark.parametrize("rows", [128, 64, 32])
@pytest.mark.parametrize("columns", [64, 80, 128, 256])
@pytest.mark.parametrize("one_block", [False, True])
def test_deterministic_forward_configs_compute_the_same_bits(rows, columns, one_block):
    """In deterministic mode the forward's autotuner only chooses the pipeline depth: one key block and program
    size, whose results do not depend on which configuration a run's timings pick."""
    pruned = attention_op._prune_fwd_configs(attention_op.fwd_configs(rows, deterministic=True), {},
                                             BLOCK_D0=columns, BLOCK_D1=0, ONE_BLOCK=one_block)
    assert pruned and {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"], c.num_warps) for c in pruned} == {
        (64, rows, 8 if rows == 128 else 4)}


def test_forward_launch_follows_deterministic_mode():
    seqs = PackedSeqs.from_grids([(1, 12, 16), (1, 1, 3)], device=DEVICE)
    q = torch.randn(seqs.num_tokens, 2, 32, device=DEVICE)
    seen = []
    kernel = attention_op._fwd_kernel

    def spied(rows, deterministic):
        seen.append(deterministic)
        return kernel(rows, deterministic)

    with mock.patch.object(attention_op, "_fwd_kernel", spied):
        for enabled in (False, True):
            with _deterministic(enabled):
                attention_op.varlen_attention(q, q, q, seqs.cu_seqlens, seqs.max_seqlen, seqs=seqs)
    assert seen == [False, True]


def test_forward_programs_of_half_a_tile_match_the_reference(monkeypatch):
    """The autotuner's 64-row programs on 128-row tiles (two per tile through grid axis 2), forced as the one
    configuration the interpreter runs: forward and backward match the reference in full and spatial mode."""
    configs = attention_op.fwd_configs
    split = [c for c in configs(128) if c.kwargs["BLOCK_M"] == 64]
    monkeypatch.setattr(attention_op, "fwd_configs",
                        lambda rows, deterministic: split if rows == 128 else configs(rows, deterministic))
    attention_op._fwd_kernel.cache_clear()
    try:
        seqs = PackedSeqs.from_grids([(2, 16, 16), (1, 12, 32), (1, 1, 1)])
        for mode in ("full", "spatial"):
            grids = seqs.grids if mode != "full" else None
            schedule = attention_schedule.host_schedule(mode, seqs.seqlens, None, grids, seqs.num_tokens, DEVICE)
            assert schedule.block_m == 128
            check_against_reference(seqs, 4, 2, 32, mode=mode)
            assert attention_op._fwd_kernel(128, False).best_config.kwargs["BLOCK_M"] == 64
    finally:
        attention_op._fwd_kernel.cache_clear()


@pytest.mark.parametrize("query_grids, key_lengths, one_block, dq_mode", [
    ([(1, 8, 10), (1, 3, 4)], [20, 0], {"attention_fwd_kernel"}, "single"),          # long queries, short keys
    ([(1, 4, 5), (1, 2, 3)], [100, 70], {"attention_bwd_dkdv_kernel"}, "atomic"),  # short queries, long keys
])
def test_cross_attention_loops_over_heads_on_the_side_that_fits_one_block(query_grids, key_lengths, one_block,
                                                                          dq_mode):
    """The forward loops over heads where every key segment fits one block, dK/dV where every query segment
    does (``max_q_len``); the other side keeps one head per program and its block loop. Both match the oracle.
    Short keys: each key segment lies within one dK/dV program, which adds dQ once, and the 12 queries without
    keys keep their zeros; long keys span two 64-key tiles, whose programs add dQ by fp32 atomics."""
    seqs = PackedSeqs.from_grids(query_grids, device=DEVICE)
    with mock.patch.object(attention_op, "_ONE_BLOCK_HEADS", 3), _spied_launches() as launched:
        check_against_reference(seqs, 6, 3, 16, cu_k=cu_seqlens_of(key_lengths, DEVICE), num_k=sum(key_lengths),
                                max_k=max(key_lengths), seed=len(key_lengths))
    assert {name for name, (grid, kwargs) in launched.items() if kwargs["ONE_BLOCK"]} == one_block
    assert launched["attention_bwd_dkdv_kernel"][1]["DQ_MODE"] == dq_mode


def test_head_loops_take_the_heads_and_stages_that_fit():
    """One-block launches (inner segments <= 64 rows) split the heads evenly into programs of at most 8; a backward
    head loop stages all four tiles a head reads within 128 KiB (up to 3 stages), and where one stage does not fit
    the launch keeps one head per program."""
    split, stages = attention_op._head_split, attention_op._head_loop_stages
    assert split(16, 33) == (True, 8) and split(9, 64) == (True, 5) and split(24, 1) == (True, 8)
    assert split(16, 65) == (False, 1) and split(16, 9, 0) == (False, 1)
    assert stages(64, 64, 64, 2) == stages(64, 64, 72, 2) == 3
    assert stages(64, 64, 128, 2) == 2  # 3 stages took 225 KiB, more than an A100's 163
    assert stages(64, 2 * 64, 72, 2) == 2  # GQA 2: two query blocks per head
    assert stages(32, 2 * 64, 256, 4) == 0  # fp32, D = 256, GQA 2


def test_dq_mode_stores_where_every_key_segment_is_one_program():
    """dQ is added once by the dK/dV programs where each key segment lies within one (exact lengths, key tile
    taken whole), in deterministic mode too; else by fp32 atomics where they keep the key tile (not
    deterministic), else by the dQ kernel."""
    mode = attention_op._dq_mode  # (block_kt, max_k_len, keys_uncovered, head_dim, itemsize, group, deterministic)
    assert mode(64, 25, False, 72, 2, 1, False) == mode(64, 25, False, 72, 2, 2, True) == "single"  # temporal
    assert mode(128, 120, False, 72, 2, 1, False) == "single"  # text keys within one 128-row key tile
    assert mode(128, 120, True, 72, 2, 1, False) == "atomic"  # device-built schedule: the lengths are bounds
    assert mode(128, 129, False, 72, 2, 1, False) == "atomic" and mode(128, 129, False, 72, 2, 1, True) == "separate"
    assert mode(128, 100, False, 128, 2, 1, False) == "separate"  # 64-key programs: a key tile is two programs
    assert mode(64, 64, False, 256, 4, 1, False) == "atomic"  # fp32 at D = 256: 32-key programs
