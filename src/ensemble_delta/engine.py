"""The training and scoring engine: one flat loop, fed from the uint8 cache on the device.

Why it is fast (DESIGN.md "Speed"):
- images are decoded once; batches are sliced from a uint8 tensor on the training device
  and augmented there, per image, with no DataLoader and no per-sample Python;
- a frozen prefix (everything before the first trainable block) runs once per image and
  augmented view, and its output feeds every specialist with the same freeze and
  augmentation; without augmentation it runs once for all epochs;
- on CUDA: bf16 autocast, channels_last, fused optimizers, optional torch.compile;
- on CPU: convolutions with a one-pixel output (layer4 at 32 px) as one matrix product,
  the same arithmetic without oneDNN's slow backward for that shape (models.WindowConv2d),
  and max pooling in channels-last order, bit for bit the same and 10x faster
  (models.ChannelsLastMaxPool2d).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import augment as aug
from . import models
from .config import RuntimeConfig


@dataclass
class Runtime:
    """Where and how tensors run; derived once from the config's runtime section."""

    device: torch.device
    bf16: bool
    channels_last: bool
    compile: bool

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.cuda and self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.cuda and self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if not self.cuda:
            models.use_cpu_kernels(model)  # the same arithmetic, faster on a CPU (models.WindowConv2d, ChannelsLastMaxPool2d)
        return model

    def input(self, images_u8: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        return aug.to_input(images_u8.to(self.device, non_blocking=True), params, channels_last=self.cuda and self.channels_last)


def resolve_runtime(rc: RuntimeConfig, device: str | None = None) -> Runtime:
    name = device or rc.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        from .errors import UserError

        raise UserError(f"runtime.device: {name} requested but no CUDA device is visible; set runtime.device: cpu or auto")
    if rc.threads and name == "cpu":
        torch.set_num_threads(rc.threads)
    dev = torch.device(name)
    if dev.type == "cuda":
        if dev.index is None:  # tensors report cuda:N; compare like with like
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, rc.bf16, rc.channels_last, rc.compile and dev.type == "cuda")


def images_on(rt: Runtime, images: torch.Tensor) -> torch.Tensor:
    """Keep the uint8 cache on the device when it fits comfortably (under a third of free memory)."""
    if images.device == rt.device:
        return images  # already there
    if rt.cuda:
        free, _ = torch.cuda.mem_get_info(rt.device)
        if images.numel() < free / 3:
            return images.to(rt.device)
        return images.pin_memory()
    return images


def data_on(rt: Runtime, data):
    """The dataset with every split's uint8 images moved to the device once (images_on is then a no-op)."""
    import dataclasses

    return dataclasses.replace(data, **{k: dataclasses.replace(getattr(data, k), images=images_on(rt, getattr(data, k).images)) for k in ("train", "val", "test")})


def make_optimizer(params, name: str, lr: float, momentum: float, weight_decay: float, rt: Runtime):
    params = [p for p in params if p.requires_grad]
    # fused kernels exist for CPU and CUDA (torch >= 2.4); on CPU fused AdamW is ~4x faster than foreach
    fast = {"fused": True}
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **fast)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **fast)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch; depends only on (seed, epoch), never on the device."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))


def train_one_epoch(
    tail: nn.Module,
    get_input: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    opt: torch.optim.Optimizer,
    rt: Runtime,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> float:
    """One pass over `order` (row indices); returns the mean loss. Targets live on the device."""
    total = torch.zeros((), device=rt.device)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        # 1. inputs: cached prefix features or augmented images, sliced on the device
        x = get_input(rows)
        # 2. forward and loss under autocast
        with rt.autocast():
            out = tail(x)
        loss = loss_fn(out.float(), targets[rows.to(targets.device)])
        # 3. step
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += loss.detach() * len(rows)
    return total.item() / max(1, len(order))  # one sync per epoch, not per step


@torch.no_grad()
def run_prefix(
    prefix: nn.Module,
    images: torch.Tensor,
    idx: torch.Tensor,
    rt: Runtime,
    batch_size: int,
    params: dict | None = None,
) -> torch.Tensor:
    """Outputs of a frozen prefix (eval mode) for images[idx], augmented per image with params[idx]."""
    prefix.eval()
    chunks = []
    feat_dtype = torch.bfloat16 if rt.cuda and rt.bf16 else torch.float32
    idx, params = idx.to(images.device), aug.moved(params, images.device)  # once: a copy per batch would sync the GPU each time
    for start in range(0, len(idx), batch_size):
        rows = idx[start : start + batch_size]
        p = aug.take(params, rows) if params else None
        x = rt.input(images[rows], p)
        with rt.autocast():
            chunks.append(prefix(x).to(feat_dtype))
    return torch.cat(chunks)


@torch.no_grad()
def logits(model: nn.Module, images: torch.Tensor, rt: Runtime, batch_size: int) -> torch.Tensor:
    """Outputs of a whole model in eval mode over all images, float32 on the CPU."""
    model = rt.prepare(model).eval()
    return run_prefix(model, images, torch.arange(len(images)), rt, batch_size).float().cpu()


class PrefixFeatures:
    """A frozen prefix's outputs over a group's rows, computed as few times as the views allow.

    Without augmentation the views never change: one pass for all epochs. Flip alone has
    two views per image: past two epochs, both are computed once and each epoch picks
    its view per image (`torch.where`), which is what a pass over that epoch's views
    gives. Otherwise one pass per epoch. Nothing frozen: no features (None).
    """

    def __init__(self, prefix: nn.Module, images: torch.Tensor, rows: torch.Tensor, augment, epochs: int, rt: Runtime, batch_size: int):
        self.prefix, self.images, self.rows, self.rt, self.batch_size = prefix, images, rows.to(images.device), rt, batch_size
        self.frozen = len(prefix) > 0
        self.two_views = tuple(augment) == ("flip",) and epochs > 2
        self._fixed: torch.Tensor | None = None  # the one view without augmentation
        self._views: list[torch.Tensor] | None = None  # unflipped and flipped, for flip alone

    def _run(self, params: dict | None) -> torch.Tensor:
        return run_prefix(self.prefix, self.images, self.rows, self.rt, self.batch_size, params)

    def for_epoch(self, params: dict | None) -> torch.Tensor | None:
        if not self.frozen:
            return None
        if not params:
            if self._fixed is None:
                self._fixed = self._run(None)
            return self._fixed
        if not self.two_views:
            return self._run(params)
        if self._views is None:
            n = len(self.images)
            self._views = [self._run({"flip": torch.full((n,), flipped, device=self.images.device)}) for flipped in (False, True)]
        plain, flipped = self._views
        pick = params["flip"][self.rows].to(plain.device).view(-1, *[1] * (plain.dim() - 1))
        return torch.where(pick, flipped, plain)


@dataclass
class Member:
    """One model trained in a group: its rows of the training split, targets, loss and hyperparameters.

    `hp` is any config section with optimizer, lr, momentum, weight_decay, epochs,
    batch_size and seed (a Strategy, PretrainConfig or DistillConfig).
    """

    name: Any
    model: nn.Module
    idx: torch.Tensor  # rows of the training split, sorted
    targets: torch.Tensor  # one per row of idx
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    hp: Any
    one_cycle: bool = False  # OneCycle learning-rate schedule (pretraining from scratch)
    losses: list[float] = field(default_factory=list)


def fit_group(
    members: list[Member], freeze: str, augment: list[str] | tuple[str, ...], images: torch.Tensor, rt: Runtime, prefix_batch: int, aug_seed: int
) -> None:
    """Train members that share a freeze point and augmentation, with one prefix pass per view.

    Every member's frozen prefix holds the same (base) weights, so the first one's prefix
    output over the union of their rows feeds them all (PrefixFeatures: once for all
    epochs without augmentation, two views for flip alone, else once per epoch). Views
    depend only on (aug_seed, epoch, image).
    """
    union = torch.unique(torch.cat([m.idx for m in members]))
    parts = []
    for m in members:
        m.model = rt.prepare(m.model)
        prefix, tail = models.freeze(m.model, freeze)
        step_tail = torch.compile(tail) if rt.compile else tail
        hp = m.hp
        opt = make_optimizer(tail.parameters(), hp.optimizer, hp.lr, hp.momentum, hp.weight_decay, rt)
        steps = hp.epochs * -(-len(m.idx) // hp.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=steps, pct_start=0.25) if m.one_cycle else None
        rows = torch.searchsorted(union, m.idx).to(rt.device)  # the member's rows in the union (of the features)
        parts.append((prefix, tail, step_tail, opt, sched, rows, m.idx.to(images.device), m.targets.to(rt.device)))
    epochs = max(m.hp.epochs for m in members)
    shared = PrefixFeatures(parts[0][0], images, union, augment, epochs, rt, prefix_batch)
    # Every index tensor lives beside the tensor it indexes, moved once per epoch at most:
    # on CUDA a host-to-device copy inside the step loop would make the host wait for the
    # GPU every step, and the GPU then idles while Python prepares the next one.
    for epoch in range(epochs):
        params = aug.moved(aug.draw_params(len(images), augment, aug_seed, epoch), images.device) if augment else None
        feats = shared.for_epoch(params)  # None when nothing is frozen
        for m, (prefix, tail, step_tail, opt, sched, rows, idx, targets) in zip(members, parts):
            if epoch >= m.hp.epochs:
                continue
            models.set_train_mode(prefix, tail)
            if feats is not None:
                get_input = lambda b, rows=rows, feats=feats: feats[rows[b]]
            else:

                def get_input(b, idx=idx, params=params):
                    i = idx[b.to(idx.device)]  # a no-op move unless the images stayed on the host
                    return rt.input(images[i], aug.take(params, i) if params else None)

            order = epoch_order(len(rows), m.hp.seed, epoch).to(rt.device)
            m.losses.append(train_one_epoch(step_tail, get_input, targets, order, m.hp.batch_size, m.loss_fn, opt, rt, sched))
