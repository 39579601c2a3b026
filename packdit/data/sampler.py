"""Per-rank batches from the packing planner, and the collate function that packs them.

``PackedSampler`` is a batch sampler: each rank builds the same plan from the same lengths and seed
(no communication) and yields its own list of sample indices per step::

    sampler = PackedSampler(lengths, capacity=131072, ranks=world, rank=rank, hidden_size=3072)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=functools.partial(collate_packed, patch_size=2))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from packdit.packing import Plan, plan_steps
from packdit.patches import pack

__all__ = ["PackedSampler", "collate_packed"]


class PackedSampler(Sampler[list[int]]):
    """Rank ``rank``'s sample indices for every step of an epoch, planned by :func:`plan_steps`.

    Epoch e shuffles the stream with ``torch.randperm(n)`` seeded by ``seed + e`` (``shuffle=False``
    keeps the given order), plans it with tie seed ``seed + e``, and yields
    ``perm[plan.steps[s][rank]]`` for every step s. A rank idle at a step (possible at the end of a
    planner window, see :mod:`packdit.packing.planner`) gets ``[]``; ``drop_last=True`` skips the steps
    where any rank would be idle instead. Samples longer than ``capacity`` raise, or with
    ``split_long=True`` are left out (``plan().long_samples``, indices into the shuffled stream).

    Resuming: ``state_dict()`` is ``{"epoch", "step"}`` where step counts the batches handed out in
    this epoch; after ``load_state_dict`` the next iteration continues at that step of that epoch, so
    no sample is lost or repeated. A DataLoader with workers prefetches batches, so save the step the
    training loop has consumed instead: ``{"epoch": e, "step": consumed_steps}``.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        *,
        capacity: int,
        ranks: int,
        rank: int,
        hidden_size: int | None = None,
        window: int = 16,
        seed: int = 0,
        drop_last: bool = False,
        shuffle: bool = True,
        cost=None,
        split_long: bool = False,
    ):
        if not 0 <= rank < ranks:
            raise ValueError(f"rank: expected 0 <= rank < ranks={ranks}, got {rank}")
        self.lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        self.plan_args = dict(capacity=capacity, ranks=ranks, hidden_size=hidden_size, window=window, cost=cost,
                              split_long=split_long)
        self.rank, self.seed, self.drop_last, self.shuffle = rank, seed, drop_last, shuffle
        self.epoch = 0
        self._position = 0     # batches handed out in this epoch
        self._resume_from = 0  # first step of the next iteration
        self._planned: tuple[int, Plan, list[list[int]]] | None = None  # (epoch, plan, this rank's batches)

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s shuffle and plan from the next iteration, starting at its first step."""
        if epoch != self.epoch:
            self._position = self._resume_from = 0
        self.epoch = epoch

    def permutation(self) -> np.ndarray:
        """Stream order of this epoch: stream position -> sample index."""
        if not self.shuffle:
            return np.arange(len(self.lengths))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.lengths), generator=generator).numpy()

    def plan(self) -> Plan:
        """This epoch's plan over the shuffled stream (indices are stream positions; see :meth:`permutation`)."""
        return self._epoch_plan()[0]

    def _epoch_plan(self) -> tuple[Plan, list[list[int]]]:
        if self._planned is None or self._planned[0] != self.epoch:
            perm = self.permutation()
            plan = plan_steps(self.lengths[perm], seed=self.seed + self.epoch, **self.plan_args)
            steps = range(plan.num_steps)
            if self.drop_last:
                sizes = np.diff(plan.bin_offsets).reshape(plan.num_steps, plan.ranks)
                steps = np.flatnonzero((sizes > 0).all(axis=1)).tolist()
            positions = plan.rank_batches(self.rank)
            self._planned = (self.epoch, plan, [perm[positions[s]].tolist() for s in steps])
        return self._planned[1:]

    def _batches(self) -> list[list[int]]:
        return self._epoch_plan()[1]

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self):
        batches = self._batches()
        start, self._resume_from = self._resume_from, 0
        self._position = start
        return self._hand_out(batches, start)

    def _hand_out(self, batches: list[list[int]], start: int):
        for s in range(start, len(batches)):
            self._position = s + 1
            yield batches[s]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self._position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._position = self._resume_from = int(state["step"])


def collate_packed(batch: list, patch_size=2) -> tuple | None:
    """Pack one rank's samples: ``batch`` is a list of latents ``(C, [T,] H, W)`` or of tuples
    ``(latent, *extras)`` (labels, timesteps, ... one scalar or tensor each).

    Returns ``(tokens (N, C*pt*ph*pw), seqs, *extras)`` with every extra stacked over the batch
    (``(B, ...)``), ``patch_size`` as for :func:`packdit.pack`; None for an empty batch (idle rank).
    """
    if not batch:
        return None
    items = [item if isinstance(item, (tuple, list)) else (item,) for item in batch]
    tokens, seqs = pack([item[0] for item in items], patch_size)
    extras = [torch.stack([torch.as_tensor(v) for v in column]) for column in list(zip(*items))[1:]]
    return (tokens, seqs, *extras)
