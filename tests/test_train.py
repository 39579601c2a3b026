"""packdit.train.Trainer in one process: images and videos with spacetime patches, a resumed run (from a checkpoint,
or by calling run again) equals an uninterrupted one bitwise across an epoch boundary, the per-step hook."""

import pytest
import torch

from packdit import DiT
from packdit.train import StepInfo, Trainer

_SHAPES = [(4, 4, 4), (4, 2, 4, 6), (4, 6, 2), (4, 3, 2, 2)]  # 4, 12, 3, 3 tokens at patch (1, 2, 2)


class Clips:
    """10 latents, images and videos of mixed sizes, labels in [0, 3); a function of the index only."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.randn(_SHAPES[i % 4], generator=torch.Generator().manual_seed(i)), i % 3

    def lengths(self):
        return [4, 12, 3, 3] * 2 + [4, 12]


def _trainer():
    torch.manual_seed(0)
    # label dropout inside the model draws from the global RNG: resuming must restore it
    model = DiT(input_size=8, patch_size=(1, 2, 2), in_channels=4, hidden_size=16, depth=1, num_heads=2,
                num_classes=3, learn_sigma=False, class_dropout_prob=0.3, backend="torch")
    data = Clips()
    return Trainer(model, data, lengths=data.lengths(), capacity=16, patch_size=(1, 2, 2), lr=1e-2, window=2,
                   seed=5, cfg_dropout=0.2, null_label=3)


def _assert_same_run(a: Trainer, b: Trainer):
    assert a.step == b.step and a.losses == b.losses
    assert a.sampler.state_dict() == b.sampler.state_dict()
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_resume_from_a_checkpoint_and_a_second_run_equal_one_run(tmp_path):
    straight = _trainer()
    steps = []
    straight.run(7, on_step=steps.append)
    assert [s.step for s in steps] == list(range(1, 8)) and all(isinstance(s, StepInfo) for s in steps)
    assert steps[-1].epoch >= 1, "the run should cross an epoch boundary"
    assert steps[0].samples > 0 and all(torch.isfinite(torch.tensor(straight.losses)))

    first = _trainer()
    first.run(3, checkpoint=tmp_path / "ckpt.pt", checkpoint_every=2)
    torch.manual_seed(123)  # the resumed process starts from another global RNG state
    resumed = _trainer()
    resumed.load(tmp_path / "ckpt.pt")
    assert resumed.step == 3
    resumed.run(7)
    _assert_same_run(resumed, straight)

    twice = _trainer()
    twice.run(2)
    twice.run(7)
    _assert_same_run(twice, straight)


def test_cfg_dropout_needs_the_null_label():
    trainer = _trainer()
    trainer.null_label = None
    with pytest.raises(ValueError, match="null_label"):
        trainer.run(1)
