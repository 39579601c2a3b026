"""Triton kernels of :mod:`packdit.ops.attention`: forward, dK/dV (+ atomic dQ), dQ, delta.

Work: a program computes one tile of the schedule (:mod:`packdit.ops.attention_schedule`): program id 0
indexes the tile table, whose entry names a group (a sample's equal segments); the group fields give the
tile's rows. Tile row r is row ``first + r // pack`` of segment ``seg0 + r % pack`` (``pack == 1``: one
segment's rows ``first..first + BLOCK``; ``pack > 1``: several short segments, frame-major, with the
block-diagonal mask ``r % pack == c % pack`` between query row r and key column c). Single-row segments
(``q_len == k_len == 1``) are computed row by row: out = v, lse = scale q.k, dv = sum of dO, no MMA.
Program id 1 picks the heads: one, or, where every tile is one block (ONE_BLOCK: temporal tiles), several in a
loop whose software pipeline loads the next heads' rows during the current head's matmuls.

Head dim: a tile holds ``BLOCK_D0 + BLOCK_D1`` columns (see ``_head_blocks`` in attention.py): one power of two
when the head dim is one (64, 128), else a power of two plus a second, narrower chunk (72 = 64 + 16 with 8
columns masked, 96 = 64 + 32) whose matmuls are separate ``tl.dot`` calls accumulating into the same scores:
11% padded MMA work at D = 72 instead of 78% for a 128-column tile. Columns past D read 0 and are not written.

Alignment: row and head strides arrive divided by ``ALIGN`` (16 bytes / element size when every stride is a
multiple of it) and are multiplied back by the constexpr here, so Triton knows each row starts on a 16-byte
boundary and vectorizes (cp.async) even when the stride itself is not a multiple of 16 (q/k/v of head dim 72
are views of the fused qkv projection: head stride 72, row stride 3 H 72).

Softmax runs in base 2: scores ``s`` stay unscaled and ``scale * log2(e)`` enters the exponent's FFMA,
``p = exp2(s * qk_scale - m)`` with ``m`` the running max of ``s * qk_scale`` (no separate multiply per score,
no rounding of a pre-scaled q). The stored LSE is natural-log, ``lse = ln(sum_j exp(scale q.k_j))``
(flash-attn convention), ``-inf`` for rows with no keys (their output is 0).
"""

from __future__ import annotations

import triton
import triton.language as tl

from packdit.ops._triton_utils import LN2, LOG2E


# ---------------------------------------------------------------------------------------------- tiles
@triton.jit
def _tile_of(Groups, Tiles, num_groups, TILE: tl.constexpr):
    """The work of program ``program_id(0)``: ``(live, q_start, k_start, q_len, k_len, num_segs, seg_stride,
    row_stride, pack, seg0, first)``; ``live`` is False for surplus programs of an upper-bound tile table. Each
    field's offset is one index (``k * num_groups + group``): as two pointer additions, the fields' base pointers
    were shared by dK/dV's two reads of the table (see attention_bwd_dkdv_kernel) and held across its block loop
    (32 B spilled at D = 72)."""
    tile = tl.program_id(0)
    group = tl.load(Tiles + tile)
    tile_start = tl.load(Groups + group)
    q_start = tl.load(Groups + (num_groups + group))
    k_start = tl.load(Groups + (2 * num_groups + group))
    q_len = tl.load(Groups + (3 * num_groups + group))
    k_len = tl.load(Groups + (4 * num_groups + group))
    num_segs = tl.load(Groups + (5 * num_groups + group))
    seg_stride = tl.load(Groups + (6 * num_groups + group))
    row_stride = tl.load(Groups + (7 * num_groups + group))
    pack = tl.load(Groups + (8 * num_groups + group))
    split = tl.load(Groups + (9 * num_groups + group))
    local = tile - tile_start
    seg_block = local // tl.maximum(split, 1)
    first = (local - seg_block * split) * TILE
    seg0 = seg_block * pack
    live = (split > 0) & (seg0 < num_segs)
    return live, q_start, k_start, q_len, k_len, num_segs, seg_stride, row_stride, pack, seg0, first


@triton.jit
def _frame_and_segment(index, pack):
    """``(index // pack, index % pack)`` of key columns ``0 <= index < 2**20`` (callers pass a block's columns,
    < 2**8), by fp32 arithmetic: ``(index + 0.5) / pack`` lies at least ``0.5 / pack`` from an integer, and a
    reciprocal within 2 ulp and one rounded product move it by less than ``(index + 0.5) / pack * 1.25 * 2**-22``.
    About 4 instructions per element instead of a ~20-instruction signed division by a runtime value. Compiled for
    sm_90 (bf16), 5-14% fewer instructions outside the key loops of the forward and dQ programs, the loops within
    1%. Query rows (``_rows``) keep the integer division: the fp32 one there spilled 8 B in the forward at D = 64
    and in dK/dV at D = 72."""
    frame = ((index.to(tl.float32) + 0.5) * (1.0 / pack.to(tl.float32))).to(tl.int32)
    return frame, index - frame * pack


@triton.jit
def _rows(index, frame0, start, length, seg0, num_segs, seg_stride, row_stride, pack):
    """Rows of tile positions ``index`` whose first frame is ``frame0``: ``(rows, valid, segment)``."""
    frame = frame0 + index // pack
    seg = seg0 + index % pack
    valid = (frame < length) & (seg < num_segs)
    return start + seg * seg_stride + frame * row_stride, valid, seg


@triton.jit
def _row_ptrs(ptr, rows, stride_row, head_offset, ALIGN: tl.constexpr):
    """Pointers to column 0 of ``rows`` of one head; strides in units of ALIGN elements."""
    return ptr + (rows.to(tl.int64) * stride_row + head_offset) * ALIGN


@triton.jit
def _load_chunk(row_ptrs, row_valid, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                MASK_ROWS: tl.constexpr):
    """``(len(row_ptrs), WIDTH)`` columns ``COL0..COL0 + WIDTH`` of each row; invalid rows / columns >= D read 0."""
    cols = COL0 + tl.arange(0, WIDTH)
    ptrs = row_ptrs[:, None] + cols[None, :]
    if COL0 + WIDTH <= HEAD_DIM:
        if MASK_ROWS:
            x = tl.load(ptrs, mask=row_valid[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    else:
        mask = cols[None, :] < HEAD_DIM
        if MASK_ROWS:
            mask = mask & row_valid[:, None]
        x = tl.load(ptrs, mask=mask, other=0.0)
    return x


@triton.jit
def _load_head(row_ptrs, row_valid, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """The two column chunks of a head's rows; the second is a placeholder (the first) when BLOCK_D1 == 0."""
    x0 = _load_chunk(row_ptrs, row_valid, 0, BLOCK_D0, HEAD_DIM, MASK_ROWS)
    x1 = x0
    if BLOCK_D1 > 0:
        x1 = _load_chunk(row_ptrs, row_valid, BLOCK_D0, BLOCK_D1, HEAD_DIM, MASK_ROWS)
    return x0, x1


@triton.jit
def _zeros_head(ROWS: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr):
    """fp32 zero accumulators for the two column chunks (the second a placeholder when BLOCK_D1 == 0)."""
    x0 = tl.zeros((ROWS, BLOCK_D0), tl.float32)
    x1 = x0
    if BLOCK_D1 > 0:
        x1 = tl.zeros((ROWS, BLOCK_D1), tl.float32)
    return x0, x1


@triton.jit
def _store_chunk(row_ptrs, row_valid, x, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr):
    cols = COL0 + tl.arange(0, WIDTH)
    tl.store(row_ptrs[:, None] + cols[None, :], x.to(row_ptrs.dtype.element_ty),
             mask=row_valid[:, None] & (cols < HEAD_DIM)[None, :])


@triton.jit
def _store_head(row_ptrs, row_valid, x0, x1, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr,
                BLOCK_D1: tl.constexpr):
    _store_chunk(row_ptrs, row_valid, x0, 0, BLOCK_D0, HEAD_DIM)
    if BLOCK_D1 > 0:
        _store_chunk(row_ptrs, row_valid, x1, BLOCK_D0, BLOCK_D1, HEAD_DIM)


@triton.jit
def _add_dq_chunk(row_ptrs, row_valid, x, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_DIM: tl.constexpr,
                  MASK_ROWS: tl.constexpr):
    """Adds dQ columns ``COL0..COL0 + WIDTH`` of a dK/dV program to dQ by atomic reductions in dQ's dtype: fp32 for
    DQ_MODE "atomic" (one add per key tile), q's for "single" (this program holds every key of these query rows,
    so its add to the zeroed dQ is the only one, an exact store). Reductions rather than a store for "single":
    compiled for sm_90 (bf16, D = 128) they run as REDG.ADD.BF16x8 without spilling, where the store's layout
    conversion spilled 24 B inside the loop; on sm_80 bf16 adds are compare-and-swap loops."""
    cols = COL0 + tl.arange(0, WIDTH)
    mask = (cols < HEAD_DIM)[None, :]
    if MASK_ROWS:
        mask = mask & row_valid[:, None]
    tl.atomic_add(row_ptrs[:, None] + cols[None, :], x.to(row_ptrs.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _dot_nt(a0, a1, b0, b1, BLOCK_D1: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``a @ b^T`` over both column chunks: (rows of a) x (rows of b), fp32."""
    s = tl.dot(a0, tl.trans(b0), input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        s = tl.dot(a1, tl.trans(b1), s, input_precision=DOT_PRECISION)
    return s


@triton.jit
def _dot_nn(p, b0, b1, acc0, acc1, BLOCK_D1: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """``acc += p @ b`` per column chunk."""
    acc0 = tl.dot(p, b0, acc0, input_precision=DOT_PRECISION)
    if BLOCK_D1 > 0:
        acc1 = tl.dot(p, b1, acc1, input_precision=DOT_PRECISION)
    return acc0, acc1


@triton.jit
def _rowdot(a0, a1, b0, b1, BLOCK_D1: tl.constexpr):
    """Row-wise ``sum_d a * b`` in fp32 over both chunks."""
    s = tl.sum(a0.to(tl.float32) * b0.to(tl.float32), 1)
    if BLOCK_D1 > 0:
        s += tl.sum(a1.to(tl.float32) * b1.to(tl.float32), 1)
    return s


# ---------------------------------------------------------------------------------------------- forward
@triton.jit
def _key_blocks(K, V, k_start, seg_stride, row_stride, pack, seg0, head_offset_k, head_offset_v, stride_kn, stride_vn,
                BLOCK_N: tl.constexpr, ALIGN: tl.constexpr):
    """K/V row pointers of the key block at frame 0, their segments, and the pointer steps per frame: key column c is
    frame c // pack of segment seg0 + c % pack."""
    k_frame, k_seg = _frame_and_segment(tl.arange(0, BLOCK_N), pack)
    k_seg += seg0
    rows = k_start + k_seg * seg_stride + k_frame * row_stride
    k_ptrs = _row_ptrs(K, rows, stride_kn, head_offset_k, ALIGN)
    v_ptrs = _row_ptrs(V, rows, stride_vn, head_offset_v, ALIGN)
    k_step = (row_stride * stride_kn).to(tl.int64) * ALIGN
    v_step = (row_stride * stride_vn).to(tl.int64) * ALIGN
    return k_ptrs, v_ptrs, k_step, v_step, k_seg


@triton.jit
def _tail_mask(frame0, k_len, k_seg, q_seg, num_segs, pack, BLOCK_N: tl.constexpr):
    """``(key_valid (BLOCK_N,), score mask (rows, BLOCK_N))`` of the masked key block at frame ``frame0``: keys inside
    the segments, each query row seeing its own segment's keys."""
    cols = tl.arange(0, BLOCK_N)
    k_frame, _ = _frame_and_segment(cols, pack)
    key_valid = (frame0 + k_frame < k_len) & (k_seg < num_segs) & (cols < (BLOCK_N // pack) * pack)
    return key_valid, key_valid[None, :] & (k_seg[None, :] == q_seg[:, None])


@triton.jit
def _fwd_block(q0, q1, k_ptrs, v_ptrs, key_valid, mask, m_i, l_i, acc0, acc1, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, MASKED: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """One key block of the online softmax. MASKED: ``mask (BLOCK_M, BLOCK_N)`` says which scores exist and
    rows may have none yet (their max stays -inf); else every score of the block exists."""
    # The masked block runs outside the pipelined loop (it is the one block of a temporal tile), where V's load
    # would wait for the scores: loaded with K, twice the 16-byte loads are in flight before its first MMA on
    # tiles of >= 64 rows (sm_90). Inside the loop the pipeliner prefetches both either way; 128-key blocks hold
    # twice the registers and spilled 8 B (64 rows, D = 64).
    V_WITH_K: tl.constexpr = MASKED and k_ptrs.shape[0] == 64
    k0, k1 = _load_head(k_ptrs, key_valid, HEAD_DIM, BLOCK_D0, BLOCK_D1, MASKED)
    if V_WITH_K:
        v0, v1 = _load_head(v_ptrs, key_valid, HEAD_DIM, BLOCK_D0, BLOCK_D1, MASKED)
    s = _dot_nt(q0, q1, k0, k1, BLOCK_D1, DOT_PRECISION)
    if MASKED:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASKED:
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_new_safe = m_new
    alpha = tl.exp2(m_i - m_new_safe)
    p = tl.exp2(s * qk_scale - m_new_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if not V_WITH_K:
        v0, v1 = _load_head(v_ptrs, key_valid, HEAD_DIM, BLOCK_D0, BLOCK_D1, MASKED)
    acc0, acc1 = _dot_nn(p.to(v0.dtype), v0, v1, acc0 * alpha[:, None], acc1 * alpha[:, None], BLOCK_D1,
                         DOT_PRECISION)
    return m_new, l_i, acc0, acc1


@triton.jit
def _fwd_single_rows(Q, K, V, Out, Lse, q_rows, k_rows, m_valid, head, kv_head, stride_qn, stride_qh, stride_kn,
                     stride_kh, stride_vn, stride_vh, stride_on, stride_oh, stride_lh, scale, HEAD_DIM: tl.constexpr,
                     BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, ALIGN: tl.constexpr):
    """Single-row segments of one head: the softmax of one score is 1, out = v, lse = scale q.k."""
    q0, q1 = _load_head(_row_ptrs(Q, q_rows, stride_qn, head * stride_qh, ALIGN), m_valid, HEAD_DIM, BLOCK_D0,
                        BLOCK_D1, True)
    k0, k1 = _load_head(_row_ptrs(K, k_rows, stride_kn, kv_head * stride_kh, ALIGN), m_valid, HEAD_DIM,
                        BLOCK_D0, BLOCK_D1, True)
    v0, v1 = _load_head(_row_ptrs(V, k_rows, stride_vn, kv_head * stride_vh, ALIGN), m_valid, HEAD_DIM,
                        BLOCK_D0, BLOCK_D1, True)
    _store_head(_row_ptrs(Out, q_rows, stride_on, head * stride_oh, ALIGN), m_valid, v0, v1, HEAD_DIM, BLOCK_D0,
                BLOCK_D1)
    tl.store(Lse + head * stride_lh + q_rows, _rowdot(q0, q1, k0, k1, BLOCK_D1) * scale, mask=m_valid)


@triton.jit
def _fwd_store(Out, Lse, q_rows, m_valid, head, stride_on, stride_oh, stride_lh, m_i, l_i, acc0, acc1,
               HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, ALIGN: tl.constexpr):
    """out = acc / l and the natural-log lse of one head's rows (-inf and 0 for rows without keys)."""
    has_keys = l_i > 0.0
    inv_l = 1.0 / tl.where(has_keys, l_i, 1.0)
    _store_head(_row_ptrs(Out, q_rows, stride_on, head * stride_oh, ALIGN), m_valid, acc0 * inv_l[:, None],
                acc1 * inv_l[:, None], HEAD_DIM, BLOCK_D0, BLOCK_D1)
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(Lse + head * stride_lh + q_rows, lse, mask=m_valid)


@triton.jit
def attention_fwd_kernel(
    Q, K, V, Out, Lse, QGroups, QTiles, num_groups, num_heads, heads_per_program,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, stride_lh,
    scale, max_len_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, ONE_BLOCK: tl.constexpr, ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_M rows (part ``program_id(2)`` of a TILE-row query tile) x ``heads_per_program`` query
    heads from ``program_id(1) * heads_per_program``: online softmax over the tile's keys, full key blocks
    unmasked, then one masked block (the segment's tail, or the whole key set of a packed tile). ONE_BLOCK: every
    tile's keys fit that one masked block (temporal tiles), and the program loops over its heads, the pipeliner
    keeping the next heads' loads in flight during this head's matmuls; else one head per program."""
    head0 = tl.program_id(1) * heads_per_program
    heads_end = tl.minimum(head0 + heads_per_program, num_heads)
    live, q_start, k_start, q_len, k_len, num_segs, seg_stride, row_stride, pack, seg0, first = _tile_of(
        QGroups, QTiles, num_groups, TILE)
    index = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    if (live == 0) | (first + (tl.program_id(2) * BLOCK_M) // pack >= q_len):
        return  # surplus program, or a part of a tile past its segment's end
    q_rows, m_valid, q_seg = _rows(index, first, q_start, q_len, seg0, num_segs, seg_stride, row_stride, pack)
    if (q_len == 1) & (k_len == 1):
        k_rows = k_start + q_seg * seg_stride
        for head in range(head0, heads_end):
            _fwd_single_rows(Q, K, V, Out, Lse, q_rows, k_rows, m_valid, head, head // GROUP, stride_qn, stride_qh,
                             stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, stride_lh, scale,
                             HEAD_DIM, BLOCK_D0, BLOCK_D1, ALIGN)
        return

    qk_scale = scale * LOG2E
    k_ptrs, v_ptrs, k_step, v_step, k_seg = _key_blocks(K, V, k_start, seg_stride, row_stride, pack, seg0, 0, 0,
                                                        stride_kn, stride_vn, BLOCK_N, ALIGN)
    if ONE_BLOCK:
        key_valid, mask = _tail_mask(0, k_len, k_seg, q_seg, num_segs, pack, BLOCK_N)
        for head in tl.range(head0, heads_end):
            kv_head = head // GROUP
            q0, q1 = _load_head(_row_ptrs(Q, q_rows, stride_qn, head * stride_qh, ALIGN), m_valid, HEAD_DIM,
                                BLOCK_D0, BLOCK_D1, True)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            acc0, acc1 = _zeros_head(BLOCK_M, BLOCK_D0, BLOCK_D1)
            m_i, l_i, acc0, acc1 = _fwd_block(q0, q1, k_ptrs + kv_head * stride_kh * ALIGN,
                                              v_ptrs + kv_head * stride_vh * ALIGN, key_valid, mask, m_i, l_i, acc0,
                                              acc1, qk_scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, True, DOT_PRECISION)
            _fwd_store(Out, Lse, q_rows, m_valid, head, stride_on, stride_oh, stride_lh, m_i, l_i, acc0, acc1,
                       HEAD_DIM, BLOCK_D0, BLOCK_D1, ALIGN)
    else:
        head = head0
        kv_head = head // GROUP
        k_ptrs += kv_head * stride_kh * ALIGN
        v_ptrs += kv_head * stride_vh * ALIGN
        q0, q1 = _load_head(_row_ptrs(Q, q_rows, stride_qn, head * stride_qh, ALIGN), m_valid, HEAD_DIM, BLOCK_D0,
                            BLOCK_D1, True)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc0, acc1 = _zeros_head(BLOCK_M, BLOCK_D0, BLOCK_D1)
        full_frames = tl.where(pack == 1, k_len - k_len % BLOCK_N, 0)
        for n0 in range(0, full_frames, BLOCK_N):
            m_i, l_i, acc0, acc1 = _fwd_block(q0, q1, k_ptrs + n0 * k_step, v_ptrs + n0 * v_step, m_valid, m_valid,
                                              m_i, l_i, acc0, acc1, qk_scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, False,
                                              DOT_PRECISION)
        if full_frames < k_len:
            key_valid, mask = _tail_mask(full_frames, k_len, k_seg, q_seg, num_segs, pack, BLOCK_N)
            m_i, l_i, acc0, acc1 = _fwd_block(q0, q1, k_ptrs + full_frames * k_step, v_ptrs + full_frames * v_step,
                                              key_valid, mask, m_i, l_i, acc0, acc1, qk_scale, HEAD_DIM, BLOCK_D0,
                                              BLOCK_D1, True, DOT_PRECISION)
        _fwd_store(Out, Lse, q_rows, m_valid, head, stride_on, stride_oh, stride_lh, m_i, l_i, acc0, acc1,
                   HEAD_DIM, BLOCK_D0, BLOCK_D1, ALIGN)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def attention_bwd_delta_kernel(Out, DO, Delta, GradLse, num_rows, stride_on, stride_oh, stride_don, stride_doh,
                               stride_lh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                               HAS_GRAD_LSE: tl.constexpr, ALIGN: tl.constexpr):
    """``delta[h, n] = sum_d dO[n, h, d] * O[n, h, d] - dlse[h, n]`` (the dlse term makes lse differentiable:
    d lse / d s = P, so it shifts dS = P * (dP - delta) by +P * dlse)."""
    head = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < num_rows
    o = _load_chunk(_row_ptrs(Out, rows, stride_on, head * stride_oh, ALIGN), row_valid, 0, BLOCK_D, HEAD_DIM, True)
    do = _load_chunk(_row_ptrs(DO, rows, stride_don, head * stride_doh, ALIGN), row_valid, 0, BLOCK_D, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_GRAD_LSE:
        delta -= tl.load(GradLse + head * stride_lh + rows, mask=row_valid, other=0.0)
    tl.store(Delta + head * stride_lh + rows, delta, mask=row_valid)


@triton.jit
def _pair_heads(kv_head, pair, GROUP: tl.constexpr):
    """The query head of each query-head pair of kv head ``kv_head`` (a scalar without GQA)."""
    heads = kv_head
    if GROUP > 1:
        heads = kv_head * GROUP + pair % GROUP
    return heads


@triton.jit
def _dkdv_block(Q, DO, DQ, Lse, Delta, q_rows, heads, stride_qn, stride_qh, stride_don, stride_doh, stride_dqn,
                stride_dqh, stride_lh, query_valid, same_seg, k0, k1, v0, v1, dk0, dk1, dv0, dv1, scale,
                HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, ALIGN: tl.constexpr,
                MASKED: tl.constexpr, DQ_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One query block of the key-major backward (keys are the MMA rows: every product is a wgmma with
    M = key rows)::

        sT = k q^T   pT = exp2(sT * scale log2 e - lse log2 e)   dv += pT dO   dpT = v dO^T
        dsT = pT * (dpT - delta)   dk += dsT q   (DQ_MODE "atomic" / "single") dQ += scale dsT^T k

    Padded query rows read lse = +inf (pT = 0), so unpacked blocks need no mask; MASKED (packed tiles) zeroes
    the scores between different segments (``same_seg``) and masks the loads. Block row r is query row
    ``q_rows[r]`` of query head ``heads[r]``."""
    q0, q1 = _load_head(_row_ptrs(Q, q_rows, stride_qn, heads * stride_qh, ALIGN), query_valid, HEAD_DIM, BLOCK_D0,
                        BLOCK_D1, MASKED)
    do0, do1 = _load_head(_row_ptrs(DO, q_rows, stride_don, heads * stride_doh, ALIGN), query_valid, HEAD_DIM,
                          BLOCK_D0, BLOCK_D1, MASKED)
    stats = heads * stride_lh + q_rows
    if MASKED:
        lse = tl.load(Lse + stats, mask=query_valid, other=float("inf"))
        delta = tl.load(Delta + stats, mask=query_valid, other=0.0)
    else:
        lse = tl.load(Lse + stats)
        delta = tl.load(Delta + stats)
    s_t = _dot_nt(k0, k1, q0, q1, BLOCK_D1, DOT_PRECISION)
    p_t = tl.exp2(s_t * (scale * LOG2E) - (lse * LOG2E)[None, :])
    if MASKED:
        p_t = tl.where(same_seg, p_t, 0.0)
    dv0, dv1 = _dot_nn(p_t.to(do0.dtype), do0, do1, dv0, dv1, BLOCK_D1, DOT_PRECISION)
    dp_t = _dot_nt(v0, v1, do0, do1, BLOCK_D1, DOT_PRECISION)
    ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
    dk0, dk1 = _dot_nn(ds_t, q0, q1, dk0, dk1, BLOCK_D1, DOT_PRECISION)
    if DQ_MODE != "separate":
        dq_ptrs = _row_ptrs(DQ, q_rows, stride_dqn, heads * stride_dqh, ALIGN)
        ds = tl.trans(ds_t)
        _add_dq_chunk(dq_ptrs, query_valid, tl.dot(ds, k0, input_precision=DOT_PRECISION) * scale, 0, BLOCK_D0,
                      HEAD_DIM, MASKED)
        if BLOCK_D1 > 0:
            _add_dq_chunk(dq_ptrs, query_valid, tl.dot(ds, k1, input_precision=DOT_PRECISION) * scale, BLOCK_D0,
                          BLOCK_D1, HEAD_DIM, MASKED)
    return dk0, dk1, dv0, dv1


@triton.jit
def _dkdv_single_rows(Q, K, V, DO, Delta, DQ, DK, DV, q_start, seg_stride, k_rows, n_valid, k_seg, kv_head, stride_qn,
                      stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh, stride_dqn,
                      stride_dqh, stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_lh, scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP: tl.constexpr, ALIGN: tl.constexpr, DQ_MODE: tl.constexpr):
    """Single-row segments of one kv head: p = 1, ds = dO.v - delta, dv = sum of dO, dk = sum of ds q over the
    GROUP query heads. Two passes over the heads (dv, then dk), each a loop: dv and dk accumulated together
    (BLOCK_N x D fp32 each) beside k, v, q and dO held the key rows in local memory, 16 B with GQA 3 at D = 128
    (128 keys, sm_90); unrolled, the heads spilled 16 B at 64 keys."""
    k0, k1 = _load_head(_row_ptrs(K, k_rows, stride_kn, kv_head * stride_kh, ALIGN), n_valid, HEAD_DIM, BLOCK_D0,
                        BLOCK_D1, True)
    v0, v1 = _load_head(_row_ptrs(V, k_rows, stride_vn, kv_head * stride_vh, ALIGN), n_valid, HEAD_DIM, BLOCK_D0,
                        BLOCK_D1, True)
    q_rows = q_start + k_seg * seg_stride
    dv0, dv1 = _zeros_head(BLOCK_N, BLOCK_D0, BLOCK_D1)
    for g in range(GROUP):
        do0, do1 = _load_head(_row_ptrs(DO, q_rows, stride_don, (kv_head * GROUP + g) * stride_doh, ALIGN), n_valid,
                              HEAD_DIM, BLOCK_D0, BLOCK_D1, True)
        dv0 += do0.to(tl.float32)
        if BLOCK_D1 > 0:
            dv1 += do1.to(tl.float32)
    _store_head(_row_ptrs(DV, k_rows, stride_dvn, kv_head * stride_dvh, ALIGN), n_valid, dv0, dv1, HEAD_DIM, BLOCK_D0,
                BLOCK_D1)
    dk0, dk1 = _zeros_head(BLOCK_N, BLOCK_D0, BLOCK_D1)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q0, q1 = _load_head(_row_ptrs(Q, q_rows, stride_qn, head * stride_qh, ALIGN), n_valid, HEAD_DIM, BLOCK_D0,
                            BLOCK_D1, True)
        do0, do1 = _load_head(_row_ptrs(DO, q_rows, stride_don, head * stride_doh, ALIGN), n_valid, HEAD_DIM,
                              BLOCK_D0, BLOCK_D1, True)
        ds = _rowdot(do0, do1, v0, v1, BLOCK_D1) - tl.load(Delta + head * stride_lh + q_rows, mask=n_valid, other=0.0)
        dk0 += ds[:, None] * q0.to(tl.float32)
        if BLOCK_D1 > 0:
            dk1 += ds[:, None] * q1.to(tl.float32)
        if DQ_MODE != "separate":  # the only contribution to these dQ rows: a plain store
            _store_head(_row_ptrs(DQ, q_rows, stride_dqn, head * stride_dqh, ALIGN), n_valid,
                        (scale * ds)[:, None] * k0.to(tl.float32), (scale * ds)[:, None] * k1.to(tl.float32),
                        HEAD_DIM, BLOCK_D0, BLOCK_D1)
    _store_dk(DK, k_rows, n_valid, kv_head, stride_dkn, stride_dkh, dk0, dk1, scale, HEAD_DIM, BLOCK_D0, BLOCK_D1,
              ALIGN)


@triton.jit
def _store_dk(DK, k_rows, n_valid, kv_head, stride_dkn, stride_dkh, dk0, dk1, scale, HEAD_DIM: tl.constexpr,
              BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, ALIGN: tl.constexpr):
    """dK = scale dk (the kernels accumulate ds q unscaled) of one kv head's key rows."""
    _store_head(_row_ptrs(DK, k_rows, stride_dkn, kv_head * stride_dkh, ALIGN), n_valid, dk0 * scale, dk1 * scale,
                HEAD_DIM, BLOCK_D0, BLOCK_D1)


@triton.jit
def _dkdv_store(DK, DV, k_rows, n_valid, kv_head, stride_dkn, stride_dkh, stride_dvn, stride_dvh, dk0, dk1, dv0, dv1,
                scale, HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, ALIGN: tl.constexpr):
    """dK (_store_dk) and dV of one kv head's key rows."""
    _store_dk(DK, k_rows, n_valid, kv_head, stride_dkn, stride_dkh, dk0, dk1, scale, HEAD_DIM, BLOCK_D0, BLOCK_D1,
              ALIGN)
    _store_head(_row_ptrs(DV, k_rows, stride_dvn, kv_head * stride_dvh, ALIGN), n_valid, dv0, dv1, HEAD_DIM, BLOCK_D0,
                BLOCK_D1)


@triton.jit
def _dkdv_masked_block(Q, DO, DQ, Lse, Delta, m0, q_start, q_len, seg0, num_segs, seg_stride, row_stride, pack,
                       pairs, kv_head, k_seg, stride_qn, stride_qh, stride_don, stride_doh, stride_dqn, stride_dqh,
                       stride_lh, k0, k1, v0, v1, dk0, dk1, dv0, dv1, scale, HEAD_DIM: tl.constexpr,
                       BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, BLOCK_M: tl.constexpr, GROUP: tl.constexpr,
                       ALIGN: tl.constexpr, DQ_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The query-head pairs ``m0..m0 + BLOCK_M`` (those < ``pairs``), masked: a segment's tail, or a packed tile
    (pack * q_len <= BLOCK_M rows per head), where a key sees the queries of its own segment only."""
    pair = m0 + tl.arange(0, BLOCK_M)
    q_rows, query_valid, q_seg = _rows(pair // GROUP, 0, q_start, q_len, seg0, num_segs, seg_stride, row_stride, pack)
    return _dkdv_block(Q, DO, DQ, Lse, Delta, q_rows, _pair_heads(kv_head, pair, GROUP), stride_qn, stride_qh,
                       stride_don, stride_doh, stride_dqn, stride_dqh, stride_lh, query_valid & (pair < pairs),
                       k_seg[:, None] == q_seg[None, :], k0, k1, v0, v1, dk0, dk1, dv0, dv1, scale, HEAD_DIM,
                       BLOCK_D0, BLOCK_D1, ALIGN, True, DQ_MODE, DOT_PRECISION)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DK, DV, KGroups, KTiles, num_groups, num_kv_heads, heads_per_program,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dqn, stride_dqh, stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_lh,
    scale,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, ONE_BLOCK: tl.constexpr, ALIGN: tl.constexpr,
    DQ_MODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_N key rows (part ``program_id(2)`` of a TILE-row key tile) x ``heads_per_program`` kv
    heads from ``program_id(1) * heads_per_program``, looping over BLOCK_M-row query blocks (see _dkdv_block) whose
    rows are the (query row, query head) pairs of the GROUP heads that read these keys, row-major: GQA adds rows to
    the blocks, not a loop around them (a loop over heads around the pipelined block loop spilled 400 B at D = 72).
    ONE_BLOCK: every key tile's queries fit the masked blocks (temporal tiles); the program then loops over its kv
    heads, the pipeliner keeping the next heads' loads in flight, as the forward does; else one kv head per
    program. dQ (DQ_MODE): "separate" (the dQ kernel computes it), "atomic" (fp32 atomic adds from every key tile)
    or "single" (every key segment lies within one program, which then holds the only contribution to its query
    rows' dQ, added in dQ's dtype). No two programs write the same dK/dV rows, so dK/dV are deterministic; dQ is,
    except by fp32 atomics."""
    kv_head0 = tl.program_id(1) * heads_per_program
    kv_heads_end = tl.minimum(kv_head0 + heads_per_program, num_kv_heads)
    live, q_start, k_start, q_len, k_len, num_segs, seg_stride, row_stride, pack, seg0, first = _tile_of(
        KGroups, KTiles, num_groups, TILE)
    index = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    if (live == 0) | (first + (tl.program_id(2) * BLOCK_N) // pack >= k_len):
        return
    k_rows, n_valid, k_seg = _rows(index, first, k_start, k_len, seg0, num_segs, seg_stride, row_stride, pack)
    if (q_len == 1) & (k_len == 1):
        for kv_head in range(kv_head0, kv_heads_end):
            _dkdv_single_rows(Q, K, V, DO, Delta, DQ, DK, DV, q_start, seg_stride, k_rows, n_valid, k_seg, kv_head,
                              stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don,
                              stride_doh, stride_dqn, stride_dqh, stride_dkn, stride_dkh, stride_dvn, stride_dvh,
                              stride_lh, scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_N, GROUP, ALIGN, DQ_MODE)
        return

    # Block row r of the block at m0 is the query-head pair m0 + r: query row q = (m0 + r) // GROUP (row
    # q // pack of segment seg0 + q % pack) of head kv_head * GROUP + (m0 + r) % GROUP.
    pairs = GROUP * pack * q_len
    if ONE_BLOCK:
        for kv_head in tl.range(kv_head0, kv_heads_end):
            k0, k1 = _load_head(_row_ptrs(K, k_rows, stride_kn, kv_head * stride_kh, ALIGN), n_valid, HEAD_DIM,
                                BLOCK_D0, BLOCK_D1, True)
            v0, v1 = _load_head(_row_ptrs(V, k_rows, stride_vn, kv_head * stride_vh, ALIGN), n_valid, HEAD_DIM,
                                BLOCK_D0, BLOCK_D1, True)
            dk0, dk1 = _zeros_head(BLOCK_N, BLOCK_D0, BLOCK_D1)
            dv0, dv1 = _zeros_head(BLOCK_N, BLOCK_D0, BLOCK_D1)
            # pairs <= GROUP * BLOCK_M: every block runs, unguarded (loads under an if are not pipelined); a
            # block past the pairs is all masked.
            for block in tl.static_range(GROUP):
                dk0, dk1, dv0, dv1 = _dkdv_masked_block(
                    Q, DO, DQ, Lse, Delta, block * BLOCK_M, q_start, q_len, seg0, num_segs, seg_stride, row_stride,
                    pack, pairs, kv_head, k_seg, stride_qn, stride_qh, stride_don, stride_doh, stride_dqn, stride_dqh,
                    stride_lh, k0, k1, v0, v1, dk0, dk1, dv0, dv1, scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_M,
                    GROUP, ALIGN, DQ_MODE, DOT_PRECISION)
            _dkdv_store(DK, DV, k_rows, n_valid, kv_head, stride_dkn, stride_dkh, stride_dvn, stride_dvh, dk0, dk1,
                        dv0, dv1, scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, ALIGN)
    else:
        kv_head = kv_head0
        k0, k1 = _load_head(_row_ptrs(K, k_rows, stride_kn, kv_head * stride_kh, ALIGN), n_valid, HEAD_DIM, BLOCK_D0,
                            BLOCK_D1, True)
        v0, v1 = _load_head(_row_ptrs(V, k_rows, stride_vn, kv_head * stride_vh, ALIGN), n_valid, HEAD_DIM, BLOCK_D0,
                            BLOCK_D1, True)
        dk0, dk1 = _zeros_head(BLOCK_N, BLOCK_D0, BLOCK_D1)
        dv0, dv1 = _zeros_head(BLOCK_N, BLOCK_D0, BLOCK_D1)
        full_pairs = tl.where(pack == 1, pairs - pairs % BLOCK_M, 0)
        # The full blocks, unmasked.
        q_base = q_start + seg0 * seg_stride
        for m0 in range(0, full_pairs, BLOCK_M):
            pair = m0 + tl.arange(0, BLOCK_M)
            dk0, dk1, dv0, dv1 = _dkdv_block(
                Q, DO, DQ, Lse, Delta, q_base + (pair // GROUP) * row_stride, _pair_heads(kv_head, pair, GROUP),
                stride_qn, stride_qh, stride_don, stride_doh, stride_dqn, stride_dqh, stride_lh, n_valid, n_valid, k0,
                k1, v0, v1, dk0, dk1, dv0, dv1, scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, ALIGN, False, DQ_MODE,
                DOT_PRECISION)
        # Then the rest, masked: a segment's tail (< BLOCK_M pairs), or a packed tile; unrolled, not a loop.
        for block in tl.static_range(GROUP):
            m0 = full_pairs + block * BLOCK_M
            if m0 < pairs:
                dk0, dk1, dv0, dv1 = _dkdv_masked_block(
                    Q, DO, DQ, Lse, Delta, m0, q_start, q_len, seg0, num_segs, seg_stride, row_stride, pack, pairs,
                    kv_head, k_seg, stride_qn, stride_qh, stride_don, stride_doh, stride_dqn, stride_dqh, stride_lh,
                    k0, k1, v0, v1, dk0, dk1, dv0, dv1, scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, BLOCK_M, GROUP, ALIGN,
                    DQ_MODE, DOT_PRECISION)
        # The store's row indices again, from a second read of the tile table (L1 hits; the compiler does not merge
        # loads, so everything derived from it is computed here): those of the prologue, held across the block loop,
        # spilled 40 B at D = 128 (128 keys, 255 registers), and the loop takes 504 instead of 561 instructions
        # per warp without them (sm_90).
        _, _, k_start, _, k_len, num_segs, seg_stride, row_stride, pack, seg0, first = _tile_of(
            KGroups, KTiles, num_groups, TILE)
        k_rows, n_valid, _ = _rows(tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N), first, k_start, k_len, seg0,
                                   num_segs, seg_stride, row_stride, pack)
        _dkdv_store(DK, DV, k_rows, n_valid, kv_head, stride_dkn, stride_dkh, stride_dvn, stride_dvh, dk0, dk1, dv0,
                    dv1, scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, ALIGN)


@triton.jit
def _dq_rows(Q, DO, Lse, Delta, q_rows, m_valid, head, stride_qn, stride_qh, stride_don, stride_doh, stride_lh,
             HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, ALIGN: tl.constexpr):
    """What a dQ program holds of its query rows in one head: q, dO, lse * log2(e) (+inf on invalid rows: p = 0)
    and delta."""
    q0, q1 = _load_head(_row_ptrs(Q, q_rows, stride_qn, head * stride_qh, ALIGN), m_valid, HEAD_DIM, BLOCK_D0,
                        BLOCK_D1, True)
    do0, do1 = _load_head(_row_ptrs(DO, q_rows, stride_don, head * stride_doh, ALIGN), m_valid, HEAD_DIM, BLOCK_D0,
                          BLOCK_D1, True)
    stats = head * stride_lh + q_rows
    lse2 = tl.load(Lse + stats, mask=m_valid, other=float("inf")) * LOG2E
    delta = tl.load(Delta + stats, mask=m_valid, other=0.0)
    return q0, q1, do0, do1, lse2, delta


@triton.jit
def _dq_block(q0, q1, do0, do1, lse2, delta, k_ptrs, v_ptrs, key_valid, mask, dq0, dq1, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """One key block of dQ: ``p = exp2(q k^T * qk_scale - lse2)``, ``dq += (p * (dO v^T - delta)) k``."""
    k0, k1 = _load_head(k_ptrs, key_valid, HEAD_DIM, BLOCK_D0, BLOCK_D1, MASKED)
    v0, v1 = _load_head(v_ptrs, key_valid, HEAD_DIM, BLOCK_D0, BLOCK_D1, MASKED)
    p = tl.exp2(_dot_nt(q0, q1, k0, k1, BLOCK_D1, DOT_PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        p = tl.where(mask, p, 0.0)
    ds = p * (_dot_nt(do0, do1, v0, v1, BLOCK_D1, DOT_PRECISION) - delta[:, None])
    return _dot_nn(ds.to(k0.dtype), k0, k1, dq0, dq1, BLOCK_D1, DOT_PRECISION)


@triton.jit
def _dq_single_rows(Q, K, V, DO, Delta, DQ, q_rows, k_rows, m_valid, head, kv_head, stride_qn, stride_qh, stride_kn,
                    stride_kh, stride_vn, stride_vh, stride_don, stride_doh, stride_dqn, stride_dqh, stride_lh, scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, ALIGN: tl.constexpr):
    """Single-row segments of one head: ds = dO.v - delta, dq = scale ds k."""
    do0, do1 = _load_head(_row_ptrs(DO, q_rows, stride_don, head * stride_doh, ALIGN), m_valid, HEAD_DIM, BLOCK_D0,
                          BLOCK_D1, True)
    k0, k1 = _load_head(_row_ptrs(K, k_rows, stride_kn, kv_head * stride_kh, ALIGN), m_valid, HEAD_DIM, BLOCK_D0,
                        BLOCK_D1, True)
    v0, v1 = _load_head(_row_ptrs(V, k_rows, stride_vn, kv_head * stride_vh, ALIGN), m_valid, HEAD_DIM, BLOCK_D0,
                        BLOCK_D1, True)
    delta = tl.load(Delta + head * stride_lh + q_rows, mask=m_valid, other=0.0)
    ds = scale * (_rowdot(do0, do1, v0, v1, BLOCK_D1) - delta)
    _store_head(_row_ptrs(DQ, q_rows, stride_dqn, head * stride_dqh, ALIGN), m_valid, ds[:, None] * k0.to(tl.float32),
                ds[:, None] * k1.to(tl.float32), HEAD_DIM, BLOCK_D0, BLOCK_D1)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, QGroups, QTiles, num_groups, num_heads, heads_per_program,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dqn, stride_dqh, stride_lh,
    scale,
    HEAD_DIM: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr, ONE_BLOCK: tl.constexpr, ALIGN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_M rows (part ``program_id(2)`` of a query tile) x ``heads_per_program`` query heads (a
    loop where ONE_BLOCK, as in the forward): ``dQ = scale sum_blocks (P * (dO v^T - delta)) k``, recomputing P
    from the saved LSE; one writer per dQ element, so bitwise deterministic."""
    head0 = tl.program_id(1) * heads_per_program
    heads_end = tl.minimum(head0 + heads_per_program, num_heads)
    live, q_start, k_start, q_len, k_len, num_segs, seg_stride, row_stride, pack, seg0, first = _tile_of(
        QGroups, QTiles, num_groups, TILE)
    index = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    if (live == 0) | (first + (tl.program_id(2) * BLOCK_M) // pack >= q_len):
        return
    q_rows, m_valid, q_seg = _rows(index, first, q_start, q_len, seg0, num_segs, seg_stride, row_stride, pack)
    if (q_len == 1) & (k_len == 1):
        k_rows = k_start + q_seg * seg_stride
        for head in range(head0, heads_end):
            _dq_single_rows(Q, K, V, DO, Delta, DQ, q_rows, k_rows, m_valid, head, head // GROUP, stride_qn,
                            stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh, stride_dqn,
                            stride_dqh, stride_lh, scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, ALIGN)
        return

    qk_scale = scale * LOG2E
    k_ptrs, v_ptrs, k_step, v_step, k_seg = _key_blocks(K, V, k_start, seg_stride, row_stride, pack, seg0, 0, 0,
                                                        stride_kn, stride_vn, BLOCK_N, ALIGN)
    if ONE_BLOCK:
        key_valid, mask = _tail_mask(0, k_len, k_seg, q_seg, num_segs, pack, BLOCK_N)
        for head in tl.range(head0, heads_end):
            kv_head = head // GROUP
            q0, q1, do0, do1, lse2, delta = _dq_rows(Q, DO, Lse, Delta, q_rows, m_valid, head, stride_qn, stride_qh,
                                                     stride_don, stride_doh, stride_lh, HEAD_DIM, BLOCK_D0, BLOCK_D1,
                                                     ALIGN)
            dq0, dq1 = _zeros_head(BLOCK_M, BLOCK_D0, BLOCK_D1)
            dq0, dq1 = _dq_block(q0, q1, do0, do1, lse2, delta, k_ptrs + kv_head * stride_kh * ALIGN,
                                 v_ptrs + kv_head * stride_vh * ALIGN, key_valid, mask, dq0, dq1, qk_scale, HEAD_DIM,
                                 BLOCK_D0, BLOCK_D1, True, DOT_PRECISION)
            _store_head(_row_ptrs(DQ, q_rows, stride_dqn, head * stride_dqh, ALIGN), m_valid, dq0 * scale,
                        dq1 * scale, HEAD_DIM, BLOCK_D0, BLOCK_D1)
    else:
        head = head0
        kv_head = head // GROUP
        k_ptrs += kv_head * stride_kh * ALIGN
        v_ptrs += kv_head * stride_vh * ALIGN
        q0, q1, do0, do1, lse2, delta = _dq_rows(Q, DO, Lse, Delta, q_rows, m_valid, head, stride_qn, stride_qh,
                                                 stride_don, stride_doh, stride_lh, HEAD_DIM, BLOCK_D0, BLOCK_D1, ALIGN)
        dq0, dq1 = _zeros_head(BLOCK_M, BLOCK_D0, BLOCK_D1)
        full_frames = tl.where(pack == 1, k_len - k_len % BLOCK_N, 0)
        for n0 in range(0, full_frames, BLOCK_N):
            dq0, dq1 = _dq_block(q0, q1, do0, do1, lse2, delta, k_ptrs + n0 * k_step, v_ptrs + n0 * v_step, m_valid,
                                 m_valid, dq0, dq1, qk_scale, HEAD_DIM, BLOCK_D0, BLOCK_D1, False, DOT_PRECISION)
        if full_frames < k_len:
            key_valid, mask = _tail_mask(full_frames, k_len, k_seg, q_seg, num_segs, pack, BLOCK_N)
            dq0, dq1 = _dq_block(q0, q1, do0, do1, lse2, delta, k_ptrs + full_frames * k_step,
                                 v_ptrs + full_frames * v_step, key_valid, mask, dq0, dq1, qk_scale, HEAD_DIM,
                                 BLOCK_D0, BLOCK_D1, True, DOT_PRECISION)
        _store_head(_row_ptrs(DQ, q_rows, stride_dqn, head * stride_dqh, ALIGN), m_valid, dq0 * scale, dq1 * scale,
                    HEAD_DIM, BLOCK_D0, BLOCK_D1)
