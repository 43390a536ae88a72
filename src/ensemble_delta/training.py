"""Base model and the one-vs-rest specialists.

Specialists that share a freeze point and an augmentation are trained together: their
frozen prefix is run once per image and view for all of them (it holds the base's
weights in every one), then each trains its own tail on its own rows, order and seed.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing as mp
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import models
from .config import Config, Strategy, config_hash, hash_of
from .data import Data, one_vs_rest
from .engine import Member, Runtime, fit_group, images_on, resolve_runtime
from .errors import UserError
from .paths import RunPaths, is_done
from .storage import save_tensors, write_json

AUG_SEED = 17  # the augmentation stream is shared by all specialists: views depend on (image, epoch)


# ----------------------------------------------------------------------------- base


def base_hash(cfg: Config) -> str:
    return config_hash(cfg, sections=("num_classes", "data", "model", "pretrain"))


def specialist_hash(cfg: Config, c: int) -> str:
    """Specialist c depends on the base, the data and its own strategy only."""
    return base_hash(cfg) + "-" + hash_of({"strategies": [dataclasses.asdict(cfg.strategy(c))]})


def pretrain_base(cfg: Config, data: Data, rt: Runtime) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Train the base from a seeded random init as a K-class classifier (the offline ImageNet stand-in)."""
    p = cfg.pretrain
    n = len(data.train)
    member = Member("base", models.seeded_build(cfg.model.arch, cfg.num_classes, cfg.model.init_seed), torch.arange(n), data.train.labels, F.cross_entropy, p, one_cycle=p.optimizer == "sgd")
    print(f"pretrain: {cfg.model.arch} from a random init, {n} images x {p.epochs} epochs, {p.epochs * -(-n // p.batch_size)} steps")
    fit_group([member], "full", p.augment, images_on(rt, data.train.images), rt, cfg.eval.batch_size, p.seed + AUG_SEED)
    print(f"pretrain: loss per epoch {[round(x, 4) for x in member.losses]}")
    return {k: v.detach().cpu() for k, v in member.model.state_dict().items()}, member.losses


def base_state(cfg: Config, paths: RunPaths, data: Data | None = None, rt: Runtime | None = None, force: bool = False) -> dict[str, torch.Tensor]:
    """The base weights: made (or trained) once and saved, or read back from the run / torchvision."""
    w = cfg.model.weights
    if w in models.IMAGENET_WEIGHTS:
        return models.imagenet_state(cfg.model.arch, w)
    if w not in ("none", "pretrain"):
        return models.load_checkpoint(w)
    h = base_hash(cfg)
    if is_done(paths.base_log, h) and paths.base.exists() and not force:
        from .storage import load_tensors

        return load_tensors(paths.base)
    if data is None or rt is None:
        raise UserError(f"{paths.base} is missing or stale: run `ensemble-delta train` first")
    t0 = time.perf_counter()
    if w == "none":
        state, losses = models.seeded_build(cfg.model.arch, cfg.num_classes, cfg.model.init_seed).state_dict(), []
    else:
        state, losses = pretrain_base(cfg, data, rt)
    save_tensors(paths.base, state)
    write_json(paths.base_log, {"config_hash": h, "weights": w, "loss_per_epoch": losses, "seconds": time.perf_counter() - t0})
    return state


# ----------------------------------------------------------------------------- specialists


def _group_key(s: Strategy) -> tuple:
    return (s.freeze, tuple(sorted(s.augment)))


def groups_of(cfg: Config, classes: list[int]) -> dict[tuple, list[int]]:
    """Classes by (freeze, augment): the specialists that share one prefix pass."""
    groups: dict[tuple, list[int]] = {}
    for c in classes:
        groups.setdefault(_group_key(cfg.strategy(c)), []).append(c)
    return groups


def cost(cfg: Config, classes: list[int]) -> int:
    """Rough relative training cost of some specialists (per image: head 1 ... full 6, times epochs)."""
    per_image = {"head": 1, "layer4": 2, "layer3": 3, "full": 6}
    return sum(per_image[cfg.strategy(c).freeze] * cfg.strategy(c).epochs for c in classes)


def _bce(pos_weight: float):
    pw: dict[torch.device, torch.Tensor] = {}  # per device, made once: a copy per step would sync the GPU

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if out.device not in pw:
            pw[out.device] = torch.tensor(pos_weight, device=out.device)
        return F.binary_cross_entropy_with_logits(out.squeeze(1), y, pos_weight=pw[out.device])

    return loss


def train_group(
    cfg: Config, classes: list[int], base: dict[str, torch.Tensor], data: Data, images: torch.Tensor, rt: Runtime, paths: RunPaths
) -> list[Callable[[], None]]:
    """Train specialists with one freeze point and augmentation, sharing the frozen prefix's pass.

    Returns one writer per specialist (checkpoint, then its completion marker), for the
    caller to run off the training path.
    """
    freeze, augment = _group_key(cfg.strategy(classes[0]))
    members = []
    for c in classes:
        s = cfg.strategy(c)
        ovr = one_vs_rest(data.train.labels, c, cfg.data.negatives, cfg.data.split_seed)
        model = models.with_head(cfg.model.arch, base, 1, seed=s.seed + c)
        members.append(Member(c, model, ovr.indices, ovr.targets, _bce(ovr.pos_weight), dataclasses.replace(s, seed=s.seed + c)))
        trained = sum(p.numel() for p in models.split(model, freeze)[1].parameters())
        print(
            f"specialist {c}: freeze={freeze} augment={'+'.join(augment) or 'none'}: {len(ovr.indices)} images "
            f"({int(ovr.targets.sum())} positive), {s.epochs} epochs x {-(-len(ovr.indices) // s.batch_size)} steps, {trained:,} parameters trained"
        )
    t0 = time.perf_counter()
    fit_group(members, freeze, augment, images, rt, cfg.eval.batch_size, AUG_SEED)
    seconds = time.perf_counter() - t0
    return [functools.partial(_save_specialist, cfg, paths, m, freeze, augment, classes, seconds) for m in members]


def _save_specialist(cfg: Config, paths: RunPaths, m: Member, freeze: str, augment: tuple, classes: list[int], seconds: float) -> None:
    """The checkpoint, then its completion marker (written last)."""
    save_tensors(paths.specialist(m.name), m.model.state_dict())
    log = {
        "config_hash": specialist_hash(cfg, m.name),
        "class": m.name,
        "freeze": freeze,
        "augment": list(augment),
        "n_images": len(m.idx),
        "n_positive": int(m.targets.sum()),
        "trained_parameters": models.n_trainable(m.model),
        "loss_per_epoch": m.losses,
        "group": sorted(classes),
        "group_seconds": seconds,
    }
    write_json(paths.specialist_log(m.name), log)


def pending(cfg: Config, paths: RunPaths, force: bool) -> list[int]:
    return [c for c in range(cfg.num_classes) if force or not (paths.specialist(c).exists() and is_done(paths.specialist_log(c), specialist_hash(cfg, c)))]


def cpu_lanes(rt: Runtime, n_groups: int) -> int:
    """How many groups to train side by side on a CPU: one per core, one torch thread each.

    Small images leave a multi-threaded convolution poorly parallel (2 threads ran 1.5x
    faster than 1 here), while two independent groups on two cores run nearly 2x; each
    lane's math is single-threaded and so deterministic.
    """
    if rt.cuda or n_groups < 2:
        return 1
    return min(n_groups, torch.get_num_threads())


def train_specialists(cfg: Config, paths: RunPaths, classes: list[int], data: Data, rt: Runtime) -> None:
    """Train the given classes' specialists on one device, grouped by (freeze, augment)."""
    base = base_state(cfg, paths)
    groups = groups_of(cfg, classes)
    images = images_on(rt, data.train.images)  # once, shared by every group
    lanes = cpu_lanes(rt, len(groups))
    # checkpoints are written by a background thread while the next group trains; each
    # writer saves its checkpoint before its marker, so a crash leaves no false completion
    with ThreadPoolExecutor(max_workers=1) as saver:
        saves: list[Future] = []
        if lanes == 1:
            for group in tqdm(groups.values(), desc="specialist groups", leave=False):
                saves += [saver.submit(w) for w in train_group(cfg, group, base, data, images, rt, paths)]
        else:
            # CPU: groups in parallel threads (torch releases the GIL inside its kernels), costliest first
            threads = torch.get_num_threads()
            order = sorted(groups.values(), key=lambda g: cost(cfg, g), reverse=True)
            torch.set_num_threads(1)
            try:
                with ThreadPoolExecutor(max_workers=lanes) as pool:
                    futures = [pool.submit(train_group, cfg, g, base, data, images, rt, paths) for g in order]
                    for f in tqdm(futures, desc=f"specialist groups ({lanes} CPU lanes)", leave=False):
                        saves += [saver.submit(w) for w in f.result()]  # re-raises a lane's error here
            finally:
                torch.set_num_threads(threads)
        for f in saves:
            f.result()  # re-raises a writer's error


def _worker(cfg: Config, root: str, classes: list[int], device: str) -> None:
    """One process per device: loads the cached data and trains its share of specialists."""
    from .data import load_data

    if device == "cpu":
        torch.set_num_threads(1)
    rt = resolve_runtime(cfg.runtime, device)
    data = load_data(cfg.data, cfg.num_classes)
    train_specialists(cfg, RunPaths(Path(root)), classes, data, rt)


def assign(cfg: Config, classes: list[int], n_devices: int) -> list[list[int]]:
    """Spread specialists over devices, most costly first onto the least loaded device.

    Whole (freeze, augment) groups move together when there are enough groups to go
    round, so they keep sharing their prefix pass; otherwise specialists move singly.
    """
    groups = groups_of(cfg, classes)
    units = list(groups.values()) if len(groups) >= n_devices else [[c] for c in classes]
    shares, load = [[] for _ in range(n_devices)], [0] * n_devices
    for unit in sorted(units, key=lambda u: cost(cfg, u), reverse=True):
        d = load.index(min(load))
        shares[d] += unit
        load[d] += cost(cfg, unit)
    return [sorted(s) for s in shares if s]


def devices_for(cfg: Config) -> list[str]:
    rc = cfg.runtime
    if rc.device == "cpu" or (rc.device == "auto" and not torch.cuda.is_available()):
        return ["cpu"] * max(1, rc.devices)
    if rc.device.startswith("cuda:"):
        return [rc.device]
    n = torch.cuda.device_count() if rc.devices == 0 else min(rc.devices, torch.cuda.device_count())
    return [f"cuda:{i}" for i in range(max(1, n))]


def train_all(cfg: Config, paths: RunPaths, data: Data, rt: Runtime, force: bool = False) -> list[int]:
    """Train every pending specialist, spread over the configured devices; returns the classes trained."""
    todo = pending(cfg, paths, force)
    if not todo:
        print(f"specialists: all {cfg.num_classes} complete for this config, skipping (--force retrains)")
        return []
    devices = devices_for(cfg)
    if len(devices) == 1 or len(todo) == 1:
        train_specialists(cfg, paths, todo, data, rt)
        return todo
    shares = assign(cfg, todo, len(devices))
    print(f"specialists: {len(todo)} over {len(shares)} worker processes on {', '.join(devices[: len(shares)])}")
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    procs = [ctx.Process(target=_worker, args=(cfg, str(paths.root), share, dev)) for share, dev in zip(shares, devices)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = [c for c in todo if not is_done(paths.specialist_log(c), specialist_hash(cfg, c))]
    if failed:
        raise RuntimeError(f"worker processes failed to train specialists {failed}; see their output above")
    return todo
