"""examples/train_tiny.py: a resumed run equals an uninterrupted one (no sample lost or repeated)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import train_tiny  # noqa: E402

from packdit import checkpoint  # noqa: E402


def test_resume_equals_uninterrupted(tmp_path):
    common = ["--samples", "24", "--capacity", "160", "--seed", "3"]
    train_tiny.main([*common, "--steps", "6", "--out", str(tmp_path / "straight")])
    train_tiny.main([*common, "--steps", "3", "--out", str(tmp_path / "resumed")])
    train_tiny.main([*common, "--steps", "6", "--out", str(tmp_path / "resumed"), "--resume"])
    a = checkpoint.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    b = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 6 and a["losses"] == b["losses"]
    assert a["sampler"] == b["sampler"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (tmp_path / "resumed" / "loss.png").stat().st_size > 0
    samples = torch.load(tmp_path / "resumed" / "samples.pt")
    assert [tuple(s.shape) for s in samples] == [(4, 8, 8), (4, 8, 16), (4, 3, 8, 8)]


def test_synthetic_data_is_a_function_of_the_index():
    a, la = train_tiny.synthetic_latent(5, seed=1)
    b, lb = train_tiny.synthetic_latent(5, seed=1)
    assert torch.equal(a, b) and la == lb and a.shape == train_tiny.SHAPES[5]
