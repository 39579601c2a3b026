"""Packed layout: many images and videos as one token sequence (NaViT "Patch n' Pack", arXiv 2307.06304).

A batch of B latents, sample b of shape ``(C, T_b, H_b, W_b)`` (video) or ``(C, H_b, W_b)`` (image, T=1),
is cut into ``pt x ph x pw`` spacetime patches and concatenated, sample after sample, each in (t, h, w)
raster order, into one buffer::

    tokens: (N, C*pt*ph*pw)        N = sum_b L_b,  L_b = (T_b/pt)*(H_b/ph)*(W_b/pw)

The vector of one patch is ordered (C, pt, ph, pw), the flattening of a ``Conv3d``/``Conv2d`` weight
``(out, C, pt, ph, pw)``, so ``tokens @ conv.weight.flatten(1).T + conv.bias`` equals the strided conv
patch embedding. :class:`PackedSeqs` describes where every sample and token sits; every packdit op
receives it.

Token dropping (NaViT section 3.1): ``pack(..., drop_rate=r)`` keeps a random subset of each sample's
patches, still in raster order, and ``positions`` hold the *true* (t, h, w) of the kept tokens, so
position embeddings and RoPE are unchanged by the drop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from packdit._validate import validate_seqs
from packdit.ops.layout_positions import layout_positions

__all__ = ["PackedSeqs", "pack", "pack_like", "unpack", "normalize_patch_size"]

_INT32_MAX = 2**31 - 1

PatchSize = Union[int, Sequence[int]]
DropRate = Union[float, Callable[[tuple[int, int, int]], float], None]


@dataclasses.dataclass(frozen=True, eq=False)
class PackedSeqs:
    """Where each sample and each token of a packed batch sits.

    Attributes:
        cu_seqlens: ``(B+1,)`` int32, device. Sample b owns tokens ``cu_seqlens[b]:cu_seqlens[b+1]``.
        max_seqlen: host int, ``max_b L_b`` (computed once on the host, never by ``.item()``).
        grid: ``(B, 3)`` int32, device. ``(T, H, W)`` of each sample in patches (before dropping).
        positions: ``(N, 3)`` int32, device. ``(t, h, w)`` of each token inside its sample's grid.
        segment_ids: ``(N,)`` int32, device. The sample each token belongs to.
        dropped: host bool, True when some tokens were dropped (``L_b < T*H*W`` for some b).
        sample_ndims: host tuple, 3 for a sample packed from an image ``(C, H, W)``, 4 for a video;
            ``unpack`` uses it to give back the input shapes.

    ``len(seqs)`` is B. The object is immutable; ops may memoize layout-derived metadata (block
    schedules, host copies of lengths) with :meth:`cached`, so it is computed once per batch, not once
    per layer. It is a registered pytree node: the tensors and ``max_seqlen`` are leaves (``max_seqlen``
    becomes a SymInt under ``torch.compile(dynamic=True)``), ``dropped`` and ``sample_ndims`` are static.
    """

    cu_seqlens: Tensor
    max_seqlen: int
    grid: Tensor
    positions: Tensor
    segment_ids: Tensor
    dropped: bool = False
    sample_ndims: tuple[int, ...] = ()
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        # The 3 of (N, 3) / (B, 3) is a constant: marking it static keeps torch.compile(dynamic=True)
        # from "duck sizing" it together with an unrelated size that happens to be 3 (e.g. B + 1 when
        # B = 2) and recompiling when that coincidence ends.
        if not torch.compiler.is_compiling():
            for t in (self.positions, self.grid):
                torch._dynamo.mark_static(t, 1)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_grids(
        cls,
        grids: Sequence[Sequence[int]],
        *,
        kept: Sequence[Tensor | None] | None = None,
        sample_ndims: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> PackedSeqs:
        """Layout of samples with patch grids ``grids[b] = (T, H, W)``.

        ``kept[b]``, when given and not None, is a 1-D integer tensor of the raster indices
        (``t*H*W + h*W + w``, strictly increasing) of the tokens of sample b that survive dropping.
        """
        grids = [tuple(int(s) for s in g) for g in grids]
        for b, g in enumerate(grids):
            if len(g) != 3 or min(g) < 0:
                raise ValueError(f"grids[{b}]: expected (T, H, W) of non-negative ints, got {g}")
        full = [g[0] * g[1] * g[2] for g in grids]
        if kept is None:
            kept = [None] * len(grids)
        if len(kept) != len(grids):
            raise ValueError(f"kept: expected {len(grids)} entries (one per sample), got {len(kept)}")
        lengths, token_index, dropped = [], [], False
        for b, (k, n) in enumerate(zip(kept, full)):
            if k is None:
                lengths.append(n)
                token_index.append(torch.arange(n, dtype=torch.int32))
                continue
            k = torch.as_tensor(k).to("cpu", torch.int64).reshape(-1)
            if k.numel() and (int(k[0]) < 0 or int(k[-1]) >= n or bool((k[1:] <= k[:-1]).any())):
                raise ValueError(
                    f"kept[{b}]: expected strictly increasing raster indices in [0, {n}) for grid "
                    f"{grids[b]}, got {k.tolist()[:8]}{'...' if k.numel() > 8 else ''}"
                )
            lengths.append(k.numel())
            token_index.append(k.to(torch.int32))
            dropped |= k.numel() < n
        num_tokens = sum(lengths)
        if num_tokens > _INT32_MAX:
            raise ValueError(f"packed batch has {num_tokens} tokens; int32 indexing allows at most {_INT32_MAX}")
        if sample_ndims is None:
            sample_ndims = (4,) * len(grids)
        sample_ndims = tuple(int(d) for d in sample_ndims)
        if len(sample_ndims) != len(grids) or any(d not in (3, 4) for d in sample_ndims):
            raise ValueError(f"sample_ndims: expected {len(grids)} entries of 3 or 4, got {sample_ndims}")

        device = torch.device(device) if device is not None else torch.device("cpu")
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        cu_seqlens = torch.tensor(cu, dtype=torch.int32, device=device)
        grid = torch.tensor(grids, dtype=torch.int32, device=device).reshape(len(grids), 3)
        index = torch.cat(token_index).to(device) if dropped else None
        segment_ids, positions = layout_positions(cu_seqlens, grid, index, num_tokens)
        seqs = cls(
            cu_seqlens=cu_seqlens,
            max_seqlen=max(lengths, default=0),
            grid=grid,
            positions=positions,
            segment_ids=segment_ids,
            dropped=dropped,
            sample_ndims=sample_ndims,
        )
        seqs._cache["seqlens"] = tuple(lengths)
        seqs._cache["grids"] = tuple(grids)
        seqs._cache["validated"] = True  # consistent by construction: no device->host check needed later
        return seqs

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return self.cu_seqlens.shape[0] - 1

    @property
    def num_tokens(self) -> int:
        return self.segment_ids.shape[0]

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` int32 device tensor of tokens per sample (after dropping)."""
        return self.cu_seqlens[1:] - self.cu_seqlens[:-1]

    @property
    def seqlens(self) -> tuple[int, ...]:
        """Host tuple of tokens per sample; one device->host copy per layout object at most."""
        return self.cached("seqlens", lambda: tuple(self.lengths.tolist()))

    @property
    def grids(self) -> tuple[tuple[int, int, int], ...]:
        """Host tuple of each sample's ``(T, H, W)`` patch grid."""
        return self.cached("grids", lambda: tuple(tuple(g) for g in self.grid.tolist()))

    def raster_index(self) -> Tensor:
        """``(N,)`` int64: each token's index ``t*H*W + h*W + w`` inside its sample's full grid."""
        g = self.grid.long()[self.segment_ids.long()]
        p = self.positions.long()
        return (p[:, 0] * g[:, 1] + p[:, 1]) * g[:, 2] + p[:, 2]

    # ------------------------------------------------------------------ caching, moves
    def cached(self, key: str, compute: Callable[[], object]):
        """Memoize ``compute()`` on this layout under ``key`` (layout-derived metadata only)."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedSeqs:
        """The same layout on ``device``. Host metadata (lengths, grids) is carried over, device caches are not."""
        moved = dataclasses.replace(
            self,
            **{f: getattr(self, f).to(device, non_blocking=non_blocking) for f in _TENSOR_FIELDS},
            _cache={k: self._cache[k] for k in _HOST_CACHE_KEYS if k in self._cache},
        )
        return moved


_TENSOR_FIELDS = ("cu_seqlens", "grid", "positions", "segment_ids")
_HOST_CACHE_KEYS = ("seqlens", "grids")


def _flatten(seqs: PackedSeqs):
    leaves = [getattr(seqs, f) for f in _TENSOR_FIELDS] + [seqs.max_seqlen]
    return leaves, (seqs.dropped, seqs.sample_ndims)


def _unflatten(leaves, context) -> PackedSeqs:
    *tensors, max_seqlen = leaves
    dropped, sample_ndims = context
    return PackedSeqs(**dict(zip(_TENSOR_FIELDS, tensors)), max_seqlen=max_seqlen, dropped=dropped,
                      sample_ndims=sample_ndims)


def _flatten_with_keys(seqs: PackedSeqs):
    leaves, context = _flatten(seqs)
    names = _TENSOR_FIELDS + ("max_seqlen",)
    return [(pytree.GetAttrKey(n), v) for n, v in zip(names, leaves)], context


pytree.register_pytree_node(
    PackedSeqs, _flatten, _unflatten, serialized_type_name="packdit.PackedSeqs",
    flatten_with_keys_fn=_flatten_with_keys,
)


# ---------------------------------------------------------------------- patch helpers
def normalize_patch_size(patch_size: PatchSize) -> tuple[int, int, int]:
    """``p`` -> ``(1, p, p)``, ``(ph, pw)`` -> ``(1, ph, pw)``, ``(pt, ph, pw)`` unchanged; all positive ints."""
    if isinstance(patch_size, int):
        patch_size = (1, patch_size, patch_size)
    patch_size = tuple(patch_size)
    if len(patch_size) == 2:
        patch_size = (1, *patch_size)
    if len(patch_size) != 3 or not all(isinstance(p, int) and p > 0 for p in patch_size):
        raise ValueError(f"patch_size: expected a positive int, (ph, pw) or (pt, ph, pw), got {patch_size}")
    return patch_size


def _check_latents(latents, patch_size) -> list[tuple[int, int, int]]:
    """Validate a list of latents; return each sample's patch grid (T, H, W)."""
    if isinstance(latents, Tensor) or not isinstance(latents, Sequence):
        raise TypeError(f"latents: expected a list of (C, T, H, W) or (C, H, W) tensors, got {type(latents).__name__}")
    if len(latents) == 0:
        raise ValueError("latents: expected at least one sample, got an empty list")
    pt, ph, pw = patch_size
    ref = latents[0]
    grids = []
    for b, x in enumerate(latents):
        if not isinstance(x, Tensor):
            raise TypeError(f"latents[{b}]: expected a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"latents[{b}]: expected a floating-point tensor, got {x.dtype}")
        if x.dim() not in (3, 4):
            raise ValueError(
                f"latents[{b}]: expected (C, H, W) image or (C, T, H, W) video, got {x.dim()}-D shape {tuple(x.shape)}"
            )
        if x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(
                f"latents[{b}]: expected dtype {ref.dtype} on {ref.device} like latents[0], got {x.dtype} on {x.device}"
            )
        if x.shape[0] != ref.shape[0]:
            raise ValueError(f"latents[{b}]: expected C={ref.shape[0]} channels like latents[0], got C={x.shape[0]}")
        c, t, h, w = x.shape if x.dim() == 4 else (x.shape[0], 1, *x.shape[1:])
        if x.dim() == 3 and pt != 1:
            raise ValueError(
                f"latents[{b}]: image (C, H, W) has T=1 frame, not divisible by temporal patch pt={pt}; "
                f"pass it as a video with {pt} frames or use pt=1"
            )
        for name, size, p in (("T", t, pt), ("H", h, ph), ("W", w, pw)):
            if size % p:
                raise ValueError(
                    f"latents[{b}]: {name}={size} is not divisible by the patch size {p} (shape {tuple(x.shape)}, "
                    f"patch_size {patch_size})"
                )
        grids.append((t // pt, h // ph, w // pw))
    return grids


def _patchify(x: Tensor, patch_size) -> Tensor:
    """(C, T, H, W) or (C, H, W) -> (T'*H'*W', C*pt*ph*pw), a view-permute (copied by the caller)."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    c, t, h, w = x.shape
    pt, ph, pw = patch_size
    x = x.reshape(c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(1, 3, 5, 0, 2, 4, 6).reshape((t // pt) * (h // ph) * (w // pw), c * pt * ph * pw)


def _drop_keep(grid, rate: float, generator) -> Tensor | None:
    n = grid[0] * grid[1] * grid[2]
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"drop_rate: expected a value in [0, 1], got {rate} for grid {grid}")
    keep = n - int(rate * n)
    if keep == n:
        return None
    return torch.randperm(n, generator=generator)[:keep].sort().values


def pack(
    latents: Sequence[Tensor],
    patch_size: PatchSize = (1, 2, 2),
    *,
    drop_rate: DropRate = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, PackedSeqs]:
    """Patchify and concatenate ``latents`` into ``(tokens (N, C*pt*ph*pw), PackedSeqs)``.

    ``drop_rate``: fraction of each sample's patches to drop (NaViT token dropping), a float or a
    callable ``grid (T, H, W) -> float`` for resolution-dependent rates; sample b keeps
    ``L_b - floor(rate * L_b)`` patches chosen with ``generator`` (CPU), in raster order.
    ``torch.cat`` of the permuted views writes each element once; the CUDA gather kernel replaces it.
    """
    patch_size = normalize_patch_size(patch_size)
    grids = _check_latents(latents, patch_size)
    num_tokens = sum(t * h * w for t, h, w in grids)
    if num_tokens > _INT32_MAX:
        raise ValueError(f"latents: {num_tokens} patches in total; int32 indexing allows at most {_INT32_MAX}")
    kept = None
    if drop_rate is not None:
        rate = drop_rate if callable(drop_rate) else (lambda g: drop_rate)
        kept = [_drop_keep(g, float(rate(g)), generator) for g in grids]
    seqs = PackedSeqs.from_grids(
        grids, kept=kept, sample_ndims=[x.dim() for x in latents], device=latents[0].device
    )
    return _gather(latents, seqs, patch_size, kept), seqs


def _gather(latents, seqs: PackedSeqs, patch_size, kept) -> Tensor:
    from packdit.ops import patchify as patchify_op

    if patchify_op.implementation(latents[0]) == "cuda":
        raster = seqs.raster_index() if seqs.dropped else None
        return patchify_op.patchify(list(latents), seqs.cu_seqlens, seqs.segment_ids, raster, list(patch_size), False)
    pieces = []
    for b, x in enumerate(latents):
        p = _patchify(x, patch_size)
        if kept is not None and kept[b] is not None:
            p = p[kept[b].to(x.device)]
        pieces.append(p)
    return torch.cat(pieces)


def _kept_raster(seqs: PackedSeqs) -> list[Tensor | None]:
    """Per sample, the raster indices of the kept tokens (None where nothing was dropped)."""
    if not seqs.dropped:
        return [None] * len(seqs)
    raster = seqs.raster_index().split(list(seqs.seqlens))
    return [None if r.numel() == t * h * w else r for r, (t, h, w) in zip(raster, seqs.grids)]


def pack_like(latents: Sequence[Tensor], seqs: PackedSeqs, patch_size: PatchSize = (1, 2, 2)) -> Tensor:
    """Pack ``latents`` (e.g. targets or noise) into exactly the layout ``seqs``, keeping the same dropped tokens.

    The loss on kept tokens of a dropped layout is ``mse(pred_tokens, pack_like(targets, seqs, p))``.
    """
    patch_size = normalize_patch_size(patch_size)
    validate_seqs(seqs)
    grids = _check_latents(latents, patch_size)
    if len(grids) != len(seqs) or tuple(grids) != seqs.grids:
        for b, (g, want) in enumerate(zip(grids, seqs.grids)):
            if g != want:
                raise ValueError(f"latents[{b}]: patch grid {g} does not match the layout's grid {want}")
        raise ValueError(f"latents: expected {len(seqs)} samples like the layout, got {len(grids)}")
    return _gather(latents, seqs, patch_size, _kept_raster(seqs))


def unpack(
    tokens: Tensor,
    seqs: PackedSeqs,
    patch_size: PatchSize = (1, 2, 2),
    *,
    channels_last: bool = False,
    fill_value: float | None = None,
) -> list[Tensor]:
    """Inverse of :func:`pack`: ``tokens (N, C*pt*ph*pw)`` -> list of ``(C, T, H, W)`` / ``(C, H, W)``.

    ``channels_last=True`` reads each token as ``(pt, ph, pw, C)``, the order of the official DiT
    final layer (``unpatchify``'s ``nhwpqc``), instead of the conv order ``(C, pt, ph, pw)``.
    A layout with dropped tokens cannot be inverted: pass ``fill_value`` to scatter the kept tokens
    into full-size outputs filled with it (to look at predictions), or compare on kept tokens with
    :func:`pack_like`.
    """
    patch_size = normalize_patch_size(patch_size)
    validate_seqs(seqs)
    pt, ph, pw = patch_size
    if tokens.dim() != 2 or tokens.shape[0] != seqs.num_tokens:
        raise ValueError(f"tokens: expected shape ({seqs.num_tokens}, C*{pt}*{ph}*{pw}), got {tuple(tokens.shape)}")
    if tokens.shape[1] % (pt * ph * pw):
        raise ValueError(f"tokens: feature size {tokens.shape[1]} is not a multiple of pt*ph*pw = {pt * ph * pw}")
    if seqs.dropped and fill_value is None:
        raise ValueError(
            "seqs: the layout has dropped tokens, so unpack cannot restore the full samples; pass fill_value= "
            "to scatter kept tokens into full-size outputs, or use pack_like() to compare on kept tokens"
        )
    sample_ndims = seqs.sample_ndims or (4,) * len(seqs)
    from packdit.ops import patchify as patchify_op

    if patchify_op.implementation(tokens) == "cuda":
        raster = seqs.raster_index() if seqs.dropped else None
        return patchify_op.unpatchify(tokens, seqs.cu_seqlens, seqs.segment_ids, raster,
                                      [g for grid in seqs.grids for g in grid], list(sample_ndims),
                                      list(patch_size), channels_last, fill_value)
    c = tokens.shape[1] // (pt * ph * pw)
    out = []
    for x, keep, (t, h, w), nd in zip(tokens.split(list(seqs.seqlens)), _kept_raster(seqs), seqs.grids,
                                      sample_ndims):
        if keep is not None:
            x = x.new_full((t * h * w, x.shape[1]), fill_value).index_copy_(0, keep.to(x.device), x)
        if channels_last:
            x = x.reshape(t, h, w, pt, ph, pw, c).permute(6, 0, 3, 1, 4, 2, 5)
        else:
            x = x.reshape(t, h, w, c, pt, ph, pw).permute(3, 0, 4, 1, 5, 2, 6)
        x = x.reshape(c, t * pt, h * ph, w * pw)
        out.append(x.squeeze(1) if nd == 3 else x)
    return out
