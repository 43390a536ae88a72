"""Atomic file writing and the small tables every stage exchanges.

Every file a resume relies on is written to a temporary name in the same folder and
renamed, so a crash (Ctrl-C, kill -9) never leaves a half-written file that looks
complete (os.replace is atomic on POSIX within one filesystem).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from .errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are read or written: tables and figures load without it
    import torch


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write text atomically; a file that already holds exactly this text is left alone, mtime
    included, so what is drawn from it (newer_than) stays current on a rerun."""
    path, data = Path(path), text.encode()
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, where the OS has one), for sizing worker pools."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def newer_than(targets: Iterable[str | os.PathLike], sources: Iterable[str | os.PathLike]) -> bool:
    """Every target exists and is at least as new as every source that exists.

    A figure or table that is a pure function of its sources is current when this holds.
    """
    targets = [Path(t) for t in targets]
    if not all(t.exists() for t in targets):
        return False
    oldest = min(t.stat().st_mtime_ns for t in targets)
    return all(oldest >= Path(s).stat().st_mtime_ns for s in sources if Path(s).exists())


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Save a flat dict of tensors as safetensors, atomically (contiguous CPU copies)."""
    from safetensors.torch import save_file

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load safetensors (never pickle); a missing file is a user error naming the stage to run."""
    from safetensors.torch import load_file

    if not Path(path).exists():
        raise UserError(f"{path} is missing: run the stage that writes it first (e.g. `ensemble-delta train`)")
    return load_file(str(path), device=device)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def write_csv(path: str | os.PathLike, rows: Iterable[dict[str, Any]], columns: list[str] | None = None) -> None:
    """Write tidy rows (one dict each) as CSV (through write_text). Floats keep full precision (repr) so tables round-trip."""
    rows = list(rows)
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(columns)
    for r in rows:
        w.writerow([_fmt(r.get(c)) for c in columns])
    write_text(path, buf.getvalue())


def _parse(v: str) -> Any:
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return {"true": True, "false": False}.get(v, v)


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a table written by write_csv: numbers back as int/float, empty cells as None."""
    if not Path(path).exists():
        raise UserError(f"{path} is missing: run the stage that writes it first (e.g. `ensemble-delta evaluate`)")
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]
