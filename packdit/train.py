"""Data-parallel training of a packed DiT with the packing planner (DDP or FSDP2 over ``torch.distributed``).

Every rank plans the same steps (:class:`~packdit.data.PackedSampler`) and trains on its own pack.
Loss of a global step with samples ``G = sum_r B_r`` over all ranks (B_r on rank r)::

    loss_i = mean over sample i's tokens and channels of (v_pred - v_target)**2
    loss   = (1/|G|) * sum_{i in G} loss_i

so every sample weighs the same whatever its length and whichever rank runs it. DDP (and FSDP2's
reduce-scatter) averages gradients over the ``world`` ranks, so rank r back-propagates
``sum_{i in B_r} loss_i * world / |G|`` (``|G|`` from an all-reduce of the sample counts): the
averaged gradient is the gradient of ``loss``,
and training on 2 ranks equals training on 1 rank with the union of their packs (up to fp32
summation order). A rank without samples at a step runs its model on one sample with weight 0 so
that it still joins the gradient all-reduce.

Objective: rectified flow / flow matching. Per sample, ``t ~ U(0, 1)`` and ``noise ~ N(0, I)`` are
drawn from a generator seeded by (seed, epoch, sample index), independent of the rank layout;
``x_t = (1 - t) x + t noise`` and the model predicts ``v = noise - x`` from ``(x_t, 1000 t, label)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from packdit.data import PackedSampler
from packdit.diffusion import FlowMatching, dit_adapter

__all__ = ["train", "packed_loss_sum", "noise_and_time"]

_MIX = 1_000_003  # prime for mixing (seed, epoch, index) into one generator seed


def noise_and_time(latent: Tensor, index: int, *, seed: int, epoch: int) -> tuple[Tensor, float]:
    """Noise like ``latent`` and ``t in [0, 1)`` of sample ``index``, a function of (seed, epoch, index) only."""
    generator = torch.Generator().manual_seed(((seed * _MIX + epoch) * _MIX + index) % 2**63)
    t = float(torch.rand((), generator=generator))
    return torch.randn(latent.shape, generator=generator, dtype=latent.dtype).to(latent.device), t


def packed_loss_sum(model: nn.Module, dataset, indices: Sequence[int], *, patch_size: int, seed: int, epoch: int,
                    device, forward: Callable | None = None) -> Tensor:
    """``sum_{i in indices} loss_i`` (see the module docstring) for samples ``dataset[i] = (latent (C, H, W), label)``,
    run as one pack through :class:`~packdit.diffusion.FlowMatching` with each sample's own noise and t.
    ``forward`` (default ``model.forward_packed``) is what runs the DiT, e.g. its DDP wrapper."""
    latents, labels, noise, times = [], [], [], []
    for i in indices:
        latent, label = dataset[i]
        latent = latent.to(device)
        n, t = noise_and_time(latent, i, seed=seed, epoch=epoch)
        latents.append(latent)
        labels.append(label)
        noise.append(n)
        times.append(t)
    loss, _ = FlowMatching().training_loss(
        dit_adapter(model, forward=forward), latents, patch_size=(1, patch_size, patch_size),
        t=torch.tensor(times, device=device), y=torch.tensor(labels, device=device), noise=noise,
    )
    return loss * len(indices)  # the mean over samples, times their number


class _Packed(nn.Module):
    """Calls ``forward_packed`` through ``forward`` so DDP's hooks see the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, seqs, t, y):
        return self.model.forward_packed(tokens, seqs, t, y)


def train(
    model: nn.Module,
    dataset,
    *,
    lengths: Sequence[int],
    steps: int,
    lr: float,
    capacity: int,
    hidden_size: int,
    patch_size: int = 2,
    window: int = 16,
    seed: int = 0,
    optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    device: torch.device | str = "cpu",
    fsdp: bool = False,
) -> list[float]:
    """Train ``model`` (a DiT with ``forward_packed``) for ``steps`` global steps; return each step's ``loss``.

    ``dataset[i] = (latent (C, H, W), label)`` with ``lengths[i]`` tokens after patchifying; ``capacity`` tokens
    per rank and step, ``hidden_size`` for the planner's FLOP cost model. Runs on every
    rank of the default process group or alone without one. With more than one rank the model is wrapped
    in DDP, or with ``fsdp=True`` sharded by FSDP2 ``fully_shard`` (each of ``model.blocks``, then the
    whole model; it stays sharded afterwards: parameters are DTensors, ``.full_tensor()`` gathers one).
    ``optimizer(params, lr=lr)`` builds the optimizer (default AdamW). Epochs repeat until ``steps``.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    model.to(device).train()
    runner = _Packed(model)
    if world > 1 and fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(model, "blocks", ()):
            fully_shard(block)
        fully_shard(runner)
    elif world > 1:
        runner = nn.parallel.DistributedDataParallel(runner)
    opt = (optimizer or torch.optim.AdamW)(model.parameters(), lr=lr)
    sampler = PackedSampler(lengths, capacity=capacity, ranks=world, rank=rank, hidden_size=hidden_size,
                            window=window, seed=seed)
    losses, epoch = [], 0
    while len(losses) < steps:
        sampler.set_epoch(epoch)
        for indices in sampler:
            local = packed_loss_sum(model, dataset, indices or [0], patch_size=patch_size, seed=seed,
                                    epoch=epoch, device=device, forward=runner)
            if not indices:
                local = local * 0.0
            counts = torch.stack([torch.tensor(float(len(indices)), device=device), local.detach().double()])
            if world > 1:
                dist.all_reduce(counts)
            num_samples, loss_sum = counts.tolist()
            num_samples = max(num_samples, 1.0)  # a step where every rank is idle trains on nothing
            opt.zero_grad(set_to_none=True)
            (local * (world / num_samples)).backward()
            opt.step()
            losses.append(loss_sum / num_samples)
            if len(losses) == steps:
                break
        epoch += 1
    return losses
