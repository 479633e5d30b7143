"""Test session setup; the shared helpers are in harness.py.

Without a CUDA device the Triton kernels run on CPU tensors through Triton's interpreter: TRITON_INTERPRET
must be set before triton is first imported, so it is set here, before kdfast is. Outputs of kernels are
poisoned with NaN before they run (KDFAST_POISON=1), so an element a kernel forgets to write cannot pass.
"""

from __future__ import annotations

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("KDFAST_POISON", "1")

import pytest

# Fresh inputs on every run, reproducible on demand: KDFAST_TEST_SEED=<the seed in the header> replays a run.
SEED = int(os.environ.get("KDFAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return [f"kdfast: test seed {SEED} (KDFAST_TEST_SEED={SEED} replays it)", f"kdfast: {_info()}"]


def pytest_terminal_summary(terminalreporter):
    # The header is hidden under -q (the README's and CI's command): repeat the seed where a failure is read.
    terminalreporter.write_line(f"kdfast: test seed {SEED} (KDFAST_TEST_SEED={SEED} replays it)")


def _info() -> str:
    import kdfast

    return ", ".join(f"{k}={v}" for k, v in kdfast.info().items())


@pytest.fixture(autouse=True)
def _seed(request):
    """Each test draws from its own stream: the session seed mixed with the test's id."""
    torch.manual_seed(SEED ^ (zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF))
