"""Ulysses sequence parallelism on the CPU: gloo process groups on loopback, 2 and 4 processes.

Every spawned group runs many cases, because starting processes costs more than the tiny models: the
differentiable exchanges (values and backward), Ulysses attention against the one-process module for every
mode, RoPE and GQA layout, and the DiT contract -- the same outputs on every rank, and after backward()
the one-process gradients -- for images and videos of uneven lengths, with checkpointing, per-frame and
per-token t, text cross-attention, token dropping and label dropout, on groups of 2 and 4 and on two groups of
2 at once. It also measures the activation memory each rank saves for backward. Four ranks train a plan that
mixes groups of 1, 2 and 4 (DDP and FSDP2, and a resumed run) exactly like one process training on each step's
samples. A stalled rank makes the others fail with the process group's timeout instead of hanging.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close, free_port, randomize_, run_in_gloo_group

from packdit import pack
from packdit.data import PackedSampler
from packdit.distributed import (
    SequenceParallel,
    exchange_rows,
    gather_rows,
    replicate,
    scatter_rows,
    sequence_parallel_groups,
    shard_bounds,
    shard_layout,
)
from packdit.layout import PackedSeqs
from packdit.models.dit import DiT
from packdit.nn import PackedAttention
from packdit.rope import RoPE3D
from packdit.train import Trainer, packed_loss_sum

GROUP_TIMEOUT = timedelta(seconds=60)  # a collective that waits longer fails: no test hangs on a lost rank
SPAWN_TIMEOUT = 420.0                   # seconds for one spawned group, start-up included (2 shared CPU cores)
ATOL, RTOL = 2e-5, 1e-4                 # fp32 sums in another order (the gradient is summed over the shards)


def _assert_sums_close(got, want, *, name: str, atol: float = ATOL) -> None:
    """``assert_close`` for fp32 results that a group sums in another order than one process: the absolute term
    is ``atol`` times the tensor's largest magnitude (at least 1), the scale of the terms one element sums, which
    cancellation can leave far above the element itself. (A gradient element of -0.0603 of a table whose largest
    is 20 came out 3.3e-5 off on a CPU, 2e-5 + 1e-4 * 0.0603 allowed; 1.7e-6 of the table's scale.)"""
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    assert_close(got, want, atol=atol * scale, rtol=RTOL, name=name)


# ---------------------------------------------------------------------- one process
def test_shard_bounds_split_like_tensor_split():
    for n in range(13):
        for p in range(1, 6):
            bounds = shard_bounds(n, p)
            sizes = [b - a for a, b in zip(bounds, bounds[1:])]
            assert sizes == [len(c) for c in torch.arange(n).tensor_split(p)]
    with pytest.raises(ValueError, match="size >= 1"):
        shard_bounds(4, 0)


def test_shard_layout_is_the_layout_of_the_kept_tokens():
    """The shard of a batch equals from_grids with the shard's raster indices kept, incl. a pre-dropped batch."""
    grids = [(2, 3, 2), (1, 1, 1), (1, 2, 3), (0, 2, 2)]
    kept = [torch.tensor([0, 2, 3, 5, 7, 8, 11]), None, torch.tensor([1, 2, 4]), None]
    for seqs in (PackedSeqs.from_grids(grids), PackedSeqs.from_grids(grids, kept=kept)):
        raster, cu = seqs.raster_index(), seqs.cu_seqlens.tolist()
        for start, stop in ((0, 0), (0, 5), (3, 9), (5, seqs.num_tokens), (0, seqs.num_tokens)):
            local = shard_layout(seqs, start, stop)
            want = PackedSeqs.from_grids(grids, kept=[raster[max(a, start):min(b, stop)] if b > a else None
                                                      for a, b in zip(cu, cu[1:])])
            for field in ("cu_seqlens", "grid", "positions", "segment_ids"):
                assert torch.equal(getattr(local, field), getattr(want, field)), (field, start, stop)
            assert local.max_seqlen == want.max_seqlen and local.seqlens == want.seqlens
            assert local.dropped == (stop - start < sum(t * h * w for t, h, w in grids))
    with pytest.raises(ValueError, match="start <= stop"):
        shard_layout(seqs, 3, 2)


def test_sequence_parallel_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="not initialized"):
        SequenceParallel(None)


# ---------------------------------------------------------------------- spawning
def _entry(rank, world, port, fn, args):
    run_in_gloo_group(rank, world, port, fn, rank, world, *args, timeout=GROUP_TIMEOUT)


def spawn(fn, world: int, *args, timeout: float = SPAWN_TIMEOUT) -> float:
    """Run ``fn(rank, world, *args)`` in ``world`` processes of one gloo group; a rank's exception fails the test
    (with its traceback), and so does a group still running after ``timeout`` seconds. Returns the seconds."""
    start = time.monotonic()
    context = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False,
                                 start_method="spawn")
    while not context.join(timeout=max(0.0, start + timeout - time.monotonic())):
        if time.monotonic() >= start + timeout:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {timeout:.0f} s")
    return time.monotonic() - start


# ---------------------------------------------------------------------- the exchanges
def _rows(rank: int, count: int, width: int = 3) -> torch.Tensor:
    """Rows that say where they come from: rank * 100 + row, then the column."""
    return (rank * 100 + torch.arange(count, dtype=torch.float32))[:, None] + torch.arange(width) / 10


def _check_exchanges(rank, world, group):
    """exchange_rows against the rows every rank can rebuild; gather/scatter/replicate backward semantics."""
    size, me = dist.get_world_size(group), dist.get_rank(group)
    send = [[(i + 2 * j) % 3 for j in range(size)] for i in range(size)]        # send[i][j]: rows i -> j, some 0
    x = _rows(me, sum(send[me])).requires_grad_()
    out = exchange_rows(x, send[me], [send[i][me] for i in range(size)], group)
    want = torch.cat([_rows(i, sum(send[i])).split(send[i])[me] for i in range(size)])
    assert torch.equal(out, want)
    (out * _rows(7 + me, out.shape[0])).sum().backward()
    # the gradient of rank i's block for rank j is rank j's output weight for rows from i
    recv = [[send[i][j] for i in range(size)] for j in range(size)]
    assert torch.equal(x.grad, torch.cat([_rows(7 + j, sum(recv[j])).split(recv[j])[me] for j in range(size)]))

    sizes = shard_bounds(2 * size + 1, size)
    sizes = [b - a for a, b in zip(sizes, sizes[1:])]
    whole = _rows(0, sum(sizes)).requires_grad_()
    part = scatter_rows(whole, sizes, group)                                     # each rank weighs its part
    assert torch.equal(part, whole.detach()[sum(sizes[:me]):sum(sizes[:me + 1])])
    (part * (me + 1)).sum().backward()
    assert torch.equal(whole.grad, torch.cat([torch.full((n, 3), float(j + 1)) for j, n in enumerate(sizes)]))

    local = _rows(me, sizes[me]).requires_grad_()
    gathered = gather_rows(local, sizes, group)
    assert torch.equal(gathered, torch.cat([_rows(j, n) for j, n in enumerate(sizes)]))
    weight = _rows(5, sum(sizes))                                                # the same loss on every rank
    (gathered * weight).sum().backward()
    assert torch.equal(local.grad, weight[sum(sizes[:me]):sum(sizes[:me + 1])])  # not P times it

    shared = torch.ones(4, requires_grad=True)
    (replicate(shared, group) * (me + 1)).sum().backward()
    assert torch.equal(shared.grad, torch.full((4,), size * (size + 1) / 2))


# ---------------------------------------------------------------------- Ulysses attention
def _check_attention(rank, world, group):
    """PackedAttention over a group equals the one-process module on the shard's rows, values and gradients, for
    every mode, RoPE and kv-head layout (Hk < P, P | Hk, Hk and P coprime)."""
    sp = SequenceParallel(group)
    torch.manual_seed(0)
    latents = [torch.randn(1, 3, 4, 6), torch.randn(1, 2, 2), torch.randn(1, 1, 6, 2)]   # 18 + 1 + 3 tokens
    _, seqs = pack(latents, (1, 2, 2))
    shard = sp.shard(seqs)
    rope = RoPE3D(axes_dims=(2, 2, 2))
    for mode, num_kv_heads, use_rope in (("full", 12, True), ("spatial", 1, True), ("temporal", 3, False),
                                         ("full", 4, False), ("spatial", 6, False), ("temporal", 2, True)):
        torch.manual_seed(1)
        attn = randomize_(PackedAttention(96, 12, num_kv_heads=num_kv_heads, qk_norm=True, mode=mode,
                                          rope=rope if use_rope else None), seed=2, std=0.2)
        x = torch.randn(seqs.num_tokens, 96, requires_grad=True)
        weight = torch.randn(seqs.num_tokens, 96)
        ref = attn(x, seqs)
        (ref * weight).sum().backward()
        ref_grads = {name: p.grad.clone() for name, p in attn.named_parameters()}
        attn.zero_grad()
        x_local = x.detach()[shard.start:shard.stop].requires_grad_()
        out = attn(x_local, seqs, shard)
        (out * weight[shard.start:shard.stop]).sum().backward()
        case = f"{mode} Hk={num_kv_heads} rope={use_rope} P={sp.size}"
        _assert_sums_close(out, ref[shard.start:shard.stop], name=f"{case} out")
        _assert_sums_close(x_local.grad, x.grad[shard.start:shard.stop], name=f"{case} dx")
        for name, p in attn.named_parameters():
            dist.all_reduce(p.grad, group=group)                                  # the shards' parts sum up
            _assert_sums_close(p.grad, ref_grads[name], name=f"{case} d{name}")


# ---------------------------------------------------------------------- the DiT contract
VIDEO = dict(input_size=8, patch_size=(1, 2, 2), in_channels=2, hidden_size=32, depth=2, num_heads=4, mlp_ratio=2.0,
             num_classes=5, class_dropout_prob=0.0)


def _latents(seed: int) -> list[torch.Tensor]:
    """Two videos and two images of uneven token counts: 3*3*2 + 2*2*3 + 1*2 + 2*1 = 34 tokens."""
    g = torch.Generator().manual_seed(seed)
    shapes = ((2, 3, 6, 4), (2, 4, 6), (2, 2, 4, 6), (2, 4, 2))
    return [torch.randn(s, generator=g) for s in shapes]


def _dit_cases():
    """(name, model options, call) with call(model) -> outputs (a tensor or a list) and inputs that need grad."""
    def class_call(per_frame: bool, labels_seed: int | None = None):
        def call(model):
            latents = _latents(0)
            frames = [x.shape[1] if x.dim() == 4 else 1 for x in latents]
            t = torch.linspace(5.0, 900.0, sum(frames) if per_frame else len(latents))
            if labels_seed is not None:  # label dropout: each rank seeds differently, rank 0 as the reference
                group = model.sequence_parallel
                torch.manual_seed(labels_seed + (0 if group is None else dist.get_rank(group)))
            return model(latents, t, torch.tensor([1, 4, 0, 3])), []
        return call

    def text_call(model):
        latents = _latents(1)
        g = torch.Generator().manual_seed(3)
        context = [torch.randn(n, 6, generator=g).requires_grad_() for n in (5, 0, 3, 1)]  # an empty prompt
        frames = [x.shape[1] if x.dim() == 4 else 1 for x in latents]
        t = torch.linspace(5.0, 900.0, sum(frames), requires_grad=True)            # per frame
        return model(latents, t, context=context), [t, *context]

    def dropped_call(model):
        tokens, seqs = pack(_latents(2), (1, 2, 2), drop_rate=0.4, generator=torch.Generator().manual_seed(4))
        tokens.requires_grad_()
        t = torch.linspace(5.0, 900.0, seqs.num_tokens, requires_grad=True)       # per token
        return model.forward_packed(tokens, seqs, t, torch.tensor([0, 1, 2, 3])), [tokens, t]

    return [
        ("full sincos per-sample checkpointed", dict(checkpoint_activations=True), class_call(False)),
        ("label dropout", dict(class_dropout_prob=0.5, depth=1), class_call(False, labels_seed=11)),
        ("spatial_temporal rope3d text per-frame", dict(attention="spatial_temporal", pos_embed="rope3d",
                                                        qk_norm=True, cond="text", text_dim=6, num_classes=1000),
         text_call),
        ("factorized dropped per-token", dict(pos_embed="factorized", max_grid=(4, 4, 4)), dropped_call),
        ("fractional spatial_temporal per-frame", dict(pos_embed="factorized", fractional_positions=True,
                                                       attention="spatial_temporal"), class_call(True)),
    ]


def _forward_backward(model, call) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward and the backward of a fixed weighted sum of the outputs -> (outputs, inputs that need grad)."""
    out, inputs = call(model)
    flat = torch.cat([o.flatten() for o in out]) if isinstance(out, list) else out.flatten()
    (flat * torch.randn(flat.shape, generator=torch.Generator().manual_seed(9))).sum().backward()
    return flat.detach(), inputs


def _run_dit(model, call):
    """Outputs, parameter gradients and input gradients of :func:`_forward_backward` from zero gradients."""
    model.zero_grad(set_to_none=True)
    out, inputs = _forward_backward(model, call)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads, [x.grad.clone() for x in inputs]


def _check_dit(rank, world, group):
    """Every case: outputs on every rank and, after backward(), every rank's gradients equal one process's."""
    size = dist.get_world_size(group)
    for name, options, call in _dit_cases():
        model = randomize_(DiT(**{**VIDEO, **options}), seed=5, std=0.2).train()
        ref_out, ref_grads, ref_inputs = _run_dit(model, call)
        model.set_sequence_parallel(group)
        out, grads, inputs = _run_dit(model, call)
        case = f"{name} P={size}"
        _assert_sums_close(out, ref_out, name=f"{case} outputs")
        assert grads.keys() == ref_grads.keys(), case
        for key, value in ref_grads.items():
            _assert_sums_close(grads[key], value, name=f"{case} grad {key}")
        for i, (got, want) in enumerate(zip(inputs, ref_inputs)):
            _assert_sums_close(got, want, name=f"{case} input {i} grad")

    # two backward passes accumulate into .grad: each pass sums only its own gradient over the group
    model.set_sequence_parallel(None)
    _, _, call = _dit_cases()[0]
    ref_grads = _run_dit(model, call)[1]
    model.set_sequence_parallel(group)
    model.zero_grad(set_to_none=True)
    for _ in range(2):
        _forward_backward(model, call)
    for key, value in ref_grads.items():
        _assert_sums_close(model.get_parameter(key).grad, 2 * value, atol=2 * ATOL, name=f"accumulated {key}")
    assert copy.deepcopy(model).sequence_parallel is group  # copies (e.g. an EMA) share the communicator


def _saved_bytes(model, call) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in one forward (the activations kept for
    backward)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack_hook(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        call(model)
    return sum(storages.values())


def _measure_memory(rank, world, group, out_dir):
    """Saved activations per rank of a 1536-token batch, alone and over the group."""
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(2, 8, 16, 16, generator=g), torch.randn(2, 4, 16, 32, generator=g)]    # 512 + 512 tokens
    latents.append(torch.randn(2, 32, 64, generator=g))                                             # + 512
    model = randomize_(DiT(**{**VIDEO, "hidden_size": 64, "depth": 2}), seed=5).train()

    def call(m):
        return m(latents, torch.tensor([10.0, 500.0, 900.0]), torch.tensor([0, 1, 2]))

    alone = _saved_bytes(model, call)
    model.set_sequence_parallel(group)
    shared = _saved_bytes(model, call)
    if rank == 0:
        with open(f"{out_dir}/memory_{world}.json", "w") as f:
            json.dump({"ranks": world, "alone": alone, "per_rank": shared}, f)


# ---------------------------------------------------------------------- DP x SP training
_CLIP_SHAPES = ((2, 2, 4, 4), (2, 4, 4, 6), (2, 6, 4), (2, 2, 4, 8), (2, 2, 2), (2, 3, 4, 4))  # 8 24 6 16 1 12 tokens
TRAIN = dict(capacity=8, patch_size=(1, 2, 2), hidden_size=16, window=2, seed=3, sp_sizes=(1, 2, 4), cfg_dropout=0.3,
             null_label=3)
TRAIN_STEPS, TRAIN_LR = 4, 0.2


class Clips:
    """14 latents of 1 to 24 tokens at patch (1, 2, 2), labels in [0, 3): with capacity 8 the 12-24-token ones need
    groups of 2 or 4 ranks. A function of the index only."""

    def __len__(self):
        return 14

    def __getitem__(self, i):
        return torch.randn(_CLIP_SHAPES[i % 6], generator=torch.Generator().manual_seed(i)), i % 3

    def lengths(self):
        shapes = [_CLIP_SHAPES[i % 6] for i in range(len(self))]
        return [(s[1] if len(s) == 4 else 1) * (s[-2] // 2) * (s[-1] // 2) for s in shapes]


def _train_model():
    model = DiT(input_size=8, patch_size=(1, 2, 2), in_channels=2, hidden_size=16, depth=1, num_heads=4,
                num_classes=4, learn_sigma=False, class_dropout_prob=0.0, backend="torch")
    return randomize_(model, seed=6, std=0.2)


def _trainer(fsdp: bool = False) -> Trainer:
    data = Clips()
    return Trainer(_train_model(), data, lengths=data.lengths(), lr=TRAIN_LR, optimizer=torch.optim.SGD, fsdp=fsdp,
                   group_timeout=GROUP_TIMEOUT, **TRAIN)


def _train(rank, world, out_dir):
    """DDP and FSDP2 runs of the mixed plan, and a DDP run stopped after 2 steps and resumed; rank 0 saves them."""
    runs = {}
    for mode in ("ddp", "fsdp2"):
        runs[mode] = _trainer(fsdp=mode == "fsdp2")
        runs[mode].run(TRAIN_STEPS)
    _trainer().run(2, checkpoint=f"{out_dir}/checkpoint.pt")
    runs["resumed"] = _trainer()
    runs["resumed"].load(f"{out_dir}/checkpoint.pt")
    runs["resumed"].run(TRAIN_STEPS)
    results = {mode: {"losses": trainer.losses,
                      "params": {k: v.full_tensor() if hasattr(v, "full_tensor") else v  # FSDP2: a collective
                                 for k, v in trainer.model.state_dict().items()}}
               for mode, trainer in runs.items()}
    if rank == 0:
        torch.save(results, f"{out_dir}/train.pt")


def _train_one_process():
    """SGD on each step's samples (every group's pack once), loss = mean of the per-sample losses."""
    data, model = Clips(), _train_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN_LR)
    options = {k: TRAIN[k] for k in ("capacity", "hidden_size", "window", "seed", "sp_sizes")}
    samplers = [PackedSampler(data.lengths(), ranks=4, rank=r, **options) for r in range(4)]
    losses, sizes = [], []
    for _, groups in zip(range(TRAIN_STEPS), zip(*(s.groups() for s in samplers))):
        packs = {(g.first_rank, g.size): g.indices for g in groups}
        sizes.append(sorted(size for _, size in packs))
        union = [i for pack in packs.values() for i in pack]
        loss = packed_loss_sum(model, data, union, patch_size=TRAIN["patch_size"], seed=TRAIN["seed"], epoch=0,
                               device="cpu", cfg_dropout=TRAIN["cfg_dropout"], null_label=TRAIN["null_label"])
        loss = loss / len(union)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model.state_dict(), sizes


def _group_of_two_worker(rank, world, out_dir):
    group = dist.new_group(list(range(world)), timeout=GROUP_TIMEOUT)
    _check_exchanges(rank, world, group)
    _check_attention(rank, world, group)
    _check_dit(rank, world, group)
    _measure_memory(rank, world, group, out_dir)


def _group_of_four_worker(rank, world, out_dir):
    groups = sequence_parallel_groups((1, 2, 4), timeout=GROUP_TIMEOUT)
    assert dist.get_process_group_ranks(groups[2]) == [rank // 2 * 2, rank // 2 * 2 + 1]
    assert dist.get_process_group_ranks(groups[4]) == [0, 1, 2, 3]
    _check_exchanges(rank, world, groups[4])
    _check_exchanges(rank, world, groups[2])   # two groups of two at once
    _check_attention(rank, world, groups[4])
    _check_dit(rank, world, groups[4])
    _check_dit(rank, world, groups[2])
    with pytest.raises(ValueError, match="2 attention heads cannot be split over a group of 4"):
        DiT(**{**VIDEO, "num_heads": 2}, sequence_parallel=groups[4])
    _measure_memory(rank, world, groups[4], out_dir)
    _train(rank, world, out_dir)


def _check_memory(out_dir, world: int, seconds: float) -> None:
    memory = json.loads((out_dir / f"memory_{world}.json").read_text())
    ratio = memory["per_rank"] / memory["alone"]
    print(f"{world} ranks: {seconds:.1f} s; saved activations per rank {memory['per_rank'] / 2**20:.2f} MiB vs "
          f"{memory['alone'] / 2**20:.2f} MiB alone (ratio {ratio:.3f})")
    assert ratio < 1.15 / world, memory   # ~1/P: only the layout, conditioning rows and outputs are replicated


def test_two_ranks_equal_one_process(tmp_path):
    _check_memory(tmp_path, 2, spawn(_group_of_two_worker, 2, str(tmp_path)))


def test_four_ranks_equal_one_process_and_train_a_mixed_plan(tmp_path):
    _check_memory(tmp_path, 4, spawn(_group_of_four_worker, 4, str(tmp_path)))
    losses, params, sizes = _train_one_process()
    assert [1, 1, 2] in sizes and [4] in sizes and [2, 2] in sizes, sizes  # groups of every size, mixed in a step
    assert max((params[k] - v).abs().max().item() for k, v in _train_model().state_dict().items()) > 1e-2
    for mode, run in torch.load(tmp_path / "train.pt").items():
        assert run["losses"] == pytest.approx(losses, rel=1e-5), mode
        for name, value in params.items():
            assert_close(run["params"][name], value, atol=1e-5, rtol=1e-4, name=f"{mode} {name}")


# ---------------------------------------------------------------------- failures
def _stalled_rank_worker(rank, world, out_dir):
    """Rank 1 never joins the first all-to-all (it waits until rank 0 has failed, at most 60 s)."""
    (group,) = sequence_parallel_groups((2,), timeout=timedelta(seconds=3)).values()
    result = Path(out_dir) / "error.json"
    if rank == 1:
        deadline = time.monotonic() + 60
        while not result.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        os._exit(0)  # rank 0 is gone (below): no barrier to meet
    model = DiT(**VIDEO)
    call = _dit_cases()[0][2]
    call(model)  # warm-up alone: the time below is the collective's
    model.set_sequence_parallel(group)
    start = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        call(model)
    result.write_text(json.dumps({"seconds": time.monotonic() - start, "error": str(error.value)[:300]}))
    # After a timed-out collective the group is unusable and gloo still holds the pending all-to-all: tearing it
    # down can std::terminate (SIGABRT). What a trainer does after a timeout, the rank does: it exits.
    os._exit(0)


def test_a_stalled_rank_fails_the_group_instead_of_hanging(tmp_path):
    spawn(_stalled_rank_worker, 2, str(tmp_path), timeout=120)
    result = json.loads((tmp_path / "error.json").read_text())
    print(result)
    assert "Timed out" in result["error"] and result["seconds"] < 10, result  # the group's 3 s timeout


# ---------------------------------------------------------------------- the e2e benchmark's rows
def test_e2e_sequence_parallel_rows_run_on_two_cpu_processes():
    """The e2e section's >= 2-GPU rows, run with gloo on the CPU: every group size verified, then timed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import e2e
    from common import Context

    ctx = Context(device=torch.device("cpu"), quick=True, env={}, out_dir=Path("."))
    cfg = e2e._config(ctx)
    assert e2e.sequence_parallel_rows(ctx, cfg, torch.float32) == [
        {"kind": "sequence-parallel", "note": "not measured: needs >= 2 GPUs, this machine has 0"}]
    rows = e2e.measure_sequence_parallel((1, 2), "gloo", cfg, (4, 2, 8, 8), 2, torch.float32)
    print(rows)
    assert [r["gpus"] for r in rows] == [1, 2] and all(r["tokens"] == 32 for r in rows)
    assert all(r["rel_err"] < 1e-4 and r["time_ms"] > 0 for r in rows) and rows[1]["speedup"] > 0, rows
