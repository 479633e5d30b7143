"""``kdfast train`` under faults: a SIGKILL right after a checkpoint, then ``--resume``, ends with the metrics of an
uninterrupted run; a truncated, empty or foreign checkpoint and a missing, empty or garbage ``--data`` each stop
with exit code 2 and one line naming the file and the problem.

The bad-file cases call ``kdfast.cli.main`` in this process (they fail before any training step); the kill runs
the command in a subprocess. test_train_cli.py kills at random moments; here the kill lands after the first
checkpoint for certain, so the resumed run has something to resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast import cli

GINI = ["train", "gini", "--steps", "6", "--batch-size", "8", "--set", "dataset=shapes", "--set", "seeds=1",
        "--set", "label_noise=0", "--set", "eval_samples=32", "--set", "train_samples=64", "--set", "widths=8,16",
        "--set", "image_size=16", "--device", "cpu", "--no-progress", "--checkpoint-every", "2", "--seed", "3"]
SLOTMATCH = ["train", "slotmatch", "--steps", "4", "--batch-size", "4", "--set", "eval_videos=4",
             "--set", "train_videos=8", "--set", "frames=2", "--set", "image_size=16", "--set", "teacher_channels=16",
             "--set", "slots=3", "--set", "teacher_hidden=32", "--device", "cpu", "--no-progress", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "KDFAST_BACKEND": "auto"}
TIMEOUT = 300


def _main(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and the one stderr line of ``kdfast <argv>`` run in this process."""
    code = cli.main(argv)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return code, lines[0]


# Kills itself with SIGKILL as soon as the checkpoint of step 2 is on disk (the write and the rename done).
_DIE_AFTER_CHECKPOINT = """
import os, signal, sys
from kdfast.train import checkpoint
real = checkpoint.save
def save(path, **state):
    written = real(path, **state)
    if state["step"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return written
checkpoint.save = save
from kdfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(argv: list[str], out: Path, script: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", script, *argv] if script else [sys.executable, "-m", "kdfast", *argv]
    return subprocess.run([*command, "--out", str(out)], check=False, capture_output=True, text=True, env=ENV,
                          timeout=TIMEOUT)


def _final_metrics(out: Path) -> tuple[list, dict]:
    """Every metrics line and report.json, without the measured throughput and wall times."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()
                    if "/s" not in k and k not in ("items_per_s", "seconds", "wall seconds", "inference_speedup",
                                                   "conclusion")}
        return [strip(v) for v in value] if isinstance(value, list) else value
    lines = [strip(json.loads(line)) for path in sorted(out.glob("*/metrics.jsonl"))
             for line in path.read_text().splitlines()]
    return lines, strip(json.loads((out / "report.json").read_text()))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted tiny gini run."""
    out = tmp_path_factory.mktemp("straight") / "run"
    done = _run(GINI, out)
    assert done.returncode == 0, done.stderr
    return out


def test_sigkill_after_a_checkpoint_then_resume_ends_with_the_uninterrupted_metrics(straight, tmp_path):
    out = tmp_path / "run"
    killed = _run(GINI, out, _DIE_AFTER_CHECKPOINT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (saved,) = out.glob("*/checkpoint.pt")  # the first of the recipe's runs, killed after its step 2
    assert torch.load(saved, weights_only=False)["step"] == 2
    assert not (out / "report.json").exists()
    done = _run([*GINI, "--resume"], out)
    assert done.returncode == 0, done.stderr
    assert _final_metrics(out) == _final_metrics(straight)
    assert torch.load(saved, weights_only=False)["step"] == 6


def _previous(straight: Path, tmp_path: Path) -> tuple[Path, list[Path]]:
    """A copy of the finished run and its checkpoints (one per run of the recipe)."""
    out = tmp_path / "previous"
    shutil.copytree(straight, out)
    return out, sorted(out.glob("*/checkpoint.pt"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "foreign", "garbage", "directory"])
def test_a_bad_checkpoint_stops_resume_with_one_line_naming_it(straight, tmp_path, capsys, damage):
    out, checkpoints = _previous(straight, tmp_path)
    expected = {
        "truncated": r"is not a readable checkpoint \(",
        "empty": r"is not a readable checkpoint \(",
        "foreign": r"is not a kdfast training checkpoint \(format None, expected 'kdfast-train-1'\)",
        "garbage": r"is not a readable checkpoint \(",
        "directory": r"is a directory, not a checkpoint file",
    }[damage]
    for saved in checkpoints:  # every one, so whichever the resume reads first is bad
        data = saved.read_bytes()
        if damage == "truncated":
            saved.write_bytes(data[: len(data) // 2])
        elif damage == "empty":
            saved.write_bytes(b"")
        elif damage == "foreign":
            torch.save({"state_dict": {"weight": torch.zeros(2)}}, saved)
        elif damage == "garbage":
            saved.write_bytes(np.random.default_rng(0).bytes(4096))
        else:
            saved.unlink()
            saved.mkdir()
    code, line = _main([*GINI, "--out", str(out), "--resume"], capsys)
    assert code == 2 and line.startswith("kdfast: error: "), line
    assert any(repr(str(saved)) in line for saved in checkpoints), line
    assert re.search(expected, line), line


def _data_cases(root: Path) -> dict[str, tuple[Path, str]]:
    """--data paths for the gini recipe, each with the message it must get."""
    root.mkdir()
    cases = {"missing": (root / "nothing-here", r"--data: '.*nothing-here' does not exist")}
    (root / "empty-dir").mkdir()
    cases["empty directory"] = (root / "empty-dir", r"--data: '.*empty-dir' has no <class>/<image> files")
    (root / "empty-classes" / "cat").mkdir(parents=True)
    cases["class folders without images"] = (root / "empty-classes", r"has no <class>/<image> files")
    (root / "empty.npz").write_bytes(b"")
    cases["empty .npz"] = (root / "empty.npz", r"--data: cannot read '.*empty.npz' as an .npz file")
    (root / "garbage.npz").write_bytes(np.random.default_rng(1).bytes(2048))
    cases["garbage .npz"] = (root / "garbage.npz", r"--data: cannot read '.*garbage.npz' as an .npz file")
    (root / "notes.txt").write_text("not data\n")
    cases["text file"] = (root / "notes.txt", r"--data: expected an image directory or a .npz file, got '.*notes.txt'")
    np.savez(root / "no-images.npz", x=np.zeros((0, 16, 16, 3), np.float32), y=np.zeros(0, np.int64))
    cases["no images in .npz"] = (root / "no-images.npz", r"--data: '.*no-images.npz' holds no images")
    np.savez(root / "one-image.npz", x=np.zeros((1, 16, 16, 3), np.float32), y=np.zeros(1, np.int64))
    cases["one image"] = (root / "one-image.npz", r"--data: '.*one-image.npz' holds 1 image; at least 2 are needed")
    (root / "one-class-folder" / "cat").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(root / "one-class-folder" / "cat" / "0.png")
    cases["one image file"] = (root / "one-class-folder", r"--data: '.*one-class-folder' holds 1 image; at least 2")
    np.savez(root / "wrong-keys.npz", a=np.zeros(3))
    cases["wrong arrays"] = (root / "wrong-keys.npz", r"needs arrays x/images/data and y/labels, has \['a'\]")
    return cases


@pytest.mark.parametrize("case", ["missing", "empty directory", "class folders without images", "empty .npz",
                                  "garbage .npz", "text file", "no images in .npz", "one image", "one image file",
                                  "wrong arrays"])
def test_a_bad_data_path_stops_with_one_line_naming_it(tmp_path, capsys, case):
    path, expected = _data_cases(tmp_path / "data")[case]
    code, line = _main([*GINI, "--out", str(tmp_path / "run"), "--data", str(path)], capsys)
    assert code == 2 and line.startswith("kdfast: error: "), line
    assert re.search(expected, line), line
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("*/checkpoint.pt"))


def _video_cases(root: Path) -> dict[str, tuple[Path, str]]:
    """--data paths for the slotmatch recipe (precomputed features or frame folders)."""
    root.mkdir()
    cases = {"missing": (root / "features.npy", r"--data: '.*features.npy' does not exist")}
    (root / "empty.npy").write_bytes(b"")
    cases["empty .npy"] = (root / "empty.npy", r"--data: cannot read '.*empty.npy' as an .npy file")
    (root / "garbage.pt").write_bytes(np.random.default_rng(2).bytes(2048))
    cases["garbage .pt"] = (root / "garbage.pt", r"--data: cannot read '.*garbage.pt' as a torch file")
    (root / "frames").mkdir()
    cases["empty frame directory"] = (root / "frames", r"--data: '.*frames' has no <video>/<frame> sub-folders")
    np.save(root / "no-videos.npy", np.zeros((0, 2, 16, 8), np.float32))
    cases["no videos"] = (root / "no-videos.npy", r"--data: '.*no-videos.npy' holds no clips of 2 frames; at least 2 are needed")
    return cases


@pytest.mark.parametrize("case", ["missing", "empty .npy", "garbage .pt", "empty frame directory", "no videos"])
def test_a_bad_video_data_path_stops_with_one_line_naming_it(tmp_path, capsys, case):
    path, expected = _video_cases(tmp_path / "data")[case]
    code, line = _main([*SLOTMATCH, "--out", str(tmp_path / "run"), "--data", str(path)], capsys)
    assert code == 2 and line.startswith("kdfast: error: "), line
    assert re.search(expected, line), line
