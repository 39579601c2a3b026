"""The packed layout, a plain value type: many images and videos as one token sequence (NaViT "Patch n' Pack",
arXiv 2307.06304).

A batch of B latents, sample b of shape ``(C, T_b, H_b, W_b)`` (video) or ``(C, H_b, W_b)`` (image, T=1),
is cut into ``pt x ph x pw`` spacetime patches and concatenated, sample after sample, each in (t, h, w)
raster order, into one buffer::

    tokens: (N, C*pt*ph*pw)        N = sum_b L_b,  L_b = (T_b/pt)*(H_b/ph)*(W_b/pw)

:class:`PackedSeqs` describes where every sample and token sits; every packdit op receives it. The
functions that fill the buffer (:func:`packdit.pack`, :func:`packdit.unpack`, :func:`packdit.pack_like`)
live in :mod:`packdit.patches`, above the kernels; this module sits below them (kernels and oracles both
read the layout) and imports no op. Its metadata (segment ids, positions) is built by
:mod:`packdit.layout_positions`.

Token dropping (NaViT section 3.1): a layout may keep a subset of each sample's patches, still in raster
order; ``positions`` hold the *true* (t, h, w) of the kept tokens, so position embeddings and RoPE are
unchanged by the drop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from packdit._validate import MAX_TOKENS, check_grid, is_validated, mark_validated, validate_seqs
from packdit.layout_positions import layout_positions

__all__ = ["PackedSeqs", "PatchSize", "DropRate", "normalize_patch_size", "check_latents", "MAX_TOKENS"]

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

    ``len(seqs)`` is B. The object is frozen; ops may memoize layout-derived metadata (block
    schedules, host copies of lengths) with :meth:`cached`, so it is computed once per batch, not once
    per layer. A layout entering the public API is validated once (``packdit._validate.validate_seqs``);
    one whose tensors are written in place afterwards is validated again, its memo dropped. It is a
    registered pytree node: the tensors and ``max_seqlen`` are leaves (``max_seqlen`` becomes a SymInt
    under ``torch.compile(dynamic=True)``), ``dropped`` and ``sample_ndims`` are static.
    """

    cu_seqlens: Tensor
    max_seqlen: int
    grid: Tensor
    positions: Tensor
    segment_ids: Tensor
    dropped: bool = False
    sample_ndims: tuple[int, ...] = ()
    # not an init field: dataclasses.replace(seqs, segment_ids=...) gets an empty cache, so it is validated
    # on first use instead of inheriting "validated" and metadata memoized from the old values
    _cache: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

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
        grids = [check_grid(g, f"grids[{b}]") for b, g in enumerate(grids)]
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
            k = torch.as_tensor(k)
            fractional = k.is_floating_point() or k.is_complex() or k.dtype == torch.bool
            if k.dim() != 1 or (fractional and k.numel()):  # (torch.as_tensor([]) is float32)
                raise ValueError(f"kept[{b}]: expected a 1-D integer tensor of raster indices, got {k.dtype} of "
                                 f"shape {tuple(k.shape)}")
            k = k.to("cpu", torch.int64)
            if k.numel() and (int(k[0]) < 0 or int(k[-1]) >= n or bool((k[1:] <= k[:-1]).any())):
                raise ValueError(
                    f"kept[{b}]: expected strictly increasing raster indices in [0, {n}) for grid "
                    f"{grids[b]}, got {k.tolist()[:8]}{'...' if k.numel() > 8 else ''}"
                )
            lengths.append(k.numel())
            token_index.append(k.to(torch.int32))
            dropped |= k.numel() < n
        num_tokens = sum(lengths)
        if num_tokens > MAX_TOKENS:
            raise ValueError(f"packed batch has {num_tokens} tokens; int32 indexing allows at most {MAX_TOKENS}")
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
        mark_validated(seqs)  # consistent by construction: no device->host check needed later
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
        """The same layout on ``device``. Host metadata (lengths, grids) and the validation of a layout not
        written in place since are carried over, device caches are not."""
        moved = dataclasses.replace(
            self, **{f: getattr(self, f).to(device, non_blocking=non_blocking) for f in _TENSOR_FIELDS})
        if is_validated(self):
            moved._cache.update({k: self._cache[k] for k in _HOST_CACHE_KEYS if k in self._cache})
            mark_validated(moved)
        return moved

    def validate(self, name: str = "seqs") -> None:
        """Check the layout's consistency now, whatever ``packdit.checks`` says (memoized): see
        :func:`packdit._validate.validate_seqs`; for code (the oracles) that checks every layout it gets."""
        validate_seqs(self, name, always=True)


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


def check_latents(latents: Sequence[Tensor], patch_size: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Validate a list of latents for ``patch_size`` (pt, ph, pw); return each sample's patch grid (T, H, W).

    The one check of latents: :func:`packdit.pack`, :func:`packdit.pack_like` and the patchify kernel use it."""
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


