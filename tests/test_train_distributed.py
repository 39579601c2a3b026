"""2-rank DDP / FSDP2 training (gloo, CPU) equals 1-process training on the union of the ranks' packs."""

import pytest
import torch
import torch.multiprocessing as mp
from helpers import assert_close, free_port, run_in_gloo_group

from packdit.data import PackedSampler
from packdit.reference.dit import DiT
from packdit.train import packed_loss_sum, train

PATCH, CAPACITY, HIDDEN, STEPS, LR, SEED = 2, 40, 32, 3, 0.5, 7
MODES = ("ddp", "fsdp2")
# latent (H, W) cycle: 16, 8, 8, 4, 12 tokens with patch 2
_SIZES = ((8, 8), (4, 8), (8, 4), (4, 4), (6, 8))


class SyntheticImages:
    """24 image latents (4, H, W) of mixed sizes with labels in [0, 4), a function of the index only."""

    def __len__(self):
        return 24

    def __getitem__(self, i):
        h, w = _SIZES[i % len(_SIZES)]
        return torch.randn(4, h, w, generator=torch.Generator().manual_seed(100 + i)), i % 4

    def lengths(self):
        return [(h // PATCH) * (w // PATCH) for h, w in (_SIZES[i % len(_SIZES)] for i in range(len(self)))]


def tiny_dit():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=PATCH, in_channels=4, hidden_size=HIDDEN, depth=1, num_heads=2,
                num_classes=4, class_dropout_prob=0.0)
    with torch.no_grad():  # off the adaLN-Zero init, so that every weight gets a gradient from step 1
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    return model


def _train_both_modes(rank, out_dir):
    """Trains with DDP, then with FSDP2, in one process group; rank 0 saves losses and full parameters."""
    data = SyntheticImages()
    for mode in MODES:
        model = tiny_dit()
        losses = train(model, data, lengths=data.lengths(), steps=STEPS, lr=LR, capacity=CAPACITY,
                       hidden_size=HIDDEN, window=2, seed=SEED, optimizer=torch.optim.SGD, fsdp=mode == "fsdp2")
        params = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save({"losses": losses, "params": params}, f"{out_dir}/{mode}.pt")


def _worker(rank, world, port, out_dir):
    run_in_gloo_group(rank, world, port, _train_both_modes, rank, out_dir)


def _single_process_reference():
    """SGD on the union of both ranks' packs of each step, loss = mean of per-sample losses."""
    data = SyntheticImages()
    model = tiny_dit()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    samplers = [PackedSampler(data.lengths(), capacity=CAPACITY, ranks=2, rank=r, hidden_size=HIDDEN, window=2,
                              seed=SEED) for r in range(2)]
    losses = []
    for _, packs in zip(range(STEPS), zip(*samplers)):
        union = [i for pack in packs for i in pack]
        loss = packed_loss_sum(model, data, union, patch_size=PATCH, seed=SEED, epoch=0,
                               device="cpu") / len(union)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model.state_dict()


def test_two_ranks_equal_one_rank(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ref_losses, ref_params = _single_process_reference()
    initial = tiny_dit().state_dict()
    assert max((ref_params[k] - v).abs().max().item() for k, v in initial.items()) > 1e-2  # the steps moved weights
    for mode in MODES:
        result = torch.load(tmp_path / f"{mode}.pt")
        assert result["losses"] == pytest.approx(ref_losses, rel=1e-5), mode
        for name, value in ref_params.items():
            assert_close(result["params"][name], value, atol=1e-5, rtol=1e-4, name=f"{mode} {name}")


def test_single_process_train_without_process_group():
    data = SyntheticImages()
    losses = train(tiny_dit(), data, lengths=data.lengths(), steps=2, lr=1e-3, capacity=CAPACITY,
                   hidden_size=HIDDEN, window=2)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
