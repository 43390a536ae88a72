"""Host-device synchronisations inside the engine's training loop (CUDA only; part of gpu_check.sh).

A synchronising call in the step loop (a pageable host-to-device copy, `.item()`) makes
the host wait for the GPU every step, so the GPU idles while Python prepares the next
one. This trains one small model per kind of group twice, with 8 and with 16 steps per
epoch, under torch.cuda.set_sync_debug_mode("warn"), and counts the warnings: the
count must not grow with the number of steps (the engine syncs once per epoch, for the
loss it reports).

    PYTHONPATH=src python3 scripts/sync_check.py
"""

from __future__ import annotations

import sys
import warnings

import torch

from ensemble_delta import engine, models, training
from ensemble_delta.config import RuntimeConfig, Strategy

GROUPS = [("full", ["flip", "crop", "color"]), ("full", []), ("layer4", ["crop"]), ("layer4", ["flip"]), ("head", [])]


def syncs(rt, freeze: str, augment: list[str], images: torch.Tensor, batch_size: int) -> tuple[int, set[str]]:
    n = len(images)
    hp = Strategy(freeze=freeze, epochs=3, batch_size=batch_size)
    member = engine.Member(0, models.build("resnet18", 1), torch.arange(n), (torch.arange(n) % 2).float(), training._bce(1.0), hp)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.fit_group([member], freeze, augment, images, rt, prefix_batch=256, aug_seed=0)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return len(caught), {str(w.message).splitlines()[0][:80] for w in caught}


def main() -> int:
    if not torch.cuda.is_available():
        print("sync_check: needs CUDA; skipped")
        return 0
    rt = engine.resolve_runtime(RuntimeConfig(device="cuda"))
    images = torch.randint(0, 256, (512, 3, 64, 64), dtype=torch.uint8, device=rt.device)
    syncs(rt, "full", [], images, 64)  # warm-up: cuDNN autotuning and first-use allocations
    bad = 0
    for freeze, augment in GROUPS:
        (a, kinds), (b, _) = syncs(rt, freeze, augment, images, 64), syncs(rt, freeze, augment, images, 32)
        ok = a == b
        bad += not ok
        print(f"{freeze:>6}/{'+'.join(augment) or 'none':<16} syncs with 8 steps/epoch: {a:>3}, with 16: {b:>3}  {'ok' if ok else 'GROWS WITH STEPS'}  {sorted(kinds)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
