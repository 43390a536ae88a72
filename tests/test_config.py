"""The typed config tree: shipped configs load, bad ones fail loudly with the YAML path and the fix."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from ensemble_delta.config import Config, Strategy, config_hash, from_dict, load_config, to_yaml
from ensemble_delta.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "tests" / "configs").glob("*.yaml"))


def _keys(tree, prefix=""):
    """Every key path of a nested YAML mapping (list items of mappings as name[i].key)."""
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        yield path
        if isinstance(v, dict):
            yield from _keys(v, path)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, dict):
                    yield from _keys(item, f"{path}[{i}]")


def _lookup(obj, path: str, get=getattr):
    """Follow a key path through a Config (get=getattr) or a parsed YAML mapping (get=dict.get)."""
    for part in path.split("."):
        name, _, index = part.partition("[")
        obj = get(obj, name)
        if index:
            obj = obj[int(index.rstrip("]"))]
    return obj


def test_shipped_configs_exist():
    assert (REPO / "configs" / "mnist-subset.yaml") in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_loads_and_mirrors_the_tree(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # every key written in the YAML is a field of the typed tree, holding the value written
    for key in _keys(raw):
        value = _lookup(cfg, key)
        written = _lookup(raw, key, dict.get)
        if not isinstance(written, (dict, list)):
            assert value == written, key
    # the resolved config round-trips through YAML (run_config reads what write_config wrote)
    again = from_dict(yaml.safe_load(to_yaml(cfg)))
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)


def test_defaults_are_valid():
    cfg = from_dict({})
    assert cfg == Config()
    assert from_dict(None) == Config()


# ----------------------------------------------------------------------------- validation


@pytest.fixture
def error(write_config):
    """error(overrides, base=None) -> the message of the UserError that loading that config raises."""

    def check(overrides: dict, base: dict | None = None) -> str:
        path = write_config(overrides, name="bad.yaml", base=base)
        with pytest.raises(UserError) as e:
            load_config(path)
        msg = str(e.value)
        assert "\n" not in msg, "a user error is one line"
        assert str(path) in msg, "the message names the file"
        return msg

    return check


def test_unknown_top_level_key(error):
    msg = error({"epochs": 3})
    assert "epochs: unknown key" in msg
    for valid in ("num_classes", "data", "strategies", "merge", "runtime"):
        assert valid in msg


def test_unknown_nested_key(error):
    msg = error({"data": {"foo": 1}})
    assert "data.foo: unknown key" in msg
    assert "image_size" in msg and "val_fraction" in msg


def test_unknown_key_in_a_strategy(error):
    msg = error({"strategies": [{"freeze": "head"}, {"frezee": "full"}]})
    assert "strategies[1].frezee: unknown key" in msg
    assert "freeze" in msg and "augment" in msg


@pytest.mark.parametrize(
    "overrides, where, expected",
    [
        ({"data": {"image_size": "big"}}, "data.image_size", "an integer"),
        ({"data": {"image_size": 32.5}}, "data.image_size", "an integer"),
        ({"runtime": {"bf16": 3}}, "runtime.bf16", "true or false"),
        ({"num_classes": True}, "num_classes", "an integer"),
        ({"strategies": [{"lr": "fast"}]}, "strategies[0].lr", "a number"),
        ({"strategies": [{"augment": 3}]}, "strategies[0].augment", "flip, crop, color"),
        ({"strategies": ["head"]}, "strategies[0]", "a mapping"),
        ({"data": "mnist"}, "data", "a mapping"),
    ],
)
def test_wrong_type(error, overrides, where, expected):
    msg = error(overrides)
    assert f"{where}: " in msg
    assert expected in msg


@pytest.mark.parametrize(
    "overrides, where, bound",
    [
        ({"data": {"image_size": 2}}, "data.image_size", ">= 8"),
        ({"data": {"image_size": 4096}}, "data.image_size", "<= 1024"),
        ({"merge": {"density": 0}}, "merge.density", "> 0"),
        ({"merge": {"density": 1.5}}, "merge.density", "<= 1"),
        ({"data": {"val_fraction": 0.9}}, "data.val_fraction", "<= 0.5"),
        ({"strategies": [{"lr": 0}]}, "strategies[0].lr", "> 0"),
        ({"num_classes": 1}, "num_classes", ">= 2"),
    ],
)
def test_out_of_range(error, overrides, where, bound):
    msg = error(overrides)
    assert f"{where}: " in msg and "out of range" in msg
    assert bound in msg


def test_unknown_freeze_in_a_long_list(error):
    strategies = [{"freeze": "head"}, {"freeze": "full"}, {"freeze": "layer4"}, {"freeze": "layers"}]
    msg = error({"strategies": strategies})
    assert "strategies[3].freeze: 'layers' is not valid" in msg
    assert "head, layer4, layer3, full" in msg


def test_unknown_augment(error):
    msg = error({"strategies": [{"augment": ["flip", "blur"]}]})
    assert "strategies[0].augment[1]: 'blur' is not valid" in msg
    assert "flip, crop, color" in msg


@pytest.mark.parametrize(
    "overrides, where, choices",
    [
        ({"data": {"name": "cifar"}}, "data.name", "mnist-subset, mnist, imagenette, folder"),
        ({"model": {"arch": "vgg16"}}, "model.arch", "resnet18"),
        ({"strategies": [{"optimizer": "adam"}]}, "strategies[0].optimizer", "sgd, adamw"),
        ({"eval": {"methods": ["ensemble", "soup"]}}, "eval.methods[1]", "ties, task_arithmetic"),
        ({"eval": {"rules": ["vote"]}}, "eval.rules[0]", "prob_norm, logit_softmax, mean_prob"),
        ({"data": {"negatives": "some"}}, "data.negatives", "balanced, all"),
    ],
)
def test_unknown_choice(error, overrides, where, choices):
    msg = error(overrides)
    assert f"{where}: " in msg and "is not valid" in msg
    assert choices in msg


def test_unknown_weights(error):
    msg = error({"model": {"weights": "imagenet21k"}})
    assert "model.weights: 'imagenet21k' is not valid" in msg
    assert "imagenet, imagenet_v1, none, pretrain" in msg


@pytest.mark.parametrize("weights", ["imagenet", "imagenet_v1", "none", "pretrain", "ckpt/base.safetensors", "base.pt"])
def test_known_weights(weights, config_dict):
    assert from_dict(config_dict({"model": {"weights": weights}})).model.weights == weights


@pytest.mark.parametrize("strategies", [[], None])
def test_empty_strategies(error, strategies, config_dict):
    base = {k: v for k, v in config_dict().items() if k != "strategies"}
    msg = error({"strategies": strategies}, base=base)
    assert "strategies: the list is empty" in msg


def test_more_strategies_than_classes(error):
    msg = error({"num_classes": 2, "strategies": [{"freeze": "head"}] * 3})
    assert "strategies: 3 given for 2 classes" in msg


def test_empty_methods(error):
    msg = error({"eval": {"methods": []}})
    assert "eval.methods" in msg and "ensemble" in msg


def test_lambda_auto_and_numbers(config_dict):
    cfg = from_dict(config_dict({"merge": {"ties_lambda": "auto", "task_arithmetic_lambda": 0.4}}))
    assert cfg.merge.ties_lambda == "auto"
    assert cfg.merge.task_arithmetic_lambda == 0.4
    cfg = from_dict(config_dict({"merge": {"ties_lambda": 2, "task_arithmetic_lambda": "auto"}}))
    assert cfg.merge.ties_lambda == 2.0 and isinstance(cfg.merge.ties_lambda, float)
    assert cfg.merge.task_arithmetic_lambda == "auto"


@pytest.mark.parametrize("value, expected", [("sometimes", "auto"), (0, "out of range"), (True, "auto")])
def test_lambda_bad(error, value, expected):
    msg = error({"merge": {"ties_lambda": value}})
    assert "merge.ties_lambda: " in msg and expected in msg


def test_scalar_augment_becomes_a_list(config_dict):
    cfg = from_dict(config_dict({"strategies": [{"augment": "flip"}]}))
    assert cfg.strategies[0].augment == ["flip"]


# ----------------------------------------------------------------------------- strategies and hashing


def test_strategy_cycling(config_dict):
    cfg = from_dict(config_dict({"strategies": [{"freeze": "head"}, {"freeze": "layer4"}, {"freeze": "full", "lr": 0.3}]}))
    assert [cfg.strategy(c).freeze for c in range(10)] == ["head", "layer4", "full"] * 3 + ["head"]
    assert cfg.strategy(5).lr == 0.3
    assert cfg.strategy(4) == Strategy(freeze="layer4")  # unspecified fields keep their defaults


def test_one_strategy_per_class(config_dict):
    strategies = [{"freeze": "head", "seed": c} for c in range(10)]
    cfg = from_dict(config_dict({"strategies": strategies}))
    assert [cfg.strategy(c).seed for c in range(10)] == list(range(10))


def test_config_hash_stable_across_loads(write_config):
    path = write_config()
    a, b = load_config(path), load_config(path)
    assert a is not b and config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16


def test_config_hash_ignores_name_out_root_runtime(config_dict):
    h = config_hash(from_dict(config_dict()))
    other = config_dict({"name": "elsewhere", "out_root": "/tmp/x", "runtime": {"device": "cuda", "bf16": False, "threads": 4}})
    assert config_hash(from_dict(other)) == h


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategies": [{"freeze": "full", "augment": [], "lr": 0.05, "epochs": 1, "batch_size": 64}]},
        {"strategies": [{"freeze": "head", "augment": ["flip"], "lr": 0.05, "epochs": 1, "batch_size": 64}]},
        {"strategies": [{"freeze": "head", "augment": [], "lr": 0.06, "epochs": 1, "batch_size": 64}]},
        {"data": {"split_seed": 1}},
        {"merge": {"density": 0.3}},
    ],
)
def test_config_hash_changes_with_what_is_computed(overrides, config_dict):
    assert config_hash(from_dict(config_dict(overrides))) != config_hash(from_dict(config_dict()))


def test_config_hash_of_sections(config_dict):
    a = from_dict(config_dict())
    b = from_dict(config_dict({"strategies": [{"freeze": "full"}]}))
    assert config_hash(a, sections=("data", "model")) == config_hash(b, sections=("data", "model"))
    assert config_hash(a, sections=("strategies",)) != config_hash(b, sections=("strategies",))


def test_config_fields_all_have_defaults():
    # one default per knob: every dataclass in the tree builds without arguments
    def walk(cls):
        obj = cls()
        for f in dataclasses.fields(cls):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                walk(type(v))

    walk(Config)
