"""Offline data for Mamba-ND: scikit-learn's bundled handwritten digits (1,797 images of 8x8, 16 grey levels) as a
2-D classification task, and short videos of those digits moving across a larger canvas as a 3-D one (class =
digit * 4 + direction, 40 classes).

The train/test split is by source image, stratified by digit and deterministic (a fixed seed, independent of the
training seed), so that the test videos show digit images the model never saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from mambakit.errors import MambaKitError

DIRECTIONS = ("right", "left", "down", "up")
_STEPS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (dy, dx) per frame
DIGIT_SIZE = 8


def load_digit_images() -> Tuple[Tensor, Tensor]:
    """images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64 (0-9), from sklearn.datasets.load_digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency of this task
        raise MambaKitError("the Mamba-ND digit tasks need scikit-learn (pip install scikit-learn)") from exc
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(d.target, dtype=torch.long)


def split_indices(labels: Tensor, test_fraction: float = 0.2, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Deterministic stratified split: for each class, a seeded shuffle and the first round(fraction * n) to test.
    Returns sorted (train_idx, test_idx)."""
    if not 0 < test_fraction < 1:
        raise MambaKitError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = int(round(test_fraction * idx.numel()))
        test.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def random_shift(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Translate each sample of x (batch, C, *spatial) by an integer offset in [-max_shift, max_shift] along every
    spatial axis, filling with zeros (the background of the digits)."""
    if max_shift <= 0:
        return x
    nd = x.dim() - 2
    pad = []
    for _ in range(nd):
        pad += [max_shift, max_shift]
    xp = F.pad(x, pad)
    offsets = torch.randint(0, 2 * max_shift + 1, (x.shape[0], nd), generator=generator)
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        sl = tuple(slice(int(o), int(o) + s) for o, s in zip(offsets[i], x.shape[2:]))
        out[i] = xp[(i, slice(None)) + sl]
    return out


@dataclass
class NDTaskData:
    """A classification task: fixed test tensors and a sampler of training batches.

    sample_train(batch_size, generator) -> (x (batch, C, *input_size), y (batch,)); x_test, y_test likewise."""

    name: str
    input_size: Tuple[int, ...]
    in_channels: int
    num_classes: int
    n_train: int
    x_test: Tensor
    y_test: Tensor
    sample_train: Callable[[int, torch.Generator], Tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------------------------------------------------
# 2-D: digits
# ----------------------------------------------------------------------------------------------------------------------
def upsample(images: Tensor, size: int) -> Tensor:
    """images (N, 8, 8) -> (N, 1, size, size), bilinear (identity for size 8)."""
    x = images[:, None]
    if size == images.shape[-1]:
        return x.clone()
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)


def digits_task(image_size: int = 16, augment_shift: int = 1, test_fraction: float = 0.2,
                split_seed: int = 0) -> NDTaskData:
    """Digits as (1, image_size, image_size) images, 10 classes. Training batches are drawn with replacement and
    (augment_shift > 0) translated by up to augment_shift pixels of the ORIGINAL 8x8 grid."""
    if not isinstance(image_size, int) or image_size < DIGIT_SIZE:
        raise MambaKitError(f"image_size must be an integer >= {DIGIT_SIZE}, got {image_size!r}")
    images, labels = load_digit_images()
    tr, te = split_indices(labels, test_fraction, split_seed)
    x_train, y_train = upsample(images[tr], image_size), labels[tr]
    shift = int(round(augment_shift * image_size / DIGIT_SIZE))

    def sample(batch_size: int, g: torch.Generator) -> Tuple[Tensor, Tensor]:
        idx = torch.randint(0, x_train.shape[0], (batch_size,), generator=g)
        return random_shift(x_train[idx], shift, g), y_train[idx]

    return NDTaskData("mamba-nd-digits", (image_size, image_size), 1, 10, len(tr), upsample(images[te], image_size),
                      labels[te], sample)


# ----------------------------------------------------------------------------------------------------------------------
# 3-D: moving digits
# ----------------------------------------------------------------------------------------------------------------------
def random_starts(directions: Tensor, frames: int, canvas: Tuple[int, int], speed: int,
                  generator: torch.Generator) -> Tensor:
    """(N, 2) top-left (y, x) of the first frame such that the digit stays on the canvas for all frames."""
    H, W = canvas
    travel = (frames - 1) * speed
    n = directions.numel()
    starts = torch.empty(n, 2, dtype=torch.long)
    for axis, size in ((0, H), (1, W)):
        step = torch.tensor([_STEPS[d][axis] for d in DIRECTIONS])[directions]  # (N,) -1, 0 or 1
        lo = torch.where(step < 0, torch.full_like(step, travel), torch.zeros_like(step))
        hi = torch.where(step > 0, torch.full_like(step, size - DIGIT_SIZE - travel),
                         torch.full_like(step, size - DIGIT_SIZE))
        u = torch.rand(n, generator=generator)
        starts[:, axis] = lo + (u * (hi - lo + 1).float()).long().clamp(max=(hi - lo))
    return starts


def render_moving_digits(images: Tensor, directions: Tensor, starts: Tensor, frames: int, canvas: Tuple[int, int],
                         speed: int = 1) -> Tensor:
    """Videos (N, 1, frames, H, W): digit images (N, 8, 8) pasted at starts (N, 2) (y, x) and moved by `speed`
    pixels per frame in DIRECTIONS[directions] (N,)."""
    n = images.shape[0]
    H, W = canvas
    steps = torch.tensor([_STEPS[d] for d in DIRECTIONS])[directions]  # (N, 2)
    t = torch.arange(frames)
    pos = starts[:, None, :] + steps[:, None, :] * t[None, :, None] * speed  # (N, T, 2)
    if pos.min() < 0 or (pos[..., 0] + DIGIT_SIZE).max() > H or (pos[..., 1] + DIGIT_SIZE).max() > W:
        raise MambaKitError("a moving digit leaves the canvas; use a larger canvas or fewer frames")
    r = torch.arange(DIGIT_SIZE)
    rows = (pos[..., 0, None] + r)[..., :, None]  # (N, T, 8, 1)
    cols = (pos[..., 1, None] + r)[..., None, :]  # (N, T, 1, 8)
    video = torch.zeros(n, frames, H, W)
    video[torch.arange(n)[:, None, None, None], t[None, :, None, None], rows, cols] = \
        images[:, None].expand(n, frames, DIGIT_SIZE, DIGIT_SIZE)
    return video[:, None]


def video_task(frames: int = 8, canvas: Tuple[int, int] = (16, 16), speed: int = 1, test_fraction: float = 0.2,
               split_seed: int = 0) -> NDTaskData:
    """Moving digits, input (1, frames, H, W), class = digit * 4 + direction index (DIRECTIONS), 40 classes.

    Training videos are rendered on the fly (random image of the train split, direction and start); the test set
    is every test image in each of the 4 directions, starts drawn once with a fixed seed."""
    H, W = canvas
    if frames < 2 or (frames - 1) * speed + DIGIT_SIZE > min(H, W):
        raise MambaKitError(f"frames={frames}, speed={speed} do not fit a {DIGIT_SIZE}-pixel digit on a {H}x{W} canvas")
    images, labels = load_digit_images()
    tr, te = split_indices(labels, test_fraction, split_seed)
    nd = len(DIRECTIONS)

    g_test = torch.Generator().manual_seed(split_seed + 1)
    te_img = te.repeat_interleave(nd)
    te_dir = torch.arange(nd).repeat(te.numel())
    x_test = render_moving_digits(images[te_img], te_dir, random_starts(te_dir, frames, canvas, speed, g_test),
                                  frames, canvas, speed)
    y_test = labels[te_img] * nd + te_dir

    def sample(batch_size: int, g: torch.Generator) -> Tuple[Tensor, Tensor]:
        img = tr[torch.randint(0, tr.numel(), (batch_size,), generator=g)]
        direction = torch.randint(0, nd, (batch_size,), generator=g)
        starts = random_starts(direction, frames, canvas, speed, g)
        return render_moving_digits(images[img], direction, starts, frames, canvas, speed), labels[img] * nd + direction

    return NDTaskData("mamba-nd-video", (frames, H, W), 1, 10 * nd, len(tr) * nd, x_test, y_test, sample)
