"""Shared test helpers: error reporting, the 2x error rule, random packed layouts."""

from __future__ import annotations

import os
import random
import socket
from datetime import timedelta

import torch
from torch import Tensor


def error_report(actual: Tensor, expected: Tensor) -> str:
    """Max abs / max rel / mean abs error and the index of the worst element."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    if diff.numel() == 0:
        return "empty"
    diff = torch.where(torch.isnan(a) ^ torch.isnan(e), torch.full_like(diff, float("inf")), diff.nan_to_num(0.0))
    worst = int(diff.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), diff.shape))
    rel = diff / e.abs().clamp_min(1e-12)
    return (f"max abs {diff.max().item():.3e} at {where} (got {a.flatten()[worst].item():.6g}, "
            f"want {e.flatten()[worst].item():.6g}), max rel {rel.max().item():.3e}, mean abs {diff.mean().item():.3e}")


def assert_close(actual: Tensor, expected: Tensor, *, atol: float = 1e-5, rtol: float = 1e-5, name: str = "") -> None:
    """``|actual - expected| <= atol + rtol*|expected|`` elementwise; the failure names the worst element."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    ok = ((a - e).abs() <= atol + rtol * e.abs()) | (torch.isnan(a) & torch.isnan(e)) | (a == e)
    if not bool(ok.all()):
        raise AssertionError(f"{name}: {int((~ok).sum())}/{ok.numel()} elements off; {error_report(actual, expected)}")


def assert_within_2x(out: Tensor, pt: Tensor, ref: Tensor, *, floor: float = 1e-5, name: str = "") -> None:
    """The flash-attention rule: kernel error vs the fp32/fp64 oracle <= 2x the error of same-precision torch
    + floor."""
    err_out = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    err_pt = (pt.double() - ref.double()).abs().max().item() if pt.numel() else 0.0
    print(f"{name}: kernel err {err_out:.3e}, torch err {err_pt:.3e}")
    assert err_out <= 2 * err_pt + floor, \
        f"{name}: {err_out:.3e} > 2*{err_pt:.3e} + {floor:.1e}; {error_report(out, ref)}"


EDGE_LENGTHS = (0, 1, 7, 37, 100)


def random_grids(rng: random.Random, n: int, *, max_t: int = 3, max_hw: int = 6, allow_empty: bool = True):
    """``n`` random (T, H, W) patch grids, including single-token and (optionally) empty samples."""
    grids = []
    for _ in range(n):
        kind = rng.random()
        if allow_empty and kind < 0.1:
            grids.append((rng.randint(0, 2), 0, rng.randint(1, max_hw)))
        elif kind < 0.25:
            grids.append((1, 1, 1))
        else:
            grids.append((rng.randint(1, max_t), rng.randint(1, max_hw), rng.randint(1, max_hw)))
    return grids


def random_seqlens(rng: random.Random, n: int, *, max_len: int = 100) -> list[int]:
    """Segment lengths mixing the edge lengths 0, 1, 7, 37, 100 with random ones up to ``max_len``."""
    return [rng.choice(EDGE_LENGTHS) if rng.random() < 0.5 else rng.randint(0, max_len) for _ in range(n)]


def cu_seqlens_of(lengths, device="cpu") -> Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Overwrite every trainable parameter with N(0, std^2) drawn from ``seed``, in place; returns the model.
    DiTs start as the identity (adaLN-Zero), so parity tests need non-zero weights everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


# ---------------------------------------------------------------------- patchify by explicit coordinates
# An implementation of patchify/unpatchify independent of packdit.reference.patchify (which reshapes and
# permutes): every feature of every token is gathered from the latent coordinates it stands for.
def _latent_coords(raster: Tensor, grid, patch_size, channels: int, channels_last: bool):
    """Latent coordinates (c, t, h, w), each (L, F), of the F features of L tokens at ``raster``."""
    _, gh, gw = grid
    pt, ph, pw = patch_size
    t, h, w = raster // (gh * gw), (raster // gw) % gh, raster % gw
    c, it, ih, iw = torch.meshgrid(*(torch.arange(s, device=raster.device) for s in (channels, pt, ph, pw)),
                                   indexing="ij")
    if channels_last:
        c, it, ih, iw = (v.permute(1, 2, 3, 0) for v in (c, it, ih, iw))
    c, it, ih, iw = (v.reshape(1, -1) for v in (c, it, ih, iw))
    return c, t[:, None] * pt + it, h[:, None] * ph + ih, w[:, None] * pw + iw


def _sample_rasters(cu_seqlens: Tensor, raster_index: Tensor | None, device) -> list[Tensor]:
    cu = cu_seqlens.tolist()
    return [torch.arange(cu[b + 1] - cu[b], device=device) if raster_index is None
            else raster_index[cu[b]:cu[b + 1]].to(device, torch.int64) for b in range(len(cu) - 1)]


def gather_patchify(latents, cu_seqlens: Tensor, raster_index: Tensor | None, patch_size,
                    channels_last: bool = False) -> Tensor:
    """Samples (C, T, H, W) / (C, H, W) -> packed tokens (N, C*pt*ph*pw)."""
    pieces = []
    for x, raster in zip(latents, _sample_rasters(cu_seqlens, raster_index, latents[0].device)):
        x = x.unsqueeze(1) if x.dim() == 3 else x
        grid = tuple(s // p for s, p in zip(x.shape[1:], patch_size))
        pieces.append(x[_latent_coords(raster, grid, patch_size, x.shape[0], channels_last)])
    return torch.cat(pieces)


def gather_unpatchify(tokens: Tensor, cu_seqlens: Tensor, raster_index: Tensor | None, grids, sample_ndims,
                      patch_size, channels_last: bool = False, fill_value: float | None = None) -> list[Tensor]:
    """Packed tokens (N, F) -> samples, (C, H, W) where ``sample_ndims[b] == 3``; ``fill_value`` (0 when
    None) where no token landed."""
    channels = tokens.shape[1] // (patch_size[0] * patch_size[1] * patch_size[2])
    out = []
    cu = cu_seqlens.tolist()
    for b, (raster, grid, ndim) in enumerate(zip(_sample_rasters(cu_seqlens, raster_index, tokens.device),
                                                 grids, sample_ndims)):
        shape = (channels, *(g * p for g, p in zip(grid, patch_size)))
        x = tokens.new_full(shape, 0.0 if fill_value is None else fill_value)
        x[_latent_coords(raster, grid, patch_size, channels, channels_last)] = tokens[cu[b]:cu[b + 1]]
        out.append(x.squeeze(1) if ndim == 3 else x)
    return out


# ---------------------------------------------------------------------------------------------- gloo groups
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_gloo_group(rank: int, world: int, port: int, fn, *args, timeout: timedelta | None = None) -> None:
    """Process entry for ``torch.multiprocessing``: ``fn(*args)`` in rank ``rank`` of a loopback gloo group.

    On success every rank meets at a barrier and the process exits at once (``os._exit(0)``), without tearing
    the group down: destroying a gloo group while a peer is still using or closing its own can end in
    ``std::terminate`` (SIGABRT, "terminate called without an active exception"), which failed CI runs of
    tests whose ranks had all finished correctly. An exception propagates with the group left as it is, so the
    spawner reports this rank's traceback first (a destroyed group would fail the peers' collectives first)."""
    import torch
    import torch.distributed as dist

    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world, **kwargs)
    torch.set_num_threads(1)
    fn(*args)
    dist.barrier()
    os._exit(0)
