"""Shared setup of the benchmark suites: the device and dtype, the implementations compared, the cases, the timing.

A suite (bench_<op>.py) is its inputs, its cost model (bytes and FLOPs) and its reference: it lists its cases with
:func:`bench_cases` (shapes from presets.py) and times each with :func:`run_case`.

Environment:
    KDFAST_BENCH_DEVICE  ``cuda`` or ``cpu`` (default: cuda when available, else cpu).
    KDFAST_BENCH_DTYPE   ``float32`` (default); ``bfloat16`` or ``float16`` on CUDA.

Every op is compared as: ``eager`` (kdfast.reference, the seed repos' plain-PyTorch code path), ``compile``
(torch.compile of that same function) and ``kdfast-<backend>`` for each kdfast backend that runs on the device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections.abc import Callable, Iterable, Sequence

import pytest
import torch

from kdfast import _backend

DEVICE = torch.device(os.environ.get("KDFAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
DTYPE_NAME = os.environ.get("KDFAST_BENCH_DTYPE", "float32")
DTYPES = {"cpu": ("float32", "float64"), "cuda": ("float32", "bfloat16", "float16")}
DTYPE = getattr(torch, DTYPE_NAME, None)

# The order rows appear in a report. kdfast-reference is the reference behind the custom op: the op's overhead.
KDFAST_BACKENDS = ("triton", "cuda", "cpp", "reference")

# Calls before timing: the first compiles (torch.compile, Triton autotuning), the next ones warm the caches.
WARMUP_CALLS = 3

# The passes every op is timed in: the forward alone, and the forward then the backward.
PASSES = ("fwd", "fwd+bwd")
FWD_BWD = "fwd+bwd"


def keep_freed_memory() -> bool:
    """On glibc, keep freed memory in the process (as a caching allocator does) instead of returning it to the OS.

    The ops here return outputs of tens of MB (a gradient as large as the activations). glibc serves each from
    fresh pages or from memory it kept, depending on the history of allocations and frees; fresh pages cost the
    kernel's zeroing and one fault per page, 1-3 ms per 26 MB here, charged at random to whichever
    implementation happens to get them. Raising the mmap and trim thresholds makes every implementation reuse
    memory, so the times compare the computations. Returns whether it applied (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and bool(libc.mallopt(m_mmap_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


# Set once per run (pytest_configure); recorded with every result, so that the report says how it was measured.
KEEPS_FREED_MEMORY = False


def pytest_configure(config):
    global KEEPS_FREED_MEMORY
    if DEVICE.type == "cpu":
        KEEPS_FREED_MEMORY = keep_freed_memory()
    if DEVICE.type not in DTYPES:
        raise pytest.UsageError(f"KDFAST_BENCH_DEVICE must be cpu or cuda, got {DEVICE.type!r}")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("KDFAST_BENCH_DEVICE=cuda but torch sees no CUDA device")
    if DTYPE_NAME not in DTYPES[DEVICE.type]:
        allowed = ", ".join(DTYPES[DEVICE.type])
        raise pytest.UsageError(f"KDFAST_BENCH_DTYPE on {DEVICE.type} must be one of {allowed}, got {DTYPE_NAME!r}")


def pytest_report_header(config):
    import kdfast

    backends = ", ".join(f"{k}={v}" for k, v in kdfast.info().items())
    lines = [f"kdfast benchmarks on {DEVICE} in {DTYPE_NAME}: {backends}"]
    if KEEPS_FREED_MEMORY:
        lines.append("glibc keeps freed memory (mallopt): outputs reuse memory instead of faulting in fresh pages")
    return lines


def kdfast_backends(op: str) -> list[str]:
    """The backends of ``op``'s table (kdfast._backend) that can run it on the benchmark device."""
    usable = []
    for backend in KDFAST_BACKENDS:
        # Triton on CPU tensors is the interpreter: a correctness tool, orders of magnitude off any fast path.
        if backend == "triton" and DEVICE.type == "cpu":
            continue
        if _backend.unavailable_reason(op, backend, DEVICE.type) is None:
            usable.append(backend)
    return usable


def implementation_names(op: str) -> list[str]:
    """Names of the implementations of one op compared on this device, in report order."""
    return ["eager", "compile"] + [f"kdfast-{backend}" for backend in kdfast_backends(op)]


def make_implementation(name: str, reference_fn: Callable, kdfast_fn: Callable) -> Callable:
    """The callable behind an implementation name; ``kdfast_fn`` takes the same arguments plus ``backend=``."""
    if name == "eager":
        return reference_fn
    if name == "compile":
        # A fresh dynamo state per benchmark: recompiles from earlier shapes would otherwise count against the
        # recompile limit (past it dynamo silently runs eager), and dynamic=False keeps the best static kernels.
        torch._dynamo.reset()
        return torch.compile(reference_fn, dynamic=False, fullgraph=False)
    backend = name.removeprefix("kdfast-")
    return lambda *args: kdfast_fn(*args, backend=backend)


def synchronize() -> None:
    """Wait for queued GPU work, so that a timed call ends when its kernels do."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_memory_bytes(step: Callable[[], None]) -> int:
    """Memory ``step`` allocates at its peak beyond what was allocated before it (CUDA only; untimed)."""
    synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    synchronize()
    return torch.cuda.max_memory_allocated() - before


def measure(benchmark, step: Callable[[], None], group: str, **extra_info) -> None:
    """Warm ``step`` up, record its peak memory on CUDA and its metadata, then time it with pytest-benchmark.

    ``step`` must synchronize on CUDA itself (see :func:`synchronize`). ``extra_info`` lands in the JSON that
    benchmarks/report.py reads (bytes, flops, shape, ...).
    """
    for _ in range(WARMUP_CALLS):
        step()
    benchmark.group = group
    benchmark.extra_info.update(device=str(DEVICE), dtype=DTYPE_NAME, keeps_freed_memory=KEEPS_FREED_MEMORY, **extra_info)
    if DEVICE.type == "cuda":
        benchmark.extra_info["peak_memory_bytes"] = peak_memory_bytes(step)
    benchmark(step)


def bench_cases(ops: Iterable[str], presets: Iterable[str], implementations: Callable[[str, str], list[str]],
                passes: Sequence[str] = PASSES) -> list:
    """The (op, pass_name, preset, impl) params of a suite, in report order, with ids ``<op>-<pass>-<preset>-<impl>``
    (a ``:`` in an op name becomes ``-``). ``implementations(op, pass_name)`` names the implementations compared."""
    presets = list(presets)
    return [
        pytest.param(op, pass_name, preset, impl, id=f"{op.replace(':', '-')}-{pass_name}-{preset}-{impl}")
        for op in ops
        for pass_name in passes
        for preset in presets
        for impl in implementations(op, pass_name)
    ]


def make_step(forward: Callable[[], object], wrt: Sequence[torch.Tensor] = (), grad_outputs=None,
              allow_unused: bool = False) -> Callable[[], None]:
    """The timed step: ``forward()`` then, when ``wrt`` is given, the gradients of its output(s) w.r.t. ``wrt``
    (torch.autograd.grad with ``grad_outputs``: tensors, or a callable of the output computing them inside the
    step), then :func:`synchronize`."""
    if not wrt:
        def step():
            forward()
            synchronize()
    elif callable(grad_outputs):
        def step():
            out = forward()
            torch.autograd.grad(out, wrt, grad_outputs(out), allow_unused=allow_unused)
            synchronize()
    else:
        def step():
            torch.autograd.grad(forward(), wrt, grad_outputs, allow_unused=allow_unused)
            synchronize()
    return step


def run_case(benchmark, *, op: str, pass_name: str, preset: str, impl: str, forward: Callable[[], object],
             wrt: Sequence[torch.Tensor] = (), grad_outputs=None, allow_unused: bool = False, shape: str,
             cost: tuple[int, int], group: str | None = None) -> None:
    """Time one case of a suite: :func:`make_step` (the backward only in the ``fwd+bwd`` pass), then :func:`measure`
    with the case's metadata (group ``<op> <pass> <preset>`` unless given; ``cost`` is (bytes, flops))."""
    step = make_step(forward, wrt if pass_name == FWD_BWD else (), grad_outputs, allow_unused)
    nbytes, flops = cost
    measure(
        benchmark,
        step,
        group=group or f"{op} {pass_name} {preset}",
        impl=impl,
        op=op,
        **{"pass": pass_name},
        preset=preset,
        shape=shape,
        bytes=nbytes,
        flops=flops,
    )
