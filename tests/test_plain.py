"""The plain recipe (plain.py) computes what the engine computes, and the engine caches what it should.

Without augmentation the engine (cached prefix features, grouped specialists, no
DataLoader) and the plain PIL/DataLoader loop are the same computation, so their test
scores agree to float rounding, for a head-only, a layer4 and a full specialist.
"""

from __future__ import annotations

import pytest
import torch

from ensemble_delta import augment as aug
from ensemble_delta import engine, evaluation, models, plain, training
from ensemble_delta.config import RuntimeConfig, Strategy, from_dict
from ensemble_delta.data import load_data
from ensemble_delta.paths import RunPaths
from ensemble_delta.storage import read_json

FREEZES = ("head", "layer4", "full")  # cycled: class c gets FREEZES[c % 3]


def _tiny_config(tmp_path, augment=()):
    return from_dict(
        {
            "name": "tiny",
            "out_root": str(tmp_path),
            "data": {"name": "synthetic", "root": str(tmp_path), "image_size": 16, "synthetic_train": 200, "synthetic_test": 60},
            "model": {"arch": "resnet18", "weights": "none"},
            "strategies": [
                {"freeze": "head", "augment": list(augment), "lr": 0.05, "epochs": 2, "batch_size": 12},
                {"freeze": "layer4", "augment": list(augment), "lr": 0.02, "epochs": 2, "batch_size": 12, "optimizer": "adamw"},
                {"freeze": "full", "augment": list(augment), "lr": 0.01, "epochs": 2, "batch_size": 12},
            ],
            "eval": {"batch_size": 64},
            "runtime": {"device": "cpu"},
        }
    )


@pytest.fixture(scope="module")
def one_thread():
    """Both paths with one torch thread: the engine trains its groups side by side in one-thread
    CPU lanes, and a full fine-tune of a random init turns thread-count rounding into visible drift."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory, one_thread):
    """The engine's run of the tiny config: every specialist trained, then scored on the test split."""
    tmp = tmp_path_factory.mktemp("fast")
    cfg = _tiny_config(tmp)
    paths, rt = RunPaths(cfg.run_dir), engine.resolve_runtime(cfg.runtime)
    data = load_data(cfg.data, cfg.num_classes)
    base = training.base_state(cfg, paths, data, rt)
    training.train_specialists(cfg, paths, list(range(cfg.num_classes)), data, rt)
    scores = evaluation.specialist_logits(cfg, paths, data.test.images, rt)
    return cfg, paths, data, base, scores


@pytest.mark.parametrize("c", [0, 1, 2], ids=[f"{f}" for f in FREEZES])
def test_plain_recipe_matches_engine_scores(fast_run, c):
    cfg, paths, data, base, fast_scores = fast_run
    assert cfg.strategy(c).freeze == FREEZES[c]
    state, losses = plain.train_specialist_plain(cfg, base, data, c, "cpu", num_workers=0, engine_kernels=True)
    model = models.build(cfg.model.arch, 1)
    model.load_state_dict(state)
    scores = plain.score_plain(model, data.test.images, "cpu", batch_size=64, num_workers=0)
    assert scores.shape == (len(data.test), 1)
    torch.testing.assert_close(scores[:, 0], fast_scores[:, c], atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(read_json(paths.specialist_log(c))["loss_per_epoch"]), atol=1e-4, rtol=1e-4)
    # the frozen part is untouched, buffers included (eval mode), exactly as in the engine
    for name in models.STAGES[: models.STAGES.index(models.FIRST_TRAINABLE[FREEZES[c]])]:
        for k, v in state.items():
            if k.startswith(name + "."):
                assert torch.equal(v, base[k]), k


def test_plain_recipe_runs_with_every_augmentation(tmp_path):
    cfg = _tiny_config(tmp_path, augment=("flip", "crop", "color"))
    data = load_data(cfg.data, cfg.num_classes)
    base = models.build(cfg.model.arch, cfg.num_classes).state_dict()
    _, losses = plain.train_specialist_plain(cfg, base, data, 0, "cpu", num_workers=0)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))


def test_sampler_yields_the_engine_order():
    s = plain.EpochOrder(50, seed=7)
    for epoch in range(3):
        s.set_epoch(epoch)
        assert list(s) == engine.epoch_order(50, 7, epoch).tolist()


# ----------------------------------------------------------------------------- feature caching


@pytest.fixture
def prefix_calls(monkeypatch):
    """Rows passed to each engine.run_prefix call (fit_group looks the name up in its module)."""
    calls: list[int] = []
    real = engine.run_prefix

    def counting(prefix, images, idx, *args, **kwargs):
        calls.append(len(idx))
        return real(prefix, images, idx, *args, **kwargs)

    monkeypatch.setattr(engine, "run_prefix", counting)
    return calls


def _members(freeze: str, epochs=(3, 2)) -> list[engine.Member]:
    """Two specialists with overlapping rows, different epochs and seeds."""
    out = []
    for k, (rows, ep) in enumerate(zip((torch.arange(0, 24), torch.arange(12, 36)), epochs)):
        targets = (rows % 2).float()
        hp = Strategy(freeze=freeze, epochs=ep, batch_size=8, lr=0.01, seed=k)
        out.append(engine.Member(k, models.build("resnet18", 1), rows, targets, training._bce(1.0), hp))
    return out


@pytest.mark.parametrize(
    "freeze, augment, expected",
    [
        ("head", [], 1),  # frozen backbone, fixed views: features once for all epochs
        ("head", ["flip"], 2),  # flip alone over 3 epochs (the longest member): both views once
        ("head", ["crop"], 3),  # new views each epoch: once per epoch
        ("layer4", [], 1),
        ("layer4", ["crop", "color"], 3),
        ("full", [], 0),  # nothing frozen: nothing to cache
        ("full", ["flip"], 0),
    ],
)
def test_prefix_runs_once_per_view_and_only_when_frozen(prefix_calls, freeze, augment, expected):
    torch.manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    rt = engine.resolve_runtime(RuntimeConfig(device="cpu"))
    members = _members(freeze)
    engine.fit_group(members, freeze, augment, images, rt, prefix_batch=64, aug_seed=0)
    assert len(prefix_calls) == expected
    assert all(n == 36 for n in prefix_calls)  # one pass over the union of the members' rows serves both
    assert [len(m.losses) for m in members] == [3, 2]


@pytest.mark.parametrize("epochs, passes", [(1, 1), (2, 2), (3, 2), (5, 2)])
def test_two_flip_views_give_each_epochs_features(prefix_calls, epochs, passes):
    """Flip alone: the features PrefixFeatures picks per epoch are those of a pass over that epoch's views."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    rt = engine.resolve_runtime(RuntimeConfig(device="cpu"))
    prefix, _ = models.freeze(rt.prepare(models.build("resnet18", 1)), "layer4")
    rows = torch.tensor([0, 3, 4, 8, 15, 16, 22, 29])
    shared = engine.PrefixFeatures(prefix, images, rows, ["flip"], epochs, rt, batch_size=5)
    assert shared.two_views == (epochs > 2)
    for epoch in range(epochs):
        params = aug.draw_params(len(images), ["flip"], seed=3, epoch=epoch)
        got = shared.for_epoch(params)
        calls = len(prefix_calls)
        want = engine.run_prefix(prefix, images, rows, rt, 5, params)
        del prefix_calls[calls:]  # the reference pass is not the engine's
        assert params["flip"][rows].any() and not params["flip"][rows].all()  # both views in play
        assert torch.equal(got, want)  # the same per-image arithmetic: bit for bit
    assert len(prefix_calls) == passes
