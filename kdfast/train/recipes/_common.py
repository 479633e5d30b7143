"""What the recipes share: their options, seeding, the training config they build, and the printed report."""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdfast.train import distributed
from kdfast.train.loop import TrainConfig


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
    extra: dict = field(default_factory=dict)

    def out_dir(self, recipe: str) -> Path:
        return Path(self.out if self.out is not None else Path("runs") / recipe)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def apply_backend(backend: str | None) -> None:
    """Route every kdfast op of this process to ``backend`` (the ``KDFAST_BACKEND`` preference)."""
    if backend is not None:
        os.environ["KDFAST_BACKEND"] = backend


def config(options: Options, description: str, *, steps: int, lr: float, **overrides) -> TrainConfig:
    return TrainConfig(steps=options.steps if options.steps is not None else steps,
                       lr=options.lr if options.lr is not None else lr, amp=options.amp, device=options.device,
                       progress=options.progress, description=description, **overrides)


def parameter_count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def finish(report: dict, out: Path) -> dict:
    """Write ``report.json`` under ``out`` (main rank) and return the report."""
    context = distributed.setup("cpu") if distributed.launched_by_torchrun() else distributed.Context()
    if context.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def format_report(report: dict) -> str:
    """A readable rendering of a recipe's report: its ``rows`` as a table, the other entries as ``key: value``."""
    lines = [f"== kdfast train {report['recipe']} =="]
    for key, value in report.items():
        if key in ("recipe", "rows"):
            continue
        lines.append(f"{key}: {value}")
    rows = report.get("rows") or []
    if rows:
        columns = list(dict.fromkeys(k for row in rows for k in row))
        cells = [[_cell(row.get(c)) for c in columns] for row in rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
        lines.append("| " + " | ".join("-" * w for w in widths) + " |")
        lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
