"""Triton kernels of :mod:`packdit.ops.attention`: forward, dK/dV (+ atomic dQ), deterministic dQ.

Every kernel works on *segments*: segment s attends queries rows ``q_start + i * row_stride``,
``i < q_len``, to key rows ``k_start + j * row_stride``, ``j < k_len`` (int32 table ``(S, 5)`` =
``q_start, k_start, q_len, k_len, row_stride``). A sample (mode "full"), a frame (mode "spatial",
row stride 1) and a spatial position across frames (mode "temporal", row stride H*W) are all
segments, so the factorized modes read the packed raster layout in place and never visit a key
outside the segment. A *tile table* ``(n_tiles, 2)`` = ``segment, first row`` maps program ids to
work, longest segments first; entries with segment -1 (tables sized by an upper bound) exit at once.

Head dim: loads use ``BLOCK_D = max(16, next_power_of_two(D))`` columns with the columns past D masked to
zero (``tl.arange`` and ``tl.dot`` need powers of two). D = 64/128 waste nothing; D = 72 and 96 pay
for 128 columns in the two matmuls (+78% / +33% MMA work, no extra memory traffic) -- chosen over
splitting 72 = 64 + 8 because it keeps one code path, and 8-wide dots are below the 16 minimum of
``tl.dot`` anyway (a 64 + 16 split would save 37% of the MMA work for D = 72 at twice the code).

Softmax runs in base 2: ``s2 = (q.k) * scale * log2(e)``, ``p = exp2(s2 - m)``; the stored LSE is
natural-log, ``lse = ln(sum_j exp(scale q.k_j))`` (flash-attn convention), ``-inf`` for rows with
no keys (their output is 0).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, rows, row_valid, stride_row, head_offset, cols, HEAD_DIM: tl.constexpr):
    """``(len(rows), BLOCK_D)`` tile of rows ``rows`` of one head; invalid rows / columns >= D read 0."""
    offsets = rows.to(tl.int64)[:, None] * stride_row + head_offset + cols[None, :]
    return tl.load(ptr + offsets, mask=row_valid[:, None] & (cols[None, :] < HEAD_DIM), other=0.0)


@triton.jit
def _segment(Segments, seg):
    q_start = tl.load(Segments + seg * 5 + 0)
    k_start = tl.load(Segments + seg * 5 + 1)
    q_len = tl.load(Segments + seg * 5 + 2)
    k_len = tl.load(Segments + seg * 5 + 3)
    row_stride = tl.load(Segments + seg * 5 + 4)
    return q_start, k_start, q_len, k_len, row_stride


@triton.jit
def attention_fwd_kernel(
    Q, K, V, Out, Lse, Segments, QTiles,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh, stride_lh,
    qk_scale_log2, max_len_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_M rows (part ``program_id(2)`` of a query tile) of one segment x one query head:
    online softmax over the segment's keys."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seg = tl.load(QTiles + tile * 2)
    if seg < 0:  # surplus entry of a tile table sized by an upper bound
        return
    first = tl.load(QTiles + tile * 2 + 1) + tl.program_id(2) * BLOCK_M
    q_start, k_start, q_len, k_len, row_stride = _segment(Segments, seg)
    if first >= q_len:  # part of a segment's last query tile past its end
        return

    cols = tl.arange(0, BLOCK_D)
    m_index = first + tl.arange(0, BLOCK_M)
    m_valid = m_index < q_len
    q_rows = q_start + m_index * row_stride
    q = _load_rows(Q, q_rows, m_valid, stride_qn, head * stride_qh, cols, HEAD_DIM)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, k_len, BLOCK_N):
        n_index = n0 + tl.arange(0, BLOCK_N)
        n_valid = n_index < k_len
        k_rows = k_start + n_index * row_stride
        k = _load_rows(K, k_rows, n_valid, stride_kn, kv_head * stride_kh, cols, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        s = tl.where(n_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V, k_rows, n_valid, stride_vn, kv_head * stride_vh, cols, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(V.dtype.element_ty), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    out_offsets = q_rows.to(tl.int64)[:, None] * stride_on + head * stride_oh + cols[None, :]
    tl.store(Out + out_offsets, out.to(Out.dtype.element_ty), mask=m_valid[:, None] & (cols[None, :] < HEAD_DIM))
    tl.store(Lse + head * stride_lh + q_rows, lse, mask=m_valid)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DK, DV, Segments, KTiles,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dqn, stride_dqh, stride_dkn, stride_dkh, stride_dvn, stride_dvh, stride_lh,
    scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_N rows (part ``program_id(2)`` of a key tile) of one segment x one kv head, looping
    over the GROUP query heads that read them and over the segment's query blocks::

        P = exp(scale q k^T - lse)   dV += P^T dO   dS = P * (dO v^T - delta)   dK += scale dS^T q
        (ATOMIC_DQ) DQ += scale dS k   with fp32 atomics

    No two programs write the same dK/dV rows, so dK/dV are deterministic; dQ is, only without ATOMIC_DQ.
    """
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seg = tl.load(KTiles + tile * 2)
    if seg < 0:  # surplus entry of a tile table sized by an upper bound
        return
    first = tl.load(KTiles + tile * 2 + 1) + tl.program_id(2) * BLOCK_N
    q_start, k_start, q_len, k_len, row_stride = _segment(Segments, seg)
    if first >= k_len:  # part of a segment's last key tile past its end
        return
    qk_scale_log2 = scale * 1.4426950408889634

    cols = tl.arange(0, BLOCK_D)
    col_valid = cols < HEAD_DIM
    n_index = first + tl.arange(0, BLOCK_N)
    n_valid = n_index < k_len
    k_rows = k_start + n_index * row_stride
    k = _load_rows(K, k_rows, n_valid, stride_kn, kv_head * stride_kh, cols, HEAD_DIM)
    v = _load_rows(V, k_rows, n_valid, stride_vn, kv_head * stride_vh, cols, HEAD_DIM)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        for m0 in range(0, q_len, BLOCK_M):
            m_index = m0 + tl.arange(0, BLOCK_M)
            m_valid = m_index < q_len
            q_rows = q_start + m_index * row_stride
            q = _load_rows(Q, q_rows, m_valid, stride_qn, head * stride_qh, cols, HEAD_DIM)
            do = _load_rows(DO, q_rows, m_valid, stride_don, head * stride_doh, cols, HEAD_DIM)
            lse = tl.load(Lse + head * stride_lh + q_rows, mask=m_valid, other=float("inf"))
            delta = tl.load(Delta + head * stride_lh + q_rows, mask=m_valid, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
            p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
            p = tl.where(n_valid[None, :], p, 0.0)
            dv += tl.dot(tl.trans(p.to(DO.dtype.element_ty)), do, input_precision=DOT_PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(Q.dtype.element_ty)), q, input_precision=DOT_PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(ds.to(K.dtype.element_ty), k, input_precision=DOT_PRECISION) * scale
                dq_offsets = q_rows.to(tl.int64)[:, None] * stride_dqn + head * stride_dqh + cols[None, :]
                tl.atomic_add(DQ + dq_offsets, dq, mask=m_valid[:, None] & col_valid[None, :])
    dk = dk * scale
    store_mask = n_valid[:, None] & col_valid[None, :]
    dk_offsets = k_rows.to(tl.int64)[:, None] * stride_dkn + kv_head * stride_dkh + cols[None, :]
    dv_offsets = k_rows.to(tl.int64)[:, None] * stride_dvn + kv_head * stride_dvh + cols[None, :]
    tl.store(DK + dk_offsets, dk.to(DK.dtype.element_ty), mask=store_mask)
    tl.store(DV + dv_offsets, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Segments, QTiles,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dqn, stride_dqh, stride_lh,
    scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One program = BLOCK_M rows (part ``program_id(2)`` of a query tile) x one query head:
    ``dQ = scale sum_blocks (P * (dO v^T - delta)) k``, recomputing P from the saved LSE; one writer per
    dQ element, so bitwise deterministic."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seg = tl.load(QTiles + tile * 2)
    if seg < 0:  # surplus entry of a tile table sized by an upper bound
        return
    first = tl.load(QTiles + tile * 2 + 1) + tl.program_id(2) * BLOCK_M
    q_start, k_start, q_len, k_len, row_stride = _segment(Segments, seg)
    if first >= q_len:  # part of a segment's last query tile past its end
        return
    qk_scale_log2 = scale * 1.4426950408889634

    cols = tl.arange(0, BLOCK_D)
    m_index = first + tl.arange(0, BLOCK_M)
    m_valid = m_index < q_len
    q_rows = q_start + m_index * row_stride
    q = _load_rows(Q, q_rows, m_valid, stride_qn, head * stride_qh, cols, HEAD_DIM)
    do = _load_rows(DO, q_rows, m_valid, stride_don, head * stride_doh, cols, HEAD_DIM)
    lse = tl.load(Lse + head * stride_lh + q_rows, mask=m_valid, other=float("inf"))
    delta = tl.load(Delta + head * stride_lh + q_rows, mask=m_valid, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, k_len, BLOCK_N):
        n_index = n0 + tl.arange(0, BLOCK_N)
        n_valid = n_index < k_len
        k_rows = k_start + n_index * row_stride
        k = _load_rows(K, k_rows, n_valid, stride_kn, kv_head * stride_kh, cols, HEAD_DIM)
        v = _load_rows(V, k_rows, n_valid, stride_vn, kv_head * stride_vh, cols, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
        p = tl.exp2(s - lse[:, None] * 1.4426950408889634)
        p = tl.where(n_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(K.dtype.element_ty), k, input_precision=DOT_PRECISION)
    dq = dq * scale
    dq_offsets = q_rows.to(tl.int64)[:, None] * stride_dqn + head * stride_dqh + cols[None, :]
    tl.store(DQ + dq_offsets, dq.to(DQ.dtype.element_ty), mask=m_valid[:, None] & (cols[None, :] < HEAD_DIM))


@triton.jit
def attention_bwd_delta_kernel(Out, DO, Delta, GradLse, num_rows, stride_on, stride_oh, stride_don, stride_doh,
                               stride_lh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                               HAS_GRAD_LSE: tl.constexpr):
    """``delta[h, n] = sum_d dO[n, h, d] * O[n, h, d] - dlse[h, n]`` (the dlse term makes lse differentiable:
    d lse / d s = P, so it shifts dS = P * (dP - delta) by +P * dlse)."""
    block = tl.program_id(0)
    head = tl.program_id(1)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    o = _load_rows(Out, rows, row_valid, stride_on, head * stride_oh, cols, HEAD_DIM).to(tl.float32)
    do = _load_rows(DO, rows, row_valid, stride_don, head * stride_doh, cols, HEAD_DIM).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_GRAD_LSE:
        delta -= tl.load(GradLse + head * stride_lh + rows, mask=row_valid, other=0.0)
    tl.store(Delta + head * stride_lh + rows, delta, mask=row_valid)
