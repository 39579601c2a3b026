#!/usr/bin/env python
"""Train a class-conditional packed DiT on real handwritten digits of mixed sizes, then sample and score it.

    pip install -r requirements/examples.txt                 # scikit-learn (the digits and the classifier)
    python examples/digits.py --out runs/digits              # ~3 minutes on 2 idle CPU cores
    python examples/digits.py --out runs/digits --resume     # continue (or only re-sample) a saved run

Data: the 1,797 8x8 handwritten digits bundled with scikit-learn (``load_digits``, no download). Every
digit is resized (bilinear) to its own random height and width, both even in 8..24, so every step packs
images of different resolution and aspect ratio; a fraction of them become short clips of 3-5 frames in
which the digit drifts by up to about one original pixel per frame, so steps mix images and videos.
Pixels are mapped to [-1, 1], one channel, 2x2 patches: 16 to 144 tokens per frame.

Training is ``packdit.train.Trainer``: rectified flow (``packdit.diffusion.FlowMatching``, logit-normal t
with the per-sample resolution shift, 10% label dropout for classifier-free guidance), packed steps
planned by ``packdit.data.PackedSampler``, atomic checkpoints for a bitwise resume. The model is a small
class-conditional ``packdit.DiT`` in pixel space.

Afterwards every class is sampled at several shapes (images of different aspect ratios and a clip) in
ONE packed call with CFG (``packdit.diffusion.sample``). A logistic regression fitted on 75% of the real
8x8 digits (its accuracy on the other 25% is printed) labels each generated sample resized back to 8x8
(a clip: the mean of its frames' class probabilities); the share labelled as the conditioning class,
per class and overall, is printed and saved. A model that learned nothing scores about 10%.

At the defaults (a DiT of 0.72M parameters, 1800 steps of 1024 tokens, CFG 3): 96.7% of 210 samples (the
classifier: 96.9% of held-out real digits, 93.3% of them after the same resize to a training shape and
back), in 172 s on 2 otherwise idle cores (214 s with ``--threads 1``).

Writes to ``--out``: samples.png (rows = classes, columns = shapes, clips as frame strips), loss.png,
samples.npz (``sample_XXX`` arrays in model space, ~[-1, 1]; ``labels``; ``predicted_class``),
accuracy.json and checkpoint.pt.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from packdit.diffusion import FlowMatching, dit_adapter, sample
from packdit.models import DiT
from packdit.train import StepInfo, Trainer

PATCH = (1, 2, 2)
NUM_CLASSES = 10
NULL_LABEL = NUM_CLASSES   # the label-table row of the unconditional model (CFG)
SIDES = tuple(range(8, 25, 2))   # training heights and widths: even, 8..24
MAX_DRIFT = 1.0            # most a clip's digit moves per frame, in pixels of the 8x8 original
# Sampled shapes (C, H, W) / (C, T, H, W): square, wide and tall images at low and high resolution, and a clip.
SAMPLE_SHAPES = ((1, 8, 8), (1, 16, 16), (1, 24, 24), (1, 12, 24), (1, 24, 12), (1, 10, 18), (1, 4, 16, 16))


def render(digit: torch.Tensor, height: int, width: int, shifts: torch.Tensor) -> torch.Tensor:
    """``digit (8, 8)`` in [0, 1] -> ``(F, height, width)`` frames, frame f shifted by ``shifts[f] = (dx, dy)``
    original pixels (background 0 flows in), resampled bilinearly; ``shifts (F, 2)``."""
    frames = shifts.shape[0]
    theta = torch.zeros(frames, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = -shifts * (2.0 / digit.shape[-1])  # grid_sample samples the source: move it the other way
    grid = F.affine_grid(theta, [frames, 1, height, width], align_corners=False)
    return F.grid_sample(digit.expand(frames, 1, *digit.shape), grid, align_corners=False)[:, 0]


class MixedDigits:
    """``dataset[i] = (latent, label)``: digit i at its own size, ``(1, H, W)`` or a clip ``(1, T, H, W)``, in [-1, 1].

    The size, whether it is a clip, its length and drift are a function of (seed, i) only; the latents are
    rendered once here (about 1 MB in all). ``lengths()`` are the token counts for the planner.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, seed: int, clip_fraction: float):
        self.labels = [int(y) for y in labels]
        self.latents = []
        for i, image in enumerate(images):
            g = torch.Generator().manual_seed(seed * 1_000_003 + i)
            height, width = (SIDES[int(j)] for j in torch.randint(len(SIDES), (2,), generator=g))
            shifts = torch.zeros(1, 2)
            if float(torch.rand((), generator=g)) < clip_fraction:
                frames = int(torch.randint(3, 6, (), generator=g))
                angle = float(torch.rand((), generator=g)) * 2 * math.pi
                speed = MAX_DRIFT * (0.5 + 0.5 * float(torch.rand((), generator=g)))
                step = torch.tensor([math.cos(angle), math.sin(angle)]) * speed
                shifts = (torch.arange(frames) - (frames - 1) / 2)[:, None] * step   # centred on the middle frame
            frames = render(torch.as_tensor(image, dtype=torch.float32) / 16.0, height, width, shifts) * 2 - 1
            self.latents.append(frames[None] if frames.shape[0] > 1 else frames)

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, index: int):
        return self.latents[index], self.labels[index]

    def lengths(self) -> list[int]:
        return [math.prod(x.shape[1:]) // math.prod(PATCH) for x in self.latents]   # T * H/2 * W/2


def load_digits_or_explain():
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit("examples/digits.py needs scikit-learn: pip install -r requirements/examples.txt") from error
    digits = load_digits()
    return digits.images, digits.target


def fit_classifier(images: np.ndarray, labels: np.ndarray, seed: int):
    """A logistic regression on 75% of the real 8x8 digits (pixels 0..16 / 16); -> (classifier, held-out
    indices, held-out accuracy)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    train, held_out = train_test_split(indices, test_size=0.25, stratify=labels, random_state=seed)
    flat = images.reshape(len(images), -1) / 16.0
    classifier = LogisticRegression(max_iter=5000).fit(flat[train], labels[train])
    return classifier, held_out, float(classifier.score(flat[held_out], labels[held_out]))


def to_8x8(latent: torch.Tensor) -> np.ndarray:
    """A sample ``(1, H, W)`` or ``(1, T, H, W)`` in model space -> ``(frames, 64)`` pixels in [0, 1] at 8x8
    (area average, any size)."""
    frames = latent.reshape(-1, 1, *latent.shape[-2:]).float()
    small = F.adaptive_avg_pool2d(((frames + 1) / 2).clamp(0, 1), (8, 8))
    return small.reshape(len(frames), 64).numpy()


def classify(classifier, latents) -> np.ndarray:
    """The classifier's class of each sample; a clip's is the argmax of its frames' mean probabilities."""
    return np.array([int(np.argmax(classifier.predict_proba(to_8x8(x)).mean(axis=0))) for x in latents])


def accuracy_table(predicted: np.ndarray, labels: np.ndarray) -> dict:
    per_class = {str(c): float(np.mean(predicted[labels == c] == c)) for c in range(NUM_CLASSES) if (labels == c).any()}
    return {"overall": float(np.mean(predicted == labels)), "per_class": per_class}


def build_model(args) -> DiT:
    return DiT(input_size=max(SIDES), patch_size=PATCH, in_channels=1, hidden_size=args.hidden, depth=args.depth,
               num_heads=args.heads, num_classes=NUM_CLASSES, learn_sigma=False, class_dropout_prob=0.1)


def count(minimum: int):
    """An argparse type: an int >= ``minimum``."""
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an int >= {minimum}, got {value}")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    arg = p.add_argument
    arg("--steps", type=count(1), default=1800, help="total optimizer steps (default %(default)s)")
    arg("--capacity", type=count(720), default=1024,
        help="tokens per packed step, at least the longest clip's 720 (default %(default)s)")
    arg("--lr", type=float, default=3e-3, help="AdamW learning rate (default %(default)s)")
    arg("--warmup", type=count(0), default=50, help="steps of linear learning-rate warm-up (default %(default)s)")
    arg("--decay", default="cosine", choices=("cosine", "none"),
        help="learning-rate decay to 0 at --steps after the warm-up (default %(default)s)")
    arg("--hidden", type=count(1), default=96, help="DiT width (default %(default)s)")
    arg("--depth", type=count(1), default=4, help="DiT blocks (default %(default)s)")
    arg("--heads", type=count(1), default=4, help="attention heads (default %(default)s)")
    arg("--clip-fraction", type=float, default=0.1, help="share of digits turned into clips (default %(default)s)")
    arg("--base-tokens", type=count(1), default=64,
        help="token count whose timesteps are not shifted, in training and sampling (default %(default)s)")
    arg("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (default %(default)s)")
    arg("--sample-steps", type=count(1), default=25, help="Euler steps when sampling (default %(default)s)")
    arg("--per-cell", type=count(1), default=3,
        help="samples per (class, shape) for the accuracy; the grid shows the first (default %(default)s)")
    arg("--threads", type=count(0), default=0, help="torch CPU threads (default 0: torch's choice, one per core; on "
        "cores shared with other jobs 1 is faster, since these small ops then spend most time waiting)")
    arg("--seed", type=int, default=0, help="(default %(default)s)")
    arg("--out", type=Path, default=Path("runs/digits"), help="output folder (default %(default)s)")
    arg("--checkpoint-every", type=count(0), default=100,
        help="steps between checkpoints, 0: only at the end (default %(default)s)")
    arg("--resume", action="store_true", help="continue from --out/checkpoint.pt: train up to --steps (with the "
        "same --steps, exactly as if never stopped), then sample")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Train, sample, score; returns the scores written to accuracy.json."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_or_explain()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args)
    model.y_embedder.dropout_prob = 0.0  # label dropout is the trainer's (cfg_dropout), per sample
    data = MixedDigits(images, labels, seed=args.seed, clip_fraction=args.clip_fraction)
    objective = FlowMatching(base_tokens=args.base_tokens)
    trainer = Trainer(model, data, lengths=data.lengths(), capacity=args.capacity, patch_size=PATCH, lr=args.lr,
                      optimizer=functools.partial(torch.optim.AdamW, weight_decay=0.0), seed=args.seed,
                      objective=objective, cfg_dropout=0.1, null_label=NULL_LABEL)
    checkpoint = args.out / "checkpoint.pt"
    if args.resume and checkpoint.exists():
        trainer.load(checkpoint)
    elif args.resume:
        print(f"--resume: no {checkpoint} yet, starting from step 0")

    def set_lr(step: int) -> None:
        """The learning rate of step ``step + 1``: a function of the step only, so a resumed run follows it too."""
        decay = 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)) if args.decay == "cosine" else 1.0
        for group in trainer.optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / max(args.warmup, 1)) * decay

    set_lr(trainer.step)
    progress = tqdm(total=args.steps, initial=min(trainer.step, args.steps), desc="train", unit="step")

    def report(info: StepInfo) -> None:
        set_lr(info.step)
        progress.update(1)
        progress.set_postfix(loss=f"{np.mean(trainer.losses[-20:]):.4f}", epoch=info.epoch)

    losses = trainer.run(args.steps, on_step=report, checkpoint=checkpoint,
                         checkpoint_every=args.checkpoint_every)
    progress.close()
    plot_losses(losses, args.out / "loss.png")

    model.eval()
    shapes = [s for _ in range(args.per_cell) for _ in range(NUM_CLASSES) for s in SAMPLE_SHAPES]
    wanted = np.array([c for _ in range(args.per_cell) for c in range(NUM_CLASSES) for _ in SAMPLE_SHAPES])
    samples = sample(dit_adapter(model), shapes, patch_size=PATCH, y=torch.as_tensor(wanted), steps=args.sample_steps,
                     cfg_scale=args.cfg_scale, null_label=NULL_LABEL, base_tokens=args.base_tokens,
                     generator=torch.Generator().manual_seed(args.seed + 1))

    classifier, held_out, held_out_accuracy = fit_classifier(images, labels, args.seed)
    predicted = classify(classifier, samples)
    scores = accuracy_table(predicted, wanted)
    scores["per_shape"] = {"x".join(map(str, s[1:])): float(np.mean(predicted[i::len(SAMPLE_SHAPES)]
                                                                      == wanted[i::len(SAMPLE_SHAPES)]))
                           for i, s in enumerate(SAMPLE_SHAPES)}
    scores["classifier_held_out"] = held_out_accuracy
    scores["real_resized_held_out"] = accuracy_table(classify(classifier, [data[i][0] for i in held_out]),
                                                     labels[held_out])["overall"]
    scores.update(steps=trainer.step, samples=len(samples), final_loss=float(np.mean(losses[-20:])))
    (args.out / "accuracy.json").write_text(json.dumps(scores, indent=2) + "\n")
    np.savez_compressed(args.out / "samples.npz", labels=wanted, predicted_class=predicted,
                        **{f"sample_{i:03d}": x.numpy() for i, x in enumerate(samples)})
    plot_grid(samples[:NUM_CLASSES * len(SAMPLE_SHAPES)], args.out / "samples.png")

    print(f"loss: first 20 steps {np.mean(losses[:20]):.4f} -> last 20 steps {scores['final_loss']:.4f}")
    print(f"classifier (logistic regression) on held-out real digits: {held_out_accuracy:.1%}; on the same digits "
          f"resized to their training shapes and back: {scores['real_resized_held_out']:.1%}")
    print("generated samples labelled as their class: " + ", ".join(
        f"{c}: {a:.0%}" for c, a in scores["per_class"].items()) + f"; overall {scores['overall']:.1%} "
          f"of {len(samples)}")
    print("per shape: " + ", ".join(f"{s}: {a:.0%}" for s, a in scores["per_shape"].items()))
    print(f"wrote {', '.join(str(args.out / n) for n in ('samples.png', 'loss.png', 'samples.npz', 'accuracy.json'))}")
    return scores


def plot_losses(losses, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    smooth = np.convolve(losses, np.ones(15) / 15, mode="valid") if len(losses) >= 15 else losses
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(losses, color="0.75", lw=0.8, label="step")
    ax.plot(np.arange(len(smooth)) + (len(losses) - len(smooth)), smooth, label="mean of 15 steps")
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def frame_strip(latent: torch.Tensor) -> torch.Tensor:
    """A sample ``(1, H, W)`` or ``(1, T, H, W)`` -> ``(H, T * (W + 1) - 1)`` in [0, 1]: its frames side by side,
    split by NaN columns."""
    frames = ((latent.reshape(-1, *latent.shape[-2:]) + 1) / 2).clamp(0, 1)
    gap = torch.full((frames.shape[1], 1), math.nan)
    return torch.cat([torch.cat([f, gap], 1) for f in frames], 1)[:, :-1]


def plot_grid(samples, path, gap: int = 2) -> None:
    """One row per class, one column per shape of SAMPLE_SHAPES (a clip: its frames side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strips = [frame_strip(x) for x in samples]
    cols = len(SAMPLE_SHAPES)
    widths = [max(strips[r * cols + c].shape[1] for r in range(NUM_CLASSES)) for c in range(cols)]
    cell_h = max(s.shape[0] for s in strips)
    lefts = np.cumsum([0] + [w + gap for w in widths])
    canvas = torch.full((NUM_CLASSES * (cell_h + gap) - gap, lefts[-1] - gap), math.nan)   # NaN: between cells
    for i, strip in enumerate(strips):
        r, c = divmod(i, cols)
        top = r * (cell_h + gap) + (cell_h - strip.shape[0]) // 2
        left = lefts[c] + (widths[c] - strip.shape[1]) // 2
        canvas[top:top + strip.shape[0], left:left + strip.shape[1]] = strip
    fig, ax = plt.subplots(figsize=(canvas.shape[1] / 28 + 0.6, canvas.shape[0] / 28 + 0.5))
    cmap = matplotlib.colormaps["gray_r"].with_extremes(bad="#c8d0e0")
    ax.imshow(canvas.numpy(), cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(lefts[:-1] + np.array(widths) / 2 - 0.5, ["x".join(map(str, s[1:])) for s in SAMPLE_SHAPES],
                  fontsize=7)
    ax.set_yticks(np.arange(NUM_CLASSES) * (cell_h + gap) + cell_h / 2 - 0.5, range(NUM_CLASSES), fontsize=7)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.tight_layout(pad=0.2)
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
