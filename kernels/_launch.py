"""Host-side helpers shared by the Triton launchers: output allocation, accumulator dtype, block sizes."""

import contextlib
import os

import torch
import triton

# Read once at import. The test suite sets it so that an output element a kernel forgets to write is NaN,
# which no comparison lets through; torch.empty could hold a stale correct value from a previous run.
POISON = os.environ.get("KDFAST_POISON", "0") == "1"


def empty_output(shape, dtype, device):
    """An uninitialised output tensor, or one filled with NaN when KDFAST_POISON=1."""
    if POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def accumulator_dtype(dtype):
    """The dtype reductions accumulate in: float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_fp64(dtype):
    """Value of the kernels' IS_FP64 constexpr, which selects the float64 accumulator."""
    return dtype == torch.float64


def block_size(n, minimum=16, maximum=None):
    """The power-of-two block covering n, at least minimum (tl.dot needs 16), at most maximum if given."""
    size = max(minimum, triton.next_power_of_2(max(int(n), 1)))
    return size if maximum is None else max(minimum, min(size, maximum))


def device_guard(tensor):
    """Makes tensor's GPU current: Triton launches on the current device, not on the tensors' device."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()
