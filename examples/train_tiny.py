#!/usr/bin/env python
"""Train a tiny packed DiT on synthetic images and short videos, then sample a few shapes.

    python examples/train_tiny.py --steps 300 --out runs/tiny           # ~2-3 minutes on 2 CPU cores
    python examples/train_tiny.py --steps 600 --out runs/tiny --resume  # continues where it stopped

The data are procedural "latents" (4 channels): a soft square, disc or bar (the class label) with a
random colour per channel, on a background gradient, drifting with a constant velocity across frames.
Sizes mix 8x8..16x16 images with 3- and 5-frame clips, so every step packs samples of different
resolution, aspect ratio and duration into one sequence, balanced by the packing planner.

Training is ``packdit.train.Trainer``: rectified flow (``packdit.diffusion.FlowMatching``: logit-normal t
with the per-sample resolution shift, loss normalised per sample, 10% label dropout for CFG), packed steps
planned by ``packdit.data.PackedSampler``, and atomic checkpoints (``packdit.checkpoint``) of the model,
optimizer, sampler position and RNG state, so a resumed run continues bitwise as if it had not stopped.
Writes ``loss.png`` (the curve) and ``samples.pt`` (Euler samples with CFG) to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import torch
from tqdm import tqdm

from packdit.diffusion import dit_adapter, sample
from packdit.models import DiT
from packdit.train import StepInfo, Trainer

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


class SyntheticLatents:
    """The dataset: ``dataset[i] = synthetic_latent(i, seed)``; ``lengths()`` are the token counts for the planner."""

    def __init__(self, samples: int, seed: int):
        self.samples, self.seed = samples, seed

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int):
        return synthetic_latent(index, self.seed)

    def lengths(self) -> list[int]:
        return [token_count(SHAPES[i % len(SHAPES)]) for i in range(self.samples)]


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
                num_classes=NUM_CLASSES, learn_sigma=False, class_dropout_prob=0.1)
    model.y_embedder.dropout_prob = 0.0  # label dropout is done by the trainer (cfg_dropout), per sample
    data = SyntheticLatents(args.samples, args.seed)
    trainer = Trainer(model, data, lengths=data.lengths(), capacity=args.capacity, patch_size=PATCH, lr=args.lr,
                      optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.0), hidden_size=64, window=4,
                      seed=args.seed, cfg_dropout=0.1, null_label=NUM_CLASSES)
    ckpt_path = args.out / "checkpoint.pt"
    if args.resume and ckpt_path.exists():
        trainer.load(ckpt_path)

    progress = tqdm(total=args.steps, initial=trainer.step, desc="train", unit="step")

    def report(info: StepInfo) -> None:
        progress.update(1)
        progress.set_postfix(loss=f"{_mean(trainer.losses[-20:]):.4f}")

    losses = trainer.run(args.steps, on_step=report, checkpoint=ckpt_path, checkpoint_every=50)
    progress.close()

    _plot_losses(losses, args.out / "loss.png")
    print(f"loss: first 20 steps {_mean(losses[:20]):.4f} -> last 20 steps {_mean(losses[-20:]):.4f}")

    model.eval()
    shapes = [(4, 8, 8), (4, 8, 16), (4, 3, 8, 8)]
    samples = sample(dit_adapter(model), shapes, patch_size=PATCH, y=torch.tensor([0, 1, 2]), steps=20, cfg_scale=2.0,
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
