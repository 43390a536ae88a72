"""The plain recipe a typical user writes: the benchmark's reference for the engine (issue 5).

The same specialists as training.py, trained the way most fine-tuning scripts do it:

- a torch `Dataset` that hands over PIL images (`PIL.Image.fromarray` on the same uint8
  cache the engine reads), torchvision's transforms on each PIL image, a `DataLoader`
  with worker processes (`num_workers=2`, the value most tutorials and the torchvision
  references start from; 0 in tests, where worker start-up would dominate);
- float32, no autocast, no channels_last, torch's default optimizer implementation;
- one specialist at a time, and every step runs the whole network: the frozen part runs
  forward each step (requires_grad False, eval mode, exactly as the engine freezes it),
  so nothing is cached across epochs or shared between specialists.

Everything that decides the result is the engine's: the one-vs-rest rows
(`data.one_vs_rest`), the seeded head (`models.with_head`), the shuffle order of each
epoch (`engine.epoch_order`, fed through a Sampler), the optimizer, learning rate,
epochs, batch size and loss. Without augmentation this is the engine's computation up to
float rounding (tests/test_plain.py checks it); with augmentation the views differ
(torchvision draws its own), but the work per image is the same kind.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from . import augment as aug
from . import models
from .config import Config
from .data import Data, one_vs_rest
from .engine import epoch_order

DEFAULT_WORKERS = 2  # DataLoader worker processes: the typical user's choice


class PILImages(Dataset):
    """Rows of a uint8 [N, C, S, S] tensor as PIL images (mode L or RGB) through `transform`, with a target."""

    def __init__(self, images_u8: torch.Tensor, transform, rows: torch.Tensor | None = None, targets: torch.Tensor | None = None):
        self.images, self.transform = images_u8, transform
        self.rows = torch.arange(len(images_u8)) if rows is None else rows
        self.targets = torch.zeros(len(self.rows)) if targets is None else targets.float()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        arr = self.images[int(self.rows[i])].numpy()
        arr = arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0))  # HW or HWC
        return self.transform(PIL.Image.fromarray(arr)), self.targets[i]


class EpochOrder(Sampler[int]):
    """The engine's shuffle order of each epoch (`engine.epoch_order`); call set_epoch before each epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(epoch_order(self.n, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return self.n


def transform(size: int, augment=(), grayscale: bool = False) -> T.Compose:
    """PIL -> normalised float tensor: the classic torchvision recipe, with the engine's augmentation ranges.

    The v1 transforms, as most fine-tuning scripts still write them: ToTensor divides by
    255 and Normalize subtracts and divides, the same float operations as
    augment.to_input, so without augmentation the inputs are bit for bit the engine's
    (v2's ToDtype multiplies by 1/255, one rounding away, which full fine-tuning of a
    random init on tiny batches amplifies past any useful tolerance).
    """
    t = [T.Grayscale(num_output_channels=3)] if grayscale else []  # grayscale digits -> 3 channels
    if "crop" in augment:
        t.append(T.RandomResizedCrop(size, scale=aug.CROP_SCALE, ratio=aug.CROP_RATIO, antialias=True))
    else:
        t.append(T.Resize(size, antialias=True))  # a no-op when the cache is already at `size`
    if "flip" in augment:
        t.append(T.RandomHorizontalFlip())
    if "color" in augment:
        t.append(T.ColorJitter(brightness=aug.COLOR_RANGE, contrast=aug.COLOR_RANGE))
    t += [T.ToTensor(), T.Normalize(aug.IMAGENET_MEAN, aug.IMAGENET_STD)]
    return T.Compose(t)


def frozen_children(model: nn.Module, freeze: str) -> list[nn.Module]:
    """The ResNet children before the first trainable one (none for `full`)."""
    names = models.STAGES[: models.STAGES.index(models.FIRST_TRAINABLE[freeze])]
    return [getattr(model, n) for n in names]


def train_specialist_plain(
    cfg: Config,
    base_state: dict[str, torch.Tensor],
    data: Data,
    c: int,
    device: str | torch.device = "cpu",
    num_workers: int = DEFAULT_WORKERS,
    engine_kernels: bool = False,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train class c's specialist the plain way; returns (state dict on the CPU, mean loss per epoch).

    `engine_kernels` picks the engine's kernels instead of torch's defaults (fused
    optimizers; on the CPU, models.use_cpu_kernels), which round differently, so a test can
    compare the two paths as one computation; the benchmark keeps the defaults a user gets.
    """
    s, device = cfg.strategy(c), torch.device(device)
    seed = s.seed + c  # as training.train_group
    ovr = one_vs_rest(data.train.labels, c, cfg.data.negatives, cfg.data.split_seed)
    tf = transform(cfg.data.image_size, s.augment, grayscale=data.train.images.shape[1] == 1)
    sampler = EpochOrder(len(ovr.indices), seed)
    loader = DataLoader(
        PILImages(data.train.images, tf, ovr.indices, ovr.targets),
        batch_size=s.batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    model = models.with_head(cfg.model.arch, base_state, 1, seed=seed).to(device)
    if engine_kernels and device.type == "cpu":
        models.use_cpu_kernels(model)
    frozen = frozen_children(model, s.freeze)
    for m in frozen:
        m.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    kernels = {"fused": True} if engine_kernels else {}
    if s.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, **kernels)
    else:
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, **kernels)
    pos_weight = torch.tensor(ovr.pos_weight, device=device)
    losses = []
    for epoch in range(s.epochs):
        sampler.set_epoch(epoch)
        model.train()
        for m in frozen:
            m.eval()  # frozen BatchNorm must not move its running statistics
        total, n = 0.0, 0
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), y, pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(y)  # the usual per-step .item(): a device sync every step
            n += len(y)
        losses.append(total / max(1, n))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, losses


@torch.no_grad()
def score_plain(model: nn.Module, images_u8: torch.Tensor, device: str | torch.device, batch_size: int, num_workers: int = DEFAULT_WORKERS) -> torch.Tensor:
    """Outputs of `model` in eval mode over every image, through a DataLoader of PIL images; float32 on the CPU."""
    device = torch.device(device)
    tf = transform(images_u8.shape[-1], grayscale=images_u8.shape[1] == 1)
    loader = DataLoader(PILImages(images_u8, tf), batch_size=batch_size, num_workers=num_workers, pin_memory=device.type == "cuda")
    model = model.to(device).eval()
    return torch.cat([model(x.to(device, non_blocking=True)).float().cpu() for x, _ in loader])
