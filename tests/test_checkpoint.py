"""packdit.checkpoint: checksummed atomic saves, every malformed file a CheckpointError, no stale temporaries."""

import fcntl
import fractions
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from packdit import checkpoint
from packdit.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parent.parent


def payload() -> dict:
    generator = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=generator), "b": torch.arange(7), "step": 12, "name": "run",
            "losses": [0.5, 0.25]}


def assert_equal_payload(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key], key


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_and_torch_load_still_reads_the_file(tmp_path):
    path = checkpoint.save(payload(), tmp_path / "ckpt.pt")
    assert_equal_payload(checkpoint.load(path), payload())
    assert_equal_payload(torch.load(path, weights_only=True), payload())  # the trailer follows the zip archive
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_every_one_byte_flip_is_a_checkpoint_error(tmp_path):
    path = checkpoint.save(payload(), tmp_path / "ckpt.pt")
    data = path.read_bytes()
    rng = np.random.default_rng(16)
    # random bytes anywhere (pickle, zip headers, padding, tensor data), plus every byte of the trailer
    positions = sorted(set(rng.integers(0, len(data), 300).tolist()) | set(range(len(data) - 56, len(data))))
    for position in positions:
        corrupt = bytearray(data)
        corrupt[position] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(corrupt))
        with pytest.raises(CheckpointError, match=r"ckpt\.pt \(\d+ bytes\) is truncated or corrupt"):
            checkpoint.load(path)
    path.write_bytes(data)
    assert_equal_payload(checkpoint.load(path), payload())


@pytest.mark.parametrize("make, match", [
    (lambda data, path: path.write_text("step: 3\n" * 20), "no packdit checksum trailer"),
    (lambda data, path: path.write_text("step: 3\n"), "shorter than the 56-byte checksum trailer"),
    (lambda data, path: path.write_bytes(b""), "shorter than the 56-byte checksum trailer"),
    (lambda data, path: path.write_bytes(data[:40]), "shorter than the 56-byte checksum trailer"),
    (lambda data, path: path.write_bytes(data[:len(data) // 2]), "no packdit checksum trailer"),
    (lambda data, path: path.write_bytes(data[:-1]), "no packdit checksum trailer"),
    (lambda data, path: path.write_bytes(data[:-56]), "no packdit checksum trailer"),  # the bare torch.save archive
    (lambda data, path: path.write_bytes(data + b"\0"), "no packdit checksum trailer"),
    (lambda data, path: path.write_bytes(data[:100] + data[101:]), r"records a \d+-byte archive, the file holds"),
    (lambda data, path: torch.save(payload(), path), "no packdit checksum trailer"),
    (lambda data, path: path.mkdir(), "not a regular file"),
    (lambda data, path: None, "no such file"),
])
def test_malformed_files_are_checkpoint_errors(tmp_path, make, match):
    data = checkpoint.save(payload(), tmp_path / "good.pt").read_bytes()
    path = tmp_path / "bad.pt"
    make(data, path)
    with pytest.raises(CheckpointError, match=match) as info:
        checkpoint.load(path)
    assert str(path) in str(info.value)


def test_what_torch_load_refuses_is_a_checkpoint_error(tmp_path):
    path = checkpoint.save({"ratio": fractions.Fraction(1, 3)}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"passed its checksum but torch.load failed: UnpicklingError"):
        checkpoint.load(path)
    assert checkpoint.load(path, weights_only=False)["ratio"] == fractions.Fraction(1, 3)


def test_save_removes_stale_temporaries_of_its_target_only(tmp_path):
    stale, live = tmp_path / ".ckpt.pt.packdit-dead0001.tmp", tmp_path / ".ckpt.pt.packdit-live0001.tmp"
    others = [".other.pt.packdit-dead0001.tmp", ".ckpt.pt.x.packdit-dead0001.tmp", ".ckpt.pt.dead0001.tmp"]
    for p in [stale, live, *(tmp_path / name for name in others)]:
        p.write_bytes(b"partial")
    writer = os.open(live, os.O_RDONLY)  # a save in progress holds its temporary's lock
    fcntl.flock(writer, fcntl.LOCK_EX)
    try:
        checkpoint.save(payload(), tmp_path / "ckpt.pt")
        assert temporaries(tmp_path) == sorted([live.name, *others])
    finally:
        os.close(writer)
    checkpoint.save(payload(), tmp_path / "ckpt.pt")  # its writer is gone now
    assert temporaries(tmp_path) == sorted(others)


CHILD = """
import sys, torch
from packdit import checkpoint
state = {"w": torch.randn(4 << 20)}
print("ready", flush=True)
while True:
    checkpoint.save(state, sys.argv[1])
"""


def test_sigkill_during_save_leaves_no_pile_of_temporaries(tmp_path):
    path = tmp_path / "ckpt.pt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    rng = np.random.default_rng(3)
    left_behind = []
    for _ in range(4):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, env=env, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.2, 0.6)))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
        left_behind.append(len(temporaries(tmp_path)))
        if path.exists():
            assert checkpoint.load(path)["w"].shape == (4 << 20,)  # the last complete save, intact
    # each kill leaves its own temporary (two if it lands between creating one and sweeping the previous)
    # and the next save removes it: the count stays bounded however many saves are killed
    assert 1 <= max(left_behind) <= 2
    checkpoint.save({"step": 1}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
