"""PackedSampler (per-rank batches, epochs, resume, drop_last) and collate_packed."""

import functools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import packdit
from packdit.data import PackedSampler, collate_packed

LENGTHS = np.random.default_rng(0).integers(0, 120, 400).tolist()
ARGS = dict(capacity=256, ranks=3, hidden_size=16, window=4, seed=5)


def all_ranks(**kwargs):
    return [PackedSampler(LENGTHS, rank=r, **(ARGS | kwargs)) for r in range(ARGS["ranks"])]


def test_ranks_cover_every_sample_once_per_epoch_within_capacity():
    samplers = all_ranks()
    batches = [list(s) for s in samplers]
    assert len({len(b) for b in batches}) == 1 and len(batches[0]) == len(samplers[0])
    seen = sorted(i for rank in batches for batch in rank for i in batch)
    assert seen == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in batch) <= ARGS["capacity"] for rank in batches for batch in rank)


def test_epochs_reshuffle_and_repeat_deterministically():
    a, b = all_ranks()[0], all_ranks()[0]
    first = list(a)
    a.set_epoch(1)
    second = list(a)
    assert first != second
    b.set_epoch(1)
    assert list(b) == second
    assert list(a) == second  # iterating again replays the epoch
    unshuffled = PackedSampler(LENGTHS, rank=0, shuffle=False, **ARGS)
    assert list(unshuffled)[0] == unshuffled.plan().steps[0][0]


@pytest.mark.parametrize("stop", [0, 1, 7])
def test_resume_mid_epoch_loses_and_repeats_nothing(stop):
    for rank in range(ARGS["ranks"]):
        sampler = PackedSampler(LENGTHS, rank=rank, **ARGS)
        sampler.set_epoch(3)
        full = list(sampler)
        sampler.set_epoch(3)
        it = iter(sampler)
        head = [next(it) for _ in range(stop)]
        state = sampler.state_dict()
        assert state == {"epoch": 3, "step": stop}
        resumed = PackedSampler(LENGTHS, rank=rank, **ARGS)
        resumed.load_state_dict(state)
        assert head + list(resumed) == full
        assert list(resumed) == full  # the next pass over the epoch starts at its first step


def test_drop_last_skips_steps_with_idle_ranks():
    lengths = [200] * 7  # one sample per pack: 7 packs on 3 ranks -> the last step has 2 idle ranks
    batches = [list(PackedSampler(lengths, rank=r, drop_last=dl, **ARGS)) for dl in (False, True) for r in range(3)]
    keep, drop = batches[:3], batches[3:]
    assert [len(b) for b in keep] == [3, 3, 3] and sum(not b[-1] for b in keep) == 2
    assert [len(b) for b in drop] == [2, 2, 2] and all(batch for rank in drop for batch in rank)


def test_invalid_rank():
    with pytest.raises(ValueError, match="rank"):
        PackedSampler(LENGTHS, rank=3, **ARGS)


def test_collate_packed_matches_pack():
    latents = [torch.randn(4, 4, 6), torch.randn(4, 3, 2, 2), torch.randn(4, 2, 8)]
    batch = [(x, label, 0.5 * label) for label, x in enumerate(latents)]
    tokens, seqs, labels, times = collate_packed(batch, patch_size=2)
    ref_tokens, ref_seqs = packdit.pack(latents, 2)
    assert torch.equal(tokens, ref_tokens) and seqs.seqlens == ref_seqs.seqlens
    assert labels.tolist() == [0, 1, 2] and times.tolist() == [0.0, 0.5, 1.0]
    tokens, seqs = collate_packed(latents, patch_size=2)
    assert torch.equal(tokens, ref_tokens)
    assert collate_packed([], patch_size=2) is None


def test_with_dataloader():
    shapes = [(4, 2 * (1 + i % 4), 2 * (1 + i % 3)) for i in range(30)]
    dataset = [(torch.randn(s), i) for i, s in enumerate(shapes)]
    lengths = [s[1] * s[2] // 4 for s in shapes]
    sampler = PackedSampler(lengths, capacity=24, ranks=1, rank=0, hidden_size=8, window=2)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=functools.partial(collate_packed, patch_size=2))
    seen = []
    for tokens, seqs, labels in loader:
        assert seqs.num_tokens <= 24 and tokens.shape[0] == seqs.num_tokens
        assert list(seqs.seqlens) == [lengths[i] for i in labels.tolist()]
        seen += labels.tolist()
    assert sorted(seen) == list(range(30))
