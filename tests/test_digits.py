"""examples/digits.py: a short run on the real digits learns (its samples are classified as their conditioning class
far above the 10% of chance), and a run stopped mid-way and resumed ends exactly where an uninterrupted one does."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import digits  # noqa: E402

from packdit import checkpoint  # noqa: E402
from packdit.train import Trainer  # noqa: E402

# ~40 s of one core: a narrower, shallower model than the default, with a higher learning rate and no decay, reaches
# 66% (fixed seed; 300 steps reach 19-21%, an untrained model ~10%). One thread: the run must not depend on how busy
# the machine is, where a second thread only waits.
SHORT = ["--steps", "600", "--lr", "5e-3", "--decay", "none", "--hidden", "64", "--depth", "3", "--cfg-scale", "5",
         "--per-cell", "1", "--sample-steps", "12", "--threads", "1"]
TINY = ["--steps", "6", "--warmup", "2", "--hidden", "32", "--depth", "1", "--heads", "2", "--checkpoint-every", "3",
        "--per-cell", "1", "--sample-steps", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_short_run_learns_the_classes(tmp_path):
    scores = digits.main([*SHORT, "--out", str(tmp_path)])
    assert scores["classifier_held_out"] >= 0.9, scores          # the judge itself knows the real digits
    assert scores["overall"] >= 0.4, scores                        # chance: 0.1
    assert json.loads((tmp_path / "accuracy.json").read_text()) == scores
    saved = np.load(tmp_path / "samples.npz")
    count = digits.NUM_CLASSES * len(digits.SAMPLE_SHAPES)
    assert saved["labels"].dtype.kind == "i" and sorted(saved["labels"].tolist()) == sorted(
        list(range(digits.NUM_CLASSES)) * len(digits.SAMPLE_SHAPES))
    shapes = [saved[f"sample_{i:03d}"].shape for i in range(count)]
    assert shapes == [s for _ in range(digits.NUM_CLASSES) for s in digits.SAMPLE_SHAPES]
    assert np.mean(saved["predicted_class"] == saved["labels"]) == scores["overall"]
    for name in ("samples.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 0


class Stop(Exception):
    pass


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    digits.main([*TINY, "--out", str(tmp_path / "straight")])

    train_step = Trainer.train_step

    def stop_at_step_4(self, *args, **kwargs):
        if self.step == 4:
            raise Stop  # a crash after the checkpoint of step 3
        return train_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train_step", stop_at_step_4)
        with pytest.raises(Stop):
            digits.main([*TINY, "--out", str(tmp_path / "resumed")])
    assert checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")["step"] == 3
    digits.main([*TINY, "--out", str(tmp_path / "resumed"), "--resume"])

    a, b = (checkpoint.load(tmp_path / run / "checkpoint.pt") for run in ("straight", "resumed"))
    assert a["step"] == b["step"] == 6 and a["losses"] == b["losses"] and a["sampler"] == b["sampler"]
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]   # the learning-rate schedule too
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    sa, sb = (np.load(tmp_path / run / "samples.npz") for run in ("straight", "resumed"))
    assert sorted(sa.files) == sorted(sb.files) and all(np.array_equal(sa[k], sb[k]) for k in sa.files)
