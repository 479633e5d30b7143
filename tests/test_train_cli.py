"""``kdfast train`` as a user runs it, in subprocesses at tiny sizes: SIGKILL at seeded moments then ``--resume``
ends equal to an uninterrupted run (checkpoints, metrics.jsonl, report.json); a kill inside a checkpoint write;
bad files and flags each get one line, exit 2 and leave a previous run byte-identical; the finite-loss guard;
SIGTERM. The kill moments come from a fixed seed; whatever moment a kill lands on, the result must be the same.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdfast import cli

TINY = {
    "gini": ["--steps", "10", "--batch-size", "8", "--set", "dataset=shapes", "--set", "seeds=1", "--set", "label_noise=0",
             "--set", "eval_samples=32", "--set", "train_samples=100",
             "--set", "widths=8,16", "--set", "image_size=16"],
    "slotmatch": ["--steps", "10", "--batch-size", "4", "--set", "eval_videos=4", "--set", "train_videos=50",
                  "--set", "frames=2", "--set", "image_size=16", "--set", "teacher_channels=16", "--set", "slots=3",
                  "--set", "teacher_hidden=32"],
    "wecolora": ["--steps", "10", "--batch-size", "8", "--set", "probe_train=24", "--set", "held_out=16",
                 "--set", "few_shot_per_class=2", "--set", "depth=2", "--set", "embed_dim=16",
                 "--set", "train_samples=100", "--set", "image_size=16"],
}
COMMON = ["--device", "cpu", "--no-progress", "--checkpoint-every", "4", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "KDFAST_BACKEND": "auto"}
TIMEOUT = 180


def _command(recipe: str, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "kdfast", "train", recipe, *TINY[recipe], *COMMON, "--out", str(out), *extra]


def _kdfast(recipe: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_command(recipe, out, *extra), capture_output=True, text=True, env=ENV, timeout=TIMEOUT,
                          check=False)


def _error_line(done: subprocess.CompletedProcess, code: int = 2) -> str:
    """The one line a failed command wrote to stderr (no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code and len(lines) == 1, (done.returncode, done.stderr)
    return lines[0]


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        keys = set(a) - {"items_per_s"}  # the measured throughput differs from run to run
        assert keys == set(b) - {"items_per_s"}, where
        for key in keys:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def _without_throughput(value):
    if isinstance(value, dict):
        # throughput and wall times differ from run to run
        return {k: _without_throughput(v) for k, v in value.items()
                if "/s" not in k
                and k not in ("items_per_s", "seconds", "wall seconds", "inference_speedup", "conclusion")}
    if isinstance(value, list):
        return [_without_throughput(v) for v in value]
    return value


def _assert_same_run(a: Path, b: Path) -> None:
    """Checkpoints bitwise, metrics.jsonl line by line and report.json equal, throughput fields aside."""
    checkpoints = sorted(p.relative_to(a) for p in a.glob("*/checkpoint.pt"))
    assert checkpoints and checkpoints == sorted(p.relative_to(b) for p in b.glob("*/checkpoint.pt"))
    for name in checkpoints:
        _same(torch.load(a / name, weights_only=False), torch.load(b / name, weights_only=False), str(name))
        metrics = name.parent / "metrics.jsonl"
        lines = [[_without_throughput(json.loads(line)) for line in (run / metrics).read_text().splitlines()]
                 for run in (a, b)]
        assert lines[0] == lines[1], metrics
    reports = [_without_throughput(json.loads((run / "report.json").read_text())) for run in (a, b)]
    assert reports[0] == reports[1]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted runs of each recipe (made on first use) and how long each took."""
    runs: dict[str, tuple[Path, float]] = {}

    def get(recipe: str) -> tuple[Path, float]:
        if recipe not in runs:
            out = tmp_path_factory.mktemp("straight") / recipe
            started = time.monotonic()
            done = _kdfast(recipe, out)
            assert done.returncode == 0, done.stderr
            runs[recipe] = out, time.monotonic() - started
        return runs[recipe]

    return get


@pytest.mark.parametrize("recipe", ["gini", "slotmatch", "wecolora"])
def test_sigkill_at_any_moment_then_resume_ends_equal_to_an_uninterrupted_run(recipe, straight, tmp_path):
    reference, seconds = straight(recipe)
    out = tmp_path / "run"
    moments = random.Random(f"kill/{recipe}")  # fixed seed: the same moments on every run of the test
    killed = 0
    for attempt in range(2):
        resume = ["--resume"] if any(out.glob("*/checkpoint.pt")) else ["--overwrite"] if out.exists() else []
        process = subprocess.Popen(_command(recipe, out, *resume), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=ENV)
        time.sleep(moments.uniform(0.3, 0.9) * seconds)
        process.kill()
        killed += process.wait(timeout=TIMEOUT) == -signal.SIGKILL
    assert killed  # at least one kill landed while the run was going
    resume = ["--resume"] if any(out.glob("*/checkpoint.pt")) else ["--overwrite"] if out.exists() else []
    done = _kdfast(recipe, out, *resume)
    assert done.returncode == 0, done.stderr
    _assert_same_run(reference, out)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["batch_size"] == int(TINY[recipe][3]) and report["settings"]["checkpoint_every"] == 4


# Dies by SIGKILL in the middle of the second checkpoint write, half of the file written.
_DIE_WHILE_WRITING = """
import os, signal, sys, torch
real, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        f.write(b"PK\\x03\\x04" + bytes(4096))
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *args, **kwargs)
torch.save = save
from kdfast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_inside_a_checkpoint_write_keeps_the_previous_one(straight, tmp_path):
    out = tmp_path / "run"
    command = _command("gini", out)
    killed = subprocess.run([sys.executable, "-c", _DIE_WHILE_WRITING, *command[3:]], capture_output=True,
                            env=ENV, timeout=TIMEOUT, check=False)
    assert killed.returncode == -signal.SIGKILL
    assert (out / "ce_noise0_seed3" / "checkpoint.pt.tmp").stat().st_size > 4096  # the write that was cut short
    assert torch.load(out / "ce_noise0_seed3" / "checkpoint.pt", weights_only=False)["step"] == 4  # the one before it
    done = _kdfast("gini", out, "--resume")
    assert done.returncode == 0, done.stderr
    _assert_same_run(straight("gini")[0], out)


def _bad_files(root: Path) -> dict[str, Path]:
    root.mkdir()
    files = {}
    for suffix in (".npz", ".npy", ".pt"):
        files[suffix] = root / f"garbled{suffix}"
        files[suffix].write_bytes(b"\x93NUMPY\x01\x00garbled" * 10)
    (root / "folder" / "cat").mkdir(parents=True)
    for name in ("0.png", "1.png"):  # two: a folder of one image is refused before any is decoded
        (root / "folder" / "cat" / name).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    files["png"] = root / "folder"
    images = np.random.default_rng(0).random((8, 16, 16, 3), dtype=np.float32)
    images[5, 2, 3, 1] = np.nan
    np.savez(root / "nan.npz", x=images, y=np.arange(8) % 2)
    files["nan"] = root / "nan.npz"
    torch.save({"features": torch.randn(3, 4, 16, 8), "masks": torch.zeros(2, 4, 16, 16, dtype=torch.long)},
               root / "masks.pt")
    files["masks"] = root / "masks.pt"
    (root / "a-file").write_text("")
    files["file"] = root / "a-file"
    return files


def test_each_bad_file_or_flag_is_one_line_and_leaves_a_previous_run_untouched(straight, tmp_path):
    previous = tmp_path / "previous"
    shutil.copytree(straight("gini")[0], previous)
    before = _tree(previous)
    bad = _bad_files(tmp_path / "bad")
    cases = [
        ("gini", ["--overwrite", "--data", str(bad[".npz"])], r"--data: cannot read '.*garbled.npz' as an .npz file"),
        ("slotmatch", ["--overwrite", "--data", str(bad[".npy"])], r"--data: cannot read '.*garbled.npy' as an .npy"),
        ("slotmatch", ["--overwrite", "--data", str(bad[".pt"])], r"--data: cannot read '.*garbled.pt' as a torch"),
        ("gini", ["--overwrite", "--data", str(bad["png"])], r"--data: cannot read the image '.*0.png' \(Unidentified"),
        ("gini", ["--overwrite", "--data", str(bad["nan"])], r"nan.npz:x holds non-finite .* index \[5, 1, 2, 3\]"),
        ("slotmatch", ["--overwrite", "--data", str(bad["masks"])], r"masks.pt'?: masks must be integer \(V, T, H, W\)"),
        ("gini", ["--lr", "-1"], r"--lr must be a finite number > 0, got -1.0"),
        ("gini", ["--set", "nope=1"], r"--set nope: not a setting of the gini recipe; its settings are: steps, "),
        ("gini", ["--set", "widths=a"], r"--set widths=a: expected comma-separated integers"),
        ("slotmatch", ["--set", "patch=5"], r"--set image_size=16: must be a multiple of patch \(5\)"),
        ("gini", [], r"--out: '.*previous' holds a previous run \(ce\+gini\+kl_noise0_seed3/checkpoint.pt\); --resume continues it"),
        ("gini", ["--resume", "--seed", "4"], r"cannot resume from '.*ce\+gini\+kl_noise0_seed3/checkpoint.pt': .* \(seed 3 -> 4\)"),
        ("slotmatch", ["--resume"], r"cannot resume from '.*ce\+gini\+kl_noise0_seed3/checkpoint.pt': .* \(recipe 'gini' -> 'slotmatch', "),
    ]
    for recipe, flags, message in cases:
        line = _error_line(_kdfast(recipe, previous, *flags))
        assert line.startswith("kdfast: error: ")
        assert re.search(message, line), (flags, line)
        assert _tree(previous) == before, flags
    line = _error_line(_kdfast("gini", bad["file"] / "run"))
    assert "--out: " in line and "a-file' is a file, expected a directory" in line


def test_a_diverging_run_stops_with_the_guard_line_and_a_finite_checkpoint(tmp_path):
    done = _kdfast("gini", tmp_path, "--lr", "1e30")
    line = _error_line(done, code=3)
    assert re.fullmatch(r"kdfast: error: gini \[ce_noise0_seed3\]: non-finite loss at step \d+ \(.*=(nan|inf).*\); "
                                      r"training stopped, (the last finite checkpoint is .*|no checkpoint was written)",
                                      line), line
    for path in tmp_path.glob("*/checkpoint.pt"):
        state = torch.load(path, weights_only=False)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def _start(recipe: str, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_command(recipe, out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def test_sigterm_inside_a_phase_checkpoints_and_outside_one_exits_with_one_line(tmp_path):
    # Inside the first phase: long enough that the first logged line comes well before its end.
    process = _start("gini", tmp_path / "inside", "--steps", "400", "--checkpoint-every", "0")
    metrics = tmp_path / "inside" / "ce_noise0_seed3" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=TIMEOUT)
    lines = err.strip().splitlines()
    assert process.returncode == 128 + signal.SIGTERM and len(lines) == 1, err
    step = int(re.fullmatch(r"kdfast: SIGTERM: stopped after step (\d+); checkpoint: .*checkpoint.pt "
                                          r"\(continue with --resume\)", lines[0]).group(1))
    assert torch.load(tmp_path / "inside" / "ce_noise0_seed3" / "checkpoint.pt", weights_only=False)["step"] == step < 400

    # At start-up, once the settings are printed (before or just as the first phase starts): one line either way.
    process = _start("gini", tmp_path / "outside")
    assert process.stdout.readline().startswith("kdfast train gini: steps=10")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=TIMEOUT)
    lines = err.strip().splitlines()
    assert process.returncode == 128 + signal.SIGTERM and len(lines) == 1, err
    assert (lines[0].startswith("kdfast: stopped by SIGTERM outside a training phase")
            or lines[0].startswith("kdfast: SIGTERM: stopped after step")), lines[0]


def test_help_lists_each_recipes_settings_with_defaults(capsys):
    for recipe, expected in (("gini", "widths=32,64,128"), ("slotmatch", "teacher_hidden=64"),
                             ("wecolora", "teacher_steps=750")):
        with pytest.raises(SystemExit) as done:
            cli.main(["train", recipe, "--help"])
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert f"settings of {recipe} (--set KEY=VALUE; defaults shown):" in out and expected in out
        assert "checkpoint_every=100" in out


def test_train_flushes_denormals_while_the_recipe_runs_and_restores_after(monkeypatch, tmp_path):
    denormal = torch.tensor([1e-39])  # below float32's smallest normal, 1.18e-38
    seen = []

    def run(options):
        seen.append(float(denormal * 1.0))
        return {"recipe": "gini", "rows": []}

    monkeypatch.setattr("kdfast.train.recipes.gini.run", run)
    monkeypatch.setattr("kdfast.train.recipes._common.format_report", lambda report: "")
    assert cli.main(["train", "gini", "--out", str(tmp_path)]) == 0
    assert seen == [0.0]  # flushed inside the run
    assert float(denormal * 1.0) > 0  # and the process is as it was after it


def _same_students(a: Path, b: Path) -> None:
    """The student checkpoints bitwise and their metrics.jsonl line by line, throughput aside."""
    for arm in ("student", "student_alone"):
        _same(torch.load(a / arm / "checkpoint.pt", weights_only=False),
              torch.load(b / arm / "checkpoint.pt", weights_only=False), arm)
        lines = [[_without_throughput(json.loads(line)) for line in (run / arm / "metrics.jsonl").read_text().splitlines()]
                 for run in (a, b)]
        assert lines[0] == lines[1], arm


def test_slotmatch_students_side_by_side_stop_together_and_resume_to_the_in_turn_run(straight, tmp_path):
    """With 2 threads the lone student trains in a background process on 1 thread beside the distilled one on the
    other: the same numbers as both in turn on 1 thread. SIGTERM stops both with checkpoints; --resume finishes."""
    teacher = ["--teacher", str(straight("slotmatch")[0] / "teacher" / "checkpoint.pt"), "--steps", "150",
               "--checkpoint-every", "0"]
    in_turn = tmp_path / "in-turn"
    done = _kdfast("slotmatch", in_turn, *teacher)
    assert done.returncode == 0 and "background process" not in done.stdout, done.stderr
    two_threads = {**ENV, "OMP_NUM_THREADS": "2"}
    out = tmp_path / "side-by-side"
    process = subprocess.Popen(_command("slotmatch", out, *teacher), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=two_threads)
    logs = [out / arm / "metrics.jsonl" for arm in ("student", "student_alone")]
    deadline = time.monotonic() + TIMEOUT
    while not all(log.exists() and log.read_text() for log in logs) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    stdout, err = process.communicate(timeout=TIMEOUT)
    assert "slotmatch [student_alone]: trains in a background process on 1 thread(s)" in stdout
    assert process.returncode == 128 + signal.SIGTERM, err
    steps = [torch.load(out / arm / "checkpoint.pt", weights_only=False)["step"] for arm in ("student", "student_alone")]
    assert all(0 < step < 150 for step in steps), steps
    resumed = subprocess.run(_command("slotmatch", out, *teacher, "--resume"), capture_output=True, text=True,
                             env=two_threads, timeout=TIMEOUT, check=False)
    assert resumed.returncode == 0 and "background process" in resumed.stdout, resumed.stderr
    _same_students(in_turn, out)
