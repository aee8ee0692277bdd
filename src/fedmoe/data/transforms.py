"""Batch image transforms written with torch ops (no torchvision), vectorised over the batch.

Each transform maps a ``B x C x H x W`` tensor to a batch and draws its randomness per sample from
torch's global CPU RNG (or the ``generator`` it was given), so augmentation is reproducible under
``seed_everything`` and independent of the device the batch lives on.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform [0, 1) float64 draws from the CPU RNG, moved to ``device``."""
    return torch.rand(shape, generator=generator, dtype=torch.float64).to(device)


def _randint(high: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One integer uniform in ``[0, high)`` per element of ``high`` (a long tensor, every entry >= 1)."""
    u = _uniform(tuple(high.shape), generator, high.device)
    return torch.minimum((u * high).long(), high - 1)


class ToFloat:
    """Integer pixels to float32, times ``scale`` (uint8 [0, 255] -> [0, 1] by default)."""

    def __init__(self, scale: float = 1 / 255) -> None:
        self.scale = scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.float32) * self.scale


class Normalize:
    """``(x - mean) / std`` per channel; scalars apply to every channel."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


class RandomCrop:
    """Zero-pad by ``padding`` on every side, then crop ``size`` at an independent uniform offset per sample."""

    def __init__(self, size: int | Sequence[int], padding: int = 0, generator: torch.Generator | None = None) -> None:
        self.size = _pair(size)
        self.padding = padding
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.padding
        padded = F.pad(x, (p, p, p, p)) if p else x
        b, c, hp, wp = padded.shape
        th, tw = self.size
        if th > hp or tw > wp:
            raise ValueError(f"crop {th}x{tw} is larger than the padded image {hp}x{wp}")
        dev = x.device
        top = _randint(torch.full((b,), hp - th + 1, device=dev), self.generator)
        left = _randint(torch.full((b,), wp - tw + 1, device=dev), self.generator)
        rows = top[:, None] + torch.arange(th, device=dev)
        cols = left[:, None] + torch.arange(tw, device=dev)
        return padded[
            torch.arange(b, device=dev)[:, None, None, None],
            torch.arange(c, device=dev)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]


class RandomHorizontalFlip:
    """Mirror each sample left-right with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | None = None) -> None:
        self.p = p
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flip = _uniform((x.shape[0],), self.generator, x.device) < self.p
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


class Cutout:
    """Zero one ``size x size`` square per sample, centred at a uniform random pixel and clipped at the borders.

    Rows ``[cy - size // 2, cy - size // 2 + size)`` and the same for columns, in every channel
    (DeVries & Taylor, 2017). Meant to run after normalisation.
    """

    def __init__(self, size: int = 16, generator: torch.Generator | None = None) -> None:
        self.size = size
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        dev = x.device
        cy = _randint(torch.full((b,), h, device=dev), self.generator)
        cx = _randint(torch.full((b,), w, device=dev), self.generator)
        y0, x0 = cy - self.size // 2, cx - self.size // 2
        rows = torch.arange(h, device=dev)[None, :]
        cols = torch.arange(w, device=dev)[None, :]
        in_rows = (rows >= y0[:, None]) & (rows < y0[:, None] + self.size)
        in_cols = (cols >= x0[:, None]) & (cols < x0[:, None] + self.size)
        hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]
        return x.masked_fill(hole, 0)


class RandomResizedCrop:
    """Crop a random box and resize it (bilinear) to ``size``, with torchvision's box sampling rule.

    Per sample: up to ``tries`` draws of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio);
    the first box with ``0 < w <= W`` and ``0 < h <= H`` is placed at a uniform offset. Samples with no
    valid draw take torchvision's fallback: a centre crop clamped to the ratio range. The box is then
    mapped exactly onto the output with ``affine_grid``/``grid_sample`` (align_corners=False).
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.9, 1.1),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        tries: int = 10,
        generator: torch.Generator | None = None,
    ) -> None:
        self.size = _pair(size)
        self.scale = scale
        self.ratio = ratio
        self.tries = tries
        self.generator = generator

    def boxes(self, batch: int, height: int, width: int) -> torch.Tensor:
        """``batch x 4`` long tensor of crop boxes ``(top, left, h, w)`` in pixels."""
        area = height * width
        u = _uniform((batch, self.tries, 2), self.generator, torch.device("cpu"))
        target_area = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[..., 0])
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(lo + (hi - lo) * u[..., 1])
        w = torch.round(torch.sqrt(target_area * aspect)).long()
        h = torch.round(torch.sqrt(target_area / aspect)).long()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.long().argmax(dim=1)
        found = ok.any(dim=1)
        rows = torch.arange(batch)
        h, w = h[rows, first], w[rows, first]

        in_ratio = width / height
        if in_ratio < min(self.ratio):
            fw, fh = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            fw, fh = int(round(height * max(self.ratio))), height
        else:
            fw, fh = width, height
        h = torch.where(found, h, torch.full_like(h, fh))
        w = torch.where(found, w, torch.full_like(w, fw))
        top = _randint(height - h + 1, self.generator)
        left = _randint(width - w + 1, self.generator)
        top = torch.where(found, top, torch.full_like(top, (height - fh) // 2))
        left = torch.where(found, left, torch.full_like(left, (width - fw) // 2))
        return torch.stack([top, left, h, w], dim=1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, height, width = x.shape
        return resized_crop(x, self.boxes(b, height, width), self.size)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of the pixel box ``(top, left, h, w)`` of each sample onto a ``size`` output.

    With align_corners=False the output's outer edges (-1, 1) map to the box's outer pixel edges.
    """
    x = x if x.is_floating_point() else x.float()
    b, c, height, width = x.shape
    top, left, h, w = boxes.to(device=x.device, dtype=x.dtype).unbind(1)
    theta = torch.zeros(b, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [b, c, size[0], size[1]], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for t in self.transforms:
            x = t(x)
        return x


def cifar_train_transform() -> Compose:
    """CIFAR-10 training and D_s: uint8 -> float, crop 32 with 4-pixel zero pad, flip, ImageNet normalise, Cutout 16."""
    return Compose(
        [
            ToFloat(),
            RandomCrop(32, padding=4),
            RandomHorizontalFlip(0.5),
            Normalize(IMAGENET_MEAN, IMAGENET_STD),
            Cutout(16),
        ]
    )


def cifar_eval_transform() -> Compose:
    """CIFAR-10 evaluation sets: uint8 -> float, ImageNet normalise."""
    return Compose([ToFloat(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def femnist_train_transform() -> Compose:
    """FEMNIST training and D_s: random resized crop to 28 (area 0.9-1.1, ratio 3/4-4/3), normalise 0.5/0.5."""
    return Compose([RandomResizedCrop(28, scale=(0.9, 1.1), ratio=(3 / 4, 4 / 3)), Normalize(0.5, 0.5)])


def femnist_eval_transform() -> Compose:
    """FEMNIST evaluation sets: normalise 0.5/0.5 (pixels are LEAF floats in [0, 1])."""
    return Compose([Normalize(0.5, 0.5)])
