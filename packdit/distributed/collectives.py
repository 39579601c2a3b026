"""Differentiable row exchanges over a process group, built on ``torch.distributed.all_to_all_single``.

Every function moves whole rows (dim 0) of a tensor between the ``P`` ranks of ``group``; row counts may
differ from rank to rank (uneven shards), and every rank must call with matching counts (what rank i sends
to rank j is what rank j expects from rank i), in the same order. ``all_to_all_single`` is used throughout
because it takes per-rank row counts natively on every backend (gloo's ``all_gather`` needs equal sizes).

    exchange_rows(x, send, recv)      rows send[j] of x to rank j; rows from rank j, in rank order
                                      backward: the same exchange with send and recv swapped
    gather_rows(x, sizes, rank)       every rank's rows, concatenated in rank order (an all-gather)
                                      backward: this rank's own rows of the gradient (no communication)
    scatter_rows(x, sizes, rank)      this rank's rows of a tensor every rank holds whole (a slice)
                                      backward: the all-gather of the rows' gradients
    replicate(x)                      x itself, a tensor every rank holds whole and uses in part
                                      backward: the sum of the ranks' gradients (an all-reduce)

``gather_rows`` and ``scatter_rows`` are each other's adjoint *for a replicated computation*: the gradient
of a gathered tensor is the same on every rank when every rank computes the same loss from it, so each
rank keeps its own rows instead of summing P equal copies (which would count the loss P times).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["exchange_rows", "gather_rows", "scatter_rows", "replicate"]


def _all_to_all(x: Tensor, send: Sequence[int], recv: Sequence[int], group) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=list(recv), input_split_sizes=list(send),
                           group=group)
    return out


def _all_gather(x: Tensor, sizes: Sequence[int], group) -> Tensor:
    """Each rank's ``x (sizes[rank], ...)`` -> ``(sum sizes, ...)``: x sent whole to every rank."""
    return _all_to_all(x.repeat(len(sizes), *([1] * (x.dim() - 1))), [x.shape[0]] * len(sizes), sizes, group)


class _ExchangeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, send: tuple[int, ...], recv: tuple[int, ...], group) -> Tensor:
        ctx.send, ctx.recv, ctx.group = send, recv, group
        return _all_to_all(x, send, recv, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _ExchangeRows.apply(grad, ctx.recv, ctx.send, ctx.group), None, None, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], rank: int, group) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        return _all_gather(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _ScatterRows.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _ScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], rank: int, group) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank, group
        start = sum(sizes[:rank])
        return x[start:start + sizes[rank]]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _GatherRows.apply(grad, ctx.sizes, ctx.rank, ctx.group), None, None, None


class _Replicate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _row_counts(name: str, sizes: Sequence[int], group) -> tuple[int, ...]:
    sizes = tuple(int(s) for s in sizes)
    world = dist.get_world_size(group)
    if len(sizes) != world or min(sizes, default=0) < 0:
        raise ValueError(f"{name}: expected {world} non-negative row counts (one per rank of the group), got {sizes}")
    return sizes


def _check_rows(x: Tensor, rows: int) -> None:
    if x.dim() == 0 or x.shape[0] != rows:
        raise ValueError(f"x: expected {rows} rows, got shape {tuple(x.shape)}")


def exchange_rows(x: Tensor, send: Sequence[int], recv: Sequence[int], group=None) -> Tensor:
    """All-to-all of rows: ``x (sum send, ...)``, its rows ``send[j]`` (consecutive, in rank order) going to rank j
    -> ``(sum recv, ...)``, the ``recv[j]`` rows from rank j in rank order. Differentiable."""
    send, recv = _row_counts("send", send, group), _row_counts("recv", recv, group)
    _check_rows(x, sum(send))
    return _ExchangeRows.apply(x, send, recv, group)


def gather_rows(x: Tensor, sizes: Sequence[int], group=None) -> Tensor:
    """``x (sizes[rank], ...)`` on each rank -> ``(sum sizes, ...)`` on every rank: all ranks' rows in rank order.
    Backward keeps this rank's rows of the gradient (see the module docstring: for replicated losses)."""
    sizes, rank = _row_counts("sizes", sizes, group), dist.get_rank(group)
    _check_rows(x, sizes[rank])
    return _GatherRows.apply(x, sizes, rank, group)


def scatter_rows(x: Tensor, sizes: Sequence[int], group=None) -> Tensor:
    """``x (sum sizes, ...)``, the same on every rank -> rows ``sum(sizes[:rank]) + [0, sizes[rank])``. Backward
    all-gathers the rows' gradients, so every rank gets the gradient of the whole ``x``."""
    sizes = _row_counts("sizes", sizes, group)
    _check_rows(x, sum(sizes))
    return _ScatterRows.apply(x, sizes, dist.get_rank(group), group)


def replicate(x: Tensor, group=None) -> Tensor:
    """``x``, the same on every rank, of which each rank's computation uses a part (e.g. the conditioning rows of
    its own tokens): backward sums the ranks' gradients, so every rank gets the gradient of the whole use."""
    return _Replicate.apply(x, group)
