"""The training loop of a packed DiT: one process or many (DDP, FSDP2), any latent shapes, exact resume.

    trainer = Trainer(model, dataset, lengths=lengths, capacity=8192, patch_size=(1, 2, 2), lr=1e-4)
    trainer.load("runs/x/checkpoint.pt")                     # optional: continue a run, bitwise
    losses = trainer.run(10_000, checkpoint="runs/x/checkpoint.pt", checkpoint_every=500, on_step=print)

``dataset[i] = (latent, label)`` with latents ``(C, H, W)`` images or ``(C, T, H, W)`` videos of any sizes
divisible by ``patch_size``, and ``lengths[i]`` its number of tokens. Every rank of the default process
group (or the single process without one) plans the same steps with :class:`~packdit.data.PackedSampler`
(the packing planner balances the ranks' cost) and trains on its own pack.

Objective (:class:`~packdit.diffusion.FlowMatching`, rectified flow): per sample, the noise, the logit-normal
``t`` (shifted by the sample's resolution) and the classifier-free-guidance label dropout are drawn from a
generator seeded by (seed, epoch, sample index) only (:func:`sample_generator`), so a sample's loss does not
depend on which rank or step runs it, and the model gets ``(x_t, 1000 t, label)``. Loss of a global step with
samples ``G = sum_r B_r`` over all ranks::

    loss_i = mean over sample i's tokens and channels of (v_pred - v_target)**2
    loss   = (1/|G|) * sum_{i in G} loss_i

so every sample weighs the same whatever its length and whichever rank runs it. DDP (and FSDP2's
reduce-scatter) averages gradients over the ``world`` ranks, so rank r back-propagates
``sum_{i in B_r} loss_i * world / |G|`` (``|G|`` from an all-reduce of the sample counts): the averaged
gradient is the gradient of ``loss``, and training on 2 ranks equals training on 1 rank with the union of
their packs (up to fp32 summation order). A rank without samples at a step runs its model on one sample
with weight 0 so that it still joins the gradient all-reduce.

Sequence parallelism (``sp_sizes=(1, 2, 4, ...)``, the planner's group sizes; :mod:`packdit.distributed`). A sample
longer than ``capacity`` runs on the smallest group of ranks that holds it (an aligned block: a group of P ranks
starts at a rank multiple of P), next to single-rank packs in the same step. The process groups of every block
are created once, up front (:func:`~packdit.distributed.sequence_parallel_groups`); per step each rank learns
its group and pack from :meth:`~packdit.data.PackedSampler.groups` and runs the model over the group's process
group (``DiT.set_sequence_parallel``): Ulysses inside the group, DDP (or FSDP2) across every rank. The ranks of a
group compute the same loss of the same samples; each back-propagates it, times ``world / |G|``, through its
own shard of the tokens only (the model's own group reduction off), so its gradient is its shard's part, and
the data-parallel all-reduce over all ranks adds the parts of every group: the same gradient of ``loss`` as
above, every sample weighing the same whichever group runs it. Only a group's first rank counts its samples
and loss into ``|G|`` and the reported loss.

Resume: :meth:`Trainer.state_dict` holds the model, optimizer, sampler position (epoch, step), the global
RNG states, the step count and the losses; a run saved at step k and resumed continues exactly as if it
had not stopped (the per-sample draws depend on (seed, epoch, index), the rest is restored).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor, nn

from packdit import checkpoint as ckpt
from packdit.data import PackedSampler
from packdit.diffusion import FlowMatching, dit_adapter, full_token_counts, sample_timesteps, shift_timesteps
from packdit.distributed import sequence_parallel_groups
from packdit.layout import PatchSize, normalize_patch_size

__all__ = ["Trainer", "StepInfo", "train", "packed_loss_sum", "sample_generator"]

_MIX = 1_000_003  # prime for mixing (seed, epoch, index) into one generator seed


def sample_generator(index: int, *, seed: int, epoch: int) -> torch.Generator:
    """The CPU generator of sample ``index``'s random draws in epoch ``epoch``: a function of (seed, epoch, index)."""
    return torch.Generator().manual_seed(((seed * _MIX + epoch) * _MIX + index) % 2**63)


def packed_loss_sum(model: nn.Module, dataset, indices: Sequence[int], *, patch_size: PatchSize, seed: int,
                    epoch: int, device, forward: Callable | None = None, objective: FlowMatching | None = None,
                    cfg_dropout: float = 0.0, null_label: int | None = None) -> Tensor:
    """``sum_{i in indices} loss_i`` (see the module docstring) for samples ``dataset[i] = (latent, label)``, run
    as one pack through ``objective`` (default :class:`~packdit.diffusion.FlowMatching`) with each sample's own
    noise, t and label dropout. ``forward`` (default ``model.forward_packed``) runs the DiT, e.g. its DDP
    wrapper; with ``cfg_dropout > 0`` a dropped label becomes ``null_label``."""
    objective = FlowMatching() if objective is None else objective
    if cfg_dropout > 0 and null_label is None:
        raise ValueError("null_label: cfg_dropout > 0 needs the label that replaces dropped ones")
    latents, labels, noise, logit_t = [], [], [], []
    for i in indices:
        latent, label = dataset[i]
        generator = sample_generator(i, seed=seed, epoch=epoch)
        noise.append(torch.randn(latent.shape, generator=generator).to(device, latent.dtype))
        logit_t.append(sample_timesteps(1, generator=generator, mean=objective.logit_mean, std=objective.logit_std))
        if cfg_dropout > 0 and float(torch.rand((), generator=generator)) < cfg_dropout:
            label = null_label
        latents.append(latent.to(device))
        labels.append(label)
    t = torch.cat(logit_t).to(device)

    def shifted(seqs):
        if not objective.shift:
            return t
        return shift_timesteps(t, full_token_counts(seqs), base_tokens=objective.base_tokens,
                               max_shift=objective.max_shift)

    loss, _ = objective.training_loss(dit_adapter(model, forward=forward), latents, patch_size=patch_size,
                                      t=shifted, y=torch.tensor([int(y) for y in labels], device=device), noise=noise)
    return loss * len(indices)  # the mean over samples, times their number


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What :meth:`Trainer.run` reports after each optimizer step: the step count so far, the sampler's epoch,
    the step's loss (mean over all ranks' samples) and its number of samples (all ranks)."""

    step: int
    epoch: int
    loss: float
    samples: int


class _Packed(nn.Module):
    """Calls ``forward_packed`` through ``forward`` so DDP's hooks see the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens, seqs, t, y):
        return self.model.forward_packed(tokens, seqs, t, y)


class Trainer:
    """Trains ``model`` (a DiT with ``forward_packed``: :class:`packdit.DiT` or :class:`packdit.reference.DiT`).

    Args:
        dataset, lengths: ``dataset[i] = (latent, label)``, ``lengths[i]`` its tokens after patchifying.
        capacity: tokens per rank and step. hidden_size, window: the planner's cost-model width (default
            ``model.config.hidden_size``, for :class:`packdit.DiT`) and lookahead (see
            :class:`~packdit.data.PackedSampler`).
        patch_size: as for :func:`packdit.pack` (an int, (ph, pw) or (pt, ph, pw)).
        lr, optimizer: ``optimizer(params, lr=lr)`` builds the optimizer (default ``torch.optim.AdamW``).
        seed: the sampler's shuffle and every per-sample draw. objective: default ``FlowMatching()``.
        cfg_dropout, null_label: each sample's label becomes ``null_label`` with this probability.
        device: where the model and the packs live. fsdp: with more than one rank, shard with FSDP2
            ``fully_shard`` (each of ``model.blocks``, then the whole model; parameters stay DTensors)
            instead of wrapping in DDP.
        sp_sizes: the sequence-parallel group sizes the planner may use (default ``(1,)``: every pack on one
            rank); a model with ``set_sequence_parallel`` (:class:`packdit.DiT`) for sizes above 1.
            group_timeout: the collective timeout of those groups (None: torch's default for the backend);
            a rank that stops answering then fails its group's collectives instead of hanging them.
    """

    def __init__(self, model: nn.Module, dataset, *, lengths: Sequence[int], capacity: int, lr: float,
                 patch_size: PatchSize = 2, hidden_size: int | None = None, window: int = 16, seed: int = 0,
                 optimizer: Callable[..., torch.optim.Optimizer] | None = None, objective: FlowMatching | None = None,
                 cfg_dropout: float = 0.0, null_label: int | None = None, device: torch.device | str = "cpu",
                 fsdp: bool = False, sp_sizes: Sequence[int] = (1,), group_timeout: timedelta | None = None):
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.model, self.dataset, self.device, self.fsdp = model, dataset, torch.device(device), fsdp
        self.patch_size = normalize_patch_size(patch_size)
        self.seed, self.objective = seed, FlowMatching() if objective is None else objective
        self.cfg_dropout, self.null_label = cfg_dropout, null_label
        model.to(self.device).train()
        self.runner = _Packed(model)
        if self.world > 1 and fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in getattr(model, "blocks", ()):
                fully_shard(block)
            fully_shard(self.runner)
        elif self.world > 1:
            self.runner = nn.parallel.DistributedDataParallel(self.runner)
        self.optimizer = (optimizer or torch.optim.AdamW)(model.parameters(), lr=lr)
        if hidden_size is None:
            hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
        self.sampler = PackedSampler(lengths, capacity=capacity, ranks=self.world, rank=self.rank,
                                     hidden_size=hidden_size, window=window, seed=seed, sp_sizes=sp_sizes)
        if self.sampler.sp_sizes[-1] > 1 and not hasattr(model, "set_sequence_parallel"):
            raise ValueError(f"sp_sizes: groups of {self.sampler.sp_sizes[-1]} ranks need a model with "
                             f"set_sequence_parallel (packdit.DiT), got {type(model).__name__}")
        self._sp_groups = sequence_parallel_groups(self.sampler.sp_sizes, timeout=group_timeout)
        self._idle_sample = min(range(len(lengths)), key=lambda i: lengths[i], default=0)  # what idle ranks run
        self.step, self.losses = 0, []

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Everything a bitwise resume needs: model, optimizer, sampler position, RNG states, step, losses."""
        if self.fsdp and self.world > 1:
            raise ValueError("fsdp: sharded parameters need torch.distributed.checkpoint; this state_dict is for "
                             "one process or DDP")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "sampler": self.sampler.state_dict(), "rng": rng, "step": self.step, "losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampler.load_state_dict(state["sampler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.losses = int(state["step"]), list(state["losses"])

    def save(self, path: str | os.PathLike) -> None:
        """Atomic :func:`packdit.checkpoint.save` of :meth:`state_dict`, by rank 0."""
        state = self.state_dict()
        if self.rank == 0:
            ckpt.save(state, path)

    def load(self, path: str | os.PathLike) -> None:
        """Continue the run saved at ``path`` (every rank reads it)."""
        self.load_state_dict(ckpt.load(path, map_location="cpu"))

    # ------------------------------------------------------------------ the loop
    def train_step(self, indices: list[int], group_size: int = 1) -> StepInfo:
        """One optimizer step on this rank's pack ``indices``, run by the aligned group of ``group_size`` ranks
        that holds this rank (all ranks step together)."""
        epoch = self.sampler.epoch
        if group_size > 1 and indices:
            self.model.set_sequence_parallel(self._sp_groups[group_size], reduce_gradients=False)
        elif hasattr(self.model, "set_sequence_parallel"):  # an idle group's ranks run their dummy alone
            self.model.set_sequence_parallel(None)
        local = packed_loss_sum(self.model, self.dataset, indices or [self._idle_sample],
                                patch_size=self.patch_size, seed=self.seed, epoch=epoch, device=self.device,
                                forward=self.runner, objective=self.objective, cfg_dropout=self.cfg_dropout,
                                null_label=self.null_label)
        if not indices:
            local = local * 0.0
        counted = float(self.rank % group_size == 0)  # a group's samples and loss count once, on its first rank
        counts = torch.stack([torch.tensor(float(len(indices)) * counted, device=self.device),
                              local.detach().double() * counted])
        if self.world > 1:
            dist.all_reduce(counts)
        num_samples, loss_sum = counts.tolist()
        weight = self.world / max(num_samples, 1.0)  # a step where every rank is idle trains on nothing
        self.optimizer.zero_grad(set_to_none=True)
        (local * weight).backward()
        self.optimizer.step()
        self.step += 1
        self.losses.append(loss_sum / max(num_samples, 1.0))
        return StepInfo(self.step, epoch, self.losses[-1], int(num_samples))

    def run(self, steps: int, *, on_step: Callable[[StepInfo], None] | None = None,
            checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 0) -> list[float]:
        """Train until ``steps`` optimizer steps in total (counting those of a loaded run); return every step's
        loss. Epochs repeat, each with its own shuffle and plan. ``on_step`` is called after each step (progress,
        logging, evaluation). With ``checkpoint``, :meth:`save` runs every ``checkpoint_every`` steps (0: only)
        and at the end."""
        self.sampler.load_state_dict(self.sampler.state_dict())  # continue at the sampler's current position
        if self.step < steps and len(self.sampler) == 0:
            raise ValueError("lengths: the planner made no step of this dataset (is it empty?)")
        while self.step < steps:
            for group in self.sampler.groups():
                if group.first_rank != self.rank - self.rank % group.size:
                    raise ValueError(f"sampler: rank {self.rank} got group {group}, not an aligned block of ranks")
                info = self.train_step(group.indices, group.size)
                if on_step is not None:
                    on_step(info)
                done = self.step >= steps
                if checkpoint is not None and (done or (checkpoint_every and self.step % checkpoint_every == 0)):
                    self.save(checkpoint)
                if done:
                    break
            else:
                self.sampler.set_epoch(self.sampler.epoch + 1)
        return self.losses


def train(model: nn.Module, dataset, *, steps: int, **options) -> list[float]:
    """``Trainer(model, dataset, **options).run(steps)``: train from scratch, return each step's loss."""
    return Trainer(model, dataset, **options).run(steps)
