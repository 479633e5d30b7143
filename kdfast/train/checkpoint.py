"""Checkpoints that resume exactly: model, optimiser, scheduler, gradient scaler and every RNG, written atomically."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "kdfast-train-1"


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a training step may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: str | Path, **state: Any) -> Path:
    """Write ``state`` (plus the format tag) to ``path``: to a temporary file first, then renamed over it, so a
    kill during the write leaves the previous checkpoint intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"format": FORMAT, **state}, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; a ValueError says what is wrong with a bad one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {str(path)!r}")
    try:
        # Checkpoints hold RNG states (numpy arrays, python tuples): not loadable with weights_only=True.
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # truncated, corrupt or foreign files are all one user error
        raise ValueError(f"{str(path)!r} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{str(path)!r} is not a kdfast training checkpoint (format {found!r}, expected {FORMAT!r})")
    return state
