"""Per-sample compute cost ``cost(L) = a*L + b*L**2 + c`` of a sample of L tokens, and its calibration.

FLOP model of one DiT block on a sample of L tokens with hidden size D (forward + backward = 3x forward):
the projections and MLP cost ``2 * 12 * D**2 * L`` forward FLOPs and attention ``4 * D * L**2``, so
per block ``cost ∝ 6*D*L + L**2`` after dividing by ``12*D``: :meth:`CostModel.flops` gives
``a = 6*D, b = 1, c = 0``. Only ratios of costs matter to the planner, so the unit is arbitrary.
``c`` is a per-sample constant (conditioning, kernel launches per segment) that timings reveal.
:func:`calibrate` fits (a, b, c) by least squares to measured step times of packs.

Sequence parallelism (Ulysses). A pack of N tokens run by a group of P > 1 GPUs costs each GPU of the group
``(sum_i cost(L_i) + alltoall * N) / P``: every GPU computes 1/P of the pack (its N/P tokens through the
projections and MLP, H/P heads of the attention over all N tokens), plus its share of the all-to-alls
that move the attention inputs from sequence shards to head shards and back. Per attention layer these
are 4 all-to-alls (q, k, v in, the output back) forward and 4 backward, each of ``N * D / P`` elements
per rank, all on the critical path. At ``e`` FLOP-equivalents per element, in the unit of
:meth:`CostModel.flops` (``12 * D`` FLOPs per block, forward + backward) that is
``8 * N * D / P * e / (12 * D) = (2/3) * e * N / P``: ``alltoall = 2 * e / 3`` whatever the width D.

The default ``e`` (:data:`ALLTOALL_FLOPS_PER_ELEMENT`, about 2,160) is an estimate for H100/H200 SXM
groups inside one NVLink node, not a measurement: ~400 TFLOP/s achieved bf16 dense compute (about 40% of
the 989 TFLOP/s peak, a typical DiT training MFU) against ~370 GB/s of all-to-all bus bandwidth (NVLink 4
line rate 450 GB/s less NCCL's ~20% protocol overhead), 2 bytes per bf16 element. Counting the whole
``N * D / P`` buffer, not the ``(P - 1) / P`` of it that leaves the rank, makes it an upper bound for
small groups. Groups that span nodes (InfiniBand, ~50 GB/s per GPU) cost ~8x more per element: pass
``alltoall_flops_per_element=`` accordingly, or set ``alltoall`` from measured all-to-all times.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["CostModel", "Calibration", "calibrate", "resolve_costs", "resolve_alltoall_costs",
           "ALLTOALL_FLOPS_PER_ELEMENT"]

#: FLOP-equivalents of one bf16 element of a Ulysses all-to-all inside an NVLink node (module docstring):
#: achieved compute (FLOP/s) / all-to-all elements per second.
ALLTOALL_FLOPS_PER_ELEMENT = 400e12 / (370e9 / 2)


@dataclasses.dataclass(frozen=True)
class CostModel:
    """``cost(L) = a*L + b*L**2 + c`` (arbitrary unit), and the all-to-all cost ``alltoall * L`` of a sample of L
    tokens run by a sequence-parallel group (summed over the group's GPUs; module docstring). All
    coefficients must be finite and >= 0."""

    a: float
    b: float
    c: float = 0.0
    alltoall: float = 0.0

    def __post_init__(self):
        for name in ("a", "b", "c", "alltoall"):
            v = getattr(self, name)
            if not (np.isfinite(v) and v >= 0):
                raise ValueError(f"CostModel.{name}: expected a finite value >= 0, got {v}")

    @classmethod
    def flops(cls, hidden_size: int, alltoall_flops_per_element: float = ALLTOALL_FLOPS_PER_ELEMENT) -> CostModel:
        """The transformer FLOP model: ``a = 6 * hidden_size``, ``b = 1``, ``c = 0``, and
        ``alltoall = 2 / 3 * alltoall_flops_per_element`` (4 + 4 all-to-alls of ``N * D / P`` elements per
        block, in units of ``12 * hidden_size`` FLOPs)."""
        if hidden_size <= 0:
            raise ValueError(f"hidden_size: expected a positive int, got {hidden_size}")
        return cls(a=6.0 * hidden_size, b=1.0, alltoall=8.0 * alltoall_flops_per_element / 12.0)

    def __call__(self, lengths) -> np.ndarray:
        """Float64 costs of an array of token counts (same shape)."""
        L = np.asarray(lengths, dtype=np.float64)
        return self.a * L + self.b * L * L + self.c

    def alltoall_costs(self, lengths) -> np.ndarray:
        """Float64 all-to-all cost ``alltoall * L`` of samples of ``lengths`` tokens run with sequence parallelism."""
        return self.alltoall * np.asarray(lengths, dtype=np.float64)


def _resolve_model(cost, hidden_size: int | None):
    if cost is None:
        if hidden_size is None:
            raise ValueError("hidden_size: required for the default FLOP cost model (or pass cost=)")
        cost = CostModel.flops(hidden_size)
    if not callable(cost):
        raise TypeError(f"cost: expected None, a CostModel or a callable, got {type(cost).__name__}")
    return cost


def _checked(values, lengths: np.ndarray, name: str) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.shape != lengths.shape:
        raise ValueError(
            f"{name}: a callable cost is called once on the int64 array of all lengths and must return an array of "
            f"the same shape {lengths.shape}, got shape {values.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name}: expected finite costs >= 0, got {name}({int(lengths[i])}) = {values[i]} for "
                         f"sample {i}")
    return values


def resolve_costs(lengths: np.ndarray, cost, hidden_size: int | None) -> np.ndarray:
    """Float64 cost per sample from ``cost`` (None -> :meth:`CostModel.flops`, a CostModel, or a vectorized
    callable ``int64 array of lengths -> array of costs`` of the same shape). Costs must be finite and >= 0."""
    return _checked(_resolve_model(cost, hidden_size)(lengths), lengths, "cost")


def resolve_alltoall_costs(lengths: np.ndarray, cost, hidden_size: int | None) -> np.ndarray:
    """Float64 all-to-all cost per sample run with sequence parallelism: ``cost.alltoall_costs(lengths)`` for a
    CostModel (or any cost with such a method), zeros for a plain callable (no communication term)."""
    model = _resolve_model(cost, hidden_size)
    if not hasattr(model, "alltoall_costs"):
        return np.zeros(lengths.shape, dtype=np.float64)
    return _checked(model.alltoall_costs(lengths), lengths, "cost.alltoall_costs")


@dataclasses.dataclass(frozen=True)
class Calibration:
    """A fitted :class:`CostModel` and the data behind it.

    ``r2`` is the coefficient of determination of the fit on the measured (pack, time) pairs,
    ``seconds_per_unit`` converts a cost in model units back to seconds (the fit is done in seconds and
    rescaled so that ``b = 1`` when ``b > 0``).
    """

    model: CostModel
    r2: float
    seconds_per_unit: float
    packs: tuple[tuple[int, ...], ...]
    seconds: tuple[float, ...]


def _default_packs(max_tokens: int) -> list[list[int]]:
    """Packs of ``max_tokens`` tokens cut into 1, 2, 4, ... equal samples, and a few short ones: the
    design separates a (tokens), b (sum of squares) and c (sample count)."""
    packs = []
    for total in (max_tokens, max_tokens // 2, max_tokens // 4):
        parts = 1
        while total // parts >= 16 and parts <= 64:
            packs.append([total // parts] * parts)
            parts *= 4
    return packs


def calibrate(
    fn_or_model: Callable,
    device=None,
    *,
    packs: Sequence[Sequence[int]] | None = None,
    max_tokens: int = 4096,
    repeats: int = 3,
    make_input: Callable | None = None,
) -> Calibration:
    """Fit ``cost(L) = a*L + b*L**2 + c`` to measured times of packs.

    ``fn_or_model`` is one of
      * a callable timed on ``make_input(seqlens, device)`` (a tuple of arguments), when ``make_input`` is given;
      * a packed model (a module with ``forward_packed(tokens, seqs, t, y)`` like the reference DiT): one
        forward + backward on random packed images of ``(1, L)`` patches is timed;
      * otherwise a timing function ``seqlens (list[int]) -> seconds``, used as is (e.g. a synthetic one).
    Timed calls report the median of ``repeats`` after one warm-up (CUDA synchronized).
    A pack of samples ``L_1..L_k`` is modelled as
    ``time = a * sum L + b * sum L**2 + c * k``, fitted by least squares over ``packs`` (default
    :func:`_default_packs` of ``max_tokens``). Negative fitted coefficients are clipped to 0. The fit
    times packs on one device, so the model's ``alltoall`` is 0: for sequence parallelism set it with
    ``dataclasses.replace(fit.model, alltoall=...)``, in the fitted unit (``seconds_per_unit``).
    """
    packs = [list(map(int, p)) for p in (packs if packs is not None else _default_packs(max_tokens))]
    if len(packs) < 3:
        raise ValueError(f"packs: need at least 3 packs to fit 3 coefficients, got {len(packs)}")
    if make_input is None and hasattr(fn_or_model, "forward_packed"):
        fn_or_model, make_input = _training_step(fn_or_model), _packed_inputs(fn_or_model)
    if make_input is None:
        time_pack = fn_or_model
    else:
        time_pack = _timed(fn_or_model, make_input, device, repeats)
    seconds = np.array([float(time_pack(p)) for p in packs])
    design = np.array([[sum(p), sum(x * x for x in p), len(p)] for p in packs], dtype=np.float64)
    scale = design.max(axis=0)  # column scaling keeps lstsq well conditioned (sum L**2 ~ 1e7 x count)
    coef, *_ = np.linalg.lstsq(design / scale, seconds, rcond=None)
    coef = np.clip(coef / scale, 0.0, None)
    residual = seconds - design @ coef
    total = ((seconds - seconds.mean()) ** 2).sum()
    r2 = 1.0 - float((residual**2).sum() / total) if total > 0 else 1.0
    unit = coef[1] if coef[1] > 0 else (coef[0] if coef[0] > 0 else 1.0)
    return Calibration(CostModel(*(coef / unit)), r2, float(unit), tuple(map(tuple, packs)), tuple(seconds))


def _timed(fn, make_input, device, repeats: int) -> Callable[[list[int]], float]:
    import torch

    def sync():
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    def time_pack(seqlens: list[int]) -> float:
        args = make_input(seqlens, device)
        fn(*args)
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*args)
            sync()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    return time_pack


def _packed_inputs(model) -> Callable:
    """``make_input`` for a packed model: random tokens of samples with a (1, 1, L) patch grid, t, y."""
    import torch

    from packdit.layout import PackedSeqs

    width = model.in_channels * model.patch_size**2
    num_classes = model.y_embedder.num_classes

    def make_input(seqlens, device):
        seqs = PackedSeqs.from_grids([(1, 1, L) for L in seqlens], sample_ndims=[3] * len(seqlens), device=device)
        param = next(model.parameters())
        tokens = torch.randn(seqs.num_tokens, width, device=device, dtype=param.dtype)
        t = torch.rand(len(seqlens), device=device) * 1000
        y = torch.randint(0, num_classes, (len(seqlens),), device=device)
        return tokens, seqs, t, y

    return make_input


def _training_step(model) -> Callable:
    """Forward + backward of ``model.forward_packed`` (what a training step costs per pack)."""

    def step(tokens, seqs, t, y):
        model.zero_grad(set_to_none=True)
        model.forward_packed(tokens, seqs, t, y).float().square().mean().backward()

    return step
