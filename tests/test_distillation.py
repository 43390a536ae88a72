"""Distillation: the KD loss by hand, and a student that learns a tiny teacher."""

import torch
import torch.nn.functional as F

from ensemble_delta import models
from ensemble_delta.config import from_dict
from ensemble_delta.data import load_data
from ensemble_delta.distillation import kd_loss, train_student
from ensemble_delta.engine import logits, resolve_runtime


def test_kd_loss_by_hand():
    k, t = 3, 2.0
    out = torch.tensor([[1.0, -2.0, 0.5]])
    teacher = torch.tensor([[3.0, -1.0, -4.0]])
    onehot = torch.tensor([[1.0, 0.0, 0.0]])
    target = torch.cat([teacher, onehot], 1)
    q = torch.sigmoid(teacher / t)
    s = torch.sigmoid(out / t)
    soft = -(q * s.log() + (1 - q) * (1 - s).log()).mean() * t**2
    hard = -(onehot * torch.sigmoid(out).log() + (1 - onehot) * (1 - torch.sigmoid(out)).log()).mean()
    assert torch.allclose(kd_loss(t, 0.0, k)(out, target), soft, atol=1e-6)
    assert torch.allclose(kd_loss(t, 0.25, k)(out, target), 0.75 * soft + 0.25 * hard, atol=1e-6)
    # the soft term is smallest, with zero gradient, where the student equals the teacher
    z = teacher.clone().requires_grad_(True)
    kd_loss(t, 0.0, k)(z, target).backward()
    assert z.grad.abs().max() < 1e-6


def test_student_learns_a_tiny_teacher(tmp_path):
    cfg = from_dict(
        {
            "data": {"name": "synthetic", "root": str(tmp_path), "image_size": 16, "synthetic_train": 300, "synthetic_test": 100, "val_fraction": 0.0},
            "model": {"arch": "resnet18", "weights": "none"},
            "distill": {"epochs": 6, "lr": 0.05, "batch_size": 50, "temperature": 1.0},
            "runtime": {"device": "cpu"},
        }
    )
    data = load_data(cfg.data, 10)
    rt = resolve_runtime(cfg.runtime)
    base = models.seeded_build("resnet18", 10, 0).state_dict()
    teacher = 6.0 * F.one_hot(data.train.labels, 10).float() - 3.0  # confident and right: the labels
    before = models.with_head("resnet18", base, 10, seed=cfg.distill.seed)
    state, log = train_student(cfg, data, base, teacher, rt)
    student = models.build("resnet18", 10)
    student.load_state_dict(state)
    acc = lambda m: (logits(m, data.test.images, rt, 100).argmax(1) == data.test.labels).float().mean().item()
    assert log["loss_per_epoch"][-1] < 0.6 * log["loss_per_epoch"][0]
    assert acc(before) < 0.3  # a random student knows nothing
    assert acc(student) > 0.6  # and learns the teacher's classes on held-out images
