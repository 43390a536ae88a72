"""Provenance beside every result: resolved config, its hash, git state, versions, device, timings."""

from __future__ import annotations

import platform
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

from .config import Config, config_hash, to_yaml
from .paths import RunPaths
from .storage import read_json, write_json, write_text

PACKAGES = ("ensemble-delta", "torch", "torchvision", "numpy", "scipy", "scikit-learn", "safetensors", "matplotlib", "mlxtend")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = "not installed"
    return out


def git_state(outputs: Path | None = None, repo: Path | None = None) -> dict:
    """The commit of the code that ran, and whether tracked files differ from it.

    `outputs` (the folder of run directories) does not count towards `dirty`: rerunning
    the committed reference outputs rewrites them, and that is not a change to the code.
    `repo`: any folder in the repository (default: this package's).
    """
    here = repo or Path(__file__).resolve().parent

    def git(*args):
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD", "--show-toplevel")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        commit, top = head.stdout.splitlines()[:2]  # one line each; a path may hold spaces
        spec = ["--", ":/"]  # the whole working tree, wherever `repo` is in it
        if outputs is not None:
            try:
                spec.append(f":(top,exclude){Path(outputs).resolve().relative_to(Path(top).resolve()).as_posix()}")
            except ValueError:
                pass  # outputs outside the repository cannot make it dirty
        status = git("status", "--porcelain", "--untracked-files=no", *spec)
        return {"commit": commit, "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def device_name(rt) -> str:
    if rt is not None and rt.cuda:
        return f"{torch.cuda.get_device_name(rt.device)} ({rt.device})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def write_config(paths: RunPaths, cfg: Config) -> None:
    write_text(paths.config, "# resolved config written by ensemble-delta; every key is documented in config.py\n" + to_yaml(cfg))


def update_manifest(paths: RunPaths, cfg: Config, stage: str, seconds: float, rt=None, timings: dict | None = None, **extra) -> dict:
    """Merge this stage's facts into manifest.json (read-modify-write, atomic)."""
    m = read_json(paths.manifest) if paths.manifest.exists() else {}
    m.update(
        {
            "config_hash": config_hash(cfg),
            "versions": versions(),
            "git": git_state(outputs=paths.root.parent),
            "seeds": {
                "split_seed": cfg.data.split_seed,
                "init_seed": cfg.model.init_seed,
                "strategy_seeds": [cfg.strategy(c).seed + c for c in range(cfg.num_classes)],
                "distill_seed": cfg.distill.seed,
            },
            "base_weights": cfg.model.weights
            if cfg.model.weights not in ("imagenet", "imagenet_v1")
            else f"torchvision {cfg.model.arch} {'IMAGENET1K_V2' if cfg.model.weights == 'imagenet' else 'IMAGENET1K_V1'}",
        }
    )
    if rt is not None:
        m["device"] = device_name(rt)
    m.setdefault("timings", {})[stage] = round(seconds, 3)
    if timings:
        m.setdefault("stage_details", {})[stage] = {k: round(v, 3) for k, v in timings.items()}
    for key, value in extra.items():
        if isinstance(value, dict):
            m.setdefault(key, {}).update(value)
        elif value is not None:
            m[key] = value
    m["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_json(paths.manifest, m)
    return m
