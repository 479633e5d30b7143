"""Which implementation of an op runs: backend availability and selection (design.md section 2).

Backends: ``triton`` (Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), ``cuda``
and ``cpp`` (the compiled extension ``kdfast._C``, CUDA and CPU kernels), ``reference`` (kdfast.reference).

How a request is resolved, for one call of an op on one device:

- an explicit ``backend=`` argument is strict: if that backend cannot run the call, a ValueError says why;
- ``KDFAST_BACKEND`` is a preference for every op: where it cannot run a call, the op falls back to ``auto``
  with one warning per (op, backend);
- ``auto`` picks the fastest available implementation for the device (CUDA: cuda, triton, reference; CPU: cpp,
  reference). If the compiled extension is missing, one warning says so and names the fallback.
"""

from __future__ import annotations

import functools
import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "triton", "cuda", "cpp", "reference")

# Fastest first. Triton on CPU tensors is the interpreter: correct but slow, so never chosen automatically.
_AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")}

_warned: set[tuple[str, str]] = set()
# Resolution is a pure function of its arguments and KDFAST_BACKEND, and on the hot path of every call.
_resolved: dict[tuple, str] = {}


@functools.cache
def extension_error() -> str | None:
    """Why ``kdfast._C`` (the C++/CUDA extension) cannot be loaded, or None when it is loaded."""
    if os.environ.get("KDFAST_NO_EXTENSION") == "1":
        return "disabled by KDFAST_NO_EXTENSION=1"
    try:
        importlib.import_module("kdfast._C")
    except ImportError as exc:
        return (
            f"the compiled extension kdfast._C is not importable ({exc}); reinstall with "
            "`pip install --no-build-isolation -e .` on a machine with a C++ compiler"
        )
    return None


@functools.cache
def triton_error() -> str | None:
    """Why Triton kernels cannot be imported, or None when they can."""
    try:
        importlib.import_module("triton")
    except ImportError as exc:
        return f"triton is not importable ({exc})"
    return None


def triton_interpreting() -> bool:
    """True when Triton runs kernels on CPU tensors through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


@functools.cache
def interpreter_error() -> str | None:
    """Why Triton's interpreter cannot run kdfast's kernels here, or None when it can.

    Triton 3.6's interpreter turns a loop bound loaded from memory (``for j0 in range(0, n, ...)``) into a Python
    int through a one-element array, which numpy 2.4 no longer allows: every such kernel would fail with a
    TypeError from inside Triton. Triton 3.8 runs them (3.7 is untested, so it is held to the same rule).
    """
    import numpy
    import triton

    if _release(triton.__version__) < (3, 8) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) does not run with numpy "
                f"{numpy.__version__}: install numpy<2.4 (pip install 'numpy<2.4') or Triton >= 3.8")
    return None


def _has_compiled_kernel(kernel: str, device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"kdfast::{kernel}", key)
    except RuntimeError:
        # An extension built from older sources has no schema for an op added since: that backend is missing,
        # not an error (unavailable_reason then says to rebuild).
        return False


@dataclass(frozen=True)
class Implementation:
    """One backend of one op: what runs, what a build must have for it, and the sizes it handles.

    ``forward`` and ``backward`` take the op's own arguments (each op module documents them once, beside its
    table); ``eager`` is the eager-mode call where it is not the op's default. ``compiled`` names the kdfast._C op whose registration for the device says the extension has this
    backend (compiled backends only). ``limit(*sizes)`` returns why the sizes exceed this backend, or None.
    """

    forward: Callable
    backward: Callable | None = None
    compiled: str | None = None
    limit: Callable[..., str | None] | None = None
    # The eager call, where it differs from the op's default (plain autograd through the reference, or an
    # autograd.Function that saves what the custom op's backward has to recompute).
    eager: Callable | None = None


def extension_op(name: str) -> Callable:
    """A call of kdfast._C's op ``name``, looked up at call time (a build may lack the extension)."""
    return lambda *args: getattr(torch.ops.kdfast, name)(*args)


def triton_launcher(module: str, name: str) -> Callable:
    """A call of the launcher ``name`` in ``kdfast.kernels.<module>``, imported at call time (importing Triton
    costs about a second, and a CPU-only install may not have it)."""
    return lambda *args: getattr(importlib.import_module(f"kdfast.kernels.{module}"), name)(*args)


# op name -> {backend name -> Implementation}: filled by the op modules, read by the resolver, tests, benchmarks
_TABLES: dict[str, dict[str, Implementation]] = {}


def register(op: str, table: dict[str, Implementation]) -> dict[str, Implementation]:
    """Declares ``op``'s backends, fastest-first order aside (that is ``_AUTO_ORDER``); returns the table."""
    unknown = set(table) - set(BACKENDS[1:])
    if unknown or "reference" not in table:
        raise ValueError(f"kdfast.{op}: backends must be among {BACKENDS[1:]} and include reference, got {tuple(table)}")
    _TABLES[op] = table
    return table


def implementations(op: str) -> dict[str, Implementation]:
    """The backends ``op`` declares (its table)."""
    return _TABLES[op]


def unavailable_reason(op: str, backend: str, device_type: str) -> str | None:
    """Why ``backend`` cannot run ``op`` on ``device_type`` tensors in this install; None if it can."""
    table = _TABLES[op]
    if backend not in table:
        return f"the op has no {backend} implementation (it has: {', '.join(table)})"
    if backend == "reference":
        return None
    if backend == "triton":
        if triton_error() is not None:
            return triton_error()
        if device_type == "cuda":
            return None
        if device_type == "cpu" and triton_interpreting():
            return interpreter_error()
        return f"Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for {device_type} tensors"
    wanted = {"cpp": "cpu", "cuda": "cuda"}[backend]
    if device_type != wanted:
        return f"the {backend} backend runs on {wanted} tensors, got {device_type} tensors"
    if extension_error() is not None:
        return extension_error()
    kernel = table[backend].compiled
    if not _has_compiled_kernel(kernel, device_type):
        return (f"kdfast._C was built without the {device_type} kernel {kernel} (built from older sources? "
                "rebuild with `pip install --no-build-isolation -e .`)")
    return None


def _warn_once(op: str, backend: str, message: str) -> None:
    if (op, backend) not in _warned:
        _warned.add((op, backend))
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _auto(op: str, device_type: str, sizes: tuple[int, ...] = (), skip: str | None = None) -> str:
    """The fastest backend that runs ``op`` here (at ``sizes``, other than ``skip``); warns once when a compiled
    backend the op has is missing from this build."""
    table = _TABLES[op]
    order = [b for b in _AUTO_ORDER.get(device_type, ("reference",)) if b in table and b != skip]
    for backend in order:
        if unavailable_reason(op, backend, device_type) is None and _exceeds(op, backend, sizes) is None:
            best = order[0]
            if best != backend and unavailable_reason(op, best, device_type) is not None:
                reason = unavailable_reason(op, best, device_type)
                _warn_once(op, best, f"kdfast.{op}: {best} backend unavailable ({reason}); using {backend}")
            return backend
    raise AssertionError("the reference backend is always available")


def _exceeds(op: str, backend: str, sizes: tuple[int, ...]) -> str | None:
    limit = _TABLES[op][backend].limit
    return None if limit is None or not sizes else limit(*sizes)


# Resolved when torch.compile traces a call, then baked into the graph: selection is not a graph break.
@torch.compiler.assume_constant_result
def resolve(op: str, requested: str | None, device_type: str, sizes: tuple[int, ...] = ()) -> str:
    """The concrete backend for one call of ``op``.

    Args:
        op: public op name, the key of its table (``"slot_match_loss"``), used in messages.
        requested: ``backend=`` argument, or None to use ``KDFAST_BACKEND`` (default ``auto``).
        device_type: ``"cpu"`` or ``"cuda"``: where the op's tensors are.
        sizes: the sizes the backends' limits read (each op documents which); () skips the limits.

    A backend asked for by ``backend=`` that cannot run the call (unavailable, or the sizes exceed its limit)
    raises a ValueError naming the reason and the backend ``auto`` would take instead; one asked for by
    ``KDFAST_BACKEND`` falls back to that backend with one warning.
    """
    from_env = requested is None
    if from_env:
        requested = os.environ.get("KDFAST_BACKEND", "auto") or "auto"
    key = (op, requested, from_env, device_type)
    chosen = _resolved.get(key)
    if chosen is None:
        chosen = _resolved[key] = _resolve(op, requested, from_env, device_type)
    reason = _exceeds(op, chosen, sizes)
    if reason is None:
        return chosen
    fallback = _auto(op, device_type, sizes, skip=chosen)
    if requested == chosen and not from_env:
        raise ValueError(f"kdfast.{op}: {reason}; use backend={fallback!r}")
    return fallback


def _resolve(op: str, requested: str, from_env: bool, device_type: str) -> str:
    if requested not in BACKENDS:
        source = "KDFAST_BACKEND" if from_env else "backend"
        raise ValueError(f"kdfast.{op}: {source} must be one of {', '.join(BACKENDS)}; got {requested!r}")
    if requested == "auto":
        return _auto(op, device_type)
    reason = unavailable_reason(op, requested, device_type)
    if reason is None:
        return requested
    if from_env:
        chosen = _auto(op, device_type)
        _warn_once(op, requested, f"kdfast.{op}: KDFAST_BACKEND={requested} cannot run here ({reason}); using {chosen}")
        return chosen
    raise ValueError(f"kdfast.{op}: backend={requested!r} cannot run here: {reason}. Use backend='auto' or 'reference'.")
