"""`kdfast` start-up: the command imports nothing heavy before its SIGTERM handler is in place, so a SIGTERM while
torch and the recipes load (seconds) ends with one line and exit code 143, like one anywhere else outside a phase."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import kdfast.cli
import kdfast.train.recipes

ROOT = Path(__file__).resolve().parents[1]


def test_the_cli_lists_the_recipes_the_package_has():
    assert kdfast.cli.RECIPES == tuple(kdfast.train.recipes.RECIPES)


def test_importing_the_cli_imports_no_torch():
    code = "import sys, kdfast.cli; assert 'torch' not in sys.modules, 'torch imported by kdfast.cli'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def _catches_sigterm(pid: int) -> bool:
    """Whether process pid has a handler for SIGTERM (Linux: the SigCgt mask of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def test_sigterm_while_starting_up_is_one_line_and_exit_143(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "kdfast", "train", "gini", "--out", str(tmp_path / "run"), "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    deadline = time.monotonic() + 60
    while not _catches_sigterm(process.pid):
        assert process.poll() is None and time.monotonic() < deadline, "kdfast never installed its SIGTERM handler"
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0], stderr
