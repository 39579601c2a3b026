#!/usr/bin/env python
"""Train a tiny packed DiT on synthetic images and short videos, then sample a few shapes.

    python examples/train_tiny.py --steps 300 --out runs/tiny           # ~2-3 minutes on 2 CPU cores
    python examples/train_tiny.py --steps 600 --out runs/tiny --resume  # continues where it stopped

The data are procedural "latents" (4 channels): a soft square, disc or bar (the class label) with a
random colour per channel, on a background gradient, drifting with a constant velocity across frames.
Sizes mix 8x8..16x16 images with 3- and 5-frame clips, so every step packs samples of different
resolution, aspect ratio and duration into one sequence, balanced by the packing planner.

Objective: rectified flow (``packdit.diffusion.FlowMatching``: logit-normal t with the per-sample
resolution shift, loss normalised per sample). Checkpoints (``packdit.checkpoint``, atomic) hold the
model, optimizer, RNG state and the sampler's position, so a resumed run neither loses nor repeats a
sample. Writes ``loss.png`` (the curve) and ``samples.pt`` (Euler samples with CFG) to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from packdit import checkpoint
from packdit.data import PackedSampler
from packdit.diffusion import FlowMatching, dit_adapter, sample
from packdit.models import DiT

PATCH = (1, 2, 2)
NUM_CLASSES = 3
SHAPES = [(4, 8, 8), (4, 12, 8), (4, 8, 16), (4, 16, 16), (4, 3, 8, 8), (4, 5, 8, 12), (4, 3, 12, 12)]


def synthetic_latent(index: int, seed: int = 0) -> tuple[torch.Tensor, int]:
    """Sample ``index`` of the dataset: ``(latent (C, H, W) or (C, T, H, W), label)``, a pure function of index."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    shape = SHAPES[index % len(SHAPES)]
    label = int(torch.randint(NUM_CLASSES, (), generator=g))
    c, *thw = shape
    t, h, w = (1, *thw) if len(thw) == 2 else thw
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    start = torch.rand(2, generator=g) - 0.5
    velocity = (torch.rand(2, generator=g) - 0.5) * 0.4
    colour = torch.rand(c, 1, 1, generator=g) * 2 - 1
    background = (torch.rand(c, 1, 1, generator=g) - 0.5) * 0.5 * (yy + xx)
    frames = []
    for f in range(t):
        cy, cx = start + f * velocity
        if label == 0:    # square
            mask = torch.sigmoid(8 * (0.35 - torch.maximum((yy - cy).abs(), (xx - cx).abs())))
        elif label == 1:  # disc
            mask = torch.sigmoid(8 * (0.4 - ((yy - cy) ** 2 + (xx - cx) ** 2).sqrt()))
        else:             # horizontal bar
            mask = torch.sigmoid(8 * (0.15 - (yy - cy).abs()))
        frames.append(background + colour * mask)
    latent = torch.stack(frames, dim=1)
    return (latent[:, 0] if len(thw) == 2 else latent), label


def token_count(shape) -> int:
    t = shape[1] if len(shape) == 4 else 1
    return t * (shape[-2] // 2) * (shape[-1] // 2)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="total optimizer steps (default 300)")
    p.add_argument("--samples", type=int, default=512, help="dataset size (default 512)")
    p.add_argument("--capacity", type=int, default=512, help="tokens per packed step (default 512)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, default=Path("runs/tiny"))
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model = DiT(input_size=16, patch_size=PATCH, in_channels=4, hidden_size=64, depth=3, num_heads=4,
                num_classes=NUM_CLASSES, learn_sigma=False, class_dropout_prob=0.1, backend="torch")
    model.y_embedder.dropout_prob = 0.0  # label dropout is done by the objective (cfg_dropout), per sample
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    lengths = [token_count(SHAPES[i % len(SHAPES)]) for i in range(args.samples)]
    sampler = PackedSampler(lengths, capacity=args.capacity, ranks=1, rank=0, hidden_size=64, window=4,
                            seed=args.seed)
    objective = FlowMatching()
    model_fn = dit_adapter(model)
    generator = torch.Generator().manual_seed(args.seed)
    step, losses = 0, []
    ckpt_path = args.out / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        state = checkpoint.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sampler.set_epoch(state["sampler"]["epoch"])
        sampler.load_state_dict(state["sampler"])
        generator.set_state(state["generator"])
        step, losses = state["step"], state["losses"]

    model.train()
    progress = tqdm(total=args.steps, initial=step, desc="train", unit="step")
    while step < args.steps:
        for batch in sampler:
            if step >= args.steps:
                break
            if not batch:
                continue
            data = [synthetic_latent(i, args.seed) for i in batch]
            latents = [d[0] for d in data]
            y = torch.tensor([d[1] for d in data])
            loss, _ = objective.training_loss(model_fn, latents, patch_size=PATCH, y=y, generator=generator,
                                              cfg_dropout=0.1, null_label=NUM_CLASSES)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
            if step % 50 == 0 or step == args.steps:
                checkpoint.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "sampler": sampler.state_dict(), "generator": generator.get_state(),
                                 "step": step, "losses": losses}, ckpt_path)
        else:
            sampler.set_epoch(sampler.epoch + 1)
    progress.close()

    _plot_losses(losses, args.out / "loss.png")
    first, last = _mean(losses[:20]), _mean(losses[-20:])
    print(f"loss: first 20 steps {first:.4f} -> last 20 steps {last:.4f}")

    model.eval()
    shapes = [(4, 8, 8), (4, 8, 16), (4, 3, 8, 8)]
    samples = sample(model_fn, shapes, patch_size=PATCH, y=torch.tensor([0, 1, 2]), steps=20, cfg_scale=2.0,
                     null_label=NUM_CLASSES, generator=torch.Generator().manual_seed(1))
    torch.save(samples, args.out / "samples.pt")
    print(f"sampled {[tuple(s.shape) for s in samples]}; wrote {args.out / 'loss.png'}, {args.out / 'samples.pt'}")


def _mean(values) -> float:
    return sum(values) / max(1, len(values))


def _plot_losses(losses, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 30)
    smooth = [_mean(losses[max(0, i - window):i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, alpha=0.3, label="loss")
    ax.plot(smooth, label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log" if min(losses) > 0 and max(losses) / min(losses) > 10 else "linear")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
