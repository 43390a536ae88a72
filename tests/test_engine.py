"""The engine: freezing, the prefix/tail split, per-image augmentation, grouped training."""

import dataclasses

import pytest
import torch

from ensemble_delta import augment as aug
from ensemble_delta import models
from ensemble_delta.config import RuntimeConfig, Strategy
from ensemble_delta.engine import Member, fit_group, resolve_runtime
from ensemble_delta.training import _bce, assign
from ensemble_delta.config import from_dict

RT = resolve_runtime(RuntimeConfig(device="cpu"))


def tiny_images(n=48, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 2


def base_state():
    torch.manual_seed(0)
    return models.build("resnet18", 10).state_dict()


@pytest.mark.parametrize("freeze", ["head", "layer4", "layer3", "full"])
def test_prefix_then_tail_is_the_model(freeze):
    torch.manual_seed(0)
    m = models.build("resnet18", 3).eval()
    x = torch.randn(4, 3, 32, 32)
    prefix, tail = models.split(m, freeze)
    assert torch.allclose(tail(prefix(x)), m(x), atol=1e-5)


@pytest.mark.parametrize("freeze", ["head", "layer4", "layer3", "full"])
def test_frozen_parts_do_not_move(freeze):
    """Parameters and BatchNorm buffers of the frozen prefix stay bit-identical; the tail moves."""
    base = base_state()
    images, y = tiny_images()
    model = models.with_head("resnet18", base, 1, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = Strategy(freeze=freeze, augment=["flip", "crop"], lr=0.1, epochs=2, batch_size=16)
    m = Member(0, model, torch.arange(len(y)), y.float(), _bce(1.0), hp)
    fit_group([m], freeze, hp.augment, images, RT, prefix_batch=32, aug_seed=1)
    after = m.model.state_dict()
    first = models.FIRST_TRAINABLE[freeze]
    trainable_stages = models.STAGES[models.STAGES.index(first) :]
    moved, frozen = [], []
    for k, v in before.items():
        (moved if k.split(".")[0] in trainable_stages else frozen).append(k)
        if k.split(".")[0] not in trainable_stages:
            assert torch.equal(after[k], v), f"{k} moved although frozen ({freeze})"
    assert any(not torch.equal(after[k], before[k]) for k in moved if k.endswith("weight"))
    if freeze != "full":  # frozen BatchNorm running statistics are buffers in eval mode
        assert any("running_mean" in k for k in frozen)
    assert models.n_trainable(m.model) == sum(before[k].numel() for k, _ in m.model.named_parameters() if k.split(".")[0] in trainable_stages)


def test_augmentation_draws_parameters_per_image():
    n = 64
    p = aug.draw_params(n, ["flip", "crop", "color"], seed=3, epoch=0)
    assert 0 < int(p["flip"].sum()) < n  # some flipped, some not
    assert p["crop"].unique(dim=0).shape[0] == n  # every image its own crop
    assert p["color"].unique(dim=0).shape[0] == n
    # the same (seed, epoch) gives the same views; another epoch, others
    q = aug.draw_params(n, ["flip", "crop", "color"], seed=3, epoch=0)
    assert all(torch.equal(p[k], q[k]) for k in p)
    assert not torch.equal(p["crop"], aug.draw_params(n, ["crop"], seed=3, epoch=1)["crop"])
    # adding color does not change the crops (fixed draw order)
    assert torch.equal(aug.draw_params(n, ["crop"], seed=3, epoch=0)["crop"], p["crop"])
    # one image repeated across a batch comes out different per row
    x = torch.rand(1, 3, 16, 16).expand(n, -1, -1, -1)
    out = aug.apply(x, p)
    assert out.flatten(1).unique(dim=0).shape[0] == n
    assert out.min() >= 0 and out.max() <= 1


def test_flip_applies_exactly_where_drawn():
    x = torch.rand(8, 1, 5, 5)
    p = {"flip": torch.tensor([True, False] * 4)}
    out = aug.apply(x, p)
    assert torch.equal(out[0::2], x[0::2].flip(-1)) and torch.equal(out[1::2], x[1::2])


def test_full_crop_is_identity():
    x = torch.rand(2, 3, 8, 8)
    p = {"crop": torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)}  # whole image, centred
    assert torch.allclose(aug.apply(x, p), x, atol=1e-5)


def test_to_input_normalises_and_expands_gray():
    x = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    out = aug.to_input(x)
    assert out.shape == (2, 3, 4, 4)
    expect = (1 - torch.tensor(aug.IMAGENET_MEAN)) / torch.tensor(aug.IMAGENET_STD)
    assert torch.allclose(out[0, :, 0, 0], expect)


def test_group_training_equals_training_alone():
    """Sharing one prefix pass across a group gives each member what it would get alone."""
    base = base_state()
    images, y = tiny_images(n=40)
    hp = Strategy(freeze="layer4", augment=["crop"], lr=0.05, epochs=2, batch_size=8)

    def member(c, idx):
        return Member(c, models.with_head("resnet18", base, 1, seed=c), idx, (y[idx] == c % 2).float(), _bce(1.0), dataclasses.replace(hp, seed=c))

    a_idx, b_idx = torch.arange(0, 30), torch.arange(10, 40)
    together = [member(0, a_idx), member(1, b_idx)]
    fit_group(together, "layer4", ["crop"], images, RT, prefix_batch=16, aug_seed=5)
    alone = member(1, b_idx)
    fit_group([alone], "layer4", ["crop"], images, RT, prefix_batch=16, aug_seed=5)
    for k, v in alone.model.state_dict().items():
        assert torch.allclose(v.float(), together[1].model.state_dict()[k].float(), atol=1e-5), k
    assert together[1].losses == pytest.approx(alone.losses, rel=1e-5)


def test_assign_spreads_work_and_covers_every_class():
    cfg = from_dict({"strategies": [{"freeze": f} for f in ["head", "layer4", "layer3", "full", "full"]]})
    shares = assign(cfg, list(range(10)), 2)
    assert sorted(c for s in shares for c in s) == list(range(10))
    assert len(shares) == 2
    cfg1 = from_dict({"strategies": [{"freeze": "full"}]})  # one group: specialists move singly
    assert [len(s) for s in assign(cfg1, list(range(10)), 2)] == [5, 5]
