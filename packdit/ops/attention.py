"""``varlen_attention``: attention inside the samples of a packed batch, with factorized spacetime modes
and 3-D RoPE, in Triton.

Math (per query head h, kv head ``h // (Hq/Hk)``; ``q (Nq, Hq, D)``, ``k, v (Nk, Hk, D)``)::

    out[i] = sum_{j in keys(i)} softmax_j(scale * <R_i q_i, R_j k_j>) v_j      lse[h, i] = ln sum_j exp(...)

with ``R`` the optional 3-D rotary embedding of each token's ``(t, h, w)`` (identity without rope) and
``keys(i)`` the tokens of i's sample (``mode="full"``), of i's frame (``"spatial"``) or at i's spatial
position in every frame of its sample (``"temporal"``).

Oracle: :func:`packdit.reference.varlen_attention` after :func:`packdit.reference.rope.apply_rope_3d`.
Algorithm: FlashAttention-2 (Dao, arXiv 2307.08691): online softmax forward, LSE-recomputing backward with a
key-major dK/dV pass; packing of variable-length samples after NaViT (arXiv 2307.06304).

Pipeline, per layout and mode:

1. The schedule (:mod:`packdit.ops.attention_schedule`): group and tile tables, tile sizes. Built on the host
   from the layout's host metadata (``seqs.seqlens``, ``seqs.grids``) and cached on the
   :class:`~packdit.layout.PackedSeqs`, so a model builds it once per batch and reads nothing back from the
   device. Plain ``cu_seqlens`` without ``seqs``: one device->host copy with value checks, or, inside
   ``packdit.checks(False)``, device ops only. Under ``torch.compile`` it is the opaque op
   ``packdit::attention_schedule`` (data-dependent sizes), which AOTAutograd's CSE builds once per step.
2. RoPE, if any: q and k are rotated once by :func:`packdit.ops.qk_norm_rope.qk_norm_rope` (the attention
   loops never see it; ``PackedAttention`` fuses the rotation into its QK-norm).
3. ``packdit::varlen_attention_fwd``: the forward kernel, grid ``(query tiles, Hq / heads per program, parts)``.
4. ``packdit::varlen_attention_bwd``: delta kernel, then the key-major dK/dV kernel, grid
   ``(key tiles, Hk / heads per program, parts)``, with dQ (_dq_mode) added once in q's dtype inside it where
   each key segment lies within one of its programs (temporal tiles), else accumulated in fp32 atomics inside
   it, else computed by the dQ kernel, grid ``(query tiles, Hq / heads per program, parts)`` (bitwise
   reproducible, as the single adds are). The dQ kernel runs there when ``packdit.use_deterministic(True)`` or
   ``torch.use_deterministic_algorithms(True)`` is on, and where atomics would halve the dK/dV program's key
   tile (_dq_by_atomics, bf16/fp16: head dims 97-128 without GQA, up to 128 with it). A program takes one head,
   or up to _ONE_BLOCK_HEADS in a loop where every tile is one block (_head_split). ``parts`` is 1 unless a
   tile's rows would take more shared memory than fits (wide fp32 heads, see _FWD_TILE_BYTES and
   _BWD_TILE_BYTES), or the forward's autotuner runs a 128-row tile as two 64-row programs (fwd_configs).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
from torch import Tensor

from packdit._validate import checks_enabled, validate_cu_seqlens, validate_seqs
from packdit.determinism import deterministic_enabled
from packdit.layout import PackedSeqs
from packdit.ops import _triton_utils as tu
from packdit.ops import attention_schedule as sched
from packdit.ops.attention_schedule import MODES, AttentionSchedule
from packdit.ops.qk_norm_rope import qk_norm_rope
from packdit.rope import RoPE3D

__all__ = ["varlen_attention", "MODES"]

_MAX_HEAD_DIM = 256
# fp32 inputs multiply in full fp32: tf32 (10-bit mantissa) errors are ~1e3x fp32 torch's, far outside the
# 2x rule; fp16/bf16 dots ignore the setting.
_DOT_PRECISION = "ieee"
# The forward program's query rows (rows x head columns x element size) are capped at 64 KB: an fp32 query tile
# of 128 x 256 (D = 256) leaves no autotuning configuration within an A100's 163 KiB. A schedule tile with more
# rows runs as several programs (grid axis 2); bf16 / fp16 tiles are split only where the autotuner picks 64-row
# programs for a 128-row tile (fwd_configs).
_FWD_TILE_BYTES = 64 * 1024
# The dK/dV program keeps its key tile's K and V rows, the dQ program its query tile's Q and dO rows, next to the
# pipelined inner blocks. Capping each at 32 KB (rows x head columns x element size) and pipelining wider rows
# less deep (_bwd_num_stages) keeps both kernels within an A100's 163 KiB per block: the dK/dV kernel on a bf16
# tile of 128 x 256 (D = 256) needs 296 KB at 3 stages, more than an H100's 227 KiB.
_BWD_TILE_BYTES = 32 * 1024
# Most heads per program of one-block launches (temporal tiles: one masked 64-key block per tile and head). With
# one head per program they were latency-bound: on an H200 ~9.6 us per (tile, head) program, ~0.7 TB/s, as table
# lookups, loads, two matmuls and stores ran one after the other. Looping over heads, the pipeliner keeps the next
# heads' q, k, v loads (cp.async) in flight during this head's matmuls, and the program's fixed part (tile lookups,
# row indices, masks) is paid once per 8 heads: compiled for sm_90 (bf16, D = 72, 3 stages), 656 static
# instructions in the head loop and 1,431 outside it, where the one-head kernel had 2,354 in all.
_ONE_BLOCK_HEADS = 8
# Shared memory the stages of a backward head loop may take (see _head_loop_stages). Compiled for sm_90 (bf16, 64
# rows, atomic dQ), the dK/dV program held 17-33 KiB beside them: 160.5 KiB at D = 128 with 2 stages of 64 KiB,
# within an A100's 163 KiB per block (3 stages: 225 KiB); 145 KiB at D = 72 with 3 of 40 KiB.
_ONE_BLOCK_STAGED_BYTES = 128 * 1024
# Inner blocks of the backward: the dK/dV program streams 64-row query blocks (the N dimension of its
# key-major wgmmas), the dQ program 64-key blocks. 64 = PACK_ROWS, so a packed tile's rows fit one block.
_BWD_INNER = sched.PACK_ROWS


# ---------------------------------------------------------------------------------------------- launch shapes
def _head_blocks(head_dim: int) -> tuple[int, int]:
    """``(BLOCK_D0, BLOCK_D1)`` column chunks of a head: the largest power of two <= D (>= 16, ``tl.dot``'s
    minimum K), plus the next power of two >= the rest when that is narrower than doubling the first; else one
    chunk of ``next_power_of_2(D)``. 72 -> (64, 16): 80 columns, 11% padded MMA work instead of 78% at 128;
    96 -> (64, 32); 64, 128 -> one chunk; 120 -> (128, 0)."""
    padded = max(16, triton.next_power_of_2(head_dim))
    first = padded if padded == head_dim or head_dim < 16 else padded // 2
    rest = head_dim - first
    second = max(16, triton.next_power_of_2(rest)) if rest > 0 else 0
    return (first, second) if first + second < padded else (padded, 0)


def _head_columns(head_dim: int) -> int:
    return sum(_head_blocks(head_dim))


def _rows_within(block: int, tile_bytes: int, head_dim: int, itemsize: int) -> int:
    """The most rows of a ``block``-row tile, a power of two (``tl.arange``'s rule), whose head columns take at
    most ``tile_bytes``: fp32 at D = 72 (80 columns) gets 64 rows of a 32 KB budget, not 102."""
    fitting = tile_bytes // (_head_columns(head_dim) * itemsize)
    return min(block, 1 << (fitting.bit_length() - 1))


def _fwd_rows(block: int, head_dim: int, itemsize: int) -> int:
    """Rows of a ``block``-row schedule tile that one forward program takes (see _FWD_TILE_BYTES)."""
    return _rows_within(block, _FWD_TILE_BYTES, head_dim, itemsize)


def _bwd_rows(block: int, head_dim: int, itemsize: int) -> int:
    """Rows of a ``block``-row schedule tile that one dK/dV or dQ program takes (see _BWD_TILE_BYTES)."""
    return _rows_within(block, _BWD_TILE_BYTES, head_dim, itemsize)


def _dkdv_rows(block: int, head_dim: int, itemsize: int, group: int, atomic_dq: bool) -> int:
    """Key rows of one dK/dV program (``atomic_dq``: it computes dQ too, atomic or stored): 128 where dK, dV (fp32
    registers) and the (keys x 64 query rows) scores fit, else 64 up to 128 head columns, else 32. Compiled for
    sm_90 (bf16, 8 warps, 3 stages), 128 keys fit

    * with atomic dQ (its ds^T k product and fp32 atomics take registers too): up to 96 columns without GQA
      (251 registers at D = 72). At D = 128 they spill 16 B, reloaded inside the loop, in 193 KiB of shared
      memory; with 2 query heads per kv head 56 B at D = 72 and 64 B at D = 80, reloaded inside the loop (at
      D = 64 they do not spill, issue/MMA 0.93 with GQA 2 against 0.81 without);
    * without: up to 128 columns (255 registers at D = 128, no spill; with 2-4 query heads per kv head issue/MMA
      0.53-0.62 against 1.01 for 64 keys with atomic dQ and GQA 3, and no spill but 8 B with 2, in the masked
      tail block, outside the loop)."""
    if atomic_dq:
        widest = 96 if group == 1 else 0
    else:
        widest = 128
    columns = _head_columns(head_dim)
    rows = 128 if columns <= widest else 64 if columns <= 128 else 32
    return min(_bwd_rows(block, head_dim, itemsize), rows)


def _dq_by_atomics(block: int, head_dim: int, itemsize: int, group: int) -> bool:
    """Whether the default backward adds dQ by fp32 atomics inside the dK/dV programs: only where that keeps their
    key tile (_dkdv_rows). Every dQ element takes one atomic add per key tile, so halving the tile doubles that
    traffic; the dQ kernel instead recomputes the scores (7 matmuls per query-key block instead of 5, no atomics).

    Measured on an H200 (bf16, 49k-token video packs, benchmarks/results/nvidia-h200), with atomics: the backward
    took 35.5 ms at D = 128 (64-key tiles), 23.7 and 30.6 ms at D = 64 and 72 (128-key tiles) for the same FLOPs;
    FlexAttention, which computes dQ in separate programs, took 22.5 ms at D = 128. Compiled for sm_90 at D = 128,
    the 128-key dK/dV loop issues 0.49 instructions per MMA clock (64 keys with atomics: 0.80), the dQ loop 0.37."""
    return _dkdv_rows(block, head_dim, itemsize, group, True) == _dkdv_rows(block, head_dim, itemsize, group, False)


def _dq_mode(block_kt: int, max_k_len: int, keys_uncovered: bool, head_dim: int, itemsize: int, group: int,
             deterministic: bool) -> str:
    """How the backward computes dQ (the dK/dV kernel's DQ_MODE):

    * "single" where every key segment lies within one dK/dV program (``max_k_len`` <= the key tile, which one
      program takes whole; only on host-built schedules, whose lengths are exact: ``keys_uncovered`` False): that
      program holds every contribution to its query rows' dQ and adds it, once, to a zeroed dQ in q's dtype. Per
      bf16 dQ element that is 2 bytes zeroed and a 4-byte reduction instead of 4 zeroed, an 8-byte fp32
      reduction and a 6-byte conversion pass; deterministic (one add to zero). Temporal tiles, short images,
      text keys of at most a key tile.
    * "atomic" where deterministic mode is off and fp32 atomic adds keep the dK/dV key tile (_dq_by_atomics).
    * "separate": the dQ kernel."""
    if not keys_uncovered and max_k_len <= block_kt == _dkdv_rows(block_kt, head_dim, itemsize, group, True):
        return "single"
    if not deterministic and _dq_by_atomics(block_kt, head_dim, itemsize, group):
        return "atomic"
    return "separate"


def _head_split(num_heads: int, max_inner_len: int, head_stages: int = 1) -> tuple[bool, int]:
    """``(ONE_BLOCK, heads per program)`` of a launch over ``num_heads`` heads whose programs stream segments of at
    most ``max_inner_len`` rows (keys for the forward and dQ, queries for dK/dV): where every tile's inner rows fit
    one block (<= PACK_ROWS) and a head's tiles fit the pipeline (``head_stages`` > 0, see _head_loop_stages), at
    most _ONE_BLOCK_HEADS heads per program, split evenly over the fewest programs (16 -> 8 + 8, 9 -> 5 + 4,
    24 -> 3 x 8); else one head."""
    if max_inner_len > sched.PACK_ROWS or head_stages < 1:
        return False, 1
    return True, triton.cdiv(num_heads, triton.cdiv(num_heads, _ONE_BLOCK_HEADS))


def _bwd_num_warps(rows: int, head_dim: int) -> int:
    """Warps of the dQ programs on a GPU: one warpgroup (wgmma's M = 64) per 64 tile rows, and two from 128 head
    columns up (the second halves each thread's share of the fp32 accumulator)."""
    return 8 if rows >= 128 or _head_columns(head_dim) >= 128 else 4


def _dkdv_num_warps(rows: int) -> int:
    """Warps of the dK/dV programs on a GPU: 8 from 64 key rows up (at 4 warps, 64 keys x 80 columns with atomic
    dQ spill 48 B; 8 warps split the fp32 dK/dV accumulators over twice the threads)."""
    return 8 if rows >= 64 else 4


def _bwd_num_stages(head_dim: int, itemsize: int) -> int:
    """Pipeline depth of the backward kernels' inner 64-row blocks on a GPU: 3 up to 256-byte rows, 2 up to 256
    bf16 columns, 1 beyond (a dK/dV program at D = 256 holds 64 KB of K and V rows beside 64 KB per stage)."""
    row_bytes = _head_columns(head_dim) * itemsize
    return 3 if row_bytes <= 256 else 2 if row_bytes < 512 else 1


def _head_loop_stages(rows: int, inner_rows: int, head_dim: int, itemsize: int) -> int:
    """Pipeline depth of a backward head loop (ONE_BLOCK), which stages every tile a head reads: two of the
    program's ``rows`` (K, V or Q, dO) and two of ``inner_rows`` (the query blocks of all GROUP heads, or one key
    block): as many stages, up to 3, as fit _ONE_BLOCK_STAGED_BYTES; 0 where one does not (the launch then takes
    one head per program: fp32 at D = 256 with GQA needed 192 KiB on sm_80 at one stage)."""
    stage_bytes = 2 * (rows + inner_rows) * _head_columns(head_dim) * itemsize
    return min(3, _ONE_BLOCK_STAGED_BYTES // stage_bytes)


def _bwd_heads(num_heads: int, max_inner_len: int, rows: int, inner_rows: int, head_dim: int,
               itemsize: int) -> tuple[bool, int, int]:
    """``(ONE_BLOCK, heads per program, stages)`` of a backward launch whose programs take ``rows`` tile rows and
    stream blocks of ``inner_rows``: a head loop (_head_split) staged by _head_loop_stages, or one head per
    program with the block loop's _bwd_num_stages."""
    head_stages = _head_loop_stages(rows, inner_rows, head_dim, itemsize)
    one_block, heads = _head_split(num_heads, max_inner_len, head_stages)
    return one_block, heads, head_stages if one_block else _bwd_num_stages(head_dim, itemsize)


def _bwd_options(warps: int, stages: int) -> dict:
    if tu.interpreting():
        return {}
    return {"num_warps": warps, "num_stages": stages}


def fwd_configs(rows: int, deterministic: bool = False) -> list:
    """The forward kernel's autotuning configurations for programs of a tile's ``rows`` query rows (_fwd_rows):
    inner key block BLOCK_N, program rows BLOCK_M, warps, stages; the first is the one the interpreter runs.
    BLOCK_N >= 64 so a packed tile's keys fit one block (attention_schedule.PACK_ROWS).

    ``deterministic``: only configurations that compute the same bits (64-key blocks, ``rows``-row programs: they
    differ in pipeline depth alone), so that runs whose autotuners time differently agree bitwise. 128-key blocks
    update each row's running max half as often, which rounds the output and lse differently.

    A 128-row tile also gets 64-row programs (two per tile, 4 warps each; grid axis 2): a 128-row program
    (8 warps, 182-255 registers at D = 72-128, sm_90 bf16) has the SM to itself, where two 64-row programs fit
    one SM (212 / 255 registers x 128 threads), so one's table reads, Q load and pipeline fill overlap the other's
    loop. That matters where segments are a few key blocks long (spatial frames of 405 and 880 tokens, which
    the H200 ran at 0.67-0.82x torch's varlen_attn in the forward); on long segments 128-row programs read K
    and V half as often. The autotuner measures which."""
    program_rows = (rows, rows // 2) if rows == 128 and not deterministic else (rows,)
    return [triton.Config({"BLOCK_N": n, "BLOCK_M": m}, num_warps=w, num_stages=s) for m in program_rows
            for n, w, s in ((64, 4, 3), (64, 4, 2), (128, 4, 2), (64, 8, 3), (64, 8, 2), (128, 8, 2), (64, 4, 1),
                            (64, 8, 1)) if n == 64 or not deterministic]


def _prune_fwd_configs(configs, named_args, **kwargs) -> list:
    """One warpgroup (4 warps) per 64 query rows (wgmma's M), two for 128; 3 stages up to 128 head columns, 2 for
    wider heads (D = 256 at 3 stages needs 256 KB of shared memory); 128-key blocks only where scores and
    accumulator fit the registers: compiled for sm_90 (bf16), 128 x 128 scores spill beside a 128-column
    accumulator (104 B at 8 warps), 64 x 128 beside 80 columns (72 B at 4 warps); 128 x 128 beside 80 columns
    takes 255 registers without spilling.

    Where every tile's keys fit one 64-key block (ONE_BLOCK: temporal tiles, short segments) the pipelined loop is
    the one over the program's heads (see _head_split), and its depth trades prefetched heads for programs per SM:
    compiled for sm_90 (bf16, 64 rows, D = 128), 3 stages take 152 KiB (one program per SM), 2 stages 104 KiB
    (two), 1 stage 48 KiB without prefetch. All three compete there (1 stage on tiles of >= 64 rows: a 32-row tile
    at D = 72 spills 16 B), with 64-key blocks only (a packed tile's keys are at most PACK_ROWS = 64: a 128-key
    block would compute twice the masked scores)."""
    columns = kwargs["BLOCK_D0"] + kwargs["BLOCK_D1"]

    def keep(config):
        rows = config.kwargs["BLOCK_M"]
        warps = 8 if rows >= 128 else 4
        if config.num_warps != warps:
            return False
        if kwargs["ONE_BLOCK"]:
            return (config.kwargs["BLOCK_N"] == 64 and (config.num_stages < 3 or columns <= 128)
                    and (config.num_stages > 1 or rows >= 64))
        if config.num_stages == 1:
            return False
        if config.kwargs["BLOCK_N"] == 128:
            return columns <= (96 if warps == 8 else 64)
        return config.num_stages == (3 if columns <= 128 else 2)

    return [c for c in configs if keep(c)]


@functools.cache
def _fwd_kernel(rows: int, deterministic: bool):
    """The forward kernel for tiles whose programs take at most ``rows`` query rows (_fwd_rows), autotuned on a GPU
    among ``fwd_configs(rows, deterministic)`` (one configuration under the interpreter)."""
    from packdit.ops import _attention_kernels

    return triton.autotune(tu.autotune_configs(fwd_configs(rows, deterministic)),
                           key=["HEAD_DIM", "TILE", "max_len_bucket"],
                           prune_configs_by={"early_config_prune": _prune_fwd_configs})(
        _attention_kernels.attention_fwd_kernel)


@functools.cache
def _kernels():
    """The Triton kernels, imported on first launch."""
    from packdit.ops import _attention_kernels

    return _attention_kernels


# ---------------------------------------------------------------------------------------------- schedule
def _host_lengths(name: str, cu_seqlens: Tensor, num_tokens: int, max_seqlen: int) -> list[int]:
    """Segment lengths from one device->host copy of ``cu_seqlens``, value-checked."""
    host = validate_cu_seqlens(cu_seqlens, num_tokens, name)
    lengths = [end - start for start, end in zip(host, host[1:])]
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{name}: a segment has {max(lengths)} tokens, more than max_seqlen={max_seqlen}")
    return lengths


def _copied_schedule(cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, grid: Optional[Tensor], num_q: int, num_k: int,
                     max_seqlen_q: int, max_seqlen_k: int, mode: str, self_attention: bool) -> AttentionSchedule:
    """The schedule of device layout tensors: one device->host copy, with the value checks."""
    q_lens = _host_lengths("cu_seqlens_q", cu_seqlens_q, num_q, max_seqlen_q)
    k_lens = None if self_attention else _host_lengths("cu_seqlens_k", cu_seqlens_k, num_k, max_seqlen_k)
    grids = None if grid is None else grid.tolist()
    if grids is not None:
        bad = next((b for b, ((t, h, w), n) in enumerate(zip(grids, q_lens)) if t * h * w != n), None)
        if bad is not None:
            raise ValueError(f"seqs: mode={mode!r} needs every token of a sample's grid; sample {bad} has "
                             f"{q_lens[bad]} tokens for grid {grids[bad]} (tokens were dropped)")
    return sched.host_schedule(mode, q_lens, k_lens, grids, num_k, cu_seqlens_q.device)


@torch.library.custom_op("packdit::attention_schedule", mutates_args=())
def attention_schedule(
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, grid: Optional[Tensor], num_q: int, num_k: int, max_seqlen_q: int,
    max_seqlen_k: int, mode: str, self_attention: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, int, int, int, int, int]:
    """:class:`AttentionSchedule` fields of device layout tensors (for compiled graphs, where the layout's host
    metadata is not traced): one device->host copy per compiled step."""
    schedule = _copied_schedule(cu_seqlens_q, cu_seqlens_k, grid, num_q, num_k, max_seqlen_q, max_seqlen_k, mode,
                                self_attention)
    *tensors, block_m, block_kt, max_q_len, max_k_len, uncovered = schedule.as_tuple()
    return (*tensors, block_m, block_kt, max_q_len, max_k_len, int(uncovered))


@attention_schedule.register_fake
def _(cu_seqlens_q, cu_seqlens_k, grid, num_q, num_k, max_seqlen_q, max_seqlen_k, mode, self_attention):
    ctx = torch.library.get_ctx()
    fields = len(sched.GROUP_FIELDS)
    tensors = [cu_seqlens_q.new_empty(shape) for shape in ((fields, ctx.new_dynamic_size()), (ctx.new_dynamic_size(),),
                                                           (fields, ctx.new_dynamic_size()), (ctx.new_dynamic_size(),))]
    return (*tensors, *(ctx.new_dynamic_size() for _ in range(5)))


def _schedule(q: Tensor, k: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
              mode: str, seqs: Optional[PackedSeqs], self_attention: bool) -> tuple:
    """``(q_groups, q_tiles, k_groups, k_tiles, [block_m, block_kt, max_q_len, max_k_len, keys_uncovered])``."""
    num_q, num_k = q.shape[0], k.shape[0]
    grid = seqs.grid if mode != "full" else None
    if torch.compiler.is_compiling():
        *tensors, block_m, block_kt, max_q_len, max_k_len, uncovered = attention_schedule(
            cu_seqlens_q, cu_seqlens_k, grid, num_q, num_k, max_seqlen_q, max_seqlen_k, mode, self_attention)
        return (*tensors, [block_m, block_kt, max_q_len, max_k_len, uncovered])

    def copied():
        return _copied_schedule(cu_seqlens_q, cu_seqlens_k, grid, num_q, num_k, max_seqlen_q, max_seqlen_k, mode,
                                self_attention)

    if seqs is not None and self_attention:
        if seqs.max_seqlen > max_seqlen_q:
            raise ValueError(f"max_seqlen_q: a segment has {seqs.max_seqlen} tokens, more than "
                             f"max_seqlen={max_seqlen_q}")
        schedule = seqs.cached(("attention_schedule", mode), lambda: sched.host_schedule(
            mode, seqs.seqlens, None, seqs.grids if mode != "full" else None, num_k, q.device))
    elif not checks_enabled():
        schedule = sched.device_schedule(cu_seqlens_q, cu_seqlens_k, num_q, num_k, max_seqlen_q, max_seqlen_k)
    elif seqs is not None:  # cross-attention: the key lengths are device values; once per layout and key packing
        schedule = seqs.cached(("attention_schedule", mode, cu_seqlens_k), copied)
    else:
        schedule = copied()
    *tensors, block_m, block_kt, max_q_len, max_k_len, uncovered = schedule.as_tuple()
    return (*tensors, [block_m, block_kt, max_q_len, max_k_len, int(uncovered)])


# ---------------------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("packdit::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, q_groups: Tensor, q_tiles: Tensor, k_groups: Tensor, k_tiles: Tensor,
    sizes: list[int], scale: float, deterministic: bool,
) -> tuple[Tensor, Tensor]:
    """``(out (Nq, Hq, D) q.dtype, lse (Hq, Nq) fp32)``; the key-side tables are carried for the backward.
    ``sizes``: ``[block_m, block_kt, max_q_len, max_k_len, keys_uncovered]`` of the schedule; ``deterministic``:
    autotune among configurations that compute the same bits only (fwd_configs)."""
    tu.require_triton("varlen_attention", q)
    num_q, num_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_heads, num_q, dtype=torch.float32, device=q.device)
    block_m, _, _, max_k_len, _ = sizes
    if q_tiles.shape[0] == 0:
        lse.fill_(-float("inf"))
        return out.zero_(), lse
    block_d0, block_d1 = _head_blocks(head_dim)
    align = tu.stride_alignment(q.element_size(), q, k, v, out)
    one_block, heads = _head_split(num_heads, max_k_len)

    def grid(meta):
        return q_tiles.shape[0], triton.cdiv(num_heads, heads), block_m // meta["BLOCK_M"]

    _fwd_kernel(_fwd_rows(block_m, head_dim, q.element_size()), deterministic)[grid](
        q, k, v, out, lse, q_groups, q_tiles, q_groups.shape[1], num_heads, heads,
        *tu.unit_strides(align, q, k, v, out), lse.stride(0), scale, triton.next_power_of_2(max_k_len),
        HEAD_DIM=head_dim, BLOCK_D0=block_d0, BLOCK_D1=block_d1, TILE=block_m,
        GROUP=num_heads // k.shape[1], ONE_BLOCK=one_block, ALIGN=align, DOT_PRECISION=_DOT_PRECISION,
    )
    return out, lse


@varlen_attention_fwd.register_fake
def _(q, k, v, q_groups, q_tiles, k_groups, k_tiles, sizes, scale, deterministic):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        (q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("packdit::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(
    grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    q_groups: Tensor, q_tiles: Tensor, k_groups: Tensor, k_tiles: Tensor, sizes: list[int], scale: float,
    deterministic: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of :func:`varlen_attention_fwd` given ``grad_out`` (and ``grad_lse``, may be None)."""
    tu.require_triton("varlen_attention", q)
    num_q, num_heads, head_dim = q.shape
    kv_heads = k.shape[1]
    block_m, block_kt, max_q_len, max_k_len, keys_uncovered = sizes
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    kernels = _kernels()
    itemsize = q.element_size()
    block_d0, block_d1 = _head_blocks(head_dim)

    delta = torch.empty_like(lse)
    has_grad_lse = grad_lse is not None
    grad_lse = grad_lse.contiguous() if has_grad_lse else lse
    align = tu.stride_alignment(itemsize, out, grad_out)
    delta_rows = 64
    kernels.attention_bwd_delta_kernel[(triton.cdiv(num_q, delta_rows), num_heads)](
        out, grad_out, delta, grad_lse, num_q, *tu.unit_strides(align, out, grad_out), lse.stride(0), HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_R=delta_rows, HAS_GRAD_LSE=has_grad_lse,
        ALIGN=align,
    )

    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if keys_uncovered:
        dk.zero_()
        dv.zero_()
    group = num_heads // kv_heads
    dq_mode = _dq_mode(block_kt, max_k_len, bool(keys_uncovered), head_dim, itemsize, group, deterministic)
    if dq_mode == "single" and itemsize < 4 and tu.interpreting():
        dq_mode = "atomic"  # the Triton interpreter (numpy) has no bf16 / fp16 atomic adds
    if dq_mode == "atomic":
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    elif dq_mode == "single":  # the dK/dV programs add to it, once per element (rows without keys: none)
        dq = torch.zeros_like(q, memory_format=torch.contiguous_format)
    else:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    inputs = (q, k, v, grad_out)
    align = tu.stride_alignment(itemsize, *inputs, dq, dk, dv)
    shared = dict(HEAD_DIM=head_dim, BLOCK_D0=block_d0, BLOCK_D1=block_d1, GROUP=group, ALIGN=align,
                  DOT_PRECISION=_DOT_PRECISION)
    if k_tiles.shape[0]:
        key_rows = _dkdv_rows(block_kt, head_dim, itemsize, group, dq_mode != "separate")
        one_block, heads, stages = _bwd_heads(kv_heads, max_q_len, key_rows, group * _BWD_INNER, head_dim, itemsize)
        kernels.attention_bwd_dkdv_kernel[(k_tiles.shape[0], triton.cdiv(kv_heads, heads), block_kt // key_rows)](
            *inputs, lse, delta, dq, dk, dv, k_groups, k_tiles, k_groups.shape[1], kv_heads, heads,
            *tu.unit_strides(align, *inputs, dq, dk, dv), lse.stride(0), scale, TILE=block_kt, BLOCK_M=_BWD_INNER,
            BLOCK_N=key_rows, ONE_BLOCK=one_block, DQ_MODE=dq_mode, **shared,
            **_bwd_options(_dkdv_num_warps(key_rows), stages),
        )
    if dq_mode == "atomic":
        return dq.to(q.dtype), dk, dv
    if dq_mode == "single":
        return dq, dk, dv
    if q_tiles.shape[0]:
        query_rows = _bwd_rows(block_m, head_dim, itemsize)
        one_block, heads, stages = _bwd_heads(num_heads, max_k_len, query_rows, _BWD_INNER, head_dim, itemsize)
        kernels.attention_bwd_dq_kernel[(q_tiles.shape[0], triton.cdiv(num_heads, heads), block_m // query_rows)](
            *inputs, lse, delta, dq, q_groups, q_tiles, q_groups.shape[1], num_heads, heads,
            *tu.unit_strides(align, *inputs, dq), lse.stride(0), scale, TILE=block_m, BLOCK_M=query_rows,
            BLOCK_N=_BWD_INNER, ONE_BLOCK=one_block, **shared,
            **_bwd_options(_bwd_num_warps(query_rows, head_dim), stages),
        )
    else:
        dq.zero_()
    return dq, dk, dv


@varlen_attention_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, q_groups, q_tiles, k_groups, k_tiles, sizes, scale, deterministic):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, q_groups, q_tiles, k_groups, k_tiles, sizes, scale, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_groups, q_tiles, k_groups, k_tiles)
    ctx.sizes, ctx.scale = sizes, scale
    # An unused output's gradient arrives as None, not as zeros: a model that ignores lse gets the delta kernel
    # without the dlse read (HAS_GRAD_LSE=False) and no (Hq, Nq) zero tensor.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, q_groups, q_tiles, k_groups, k_tiles = ctx.saved_tensors
    if grad_out is None:  # only lse is used
        grad_out = torch.zeros_like(out)
    dq, dk, dv = varlen_attention_bwd(grad_out, grad_lse, q, k, v, out, lse, q_groups, q_tiles, k_groups, k_tiles,
                                      ctx.sizes, ctx.scale, deterministic_enabled())
    return dq, dk, dv, None, None, None, None, None, None, None


varlen_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------- functional
def _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, mode, seqs, rope):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name}: expected a (tokens, heads, head_dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
        if t.dtype not in tu.FLOAT_DTYPES:
            raise ValueError(f"{name}: expected float16, bfloat16 or float32, got {t.dtype}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name}: expected {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last (head_dim) dimension must be contiguous, got strides {t.stride()}")
    head_dim = q.shape[-1]
    if head_dim % 8 or not 8 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim {head_dim} unsupported; expected a multiple of 8 up to {_MAX_HEAD_DIM}")
    if k.shape[-1] != head_dim or v.shape != k.shape:
        raise ValueError(f"k, v: expected (Nk, Hk, {head_dim}) each, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k: query heads {q.shape[1]} are not divisible by key/value heads {k.shape[1]}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if cu is None:
            continue
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name}: expected a (B+1,) int32 tensor, got {cu.dtype} of shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name}: expected a tensor on {q.device} like q, got {cu.device}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if cu_seqlens_k is None:
        if k.shape[0] != q.shape[0]:
            raise ValueError(f"k: self-attention needs as many key as query tokens, got {k.shape[0]} vs {q.shape[0]}")
    else:
        if cu_seqlens_k.shape != cu_seqlens_q.shape:
            raise ValueError(f"cu_seqlens_k: expected {cu_seqlens_q.shape[0] - 1} segments like cu_seqlens_q, "
                             f"got {cu_seqlens_k.shape[0] - 1}")
        if mode != "full":
            raise ValueError(f"mode: {mode!r} is self-attention only; cross-attention (cu_seqlens_k) needs 'full'")
        if rope is not None:
            raise ValueError("rope: applies to self-attention only; got cu_seqlens_k (cross-attention)")
    if (mode != "full" or rope is not None) and seqs is None:
        raise ValueError(f"seqs: mode={mode!r}{' and rope' if rope is not None else ''} need the PackedSeqs "
                         "layout (grid and positions)")
    if seqs is not None:
        if not isinstance(seqs, PackedSeqs):
            raise ValueError(f"seqs: expected a packdit.PackedSeqs, got {type(seqs).__name__}")
        if seqs.cu_seqlens.shape != cu_seqlens_q.shape or seqs.positions.shape[0] != q.shape[0]:
            raise ValueError(f"seqs: layout of {len(seqs)} samples / {seqs.positions.shape[0]} tokens does not "
                             f"match cu_seqlens_q ({cu_seqlens_q.shape[0] - 1} samples) and q ({q.shape[0]} tokens)")
        if mode != "full" and seqs.dropped:
            raise ValueError(f"seqs: mode={mode!r} needs a layout without dropped tokens (pack without drop_rate)")
    if rope is not None:
        if not isinstance(rope, RoPE3D):
            raise ValueError(f"rope: expected a packdit.RoPE3D, got {type(rope).__name__}")
        rope.check_head_dim(head_dim)


def _check_layout(seqs: PackedSeqs, cu_seqlens_q: Tensor) -> None:
    """With checks on, once per layout object: ``seqs`` is consistent (:func:`packdit.validate_seqs`,
    memoized) and describes ``cu_seqlens_q``."""
    if not checks_enabled() or torch.compiler.is_compiling():
        return
    validate_seqs(seqs)
    if cu_seqlens_q is not seqs.cu_seqlens and not torch.equal(cu_seqlens_q, seqs.cu_seqlens):
        raise ValueError("cu_seqlens_q: differs from seqs.cu_seqlens; pass the layout's own offsets")


def varlen_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    max_seqlen_q: int,
    cu_seqlens_k: Tensor | None = None,
    max_seqlen_k: int | None = None,
    *,
    scale: float | None = None,
    mode: str = "full",
    seqs: PackedSeqs | None = None,
    rope: RoPE3D | None = None,
    return_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention inside each packed segment; ``out (Nq, Hq, D)`` [and ``lse (Hq, Nq)`` fp32, natural log].

    Args:
        q: ``(Nq, Hq, D)``; k, v: ``(Nk, Hk, D)``, ``Hq % Hk == 0``; fp16/bf16/fp32, D a multiple of 8 <= 256,
            last dim contiguous (other strides free: views of a fused qkv projection need no copy).
        cu_seqlens_q: ``(B+1,)`` int32 query offsets; ``max_seqlen_q`` a host int >= the longest segment.
        cu_seqlens_k, max_seqlen_k: key offsets for cross-attention (a different packing of B segments);
            None for self-attention.
        scale: softmax scale, default ``D ** -0.5``.
        mode: "full" (whole sample), "spatial" (own frame), "temporal" (own (h, w) across frames); the
            factorized modes need ``seqs`` without dropped tokens.
        seqs: the query layout (``seqs.cu_seqlens`` must be ``cu_seqlens_q``); needed for mode != "full" and
            rope; its host metadata makes the schedule free of device->host copies and cached per layout.
        rope: :class:`RoPE3D` applied to q and k from ``seqs.positions`` (self-attention only).
        return_lse: also return the log-sum-exp (differentiable).

    Empty segments produce nothing; a query segment with an empty key segment gives zeros and lse = -inf.
    Argument metadata (dtypes, shapes, devices, strides) is checked on every call at no device cost. Value
    checks run while :func:`packdit.checks` is on: once per ``seqs`` object (``packdit.validate_seqs``,
    memoized) and on every call for plain ``cu_seqlens`` (one device->host copy: monotone, last entry = N,
    ``max_seqlen`` large enough, no dropped tokens for the factorized modes). Inside ``packdit.checks(False)``
    nothing is read back from the device.

    Equivalent PyTorch: ``packdit.reference.varlen_attention`` (after ``apply_rope_3d`` of q and k).
    """
    _check_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, mode, seqs, rope)
    if seqs is not None:
        _check_layout(seqs, cu_seqlens_q)
    self_attention = cu_seqlens_k is None
    cu_k = cu_seqlens_q if self_attention else cu_seqlens_k
    max_k = max_seqlen_q if self_attention else (max_seqlen_k if max_seqlen_k is not None else k.shape[0])
    *tables, sizes = _schedule(q, k, cu_seqlens_q, cu_k, max_seqlen_q, max_k, mode, seqs, self_attention)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if rope is not None:
        q = qk_norm_rope(q, None, seqs.positions, rope)
        k = qk_norm_rope(k, None, seqs.positions, rope)
    out, lse = varlen_attention_fwd(q, k, v, *tables, sizes, scale, deterministic_enabled())
    return (out, lse) if return_lse else out
