"""Keeps benchmarks/ alive in CI: the runner on tiny CPU shapes, and a pytest-benchmark of pack."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import run as bench_run  # noqa: E402
import workloads  # noqa: E402

import packdit  # noqa: E402


def test_runner_writes_results(tmp_path, capsys):
    assert bench_run.main(["--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    for section in bench_run.SECTIONS:
        files = list(tmp_path.glob(f"*/{section}.*"))
        assert {f.suffix for f in files} == {".json", ".csv", ".png"}, files
        data = json.loads(next(f for f in files if f.suffix == ".json").read_text())
        assert data["rows"] and data["env"]["torch"] == torch.__version__
        assert str(next(f for f in files if f.suffix == ".json")) in printed


def test_runner_rejects_unknown_section():
    with pytest.raises(SystemExit):
        bench_run.main(["--only", "nope"])


@pytest.mark.parametrize("mix", workloads.MIXES)
def test_workloads_are_patchable_and_reproducible(mix):
    shapes = workloads.take_tokens(mix, 4096, seed=3)
    assert shapes == workloads.take_tokens(mix, 4096, seed=3)
    assert all(s[-1] % 2 == 0 and s[-2] % 2 == 0 for s in shapes)
    assert sum(workloads.num_patches(s) for s in shapes) <= 4096 or len(shapes) == 1


def test_pack_benchmark(benchmark):
    latents = [torch.randn(s) for s in workloads.take_tokens("video-mix", 2048, seed=0)]
    tokens, seqs = benchmark(packdit.pack, latents, (1, 2, 2))
    assert tokens.shape[0] == seqs.num_tokens
