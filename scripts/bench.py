"""Benchmark (issue 5): the engine against the plain recipe a typical user writes, side by side.

Both train the same specialists (same images, one-vs-rest rows, models, optimizers,
epochs, batch sizes and shuffle orders) in this one process, so their ratio is measured
under the same conditions; absolute numbers move with the machine and its load.

    python scripts/bench.py --dataset mnist-subset              # the offline default, on this machine
    python scripts/bench.py --dataset mnist-subset --limit-classes 4 --no-stages
    python scripts/bench.py --synthetic                          # Imagenette-sized random data at 224 px (GPU)
    python scripts/bench.py --synthetic --image-size 64 --train-images 1000 --test-images 200 --limit-classes 2
    python scripts/bench.py --config configs/imagenette.yaml --synthetic --full-finetune-throughput --no-plain --no-stages

Printed: a table per (freeze, augment) group of images per second and wall time of
(a) the engine (`training.train_specialists` on the group) and (b) plain.py (each
specialist alone, PIL + DataLoader, the whole network every step), run back to back,
their ratio plain/engine, and the totals; then (unless --no-stages) the time
of every stage of a whole `ensemble-delta run` (its own process), from its manifest.json, with each strategy
group's training time from the specialists' logs; and, with
--full-finetune-throughput, the engine's full fine-tuning images/s at the config's size.

The training comparison starts both from the same seeded random base (model.weights:
none, unless --keep-weights): a base's values do not change the work, and this skips
pretraining it. Images per second counts training images processed (rows x epochs),
whether the engine ran their frozen prefix then or reused cached features.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would break the tables; tqdm reads it at import, and torch imports tqdm

import torch

from ensemble_delta import engine, models, pipeline, plain, training
from ensemble_delta.config import Strategy, to_yaml
from ensemble_delta.data import load_data, one_vs_rest
from ensemble_delta.paths import RunPaths
from ensemble_delta.storage import read_json

IMAGENETTE = {"train": 9469, "test": 3925}  # Imagenette2-320's split sizes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", help="configs/NAME.yaml (default mnist-subset)")
    src.add_argument("--config", help="path to a YAML config")
    p.add_argument("--synthetic", action="store_true", help="random images of Imagenette's size and shape instead of the config's dataset")
    p.add_argument("--image-size", type=int, help="pixels (default: 224 with --synthetic, else the config's)")
    p.add_argument("--train-images", type=int, default=IMAGENETTE["train"], help="--synthetic: training images (default Imagenette's 9469)")
    p.add_argument("--test-images", type=int, default=IMAGENETTE["test"], help="--synthetic: test images (default Imagenette's 3925)")
    p.add_argument("--arch", help="override model.arch")
    p.add_argument("--limit-classes", type=int, help="bench only the first N specialists (keeps CPU runs short)")
    p.add_argument("--num-workers", type=int, default=plain.DEFAULT_WORKERS, help="the plain recipe's DataLoader workers (default %(default)s)")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the config's runtime.device)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--compile", action="store_true", help="runtime.compile: true for the engine (CUDA only)")
    p.add_argument("--keep-weights", action="store_true", help="train from the config's base weights, not a seeded random init")
    p.add_argument("--repeat", type=int, default=1, help="train each group this many times each way and keep the best (noisy shared machines)")
    p.add_argument("--no-plain", action="store_true", help="time the engine only")
    p.add_argument("--no-stages", action="store_true", help="skip the whole-pipeline stage timings")
    p.add_argument("--full-finetune-throughput", action="store_true", help="also measure the engine's full fine-tuning images/s")
    p.add_argument("--ff-batch", type=int, help="full fine-tuning batch size (default 256 on CUDA, else the config's first strategy's)")
    p.add_argument("--ff-steps", type=int, help="timed full fine-tuning steps (default 200 on CUDA, 4 on CPU)")
    p.add_argument("--keep", metavar="DIR", help="write the run directories under DIR and keep them (default: a temporary folder)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- setup


def bench_config(args):
    """The config to bench: --dataset/--config with the command line's overrides applied."""
    cfg = pipeline.config_for(args.dataset, Path(args.config).resolve() if args.config else None)
    if args.synthetic:
        cfg.data.name = "synthetic"
        cfg.data.synthetic_train, cfg.data.synthetic_test = args.train_images, args.test_images
        cfg.data.image_size = args.image_size or 224
        if cfg.model.weights in models.IMAGENET_WEIGHTS:
            cfg.model.weights = "none"  # benchmark machines may be offline; the values do not change the work
    elif args.image_size:
        cfg.data.image_size = args.image_size
    if args.arch:
        cfg.model.arch = args.arch
    if args.device:
        cfg.runtime.device = args.device
    if args.threads:
        cfg.runtime.threads = args.threads
    if args.compile:
        cfg.runtime.compile = True
    cfg.data.root = str(Path(cfg.data.root).resolve())  # as the CLI reads it (from the working directory); the stages run elsewhere
    return cfg


def sync(rt) -> None:
    if rt.cuda:
        torch.cuda.synchronize(rt.device)


@contextlib.contextmanager
def quiet(log: Path):
    """The library's progress lines go to a log file, so the tables stay readable."""
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        yield


def describe(rt, cfg, args) -> None:
    if rt.cuda:
        dev = f"{torch.cuda.get_device_name(rt.device)} ({rt.device}), engine: bf16 autocast {rt.bf16}, channels_last {rt.channels_last}, compile {rt.compile}"
        dev += "; cudnn.benchmark and TF32, set by the engine's runtime, apply to the plain recipe too"
    else:
        dev = f"cpu ({platform.processor() or platform.machine()}), {os.cpu_count()} cores visible"
    print(f"device: {dev}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, torch threads {torch.get_num_threads()}, plain DataLoader workers {args.num_workers}")
    src = f"synthetic ({cfg.data.synthetic_train} train / {cfg.data.synthetic_test} test images)" if cfg.data.name == "synthetic" else cfg.data.name
    print(f"config: {cfg.name}: {src} at {cfg.data.image_size}px, {cfg.model.arch}, negatives {cfg.data.negatives}")


def warm_up(cfg, rt) -> None:
    """One untimed forward and backward, so library start-up is paid by neither side."""
    m = rt.prepare(models.build(cfg.model.arch, 1))
    x = torch.zeros(8, 3, cfg.data.image_size, cfg.data.image_size, device=rt.device)
    with rt.autocast():
        m(x).float().sum().backward()
    sync(rt)


# ----------------------------------------------------------------------------- training, two ways


def images_trained(cfg, data, c: int) -> int:
    """Training images specialist c processes: its one-vs-rest rows times its epochs."""
    return len(one_vs_rest(data.train.labels, c, cfg.data.negatives, cfg.data.split_seed).indices) * cfg.strategy(c).epochs


def timed(rt, fn, log: Path) -> float:
    with quiet(log):
        sync(rt)
        t0 = time.perf_counter()
        fn()
        sync(rt)
    return time.perf_counter() - t0


def compare_training(cfg, data, rt, classes, root: Path, workers: int, repeat: int, with_plain: bool, log: Path) -> None:
    """Each group trained by the engine and by the plain recipe, back to back, best of `repeat`; prints the table.

    Engine: the wall time of `training.train_specialists` on the group (building the
    models and saving their checkpoints included). Plain: the wall time of
    `plain.train_specialist_plain` for each of the group's specialists, one at a time.
    Pairs run back to back, in alternating order, so slow drifts in a shared machine's
    load hit both sides alike; the best of `repeat` discards one-off stalls.
    """
    paths = RunPaths(root)
    with quiet(log):
        base = training.base_state(cfg, paths, data, rt)
    # a real run copies the training images to the device once for all groups: do that once here too
    # (the plain recipe reads them from the CPU, as PIL images)
    data_dev = dataclasses.replace(data, train=dataclasses.replace(data.train, images=engine.images_on(rt, data.train.images)))
    head = f"{'group (freeze/augment)':<24} {'classes':>8} {'images':>8} {'engine s':>9} {'engine img/s':>13}"
    if with_plain:
        head += f" {'plain s':>9} {'plain img/s':>12} {'plain/engine':>13}"
    print(head + "\n" + "-" * len(head), flush=True)

    def line(name, cls, n, e, p):
        s = f"{name:<24} {cls:>8} {n:>8} {e:>9.2f} {n / e:>13.0f}"
        if p is not None:
            s += f" {p:>9.2f} {n / p:>12.0f} {p / e:>12.2f}x"
        print(s, flush=True)

    total_n, total_e, total_p = 0, 0.0, 0.0
    for key, group in training.groups_of(cfg, classes).items():
        run_engine = lambda group=group: training.train_specialists(cfg, paths, group, data_dev, rt)
        run_plain = lambda group=group: [plain.train_specialist_plain(cfg, base, data, c, rt.device, workers) for c in group]
        e_times, p_times = [], []
        for r in range(repeat):
            first_engine = r % 2 == 0
            if first_engine:
                e_times.append(timed(rt, run_engine, log))
            if with_plain:
                p_times.append(timed(rt, run_plain, log))
            if not first_engine:
                e_times.append(timed(rt, run_engine, log))
        n = sum(images_trained(cfg, data, c) for c in group)
        e, p = min(e_times), (min(p_times) if with_plain else None)
        line(f"{key[0]}/{'+'.join(key[1]) or 'none'}", ",".join(map(str, group)), n, e, p)
        total_n, total_e, total_p = total_n + n, total_e + e, total_p + (p or 0.0)
    print("-" * len(head))
    line("sum of the groups", "", total_n, total_e, total_p if with_plain else None)
    # how `train` really runs them: every group in one call (on a CPU, groups side by side, one core each)
    whole = min(timed(rt, lambda: training.train_specialists(cfg, paths, classes, data_dev, rt), log) for _ in range(repeat))
    lanes = training.cpu_lanes(rt, len(training.groups_of(cfg, classes)))
    line(f"all at once ({lanes} lane{'s' if lanes > 1 else ''})", "", total_n, whole, total_p if with_plain else None)
    print(f"(best of {repeat}; engine: train_specialists, checkpoints saved; plain: one specialist at a time, {workers} DataLoader workers)")
    if with_plain:
        print(f"training ratio, plain / engine as `train` runs it: {total_p / whole:.2f}x")


# ----------------------------------------------------------------------------- stages and throughput


STAGE_ORDER = ["train", "evaluate", "correlate", "report"]
DETAIL_ORDER = ["data", "base", "specialists", "score_specialists", "merge_", "distill", "tables"]  # the order they run in


def _detail_rank(name: str) -> int:
    return next((i for i, p in enumerate(DETAIL_ORDER) if name.startswith(p)), len(DETAIL_ORDER))


def print_group_times(cfg, paths: RunPaths) -> None:
    """Each strategy group's training time, from the specialists' logs (on a CPU, groups overlap in lanes)."""
    seen = set()
    print("      per strategy group (on a CPU side by side, one core each, so they overlap):")
    for c in range(cfg.num_classes):
        log = paths.specialist_log(c)
        if not log.exists():
            continue
        entry = read_json(log)
        group = tuple(entry.get("group", [c]))
        if group in seen or "group_seconds" not in entry:
            continue
        seen.add(group)
        name = f"{entry['freeze']}/{'+'.join(entry['augment']) or 'none'} ({','.join(map(str, group))})"
        print(f"        {name:<26} {entry['group_seconds']:>5.2f}s")


def run_stages(cfg, root: Path, log: Path) -> None:
    """The whole study as a user runs it, `ensemble-delta run` in its own process, into root/stages;
    prints every stage's time from its manifest.json.

    Its own process: it starts as the command does, and worker processes it spawns (the
    figures) start from the command line, not from this script.
    """
    cfg = copy.deepcopy(cfg)
    cfg.out_root, cfg.name = str(root), "stages"
    config = root / "stages.yaml"
    config.write_text(to_yaml(cfg))
    cmd = [sys.executable, "-m", "ensemble_delta.cli", "run", "--config", str(config), "--out", str(root / "stages")]
    t0 = time.perf_counter()
    with open(log, "a") as out:  # cwd root: the command writes results/LAST there, not in the repository
        proc = subprocess.run(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, check=False)
    error = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    wall = time.perf_counter() - t0
    manifest = root / "stages" / "manifest.json"
    m = read_json(manifest) if manifest.exists() else {}
    print(f"\nstages of `ensemble-delta run` ({cfg.model.weights} base; {cfg.num_classes} specialists), from manifest.json:")
    timings, details = m.get("timings", {}), m.get("stage_details", {})
    for stage in sorted(timings, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else len(STAGE_ORDER)):
        print(f"  {stage:<28} {timings[stage]:>9.2f}s")
        for name, s in sorted(details.get(stage, {}).items(), key=lambda kv: _detail_rank(kv[0])):
            print(f"    {name:<26} {s:>9.2f}s")
            if stage == "train" and name == "specialists":
                print_group_times(cfg, RunPaths(root / "stages"))
    print(f"  {'start-up and the rest':<28} {wall - sum(timings.values()):>9.2f}s")
    print(f"  {'total (wall)':<28} {wall:>9.2f}s")
    if error:
        print(f"  ensemble-delta run stopped: {error} (its output in {log})")


def full_finetune_throughput(cfg, rt, batch: int, steps: int, log: Path) -> None:
    """Engine images/s of full fine-tuning (no augmentation, SGD) on random uint8 images already on the device."""
    size, n = cfg.data.image_size, batch * steps
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=rt.device if rt.cuda else "cpu")
    targets = (torch.arange(n) % 2).float()

    def fit(k: int) -> float:
        hp = Strategy(freeze="full", optimizer="sgd", lr=0.01, epochs=1, batch_size=batch)
        m = engine.Member("ff", models.build(cfg.model.arch, 1), torch.arange(k), targets[:k], training._bce(1.0), hp)
        sync(rt)
        t0 = time.perf_counter()
        with quiet(log):
            engine.fit_group([m], "full", [], images, rt, cfg.eval.batch_size, aug_seed=0)
        sync(rt)
        return time.perf_counter() - t0

    fit(batch * min(steps, 10 if rt.cuda else 1))  # warm-up: cuDNN autotuning, compilation
    seconds = fit(n)
    print(f"\nfull fine-tuning through the engine: {cfg.model.arch} at {size}px, batch {batch}, {steps} steps: {n / seconds:.0f} images/s ({seconds:.2f}s)")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = bench_config(args)
    rt = engine.resolve_runtime(cfg.runtime)
    describe(rt, cfg, args)
    with contextlib.ExitStack() as stack:
        if args.keep:
            top = Path(args.keep).resolve()
            top.mkdir(parents=True, exist_ok=True)
        else:
            top = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))
        log = top / "library-output.log"
        t0 = time.perf_counter()
        data = load_data(cfg.data, cfg.num_classes)
        print(f"data: {len(data.train)} train, {len(data.test)} test images loaded in {time.perf_counter() - t0:.1f}s")
        warm_up(cfg, rt)

        # 1. training, two ways, from the same base
        train_cfg = copy.deepcopy(cfg)
        if not args.keep_weights:
            train_cfg.model.weights = "none"
        train_cfg.out_root, train_cfg.name = str(top), "engine"
        classes = list(range(min(args.limit_classes or cfg.num_classes, cfg.num_classes)))
        print(f"training {len(classes)} of {cfg.num_classes} specialists from a {train_cfg.model.weights} base\n")
        compare_training(train_cfg, data, rt, classes, top / "engine", args.num_workers, args.repeat, not args.no_plain, log)

        # 2. every stage of the whole pipeline
        if not args.no_stages:
            run_stages(cfg, top, log)

        # 3. full fine-tuning throughput
        if args.full_finetune_throughput:
            batch = args.ff_batch or (256 if rt.cuda else cfg.strategy(0).batch_size)
            full_finetune_throughput(cfg, rt, batch, args.ff_steps or (200 if rt.cuda else 4), log)
        if args.keep:
            print(f"\nrun directories and library output kept under {top}")


if __name__ == "__main__":
    sys.exit(main())
