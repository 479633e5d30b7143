"""What the recipes share: their options, the checks before a run (settings, output directory, resume), seeding,
the training config they build, and the printed report."""

from __future__ import annotations

import hashlib
import json
import os
import random
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import kdfast
from kdfast.train import checkpoint, distributed
from kdfast.train.loop import TrainConfig
from kdfast.train.recipes import _settings

# What a run leaves under --out: a directory holding one of these holds a run (--resume or --overwrite to reuse it).
RUN_FILES = ("report.json", "*/checkpoint.pt", "*/metrics.jsonl")


@dataclass
class Options:
    """The command line of ``kdfast train <recipe>``; None means the recipe's default."""

    steps: int | None = None
    batch_size: int | None = None
    device: str = "auto"
    backend: str | None = None
    data: str | None = None
    out: str | None = None
    resume: bool = False
    seed: int = 0
    amp: str = "auto"
    lr: float | None = None
    teacher: str | None = None
    progress: bool = True
    checkpoint_every: int | None = None
    overwrite: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # --set key=value (strings are parsed)
    settings: Any = None  # the recipe's resolved settings (None: resolved from the fields above)

    def out_dir(self, recipe: str) -> Path:
        return Path(self.out if self.out is not None else Path("runs") / recipe)


def resolve_settings(options: Options, recipe: str, cls) -> Any:
    if options.settings is None:
        shortcuts = {"steps": options.steps, "batch_size": options.batch_size, "lr": options.lr,
                     "checkpoint_every": options.checkpoint_every}
        options.settings = _settings.resolve(cls, recipe, options.overrides, shortcuts)
    return options.settings


def prepare(options: Options, recipe: str, cls) -> tuple[Any, dict, Path]:
    """Everything checked before a recipe loads data or trains: its settings, the output directory, and (with
    resume) that every checkpoint under it was written with the same settings. Returns the settings, the run's
    identity (stored in each checkpoint) and the output directory; prints the settings on the main rank."""
    settings = resolve_settings(options, recipe, cls)
    out = options.out_dir(recipe)
    identity = {"recipe": recipe, "kdfast": kdfast.__version__, "seed": options.seed, "amp": options.amp,
                "data": file_identity(options.data), "teacher": teacher_identity(options.teacher),
                # how often checkpoints are written changes nothing in the run: it may differ on resume
                **{k: v for k, v in _settings.as_dict(settings).items() if k != "checkpoint_every"}}
    check_out_dir(out, options.resume, options.overwrite)
    if options.resume:
        for path in sorted(out.glob("*/checkpoint.pt")):
            checkpoint.check_settings(path, checkpoint.load(path).get("settings"), identity)
    if os.environ.get("RANK", "0") == "0":
        print(f"kdfast train {recipe}: " + ", ".join(f"{k}={v}" for k, v in _settings.as_dict(settings).items()),
              flush=True)
    return settings, identity, out


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """The output directory exists as a directory or can be made, is writable, and holds no other run."""
    existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"--out: {str(existing)!r} is a file, expected a directory (or a path that can be made)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out: {str(existing)!r} is not writable")
    previous = sorted(p for pattern in RUN_FILES for p in out.glob(pattern)) if out.is_dir() else []
    if previous and not (resume or overwrite):
        raise ValueError(f"--out: {str(out)!r} holds a previous run ({previous[0].relative_to(out)}); --resume "
                         "continues it, --overwrite replaces it, or choose another --out")


def file_identity(path: str | None) -> dict | None:
    """What identifies a data file or folder across moves: its name, size and a digest (of the bytes of a file;
    of the names and sizes of a folder's files)."""
    if path is None:
        return None
    path = Path(path).expanduser()
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        digest.update(f"{p.relative_to(path)}\0{p.stat().st_size}\n".encode())
    return {"name": path.name, "files": len(files), "bytes": sum(p.stat().st_size for p in files),
            "sha256": digest.hexdigest()}


def teacher_identity(teacher: str | None) -> Any:
    return teacher if teacher is None or teacher.startswith("timm:") else file_identity(teacher)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def apply_backend(backend: str | None) -> None:
    """Route every kdfast op of this process to ``backend`` (the ``KDFAST_BACKEND`` preference)."""
    if backend is not None:
        os.environ["KDFAST_BACKEND"] = backend


def config(options: Options, description: str, *, steps: int, lr: float, **overrides) -> TrainConfig:
    """The TrainConfig of one phase: its steps and lr from the recipe's settings, the rest from the options."""
    return TrainConfig(steps=steps, lr=lr, amp=options.amp, device=options.device, progress=options.progress,
                       description=description, checkpoint_every=options.settings.checkpoint_every, **overrides)


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def finish(report: dict, out: Path, settings: Any = None) -> dict:
    """Write ``report.json`` under ``out`` (main rank), with the run's settings, and return the report."""
    if settings is not None:
        report["settings"] = _settings.as_dict(settings)
    context = distributed.setup("cpu") if distributed.launched_by_torchrun() else distributed.Context()
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # Written whole and renamed: a kill or a full disk while writing leaves the previous report intact.
        checkpoint.write_atomic(out / "report.json", (json.dumps(report, indent=2, default=str) + "\n").encode())
    return report


def format_report(report: dict) -> str:
    """A readable rendering of a recipe's report: its ``rows`` as a table, the other entries as ``key: value``."""
    lines = [f"== kdfast train {report['recipe']} =="]
    for key, value in report.items():
        if key in ("recipe", "rows", "settings", "summary", "conclusion", "wall seconds"):  # the settings were
            continue  # printed at the start; the summary is the conclusion's numbers
        if key == "pictures":
            value = ", ".join(value) if value else _no_pictures(report)
        lines.append(f"{key}: {value}")
    rows = report.get("rows") or []
    if rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        cells = [[_cell(row.get(c)) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
        lines.append("| " + " | ".join("-" * w for w in widths) + " |")
        lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    if report.get("conclusion"):
        lines += ["", *textwrap.wrap(report["conclusion"], 116)]
    if report.get("wall seconds") is not None:
        lines.append(f"Wall time of the whole recipe: {report['wall seconds']:.0f} s.")
    return "\n".join(lines)


def _no_pictures(report: dict) -> str:
    """Why a report has no pictures: turned off, or Pillow is missing."""
    if not report.get("settings", {}).get("pictures", True):
        return "none (--set pictures=false)"
    return "none (they need Pillow: pip install pillow)"


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
