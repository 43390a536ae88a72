"""Shared fixtures: no network, tiny generated image trees, YAML configs written on the fly."""

from __future__ import annotations

import copy
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

# A tiny but valid config: mnist-subset at 16 px on the CPU, download never allowed.
TINY = {
    "name": "tiny",
    "num_classes": 10,
    "data": {"name": "mnist-subset", "root": "data", "download": False, "image_size": 16, "val_fraction": 0.1},
    "model": {"arch": "resnet18", "weights": "pretrain"},
    "strategies": [{"freeze": "head", "augment": [], "lr": 0.05, "epochs": 1, "batch_size": 64}],
    "runtime": {"device": "cpu"},
}


def merge(base: dict, overrides: dict) -> dict:
    """A deep copy of `base` with `overrides` merged in (nested mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach a non-local address fails the test loudly (tests must never download)."""
    real_connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if self.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise AssertionError(f"a test tried to reach the network: {address!r}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture
def config_dict():
    """config_dict(overrides=None, base=TINY) -> a fresh dict: the tiny config with overrides merged in."""

    def make(overrides: dict | None = None, base: dict | None = None) -> dict:
        return merge(TINY if base is None else base, overrides or {})

    return make


@pytest.fixture
def write_config(tmp_path):
    """write_config(overrides, name="config.yaml", base=TINY) -> path of a YAML file in tmp_path."""

    def write(overrides: dict | None = None, name: str = "config.yaml", base: dict | None = None) -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(merge(TINY if base is None else base, overrides or {}), sort_keys=False))
        return path

    return write


def save_image(path: Path, h: int, w: int, rgb: tuple[int, int, int], seed: int = 0) -> None:
    """A mostly solid-colour image (+-8 noise) of h x w, saved by extension (JPEG quality 95, or PNG)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(rgb, dtype=np.int16) + rng.integers(-8, 9, size=(h, w, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    Image.fromarray(arr).save(path, fmt, **({"quality": 95} if fmt == "JPEG" else {}))


# Distinct colours per class so channel order and labels can be checked after decoding.
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (200, 30, 200),
           (30, 200, 200), (120, 60, 20), (20, 120, 60), (60, 20, 120), (230, 230, 230)]  # fmt: skip
SIZES = [(30, 40), (40, 30), (36, 48)]  # (h, w): non-square, both orientations


@pytest.fixture
def jpeg_tree(tmp_path):
    """An Imagenette-shaped tree: tmp/imagenette/imagenette2-320/{train,val}/<wnid>/*.JPEG.

    3 train and 2 val images per class, of different non-square sizes, coloured by class.
    Returns the data root (the folder that holds imagenette2-320/).
    """
    from torchvision.datasets import Imagenette

    root = tmp_path / "imagenette"
    for split, n in (("train", 3), ("val", 2)):
        for c, wnid in enumerate(sorted(Imagenette._WNID_TO_CLASS)):  # the ten real wnids
            for i in range(n):
                h, w = SIZES[i]
                save_image(root / "imagenette2-320" / split / wnid / f"{wnid}_{i}.JPEG", h, w, COLOURS[c], seed=c * 10 + i)
    return root


@pytest.fixture
def folder_tree(tmp_path):
    """A `folder` dataset of 3 classes: train/<class>/ (3 images, png and jpg) and val/<class>/ (2 images)."""
    root = tmp_path / "folder"
    for split, n in (("train", 3), ("val", 2)):
        for c, name in enumerate(["cat", "dog", "emu"]):
            for i in range(n):
                h, w = SIZES[i]
                ext = ".png" if i % 2 == 0 else ".jpg"
                save_image(root / split / name / f"{name}_{i}{ext}", h, w, COLOURS[c], seed=c * 10 + i)
    return root


@pytest.fixture
def class_colours():
    """The RGB colour of class c's images in jpeg_tree and folder_tree."""
    return COLOURS


@pytest.fixture(name="save_image")
def save_image_fixture():
    """save_image(path, h, w, rgb, seed=0): write one generated image (JPEG or PNG by extension)."""
    return save_image
