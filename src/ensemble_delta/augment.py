"""Batched augmentation on the training device, with random parameters drawn per image.

torchvision's v2 transforms draw one set of parameters per call, so a whole batch would
share one crop. Here parameters for every training image are drawn at once per epoch
from a seeded generator and indexed by image, so a view depends only on (seed, epoch,
image): the same whichever specialists share the pass, and whatever the batch size.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_SCALE = (0.35, 1.0)  # share of the image area a random resized crop keeps
CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio range of the crop
COLOR_RANGE = (0.6, 1.4)  # brightness and contrast factors


def draw_params(n: int, augment: list[str] | tuple[str, ...], seed: int, epoch: int) -> dict[str, torch.Tensor]:
    """Per-image random parameters for all n training images of one epoch (CPU, seeded)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    params: dict[str, torch.Tensor] = {}
    # draw every kind in a fixed order, so adding `color` does not change the crops
    flip = torch.rand(n, generator=g) < 0.5
    area = torch.empty(n).uniform_(*CROP_SCALE, generator=g)
    log_ratio = torch.empty(n).uniform_(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=g)
    centre = torch.rand(n, 2, generator=g)
    bc = torch.empty(n, 2).uniform_(*COLOR_RANGE, generator=g)
    if "flip" in augment:
        params["flip"] = flip
    if "crop" in augment:
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)  # crop size as a fraction of the side
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = (centre[:, 0] * (1 - w) + w / 2) * 2 - 1  # centre in [-1, 1] keeping the crop inside
        cy = (centre[:, 1] * (1 - h) + h / 2) * 2 - 1
        params["crop"] = torch.stack([w, h, cx, cy], 1)
    if "color" in augment:
        params["color"] = bc
    return params


def apply(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Augment float images x [B, C, H, W] in [0, 1] with the batch's rows of `params`."""
    if "crop" in params:
        w, h, cx, cy = params["crop"].to(x.device, x.dtype).unbind(1)
        theta = torch.zeros(len(x), 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if "flip" in params:
        m = params["flip"].to(x.device).view(-1, 1, 1, 1)
        x = torch.where(m, x.flip(-1), x)
    if "color" in params:
        b, c = params["color"].to(x.device, x.dtype).unbind(1)
        x = x * b.view(-1, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * c.view(-1, 1, 1, 1) + mean).clamp(0, 1)
    return x


def take(params: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in params.items()}


def moved(params: dict[str, torch.Tensor] | None, device: torch.device) -> dict[str, torch.Tensor] | None:
    """The parameters on `device` (once per epoch, so that per-batch slicing needs no copy)."""
    return {k: v.to(device) for k, v in params.items()} if params else params


@functools.lru_cache(maxsize=None)
def _normaliser(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std on `device`, made once: a fresh tensor per batch is a host-to-device copy."""
    return torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)


def to_input(images_u8: torch.Tensor, params: dict[str, torch.Tensor] | None = None, channels_last: bool = False) -> torch.Tensor:
    """uint8 [B, C, H, W] on the device -> augmented, 3-channel, ImageNet-normalised float input."""
    x = images_u8.float().div_(255)
    if params:
        x = apply(x, params)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    mean, std = _normaliser(x.device)
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
