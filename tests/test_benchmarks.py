"""Keeps benchmarks/ alive in CI: the runner on tiny CPU shapes, the output checks that refuse wrong
implementations, the step-model fit guard, and a pytest-benchmark of pack."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import run as bench_run  # noqa: E402
import summary  # noqa: E402
import workloads  # noqa: E402
from common import OutputMismatch, forward_and_grads, verify_outputs  # noqa: E402

import packdit  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def test_runner_writes_results(tmp_path, capsys):
    archive = tmp_path / "results.tar.gz"
    assert bench_run.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--archive", str(archive)]) == 0
    printed = capsys.readouterr().out
    folders = [p.name for p in tmp_path.iterdir() if p.is_dir()]
    assert all(f.endswith("-quick") for f in folders), folders  # a quick run never writes results
    device_folders = [f for f in folders if f.startswith("cpu-")]
    assert len(device_folders) == 1, folders
    import tarfile

    # the archive holds the device's sections; the static sass section writes its own static-sm* folders
    with tarfile.open(archive) as tar:
        assert {f"{device_folders[0]}/{s}.json" for s in bench_run.SECTIONS if s != "sass"} <= set(tar.getnames())
    for section in bench_run.SECTIONS:
        files = list(tmp_path.glob(f"*/{section}.*"))
        assert {f.suffix for f in files} == {".json", ".csv", ".png"}, files
        data = json.loads(next(f for f in files if f.suffix == ".json").read_text())
        assert data["rows"] and data["env"]["torch"] == torch.__version__
        assert str(next(f for f in files if f.suffix == ".json")) in printed
    # the GPU check prints this summary last: every section with timed (or static) rows shows some; attention's
    # quick rows time no packdit kernel
    shown = dict(re.findall(r"^## [^/]+/(\w+): \d+ rows.*, (\d+) shown$", summary.summarize(tmp_path), flags=re.M))
    assert set(shown) == set(bench_run.SECTIONS)
    assert [s for s, n in shown.items() if n == "0"] == ["attention"], shown


def test_runner_rejects_unknown_section():
    with pytest.raises(SystemExit):
        bench_run.main(["--only", "nope"])


def test_quick_results_are_ignored_and_full_cpu_packing_results_are_not():
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0

    assert ignored("benchmarks/results/cpu-x86-64-quick/packing.json")
    assert ignored("benchmarks/results/nvidia-h200-quick/attention.json")
    assert not ignored("benchmarks/results/cpu-x86-64/packing.json")
    assert not ignored("benchmarks/results/nvidia-h200/e2e.json")


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, 1.5 x the gradient backward: a kernel whose forward is right and backward wrong."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return 1.5 * grad


@pytest.mark.parametrize("bug", ["wrong mode", "wrong dq"])
def test_attention_section_refuses_a_wrong_implementation(bug, tmp_path, monkeypatch):
    import attention

    case = attention.Case("cpu-videos", 64, True, "temporal")
    monkeypatch.setattr(attention, "_cases", lambda ctx: [case])
    providers = attention._providers

    def with_a_wrong_one(ctx, seqs, case, default_dq):
        found, skipped = providers(ctx, seqs, case, default_dq)
        ref = attention._reference(seqs, case, fused_rope=True)
        if bug == "wrong mode":  # full attention where the case asks for temporal
            full = attention._reference(seqs, attention.Case(case.mix, 64, True, "full"), fused_rope=True)
            wrong = attention.Provider("wrong", full, fused_rope=True)
        else:
            wrong = attention.Provider("wrong", lambda q, k, v: ref(_ScaleGrad.apply(q), k, v), fused_rope=True)
        return found + [wrong], skipped

    monkeypatch.setattr(attention, "_providers", with_a_wrong_one)
    assert bench_run.main(["--quick", "--device", "cpu", "--only", "attention", "--out", str(tmp_path),
                           "--no-plots"]) == 1
    rows = json.loads(next(tmp_path.glob("*/attention.json")).read_text())["rows"]
    wrong = [r for r in rows if r["provider"] == "wrong"]
    assert len(wrong) == 1 and "ms" not in wrong[0]
    assert ("out differs" if bug == "wrong mode" else "dq differs") in wrong[0]["refused"]
    assert all("ms" in r for r in rows if r["provider"] == "reference")  # the right ones were timed


def test_attention_design_providers_run_with_their_design_then_restore_the_default(tmp_path, monkeypatch):
    """A provider with ``dq="separate"`` or ``dq="atomic"`` is verified and timed with that dQ design forced in its
    forward and its backward (where the design is chosen), one with ``one_block_heads=1`` with one head per
    program on temporal tiles, one with ``fwd_rows=32`` with forward programs of at most 32 rows; afterwards
    packdit is back to its defaults, the temporal rows say the heads per program and the spatial rows the rows
    per forward program each was timed with."""
    import attention

    from packdit.layout import PackedSeqs
    from packdit.ops import attention as attention_op

    cases = [attention.Case("cpu-videos", 64, False, "temporal"), attention.Case("cpu-videos", 64, False, "spatial")]
    monkeypatch.setattr(attention, "_cases", lambda ctx: cases)
    providers, seen = attention._providers, []
    temporal_tiles = (64, 17, False, 72, 2, 1, False)  # _dq_mode's arguments on temporal tiles: dQ added once

    def design():
        return attention_op._dq_mode(*temporal_tiles), attention_op._ONE_BLOCK_HEADS, attention_op._fwd_rows(128, 64, 2)

    default = design()
    assert default[0] == "single" and default[2] == 128
    spatial_tile = attention._schedule(PackedSeqs.from_grids(attention.CPU_LAYOUTS["cpu-videos"]), cases[1]).block_m
    spatial_rows = attention_op._fwd_rows(spatial_tile, 64, 4)
    assert spatial_rows > 32  # so that the 32-row design shows in the rows

    def recorded(name):
        class Record(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                seen.append((name, "forward", design()))
                return x.view_as(x)

            @staticmethod
            def backward(ctx, grad):
                seen.append((name, "backward", design()))
                return grad

        return Record.apply

    designs = {"packdit-separate-dq": dict(dq="separate"), "packdit-atomic-dq": dict(dq="atomic"),
               "packdit-one-head": dict(one_block_heads=1), "packdit-32-row-fwd": dict(fwd_rows=32)}

    def with_every_design(ctx, seqs, case, default_dq):
        found, skipped = providers(ctx, seqs, case, default_dq)
        ref = attention._reference(seqs, case, fused_rope=True)

        def provider(name):
            record = recorded(name)
            return attention.Provider(name, lambda q, k, v: ref(record(q), k, v), fused_rope=True, **designs[name])

        return [provider(name) for name in designs] + found, skipped

    monkeypatch.setattr(attention, "_providers", with_every_design)
    assert bench_run.main(["--quick", "--device", "cpu", "--only", "attention", "--out", str(tmp_path),
                           "--no-plots"]) == 0
    assert {name: {stage for seen_name, stage, _ in seen if seen_name == name} for name in designs} == {
        name: {"forward", "backward"} for name in designs}
    expected = {"packdit-separate-dq": ("separate", default[1], 128), "packdit-atomic-dq": ("atomic", default[1], 128),
                "packdit-one-head": ("single", 1, 128), "packdit-32-row-fwd": ("single", default[1], 32)}
    assert all(state == expected[name] for name, _, state in seen)
    assert design() == default
    rows = json.loads(next(tmp_path.glob("*/attention.json")).read_text())["rows"]
    for name in designs:
        timed = {mode: [r for r in rows if r["provider"] == name and r["mode"] == mode and "ms" in r]
                 for mode in ("temporal", "spatial")}
        assert all({r["pass"] for r in timed[mode]} == {"fwd", "fwd+bwd"} for mode in timed), name
        assert all(r["dq"] == designs[name].get("dq", "single") for r in timed["temporal"]), name
        assert all(r["one_block_heads"] == designs[name].get("one_block_heads", default[1])
                   for r in timed["temporal"]), name
        assert all(r["fwd_rows"] == min(spatial_rows, designs[name].get("fwd_rows", spatial_rows))
                   for r in timed["spatial"]), name


def test_attention_gqa_case_verifies_the_peers_against_a_grouped_oracle(tmp_path, monkeypatch):
    """A GQA case (4 query heads, 2 kv heads): the oracle runs per kv head with its query heads, so dK/dV sum
    over the group; the SDPA peers (``enable_gqa``) agree with it and are timed, and the rows say kv_heads."""
    import attention

    case = attention.Case("cpu-images", 64, False, "full", group=2)
    monkeypatch.setattr(attention, "_cases", lambda ctx: [case])
    assert bench_run.main(["--quick", "--device", "cpu", "--only", "attention", "--out", str(tmp_path),
                           "--no-plots"]) == 0
    rows = json.loads(next(tmp_path.glob("*/attention.json")).read_text())["rows"]
    timed = [r for r in rows if "ms" in r]
    assert {r["provider"] for r in timed} == {"reference", "sdpa-loop", "sdpa-padded"}
    assert all((r["heads"], r["kv_heads"]) == (4, 2) and r["rel_err"] < 1e-5 for r in timed)


def test_attention_rows_name_the_dq_design_and_time_the_other_one():
    """packdit's dQ design per case follows its schedule on the GPU layouts: the dQ kernel at hd 128 and with GQA
    (hd 72 and 128) on 128-row key tiles, atomics at hd 64/72 without GQA, one add per element from the dK/dV
    programs on temporal tiles (each holds whole segments); the alternate provider is atomics beside the other
    two, the dQ kernel beside atomics."""
    import attention

    from packdit.layout import PackedSeqs

    seqs = PackedSeqs.from_grids(attention._mix_grids("video-mix"))

    def default(head_dim, mode="full", group=1):
        case = attention.Case("video-mix", head_dim, False, mode, group)
        return attention._default_dq(attention._schedule(seqs, case), case, torch.bfloat16)

    assert [default(d) for d in (128, 72, 64)] == ["separate", "atomic", "atomic"]
    assert default(72, group=2) == default(128, group=3) == "separate"
    assert default(128, mode="temporal") == default(72, mode="temporal", group=2) == "single"
    assert default(72, mode="spatial") == "atomic"
    assert [attention._other_dq(dq) for dq in ("atomic", "separate", "single")] == ["separate", "atomic", "atomic"]


@pytest.mark.parametrize("section", ["norm", "mlp", "rope"])
@pytest.mark.parametrize("bug", ["output", "gradient"])
def test_fused_block_sections_refuse_a_wrong_implementation(section, bug, tmp_path, monkeypatch):
    """A provider whose output (or only the gradient of its first input) is off is refused and not timed; the
    right ones are timed; packdit's kernels are verified on the interpreter case."""
    import importlib

    module = importlib.import_module(section)
    providers = module._providers

    def with_a_wrong_one(ctx, *case):
        found = providers(ctx, *case)
        right = found[0].fn
        if bug == "output":
            def wrong(*args):
                return right(*args) * 1.01
        else:
            def wrong(first, *rest):
                return right(_ScaleGrad.apply(first), *rest)
        return found + [module.Provider("wrong", wrong)]

    monkeypatch.setattr(module, "_providers", with_a_wrong_one)
    assert bench_run.main(["--quick", "--device", "cpu", "--only", section, "--out", str(tmp_path),
                           "--no-plots"]) == 1
    rows = json.loads(next(tmp_path.glob(f"*/{section}.json")).read_text())["rows"]
    wrong = [r for r in rows if r["impl"] == "wrong"]
    assert wrong and all("refused" in r and not any(k.endswith("_ms") for k in r) for r in wrong)
    first_grad = {"norm": "dx", "mlp": "dh", "rope": "dx"}[section]
    assert all(f"{'out' if section == 'mlp' else 'y'} differs" in r["refused"] if bug == "output"
               else f"{first_grad} differs" in r["refused"] for r in wrong)
    assert all(any(k.endswith("_ms") for k in r) for r in rows if r["impl"] == "eager")
    assert [r["note"] for r in rows if r["impl"] == "packdit"] == ["verified (Triton interpreter), not timed"]


def test_e2e_refuses_a_padded_trainer_that_attends_to_padding(monkeypatch):
    import e2e

    cfg = e2e._config(_cpu_context())
    gen = torch.Generator().manual_seed(0)
    latents = [torch.randn(s, generator=gen) for s in [(4, 2, 4, 6), (4, 6, 8), (4, 1, 2, 4)]]
    for strategy in ("pack", "pad"):
        model = e2e._model(cfg, "cpu", padded=strategy == "pad")
        assert e2e._verify(None, cfg, strategy, model, latents, torch.float32) < 1e-4

    masked = e2e.PaddedAttention.forward

    def attends_to_padding(self, x, seqs):  # every padded row is a key: the bug a key-padding mask prevents
        everything = torch.arange(x.shape[0])
        return masked(self, x, dataclasses.replace(seqs, key_index=everything, key_cu_seqlens=seqs.cu_seqlens,
                                                   key_max_seqlen=seqs.max_seqlen))

    monkeypatch.setattr(e2e.PaddedAttention, "forward", attends_to_padding)
    with pytest.raises(OutputMismatch, match="e2e/pad: output differs"):
        e2e._verify(None, cfg, "pad", e2e._model(cfg, "cpu", padded=True), latents, torch.float32)


def _cpu_context():
    from common import Context

    return Context(device=torch.device("cpu"), quick=True, env={}, out_dir=Path("."))


def test_step_model_fit_guard(capsys):
    import e2e

    cfg = e2e._config(_cpu_context())
    stream = e2e._stream(400, cfg["scale"], seed=3)
    rng = np.random.default_rng(0)
    features = np.array([e2e._features(rng.integers(1, 200, size=rng.integers(1, 9)), padded=False)
                         for _ in range(30)])
    exact = features @ np.array([2.0, 0.01, 1e-4, 0.5])
    good = e2e.fit_step_model(features, exact)
    assert good.trusted and good.r2 > 0.999 and good.mean_abs_error < 1e-6
    rows = e2e.simulated_rows(good, stream, cfg)
    assert all(r["useful_tokens_per_s_vs_shape-buckets"] > 0 for r in rows)
    assert "useful_tokens_per_s_vs_shape-buckets" in capsys.readouterr().out

    bad = e2e.fit_step_model(features, rng.uniform(1, 100, size=len(features)))  # times unrelated to the sizes
    assert not bad.trusted
    rows = e2e.simulated_rows(bad, stream, cfg)
    printed = capsys.readouterr().out
    assert "no simulated speedup" in printed and "_vs_" not in printed
    assert all("time_ms" not in r and not any("_vs_" in k for k in r) and "R^2" in r["note"] for r in rows)


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


def test_packing_section_refuses_a_broken_plan():
    import packing

    from packdit.packing import CostModel, Plan, plan_steps
    from packdit.packing.baselines import STRATEGIES

    plan = STRATEGIES["navit-greedy"]([6, 6, 5, 3, 8], capacity=10, ranks=2, cost=CostModel(0.0, 1.0))
    packing.check_plan("navit", plan, 10)
    kwargs = dict(ranks=2, capacity=10, lengths=plan.lengths, costs=plan.costs)
    with pytest.raises(OutputMismatch, match="every sample exactly once"):
        packing.check_plan("lost", Plan.from_bins([0, 1, 2, 4], [0, 1, 2, 3, 4], **kwargs), 10)
    with pytest.raises(OutputMismatch, match="exceed the capacity"):
        packing.check_plan("full", Plan.from_bins([0, 1, 2, 3, 4], [0, 2, 3, 5, 5], **kwargs), 10)
    grouped = plan_steps([25, 5, 5], capacity=10, ranks=4, hidden_size=8, sp_sizes=(1, 2, 4))
    packing.check_plan("groups", grouped, 10)  # 25 tokens on a group of 4 ranks of 10
    with pytest.raises(OutputMismatch, match="exceed the capacity of 6 tokens per rank"):
        packing.check_plan("groups", grouped, 6)


@pytest.mark.parametrize("profiler_works", [True, False])
def test_attention_rows_carry_a_kernel_breakdown(profiler_works, tmp_path, monkeypatch):
    """Each timed provider's fwd+bwd row (on a GPU: packdit's) names the kernels of one profiled call and their
    sum; a profiler that fails is recorded in the row and the timings stay."""
    import attention

    monkeypatch.setattr(attention, "_cases", lambda ctx: [attention.Case("cpu-images", 64, False, "full")])
    if not profiler_works:
        def broken(*args, **kwargs):
            raise RuntimeError("CUPTI unavailable")
        monkeypatch.setattr(attention, "kernel_times", broken)
    assert bench_run.main(["--quick", "--device", "cpu", "--only", "attention", "--out", str(tmp_path),
                           "--no-plots"]) == 0
    rows = json.loads(next(tmp_path.glob("*/attention.json")).read_text())["rows"]
    timed = [r for r in rows if "ms" in r and r["pass"] == "fwd+bwd"]
    assert timed and all("ms" in r for r in timed)
    for r in timed:
        if profiler_works:
            assert r["kernel_sum_ms"] > 0 and r["kernel_ms"].count(";") >= 1
        else:
            assert r["kernel_ms"] == "profile failed: RuntimeError: CUPTI unavailable" and "kernel_sum_ms" not in r


@pytest.mark.parametrize("arch, registers, warps, shared, expected", [
    (90, 182, 8, 81920, 1),    # the 128-row forward at hd 72: 8 x 5,888 registers of 65,536
    (90, 255, 4, 114688, 2),   # the 64-row forward at hd 128: 4 x 8,192 registers, 113 KiB of shared memory
    (90, 168, 4, 57344, 3),    # 168 x 32 = 21 register units of 256 per warp
    (90, 170, 4, 0, 2),        # 170 x 32 rounds up to 22 units: 2 blocks, not 3
    (90, 32, 4, 120000, 1),    # shared memory binds (228 KiB per SM, 1 KiB per block reserved)
    (80, 32, 4, 80000, 2),     # an A100 SM has 164 KiB
    (90, 16, 32, 0, 2),        # resident warps bind (64 per SM)
])
def test_sass_programs_per_sm_follow_the_occupancy_rules(arch, registers, warps, shared, expected):
    from sass import programs_per_sm

    assert programs_per_sm(arch, registers, warps, shared) == expected


@pytest.fixture
def gpu_branch_context(monkeypatch):
    """A CPU context whose sections take their GPU branch (``is_gpu``, full sizes: tests shrink the cases)."""
    from common import Context

    monkeypatch.setattr(Context, "is_gpu", property(lambda self: True))
    return dataclasses.replace(_cpu_context(), quick=False)


@pytest.mark.parametrize("section", ["norm", "rope"])
def test_gpu_code_paths_of_the_bandwidth_sections_run(section, gpu_branch_context, monkeypatch):
    """A section's GPU branch (bf16, packdit beside eager and torch.compile peers, both passes timed) on a tiny
    case on the CPU, packdit under the Triton interpreter: an error there would otherwise first show on a GPU
    machine, and cost its time (the norm section's compiled peer failed its backward timing: torch.compile's
    backward donates its buffers and refuses a graph retained across calls)."""
    import importlib

    module = importlib.import_module(section)
    if section == "norm":
        monkeypatch.setattr(module, "_cases", lambda gpu: [(64, 48, 3, False)])
    else:
        positions = module._positions
        monkeypatch.setattr(module, "_positions", lambda device, gpu: positions(device, False))
        monkeypatch.setattr(module, "_cases", lambda gpu: [(2, 24, True, False)])
    rows = module.run(gpu_branch_context)
    assert sorted(r["impl"] for r in rows) == ["compile", "eager", "packdit"]
    assert all(r["dtype"] == "bfloat16" and r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows), rows


def test_measure_times_short_calls_more_often():
    import time

    import common

    cpu = torch.device("cpu")
    assert common.measure(lambda: None, device=cpu, warmup=0, repeats=2).repeats == 2
    sleeps = common.measure(lambda: time.sleep(0.002), device=cpu, warmup=0, repeats=2, min_total_ms=10)
    assert 3 <= sleeps.repeats <= 5 and sleeps.median_ms >= 2
    assert common.measure(lambda: None, device=cpu, warmup=0, repeats=2, min_total_ms=1e9).repeats \
        == common.MAX_REPEATS


def test_attention_rope_overhead_compares_packdit_with_its_rope_off_twin():
    import attention

    def row(provider, rope, ms, mode="full", pass_="fwd"):
        return {"mix": "video-mix", "mode": mode, "rope": rope, "head_dim": 72, "kv_heads": 16, "pass": pass_,
                "provider": provider, "ms": ms}

    rows = [row("packdit", False, 2.0), row("packdit", True, 2.2), row("packdit", True, 3.0, pass_="fwd+bwd"),
            row("torch-varlen", False, 1.0), row("torch-varlen", True, 1.0), row("packdit", True, 5.0, mode="spatial")]
    attention._add_rope_overheads(rows)
    assert rows[1]["rope_overhead"] == pytest.approx(0.1)
    # no RoPE-off twin (other pass, other mode), RoPE-off rows and peers: no column
    assert [i for i, r in enumerate(rows) if "rope_overhead" in r] == [1]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # the interpreter's bf16 dots
def test_gpu_code_path_of_the_attention_section_runs(gpu_branch_context, monkeypatch):
    """The attention section's GPU branch (bf16, packdit's designs, every peer it tries, Flex compiled) on tiny
    layouts on the CPU, packdit through its Triton launchers under the interpreter: the first and longest step of
    the GPU check must not stop on an error a CPU could have shown. packdit is refused here (the interpreter's
    bf16 dots are wrong), the peers the CPU lacks are skipped or failed with a reason."""
    import attention

    packdit_fn = attention._packdit
    monkeypatch.setattr(attention, "_mix_grids", lambda mix: [(2, 4, 4), (1, 6, 6), (1, 1, 1)])
    monkeypatch.setattr(attention, "_packdit", lambda seqs, case, backend=None: packdit_fn(seqs, case, "triton"))
    monkeypatch.setattr(attention, "_gpu_cases", lambda: [attention.Case("video-mix", 128, False, "full"),
                                                          attention.Case("video-mix", 64, True, "spatial"),
                                                          attention.Case("video-mix", 72, False, "temporal", group=2)])
    rows = attention.run(gpu_branch_context)
    cases = [r for r in rows if r["pass"] != "static"]
    assert {(r["mode"], r["provider"]) for r in cases} >= {
        ("full", "packdit"), ("full", "packdit-atomic-dq"), ("full", "flex"), ("full", "torch-varlen"),
        ("spatial", "packdit"), ("temporal", "packdit"), ("temporal", "packdit-one-head")}
    assert all("ms" in r or r.get("refused") or r.get("note") for r in cases)
    assert any("ms" in r for r in cases if r["provider"].startswith("sdpa"))
