"""kdfast.train.background: a function in a spawned process; its value, its exception, and its stop."""

from __future__ import annotations

import operator
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdfast.train.background import Background
from kdfast.train.loop import NonFiniteLoss, TrainingInterrupted


def _gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        state = Path(f"/proc/{pid}/stat")
        if state.exists() and state.read_text().split(")")[-1].split()[0] == "Z":  # exited, not yet reaped
            return True
        time.sleep(0.05)
    return False


def test_the_value_comes_back_and_the_exception_is_raised_here():
    with Background(operator.mul, 21, 2, threads=1) as job:
        assert job.result() == 42
    with Background(int, "not a number", threads=1) as job, pytest.raises(ValueError, match="not a number"):
        job.result()
    with pytest.raises(ValueError, match="threads must be >= 1"):
        Background(operator.mul, 1, 2, threads=0)


def test_the_training_exceptions_cross_the_process_boundary_whole():
    stopped = pickle.loads(pickle.dumps(TrainingInterrupted(7, Path("/x/checkpoint.pt"), signal.SIGTERM)))
    assert (stopped.step, stopped.path, stopped.signum) == (7, Path("/x/checkpoint.pt"), signal.SIGTERM)
    diverged = pickle.loads(pickle.dumps(NonFiniteLoss("run", 5, {"loss": float("inf")}, None, 4)))
    assert diverged.step == 5 and str(diverged).startswith("run: non-finite loss at step 5 (loss=inf)")


def test_leaving_the_block_early_stops_the_child():
    with pytest.raises(KeyboardInterrupt), Background(time.sleep, 60, threads=1) as job:
        pid = job._process.pid
        raise KeyboardInterrupt
    assert _gone(pid, 10)


_ORPHAN = """
import sys, time
from kdfast.train.background import Background
if __name__ == "__main__":
    job = Background(time.sleep, 60, threads=1)
    print(job._process.pid, flush=True)
    time.sleep(60)
"""


def test_a_child_whose_parent_dies_stops_itself(tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(_ORPHAN)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait(timeout=30)
        assert _gone(child, 10)
    finally:
        parent.kill()
