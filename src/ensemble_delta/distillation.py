"""Knowledge distillation of the ensemble into one student with K sigmoid outputs.

The teacher's log-odds on the training images are the specialists' own scores, computed
once by the evaluation stage and cached (scores/teacher_train.safetensors).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from . import models
from .config import Config
from .data import Data
from .engine import Member, Runtime, fit_group, images_on


def kd_loss(temperature: float, hard_weight: float, k: int):
    """Binary KD per output: BCE between sigmoid(z_s / T) and sigmoid(z_t / T), scaled by T^2
    (Hinton et al.) so its gradients keep their size across temperatures, plus
    `hard_weight` times the BCE against the one-hot true labels."""

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        teacher, onehot = target[:, :k], target[:, k:]
        soft = F.binary_cross_entropy_with_logits(out / temperature, torch.sigmoid(teacher / temperature)) * temperature**2
        if hard_weight == 0:
            return soft
        return (1 - hard_weight) * soft + hard_weight * F.binary_cross_entropy_with_logits(out, onehot)

    return loss


def train_student(cfg: Config, data: Data, base: dict[str, torch.Tensor], teacher_train: torch.Tensor, rt: Runtime) -> tuple[dict, dict]:
    """Train the student (base backbone, new K-output head) to match the teacher's scores."""
    d, k = cfg.distill, cfg.num_classes
    n = len(data.train)
    if teacher_train.shape != (n, k):
        raise ValueError(f"teacher scores have shape {tuple(teacher_train.shape)}, expected {(n, k)}")
    targets = torch.cat([teacher_train.float(), F.one_hot(data.train.labels, k).float()], 1)
    member = Member("student", models.with_head(cfg.model.arch, base, k, seed=d.seed), torch.arange(n), targets, kd_loss(d.temperature, d.hard_weight, k), d)
    print(f"distill: student {cfg.model.arch} freeze={d.freeze}, {n} images x {d.epochs} epochs, T={d.temperature}, hard weight {d.hard_weight}")
    t0 = time.perf_counter()
    fit_group([member], d.freeze, d.augment, images_on(rt, data.train.images), rt, cfg.eval.batch_size, d.seed + 29)
    log = {"loss_per_epoch": member.losses, "seconds": time.perf_counter() - t0, "freeze": d.freeze}
    return {key: v.detach().cpu() for key, v in member.model.state_dict().items()}, log
