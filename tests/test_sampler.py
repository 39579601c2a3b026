"""PackedSampler (per-rank batches, epochs, resume, drop_last, sequence-parallel groups) and collate_packed."""

import functools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import packdit
from packdit import checkpoint
from packdit.data import PackedSampler, collate_packed
from packdit.packing import CostModel

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
        assert state["epoch"] == 3 and state["step"] == stop and not any(state["plan_excludes"])
        resumed = PackedSampler(LENGTHS, rank=rank, **ARGS)
        resumed.load_state_dict(state)
        assert head + list(resumed) == full
        assert list(resumed) == full  # the next pass over the epoch starts at its first step


def run_ranks(samplers, steps=None):
    """Iterate every rank's sampler in lock step for ``steps`` batches (all when None); the batches per rank."""
    iterators = [iter(s) for s in samplers]
    taken = [[] for _ in samplers]
    for _ in range(len(samplers[0]) if steps is None else steps):
        for batches, it in zip(taken, iterators):
            batches.append(next(it))
    return taken


def samples_of(taken) -> list[int]:
    return [i for rank in taken for batch in rank for i in batch]


RESIZES = {
    "world 2 -> 3": (dict(ranks=2), dict(ranks=3)),
    "world 4 -> 2": (dict(ranks=4), dict(ranks=2)),
    "capacity 256 -> 170": (dict(ranks=3), dict(ranks=3, capacity=170)),
    "window 4 -> 1": (dict(ranks=2), dict(ranks=2, window=1)),
    "cost model": (dict(ranks=2), dict(ranks=2, hidden_size=None, cost=lambda L: L.astype(float) ** 3)),
}


@pytest.mark.parametrize("stop", [1, 6])
@pytest.mark.parametrize("change", list(RESIZES))
def test_resume_with_another_configuration_replans_the_rest_of_the_epoch(change, stop):
    before, after = ({**ARGS, "window": 2, **kw} for kw in RESIZES[change])
    lengths = LENGTHS[:200]
    old = [PackedSampler(lengths, rank=r, **before) for r in range(before["ranks"])]
    for s in old:
        s.set_epoch(2)
    head = run_ranks(old, stop)
    state = old[0].state_dict()
    for s in old[1:]:
        assert s.state_dict() == state  # one rank's state is every rank's
    new = [PackedSampler(lengths, rank=r, **after) for r in range(after["ranks"])]
    for s in new:
        s.load_state_dict(state)
    tail = run_ranks(new)
    assert sorted(samples_of(head) + samples_of(tail)) == list(range(200))  # each sample of the epoch once
    assert all(sum(lengths[i] for i in batch) <= after["capacity"] for rank in tail for batch in rank)
    assert new[0].epoch == 2 and new[0].state_dict()["consumed"] == np.packbits(np.ones(200, bool)).tobytes()


def test_resume_across_two_resizes_then_the_next_epoch():
    lengths = LENGTHS[:200]
    configs = [dict(ARGS, ranks=2), dict(ARGS, ranks=3, capacity=200), dict(ARGS, ranks=1)]
    state, seen = None, []
    for config, steps in zip(configs, [4, 3, None]):
        samplers = [PackedSampler(lengths, rank=r, **config) for r in range(config["ranks"])]
        for s in samplers:
            s.set_epoch(1)
            if state is not None:
                s.load_state_dict(state)
        taken = run_ranks(samplers, steps)
        seen += samples_of(taken)
        state = samplers[0].state_dict()
    assert sorted(seen) == list(range(200))
    assert list(samplers[0]) == taken[0]  # another pass over the epoch replays its current (re-planned) plan
    done = PackedSampler(lengths, rank=0, **configs[0])
    done.load_state_dict(state)
    assert list(done) == []  # saved at the end of the epoch: nothing left, in any configuration
    done.set_epoch(2)
    fresh = PackedSampler(lengths, rank=0, **configs[0])
    fresh.set_epoch(2)
    assert list(done) == list(fresh)  # the next epoch is its own full plan


def test_state_survives_a_weights_only_checkpoint(tmp_path):
    sampler = PackedSampler(LENGTHS, rank=1, **ARGS)
    head = run_ranks([sampler], 5)[0]
    checkpoint.save({"sampler": sampler.state_dict()}, tmp_path / "ckpt.pt")
    resumed = PackedSampler(LENGTHS, rank=1, **ARGS)
    resumed.load_state_dict(checkpoint.load(tmp_path / "ckpt.pt")["sampler"])
    sampler.set_epoch(1)
    sampler.set_epoch(0)
    assert head + list(resumed) == list(sampler)


def test_state_of_the_consumed_batches_when_a_loader_prefetches():
    sampler = PackedSampler(LENGTHS, rank=0, **ARGS)
    full = list(sampler)
    it = iter(sampler)
    for _ in range(5):  # a loader prefetched 5 batches, the training loop trained on 3
        next(it)
    state = sampler.state_dict(consumed_batches=3)
    assert state["step"] == 3
    resumed = PackedSampler(LENGTHS, rank=0, **ARGS)
    resumed.load_state_dict(state)
    assert list(resumed) == full[3:]
    for bad in (-1, 6, 2.5):
        with pytest.raises(ValueError, match=r"consumed_batches: expected an int in \[0, 5\]"):
            sampler.state_dict(consumed_batches=bad)


def tampered(state: dict, **changes) -> dict:
    return {**state, **changes}


def flipped_bit(bits: bytes) -> bytes:
    return bits[:3] + bytes([bits[3] ^ 1]) + bits[4:]


@pytest.mark.parametrize("make_bad, match", [
    (lambda s: {"epoch": 0, "step": 3}, r"state: expected a PackedSampler.state_dict\(\) of version 3"),
    (lambda s: tampered(s, step=-1), r"state\['step'\]: expected an int >= 0, got -1"),
    (lambda s: tampered(s, step=10**6), r"state\['step'\]: expected 0 <= step <= \d+ .*got 1000000"),
    (lambda s: tampered(s, step=2.5), r"state\['step'\]: expected an int >= 0, got 2.5"),
    (lambda s: tampered(s, epoch=-2), r"state\['epoch'\]: expected an int >= 0, got -2"),
    (lambda s: tampered(s, seed=6), r"state\['seed'\]: expected 5 .*got 6"),
    (lambda s: tampered(s, shuffle=False), r"state\['shuffle'\]: expected True .*got False"),
    (lambda s: tampered(s, consumed=flipped_bit(s["consumed"])), r"state\['consumed'\]: expected the samples"),
    (lambda s: tampered(s, consumed=s["consumed"][:-1]),
     r"state\['consumed'\]: expected a bitmap of 50 bytes over 400 samples, got 49 bytes"),
    (lambda s: tampered(s, config={"ranks": 3}), r"state\['config'\]: expected keys"),
])
def test_a_state_that_does_not_describe_this_data_is_refused(make_bad, match):
    sampler = PackedSampler(LENGTHS, rank=0, **ARGS)
    run_ranks([sampler], 4)
    bad = make_bad(sampler.state_dict())
    fresh = PackedSampler(LENGTHS, rank=0, **ARGS)
    expected = list(fresh)
    with pytest.raises(ValueError, match=match):
        fresh.load_state_dict(bad)
    assert list(fresh) == expected and fresh.state_dict()["step"] == len(expected)  # a refused state changes nothing


@pytest.mark.parametrize("lengths, match", [
    (LENGTHS[:-1], r"state\['num_samples'\]: the state is for 400 samples, this sampler has 399"),
    ([n + (i == 17) for i, n in enumerate(LENGTHS)], r"state\['lengths_sha256'\]: .*other sample lengths"),
])
def test_resume_on_other_lengths_is_refused(lengths, match):
    sampler = PackedSampler(LENGTHS, rank=0, **ARGS)
    run_ranks([sampler], 4)
    with pytest.raises(ValueError, match=match):
        PackedSampler(lengths, rank=0, **ARGS).load_state_dict(sampler.state_dict())


def test_drop_last_skips_steps_with_idle_ranks():
    lengths = [200] * 7  # one sample per pack: 7 packs on 3 ranks -> the last step has 2 idle ranks
    batches = [list(PackedSampler(lengths, rank=r, drop_last=dl, **ARGS)) for dl in (False, True) for r in range(3)]
    keep, drop = batches[:3], batches[3:]
    assert [len(b) for b in keep] == [3, 3, 3] and sum(not b[-1] for b in keep) == 2
    assert [len(b) for b in drop] == [2, 2, 2] and all(batch for rank in drop for batch in rank)


@pytest.mark.parametrize("bad, match", [
    (dict(rank=3), r"rank: expected an int with 0 <= rank < ranks=3, got 3"),
    (dict(rank=0.5), r"rank: expected an int with 0 <= rank < ranks=3, got 0.5"),
    (dict(ranks=0), r"ranks: expected a positive int, got 0"),
    (dict(seed="5"), r"seed: expected an int, got '5'"),
    (dict(lengths=[3.5, 2]), r"lengths: expected integer token counts, got 3.5 for sample 0"),
    (dict(lengths=[[3, 2]]), r"lengths: expected a 1-D sequence of token counts, got shape \(1, 2\)"),
    (dict(lengths=[300]), r"sample 0 has 300 tokens, more than capacity=256"),  # at construction, not iteration
])
def test_invalid_arguments(bad, match):
    kwargs = dict(ARGS, lengths=LENGTHS, rank=0) | bad
    with pytest.raises(ValueError, match=match):
        PackedSampler(kwargs.pop("lengths"), **kwargs)
    with pytest.raises(ValueError, match=r"epoch: expected an int >= 0, got -1"):
        PackedSampler(LENGTHS, rank=0, **ARGS).set_epoch(-1)


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


# sequence parallelism: 8 of the 150 samples are longer than the capacity of 256 tokens (up to 4 ranks' worth)
SP_LENGTHS = [257 + 131 * i % 767 if i % 19 == 7 else n for i, n in enumerate(LENGTHS[:150])]
SP_ARGS = dict(capacity=256, ranks=4, hidden_size=16, window=2, seed=5, sp_sizes=(1, 2, 4))


def test_sequence_parallel_ranks_learn_their_group_and_cover_every_sample_once():
    assert sum(n > 256 for n in SP_LENGTHS) == 8 and max(SP_LENGTHS) <= 4 * 256
    samplers = [PackedSampler(SP_LENGTHS, rank=r, **SP_ARGS) for r in range(4)]
    groups = [list(s.groups()) for s in samplers]
    assert [[g.indices for g in rank] for rank in groups] == [list(s) for s in samplers]  # iter: the same packs
    seen = []
    for step in zip(*groups):
        for rank, group in enumerate(step):
            assert rank in group.ranks and group.first_rank % group.size == 0
            assert all(step[r] == group for r in group.ranks)  # every rank of the group has the same group
            assert sum(SP_LENGTHS[i] for i in group.indices) <= group.size * 256
            if rank == group.first_rank:
                seen += group.indices
    assert sorted(seen) == list(range(150))
    long_groups = [g for rank in groups for g in rank for i in g.indices if SP_LENGTHS[i] > 256]
    assert {g.size for g in long_groups} == {2, 4}  # the smallest group that holds each


def test_sequence_parallel_resume_is_exact():
    for rank in range(4):
        sampler = PackedSampler(SP_LENGTHS, rank=rank, **SP_ARGS)
        sampler.set_epoch(1)
        full = list(sampler.groups())
        sampler.set_epoch(2)
        sampler.set_epoch(1)
        it = sampler.groups()
        head = [next(it) for _ in range(5)]
        resumed = PackedSampler(SP_LENGTHS, rank=rank, **SP_ARGS)
        resumed.load_state_dict(sampler.state_dict())
        assert head + list(resumed.groups()) == full


SP_CHANGES = {  # (before, after, longest sample both can run)
    "groups on, world 4 -> 2": (dict(ranks=4, sp_sizes=(1, 2, 4)), dict(ranks=2, sp_sizes=(1, 2)), 512),
    "groups off -> on": (dict(ranks=4, sp_sizes=(1,), split_long=True), dict(ranks=4, sp_sizes=(1, 2, 4)), 1024),
    "groups on -> off": (dict(ranks=4, sp_sizes=(1, 4)), dict(ranks=4, sp_sizes=(1,)), 256),
    "all-to-all cost": (dict(ranks=2, sp_sizes=(1, 2), hidden_size=None, cost=CostModel(64.0, 1.0)),
                        dict(ranks=2, sp_sizes=(1, 2), hidden_size=None, cost=CostModel(64.0, 1.0, 0.0, 9.0)), 512),
}


@pytest.mark.parametrize("change", list(SP_CHANGES))
def test_resume_with_other_groups_replans_the_rest_of_the_epoch(change):
    before, after, longest = SP_CHANGES[change]
    before, after = {**SP_ARGS, **before}, {**SP_ARGS, **after}
    lengths = [min(n, longest) for n in SP_LENGTHS]
    old = [PackedSampler(lengths, rank=r, **before) for r in range(before["ranks"])]
    head = run_ranks([s.groups() for s in old], 3)
    state = old[0].state_dict()
    assert state["config"]["sp_sizes"] == list(before["sp_sizes"])
    new = [PackedSampler(lengths, rank=r, **after) for r in range(after["ranks"])]
    for s in new:
        s.load_state_dict(state)
    tail = run_ranks([s.groups() for s in new], len(new[0]))
    led = [(i, g.size) for taken in (head, tail) for rank, groups in enumerate(taken) for g in groups
           if g.first_rank == rank for i in g.indices]  # each group counted once, by its first rank
    assert sorted(i for i, _ in led) == list(range(150)), "each sample of the epoch once"
    assert all(size > 1 for i, size in led if lengths[i] > 256)  # the long ones (after a drop too) run by groups
    assert all(g.size in after["sp_sizes"] for groups in tail for g in groups)
    assert new[0].state_dict()["consumed"] == np.packbits(np.ones(150, bool)).tobytes()


def test_a_version_2_state_resumes_exactly():
    sampler = PackedSampler(LENGTHS, rank=1, **ARGS)
    full = list(sampler)
    head = run_ranks([sampler], 6)[0]
    state = sampler.state_dict()
    assert state["version"] == 3 and state["config"]["sp_sizes"] == [1]
    old = {**state, "version": 2, "config": {k: v for k, v in state["config"].items() if k != "sp_sizes"}}
    resumed = PackedSampler(LENGTHS, rank=1, **ARGS)
    resumed.load_state_dict(old)
    assert head + list(resumed) == full
    with pytest.raises(ValueError, match=r"state\['config'\]\['sp_sizes'\]: expected a list of group sizes, got 4"):
        PackedSampler(LENGTHS, rank=1, **ARGS).load_state_dict({**state, "config": {**state["config"], "sp_sizes": 4}})


def test_pass_groups_follow_a_dataloader_pass_and_a_resume():
    dataset = [(torch.zeros(1), i) for i in range(150)]
    sampler = PackedSampler(SP_LENGTHS, rank=2, **SP_ARGS)
    expected = list(sampler.plan().rank_groups(2))
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=lambda batch: [label for _, label in batch])
    pairs = list(zip(loader, sampler.pass_groups()))
    assert len(pairs) == len(sampler) and all(labels == group.indices for labels, group in pairs)
    assert [g.size for _, g in pairs] == [g.size for g in expected]
    it = iter(loader)
    for _ in range(4):
        next(it)
    resumed = PackedSampler(SP_LENGTHS, rank=2, **SP_ARGS)
    resumed.load_state_dict(sampler.state_dict(consumed_batches=4))
    loader = DataLoader(dataset, batch_sampler=resumed, collate_fn=lambda batch: [label for _, label in batch])
    rest = list(zip(loader, resumed.pass_groups()))  # the pass starts at step 4: so do its groups
    assert [group for _, group in rest] == [group for _, group in pairs[4:]]
    assert all(labels == group.indices for labels, group in rest)


def test_drop_last_with_groups_skips_steps_with_idle_ranks():
    lengths = [500] * 3 + [200] * 3  # three 2-rank groups and three single-rank packs on 4 ranks
    kwargs = dict(SP_ARGS, sp_sizes=(1, 2), window=1)
    keep = [list(PackedSampler(lengths, rank=r, **kwargs).groups()) for r in range(4)]
    drop = [list(PackedSampler(lengths, rank=r, drop_last=True, **kwargs).groups()) for r in range(4)]
    idle = [s for s, step in enumerate(zip(*keep)) if any(not g.indices for g in step)]
    assert idle and len(drop[0]) == len(keep[0]) - len(idle)
    assert all(g.indices for rank in drop for g in rank)


@pytest.mark.parametrize("bad, match", [
    (dict(sp_sizes=(1, 3)), r"sp_sizes: 3 does not divide ranks=4"),
    (dict(lengths=[2000]), r"sample 0 has 2000 tokens, more than the largest sequence-parallel group holds "
                           r"\(4 ranks x capacity=256 = 1024 tokens\)"),
])
def test_invalid_sequence_parallel_arguments(bad, match):
    kwargs = dict(SP_ARGS, lengths=SP_LENGTHS, rank=0) | bad
    with pytest.raises(ValueError, match=match):
        PackedSampler(kwargs.pop("lengths"), **kwargs)
