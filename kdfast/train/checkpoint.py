"""Checkpoints that resume exactly: model, optimiser, scheduler, gradient scaler and every RNG, written atomically."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

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


def write_atomic(path: str | Path, data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Write ``data`` (bytes, or a function writing to a file object) to a temporary file, then rename it over
    ``path``: a kill or a failed write (a full disk) leaves the previous file intact. A failed write is an
    OSError naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        tmp.unlink(missing_ok=True)
        if _no_space(exc):
            raise _os_error(errno.ENOSPC, f"no space left writing {path}") from exc
        if isinstance(exc, RuntimeError) and not isinstance(exc.__context__, OSError):
            raise
        raise _os_error(getattr(exc, "errno", None), f"cannot write {path}: {str(exc).splitlines()[0]}") from exc
    return path


def _os_error(code: int | None, message: str) -> OSError:
    error = OSError(message)  # OSError(code, message) would prefix "[Errno N]" to the user's one line
    error.errno = code
    return error


def _no_space(exc: BaseException) -> bool:
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        # torch's zip writer: "[enforce fail at inline_container.cc:...] . unexpected pos ..." when a write fell short
        if isinstance(exc, RuntimeError) and ("unexpected pos" in str(exc) or "No space left" in str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def save(path: str | Path, **state: Any) -> Path:
    """Write ``state`` (plus the format tag) to ``path`` atomically (:func:`write_atomic`)."""
    return write_atomic(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def check_settings(path: str | Path, stored: dict | None, current: dict) -> None:
    """A ValueError listing the settings that differ between a checkpoint and the run resuming from it."""
    if stored == current:
        return
    if stored is None:
        raise ValueError(f"cannot resume from {str(path)!r}: it stores no run settings (written by another program "
                         "or an older kdfast); start a new --out")
    keys = [k for k in dict.fromkeys([*current, *stored]) if stored.get(k) != current.get(k)]
    diffs = ", ".join(f"{k} {_short(stored.get(k))} -> {_short(current.get(k))}" for k in keys)
    raise ValueError(f"cannot resume from {str(path)!r}: it was written with other settings ({diffs}); resume with "
                     "the stored settings or start a new --out")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def load(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save`; a ValueError says what is wrong with a bad one."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory, not a checkpoint file")
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
