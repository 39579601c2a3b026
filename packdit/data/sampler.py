"""Per-rank batches from the packing planner, and the collate function that packs them.

``PackedSampler`` is a batch sampler: each rank builds the same plan from the same lengths and seed
(no communication) and yields its own list of sample indices per step::

    sampler = PackedSampler(lengths, capacity=131072, ranks=world, rank=rank, hidden_size=3072)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=functools.partial(collate_packed, patch_size=2))
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in loader: ...

With sequence parallelism (``sp_sizes=(1, 2, 4, 8)``) a pack may be run by a group of ranks; every rank
of the group gets the same indices, and learns its group per step (:class:`~packdit.packing.Group`:
``first_rank``, ``size``, ``indices``)::

    blocks = packdit.packing.group_blocks(world, sampler.sp_sizes)  # every group a plan may use, in one order
    process_groups = {block: dist.new_group(list(range(block[0], sum(block)))) for block in blocks}
    for group in sampler.groups():                          # a loop that drives the sampler itself
        pg = process_groups.get((group.first_rank, group.size))   # None: this rank runs the pack alone
        ...
    for batch, group in zip(loader, sampler.pass_groups()): ...    # a DataLoader over the sampler
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from packdit.packing import Plan, plan_steps
from packdit.packing.cost import resolve_alltoall_costs, resolve_costs
from packdit.packing.planner import Group, as_lengths, as_sp_sizes, is_integer, positive_int, prepare_samples
from packdit.patches import pack

__all__ = ["PackedSampler", "collate_packed"]

STATE_VERSION = 3


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _pack_mask(mask: np.ndarray) -> bytes:
    return np.packbits(mask).tobytes()


def _unpack_mask(bits, num_samples: int, name: str) -> np.ndarray:
    """A bitmap of :func:`_pack_mask` -> ``(num_samples,)`` bool, or ValueError naming ``name``."""
    expected = (num_samples + 7) // 8
    if not isinstance(bits, bytes) or len(bits) != expected:
        got = f"{len(bits)} bytes" if isinstance(bits, bytes) else type(bits).__name__
        raise ValueError(f"{name}: expected a bitmap of {expected} bytes over {num_samples} samples, got {got}")
    return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=num_samples).astype(bool)


class PackedSampler(Sampler[list[int]]):
    """Rank ``rank``'s sample indices for every step of an epoch, planned by :func:`plan_steps`.

    Epoch e shuffles the stream with ``torch.randperm(n)`` seeded by ``seed + e`` (``shuffle=False``
    keeps the given order), plans it with tie seed ``seed + e``, and yields
    ``perm[plan.steps[s][rank]]`` for every step s. A rank idle at a step (possible at the end of a
    planner window, see :mod:`packdit.packing.planner`) gets ``[]``; ``drop_last=True`` skips the steps
    where any rank would be idle instead.

    Sequence parallelism. With ``sp_sizes`` (see :func:`~packdit.packing.plan_steps`; default ``(1,)``:
    none) a pack may be run by a group of ranks, an aligned block, and every rank of the group gets the
    same indices. ``iter(self)`` yields the indices (``list[int]``, for a DataLoader's ``batch_sampler``);
    :meth:`groups` iterates the same steps yielding this rank's :class:`~packdit.packing.Group`
    ``(first_rank, size, indices)``, for a loop that drives the sampler itself; :meth:`pass_groups` gives
    the groups of the pass a DataLoader is iterating. Samples longer than ``capacity`` run on the
    smallest group that holds them; a sample too long for the largest group raises, or with
    ``split_long=True`` is left out (``plan().long_samples``, indices into :meth:`plan_stream`).

    Resuming. ``state_dict()`` is the same dict on every rank (save it from one), and holds::

        version        3
        epoch          the epoch being iterated
        step           batches of the current plan handed out in this epoch
        num_samples, lengths_sha256, seed, shuffle
                       what fixes the epoch's samples and their order (sha256 of the int64 lengths)
        config         {"capacity", "ranks", "window", "drop_last", "split_long", "sp_sizes", "costs_sha256"}:
                       what fixes the plan besides the stream (costs_sha256 of the float64 per-sample costs,
                       followed by their all-to-all costs when sp_sizes is not [1])
        plan_excludes  bytes, a bitmap (np.packbits over sample indices): the samples consumed before
                       the current plan was made, all zero for the epoch's own plan
        consumed       bytes, a bitmap: every sample handed out to any rank in this epoch so far

    Only plain values (ints, strings, bytes, a dict): it loads with ``torch.load(weights_only=True)`` and
    compares with ``==``.

    ``load_state_dict(state)`` makes the next iteration continue that epoch:

    * same lengths, seed, shuffle and ``config``: the same plan from ``step`` on, so the batches are
      exactly those an uninterrupted run would have seen;
    * another ``config`` (world size, capacity, window, cost model, ``drop_last``, ``split_long``,
      ``sp_sizes``): the samples not in ``consumed``, in stream order, are re-planned for this sampler's
      configuration and the iteration starts at their first step, so across the interruption every
      sample of the epoch is trained exactly once (minus those ``drop_last`` drops and, with
      ``split_long``, those too long for the new configuration), none lost or repeated;
    * other lengths, seed or shuffle, a step outside ``[0, steps of the saved plan]`` or a ``consumed``
      set that is not the first ``step`` steps of the saved plan: ValueError, nothing changes.

    The current plan (possibly re-planned) stays the plan of this epoch for every later pass over it,
    until :meth:`set_epoch` moves to another epoch. A DataLoader with workers prefetches batches, so
    save what the training loop has consumed: ``state_dict(consumed_batches=k)`` for k batches taken
    from the current pass. A state of version 2 (saved before ``sp_sizes`` existed) is read as one with
    ``sp_sizes`` ``[1]``.
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
        sp_sizes: Sequence[int] = (1,),
    ):
        ranks = positive_int(ranks, "ranks")
        if not is_integer(rank) or not 0 <= rank < ranks:
            raise ValueError(f"rank: expected an int with 0 <= rank < ranks={ranks}, got {rank!r}")
        if not is_integer(seed):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        self.lengths = as_lengths(lengths)
        # validate the configuration now, not at the first iteration
        prepare_samples(self.lengths, capacity=capacity, ranks=ranks, window=window, cost=cost,
                        hidden_size=hidden_size, split_long=split_long, sp_sizes=sp_sizes)
        self.sp_sizes = as_sp_sizes(sp_sizes, ranks)
        self._cost_args = dict(hidden_size=hidden_size, cost=cost)
        self._config = dict(capacity=int(capacity), ranks=ranks, window=int(window), drop_last=bool(drop_last),
                            split_long=bool(split_long), sp_sizes=list(self.sp_sizes),
                            costs_sha256=self._costs_sha256(self.sp_sizes))
        self.rank, self.seed, self.shuffle = int(rank), int(seed), bool(shuffle)
        self._lengths_sha256 = _sha256(self.lengths.astype("<i8"))
        self.epoch = 0
        self._plan_excludes: np.ndarray | None = None  # (n,) bool: consumed before the current plan was made
        self._position = 0     # batches of the current plan handed out in this epoch
        self._pass_start = 0   # the step the current (or next) pass starts at
        self._resume_pending = False
        self._planned: tuple[np.ndarray, Plan, list[int], list[list[int]]] | None = None

    def _costs_sha256(self, sp_sizes) -> str:
        """Fingerprint of what the cost model gives the planner under ``sp_sizes``: the float64 costs, and the
        all-to-all costs unless every pack runs on one rank."""
        digest = hashlib.sha256(resolve_costs(self.lengths, **self._cost_args).astype("<f8").tobytes())
        if list(sp_sizes) != [1]:
            digest.update(resolve_alltoall_costs(self.lengths, **self._cost_args).astype("<f8").tobytes())
        return digest.hexdigest()

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s shuffle and plan from the next iteration, starting at its first step
        (a no-op for the current epoch, so it can follow :meth:`load_state_dict`)."""
        if not is_integer(epoch) or epoch < 0:
            raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
        if epoch != self.epoch:
            self._position = self._pass_start = 0
            self._plan_excludes, self._planned, self._resume_pending = None, None, False
        self.epoch = int(epoch)

    def permutation(self) -> np.ndarray:
        """Stream order of this epoch: stream position -> sample index."""
        return self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.lengths))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.lengths), generator=generator).numpy()

    def plan_stream(self) -> np.ndarray:
        """The samples the current plan covers, in stream order (plan position -> sample index):
        :meth:`permutation` for the epoch's own plan, its not yet consumed samples after a re-plan."""
        return self._current()[0]

    def plan(self) -> Plan:
        """This epoch's current plan (indices are positions in :meth:`plan_stream`)."""
        return self._current()[1]

    def _make_plan(self, epoch: int, excludes: np.ndarray | None,
                   config: Mapping) -> tuple[np.ndarray, Plan, list[int]]:
        """``(stream, plan, step_ids)``: the plan of epoch ``epoch``'s samples outside ``excludes`` under
        ``config``, and the plan steps handed out (all, or those without idle ranks with drop_last)."""
        stream = self._permutation(epoch)
        if excludes is not None:
            stream = stream[~excludes[stream]]
        plan = plan_steps(self.lengths[stream], capacity=config["capacity"], ranks=config["ranks"],
                          window=config["window"], split_long=config["split_long"], sp_sizes=config["sp_sizes"],
                          seed=self.seed + epoch, **self._cost_args)
        step_ids = range(plan.num_steps)
        if config["drop_last"]:
            has_idle = np.zeros(plan.num_steps, dtype=bool)
            has_idle[plan.bin_step[np.diff(plan.bin_offsets) == 0]] = True
            step_ids = np.flatnonzero(~has_idle)
        return stream, plan, list(step_ids)

    @staticmethod
    def _consumed(stream: np.ndarray, plan: Plan, step_ids: list[int], steps: int, excludes: np.ndarray | None,
                  num_samples: int) -> np.ndarray:
        """``(n,)`` bool: ``excludes`` and every sample of the first ``steps`` handed-out steps, all ranks."""
        consumed = np.zeros(num_samples, dtype=bool) if excludes is None else excludes.copy()
        handed_out = np.zeros(plan.num_steps, dtype=bool)
        handed_out[step_ids[:steps]] = True
        step_of_entry = np.repeat(plan.bin_step, np.diff(plan.bin_offsets))
        consumed[stream[plan.order[handed_out[step_of_entry]]]] = True
        return consumed

    def _current(self) -> tuple[np.ndarray, Plan, list[int], list[Group]]:
        """``(stream, plan, step_ids, this rank's group per handed-out step)`` of the current plan, memoized."""
        if self._planned is None:
            stream, plan, step_ids = self._make_plan(self.epoch, self._plan_excludes, self._config)
            groups = plan.rank_groups(self.rank)
            self._planned = (stream, plan, step_ids, [groups[s]._replace(indices=stream[groups[s].indices].tolist())
                                                      for s in step_ids])
        return self._planned

    def __len__(self) -> int:
        return len(self._current()[3])

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's sample indices per step (its group's pack), from the epoch's first step or where a
        loaded state left off."""
        return self._start_pass(lambda group: group.indices)

    def groups(self) -> Iterator[Group]:
        """Iterate like ``iter(self)``, yielding this rank's :class:`~packdit.packing.Group` per step: ranks
        ``first_rank .. first_rank + size - 1`` run ``indices`` together (``size`` 1: this rank alone). For a
        loop that drives the sampler itself; it shares the position, epochs and resume state of ``iter``."""
        return self._start_pass(lambda group: group)

    def pass_groups(self) -> Iterator[Group]:
        """This rank's groups for the batches of the pass in progress, in order, without moving the sampler:
        for a DataLoader that iterates the sampler (``batch_sampler=sampler``), iterate it alongside the
        loader: ``for batch, group in zip(loader, sampler.pass_groups())``. Lazy: the pass's first step is
        read at the first ``next()``, so create it before or after the loader's iterator, but advance it only
        once the loader's pass has started."""
        groups = self._current()[3]
        yield from groups[self._pass_start:]

    def _start_pass(self, view: Callable[[Group], object]):
        groups = self._current()[3]
        start = self._position if self._resume_pending else 0
        self._resume_pending = False
        self._position = self._pass_start = start
        return self._hand_out(groups, start, view)

    def _hand_out(self, groups: list[Group], start: int, view: Callable[[Group], object]):
        for s in range(start, len(groups)):
            self._position = s + 1
            yield view(groups[s])

    def state_dict(self, consumed_batches: int | None = None) -> dict:
        """The resume state (see the class docstring) after the batches handed out so far, or after the
        first ``consumed_batches`` of the current pass (batches prefetched but not trained on excluded)."""
        step = self._position
        if consumed_batches is not None:
            handed = self._position - self._pass_start
            if not is_integer(consumed_batches) or not 0 <= consumed_batches <= handed:
                raise ValueError(f"consumed_batches: expected an int in [0, {handed}] (the batches this pass has "
                                 f"handed out), got {consumed_batches!r}")
            step = self._pass_start + int(consumed_batches)
        stream, plan, step_ids, _ = self._current()
        n = len(self.lengths)
        excludes = np.zeros(n, dtype=bool) if self._plan_excludes is None else self._plan_excludes
        return {
            "version": STATE_VERSION, "epoch": self.epoch, "step": step,
            "num_samples": n, "lengths_sha256": self._lengths_sha256, "seed": self.seed, "shuffle": self.shuffle,
            "config": dict(self._config),
            "plan_excludes": _pack_mask(excludes),
            "consumed": _pack_mask(self._consumed(stream, plan, step_ids, step, self._plan_excludes, n)),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue the epoch of ``state`` at the next iteration: exactly, or re-planned for a changed
        configuration (see the class docstring); ValueError when the state does not describe this data."""
        keys = ("version", "epoch", "step", "num_samples", "lengths_sha256", "seed", "shuffle", "config",
                "plan_excludes", "consumed")
        if not isinstance(state, Mapping) or state.get("version") not in (2, STATE_VERSION) or \
                not set(keys) <= set(state):
            got = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"state: expected a PackedSampler.state_dict() of version {STATE_VERSION} (or 2) with "
                             f"keys {list(keys)}, got {got}; a state without the configuration and the lengths "
                             "fingerprint cannot be checked against this sampler")
        n = len(self.lengths)
        if state["num_samples"] != n:
            raise ValueError(f"state['num_samples']: the state is for {state['num_samples']} samples, this "
                             f"sampler has {n}: its epoch cannot be resumed on other data")
        if state["lengths_sha256"] != self._lengths_sha256:
            raise ValueError("state['lengths_sha256']: the state was saved for other sample lengths than this "
                             "sampler's: its epoch cannot be resumed on other data")
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle)):
            if state[key] != mine:
                raise ValueError(f"state[{key!r}]: expected {mine!r} (this sampler's), got {state[key]!r}: "
                                 "the epoch's sample order would differ")
        epoch, step = state["epoch"], state["step"]
        if not is_integer(epoch) or epoch < 0:
            raise ValueError(f"state['epoch']: expected an int >= 0, got {epoch!r}")
        if not is_integer(step) or step < 0:
            raise ValueError(f"state['step']: expected an int >= 0, got {step!r}")
        epoch, step = int(epoch), int(step)
        excludes = _unpack_mask(state["plan_excludes"], n, "state['plan_excludes']")
        consumed = _unpack_mask(state["consumed"], n, "state['consumed']")
        if (excludes & ~consumed).any():
            raise ValueError("state['consumed']: expected to contain every sample of state['plan_excludes']")
        excludes = excludes if excludes.any() else None
        saved = state["config"]
        if state["version"] == 2 and isinstance(saved, Mapping):  # saved before sp_sizes: one rank per pack
            saved = {**saved, "sp_sizes": [1]}
        if not isinstance(saved, Mapping) or set(saved) != set(self._config):
            raise ValueError(f"state['config']: expected keys {sorted(self._config)}, got {saved!r}")
        if not isinstance(saved["sp_sizes"], (list, tuple)):
            raise ValueError(f"state['config']['sp_sizes']: expected a list of group sizes, got {saved['sp_sizes']!r}")

        # with the same costs the saved plan can be rebuilt, and the state checked against it; otherwise
        # only its consumed set is known, which is all a re-plan needs
        if saved["costs_sha256"] == self._costs_sha256(saved["sp_sizes"]):
            try:
                stream, plan, step_ids = self._make_plan(epoch, excludes, saved)
            except ValueError as exc:
                raise ValueError(f"state['config']: the saved plan cannot be rebuilt: {exc}") from exc
            if step > len(step_ids):
                raise ValueError(f"state['step']: expected 0 <= step <= {len(step_ids)} (the steps of the saved "
                                 f"plan of epoch {epoch}), got {step}")
            if not np.array_equal(self._consumed(stream, plan, step_ids, step, excludes, n), consumed):
                raise ValueError(f"state['consumed']: expected the samples of the first {step} steps of the saved "
                                 f"plan of epoch {epoch}, got a different set: the state is corrupt")
        if dict(saved) != self._config:  # re-plan what the epoch has not consumed yet
            excludes, step = (consumed if consumed.any() else None), 0
        self.epoch, self._plan_excludes, self._planned = epoch, excludes, None
        self._position = self._pass_start = step
        self._resume_pending = True


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
