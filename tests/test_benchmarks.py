"""Keeps benchmarks/ alive in CI: the runner on tiny CPU shapes, and a pytest-benchmark of pack."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import run as bench_run  # noqa: E402
import workloads  # noqa: E402
from common import OutputMismatch, forward_and_grads, verify_outputs  # noqa: E402

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


def test_verify_outputs_accepts_equal_and_refuses_wrong():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 8, generator=g), torch.randn(8, 8, generator=g)
    grad = torch.randn(64, 8, generator=g)
    want = forward_and_grads(lambda x, w: torch.tanh(x @ w), [x, w], grad, dtype=torch.float64)
    got = forward_and_grads(lambda x, w: torch.tanh(x @ w), [x, w], grad)
    assert verify_outputs("tanh", got, want, tol=1e-5) < 1e-5
    wrong = forward_and_grads(lambda x, w: torch.tanh(x @ w.t()), [x, w], grad)  # a transposed weight
    with pytest.raises(OutputMismatch, match=r"tanh/wrong: output differs.*relative error"):
        verify_outputs("tanh/wrong", wrong, want, tol=1e-2, names=["output", "dx", "dw"])
    bad_grad = got[:2] + [-got[2]]  # right output, gradient of the wrong sign
    with pytest.raises(OutputMismatch, match="dw differs"):
        verify_outputs("tanh", bad_grad, want, tol=1e-2, names=["output", "dx", "dw"])
    nan = got[0].clone()
    nan[3, 1] = float("nan")
    with pytest.raises(OutputMismatch, match="relative error inf"):
        verify_outputs("tanh", nan, want[0], tol=1.0)
    with pytest.raises(OutputMismatch, match="shape"):
        verify_outputs("tanh", got[0][:-1], want[0], tol=1.0)


def test_verify_outputs_two_x_rule_with_a_peer():
    want = torch.ones(100)
    peer = want + 1e-3  # relative error 1e-3
    assert verify_outputs("x", want + 2e-3, want, tol=0.0, peer=peer) == pytest.approx(2e-3, rel=1e-3)
    with pytest.raises(OutputMismatch, match=r"allowed 0.002"):
        verify_outputs("x", want + 2.5e-3, want, tol=0.0, peer=peer)
