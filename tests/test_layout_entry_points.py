"""A layout that enters the public API outside ``pack`` is checked once, where it enters: a hand-built one,
one made by ``dataclasses.replace`` from a valid layout, and one written in place after it was validated.
A token tagged with another sample's id would silently take that sample's timestep and label; a position
outside its grid would go straight into the position embedding."""

import dataclasses

import pytest
import torch

import packdit
from packdit import _validate, reference
from packdit.diffusion import FlowMatching, classifier_free_guidance, frame_timesteps, full_token_counts, segment_mean
from packdit.nn import AttentionPool, segment_pool

VIDEO = dict(input_size=8, patch_size=(1, 2, 2), in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10,
             learn_sigma=False, class_dropout_prob=0.0, backend="torch")
T, Y = torch.tensor([10.0, 900.0]), torch.tensor([1, 2])


def _packed():
    """Sample 0: a 2-frame 2x2-patch video (8 tokens), sample 1: a 1x2-patch image (2 tokens)."""
    return packdit.pack([torch.randn(4, 2, 4, 4), torch.randn(4, 2, 4)], (1, 2, 2))


def _tagged_with_another_sample(seqs):
    ids = seqs.segment_ids.clone()
    ids[3] = 1
    return dataclasses.replace(seqs, segment_ids=ids)


def _outside_its_grid(seqs):
    positions = seqs.positions.clone()
    positions[9, 2] = 5  # sample 1's grid is (1, 1, 2)
    return dataclasses.replace(seqs, positions=positions)


SEGMENT = r"seqs.segment_ids: token 3 says segment 1, cu_seqlens puts it in segment 0"
POSITION = r"seqs.positions: token 9 of segment 1 is at \(t, h, w\) = \(0, 0, 5\), outside its grid \(1, 1, 2\)"


@pytest.mark.parametrize("tamper, match", [(_tagged_with_another_sample, SEGMENT), (_outside_its_grid, POSITION)])
def test_dit_forward_packed_refuses_a_replaced_layout(tamper, match):
    model = packdit.DiT(**VIDEO)
    tokens, seqs = _packed()
    with pytest.raises(ValueError, match=match):
        model.forward_packed(tokens, tamper(seqs), T, Y)


def test_a_layout_written_in_place_after_validation_is_checked_again():
    model = packdit.DiT(**VIDEO)
    tokens, seqs = _packed()
    model.forward_packed(tokens, seqs, T, Y)
    seqs.cached("derived", lambda: "computed from the old values")
    seqs.segment_ids[3] = 1
    with pytest.raises(ValueError, match=SEGMENT):
        model.forward_packed(tokens, seqs, T, Y)
    assert "derived" not in seqs._cache, "memoized metadata of the old values must be dropped"
    seqs.segment_ids[3] = 0
    model.forward_packed(tokens, seqs, T, Y)


def test_layout_checks_run_once_per_layout_and_not_with_checks_off(monkeypatch):
    """The value checks are the layout's only device->host reads in the model's layout handling: one per
    hand-built layout object, none for layouts built by pack, none inside packdit.checks(False)."""
    reads = []
    real = _validate.validate_cu_seqlens
    monkeypatch.setattr(_validate, "validate_cu_seqlens", lambda *a, **k: reads.append(1) or real(*a, **k))
    model = packdit.DiT(**VIDEO)
    tokens, seqs = _packed()
    model.forward_packed(tokens, seqs, T, Y)
    assert reads == []
    rebuilt = dataclasses.replace(seqs, segment_ids=seqs.segment_ids.clone())
    for _ in range(3):
        model.forward_packed(tokens, rebuilt, T, Y)
    assert reads == [1]
    with packdit.checks(False):
        model.forward_packed(tokens, _tagged_with_another_sample(seqs), T, Y)
    assert reads == [1]


def test_replace_starts_a_fresh_cache():
    _, seqs = _packed()
    seqs.cached("derived", lambda: 1)
    moved = seqs.to("cpu")
    assert moved.seqlens == seqs.seqlens and "derived" not in moved._cache
    assert "derived" not in dataclasses.replace(seqs)._cache


def test_text_context_given_packed_is_checked():
    model = packdit.DiT(**{**VIDEO, "cond": "text", "text_dim": 6})
    tokens, seqs = _packed()
    ctx, ctx_seqs = torch.randn(5, 6), packdit.PackedSeqs.from_grids([(1, 1, 3), (1, 1, 2)])
    model.forward_packed(tokens, seqs, T, context=(ctx, ctx_seqs))
    bad = dataclasses.replace(ctx_seqs, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"context\[1\]: segment 0 has 2 tokens but its grid"):
        model.forward_packed(tokens, seqs, T, context=(ctx, bad))


def test_pools_and_diffusion_entry_points_check_the_layout():
    tokens, seqs = _packed()
    swapped = dataclasses.replace(seqs, cu_seqlens=torch.tensor([0, 2, 10], dtype=torch.int32), max_seqlen=8)
    lengths = r"seqs: segment 0 has 2 tokens but its grid \(T, H, W\) = \(2, 2, 2\) needs length = 8"
    x = torch.randn(10, 3)
    for call in (lambda s: segment_pool(x, s), lambda s: AttentionPool(4, 2)(torch.randn(10, 4), s),
                 lambda s: segment_mean(x[:, 0], s), lambda s: full_token_counts(s),
                 lambda s: FlowMatching().sample_timesteps(s)):
        call(seqs)
        with pytest.raises(ValueError, match=lengths):
            call(swapped)
    t_frames = [torch.tensor([0.1, 0.2]), torch.tensor([0.3])]
    frame_timesteps(t_frames, seqs)
    positions = seqs.positions.clone()
    positions[9, 0] = 1  # frame 1 of a 1-frame image would read sample 0's t
    with pytest.raises(ValueError, match=r"seqs.positions: token 9"):
        frame_timesteps(t_frames, dataclasses.replace(seqs, positions=positions))
    guided = classifier_free_guidance(lambda x, s, t, y: x, cfg_scale=2.0, null_label=0)
    guided(tokens, seqs, T, Y)
    with pytest.raises(ValueError, match=POSITION):
        guided(tokens, _outside_its_grid(seqs), T, Y)


def test_reference_dit_checks_its_layout_whatever_checks_says():
    model = reference.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                          num_classes=10)
    tokens, seqs = packdit.pack([torch.randn(4, 4, 4), torch.randn(4, 2, 4)], (1, 2, 2))
    with packdit.checks(False), pytest.raises(ValueError, match="seqs.segment_ids: token 3 says segment 1"):
        model.forward_packed(tokens, _tagged_with_another_sample(seqs), T, Y)
