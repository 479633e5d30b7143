"""kdfast.train.fit: exact resume (after Ctrl-C and after a crash), JSON lines, schedule, AMP modes, bad checkpoints."""

from __future__ import annotations

import itertools
import json
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdfast.train import TrainConfig, TrainingInterrupted, checkpoint, data, fit, load_model
from kdfast.train.loop import NonFiniteLoss, amp_dtype

STEPS = 12


class _Task(nn.Module):
    """A classifier with dropout (draws from the torch RNG every step) and batch norm (buffers)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(7, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def forward(self, batch):
        logits = self.net(batch["x"])
        loss = F.cross_entropy(logits, batch["y"])
        return {"loss": loss, "accuracy": (logits.argmax(1) == batch["y"]).float().mean()}


def _batches():
    g = torch.Generator().manual_seed(0)
    dataset = data.TensorDataset(x=torch.randn(40, 7, generator=g), y=torch.randint(0, 3, (40,), generator=g))
    return data.Batches(dataset, batch_size=8, seed=1)  # 5 batches per epoch: resumes cross epoch boundaries


def _config(**overrides) -> TrainConfig:
    settings = {"steps": STEPS, "lr": 1e-2, "warmup_steps": 3, "grad_clip": 0.5, "device": "cpu", "log_every": 1,
                "progress": False}
    return TrainConfig(**{**settings, **overrides})


def _run(out, batches=None, resume=False, settings=None, **overrides):
    torch.manual_seed(0)
    task = _Task()
    torch.manual_seed(123)  # the training RNG stream (dropout), the same for every run
    return task, fit(task, batches or _batches(), _config(**overrides), out, resume=resume, settings=settings)


def _lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_resume_after_ctrl_c_gives_the_same_loss_curve(tmp_path):
    # what the process had before the run: Python's default_int_handler, or SIG_IGN when started in the background
    # of a non-interactive shell (which ignores SIGINT for it)
    before = signal.getsignal(signal.SIGINT)
    straight_task, straight = _run(tmp_path / "straight")
    assert len(straight.losses) == STEPS and straight.step == STEPS

    batches = _batches()

    def interrupted_at_6(step, rank, world):
        if step == 6:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C while the batch of step 7 is being read
        return batches(step, rank, world)

    with pytest.raises(TrainingInterrupted) as stop:
        _run(tmp_path / "killed", interrupted_at_6)
    assert stop.value.step == 7 and stop.value.path == tmp_path / "killed" / "checkpoint.pt"
    assert signal.getsignal(signal.SIGINT) is before  # the handler is uninstalled

    torch.manual_seed(999)  # a restarted process: the RNG must come from the checkpoint, not from here
    task = _Task()
    resumed = fit(task, _batches(), _config(), tmp_path / "killed", resume=True)
    assert resumed.first_step == 7 and resumed.step == STEPS
    killed_losses = [line["loss"] for line in _lines(tmp_path / "killed")]
    assert killed_losses == straight.losses  # bitwise: floats compared with ==
    assert [line["step"] for line in _lines(tmp_path / "killed")] == list(range(1, STEPS + 1))
    _assert_same_state(task, straight_task)


def test_resume_from_a_periodic_checkpoint_after_a_crash(tmp_path):
    _, straight = _run(tmp_path / "straight")
    batches = _batches()

    def crash_at_10(step, rank, world):
        if step == 10:
            raise RuntimeError("power cut")
        return batches(step, rank, world)

    with pytest.raises(RuntimeError, match="power cut"):
        _run(tmp_path / "crashed", crash_at_10, checkpoint_every=4)
    assert checkpoint.load(tmp_path / "crashed" / "checkpoint.pt")["step"] == 8
    assert len(_lines(tmp_path / "crashed")) == 10  # steps 9 and 10 were logged after the checkpoint

    resumed_task = _Task()
    resumed = fit(resumed_task, _batches(), _config(checkpoint_every=4), tmp_path / "crashed", resume=True)
    assert resumed.losses == straight.losses[8:]
    assert [line["loss"] for line in _lines(tmp_path / "crashed")] == straight.losses

    # A finished run resumed again trains nothing and keeps its model.
    again = _Task()
    assert fit(again, _batches(), _config(), tmp_path / "crashed", resume=True).losses == []
    _assert_same_state(again, resumed_task)
    assert load_model(_Task(), tmp_path / "crashed" / "checkpoint.pt") == STEPS


def test_a_non_finite_loss_stops_training_and_keeps_the_last_finite_checkpoint(tmp_path):
    batches = _batches()

    def nan_from_step_6(step, rank, world):
        batch = batches(step, rank, world)
        if step >= 6:  # the batch of step 7 (steps count from 1) holds a NaN
            batch["x"][0, 0] = float("nan")
        return batch

    with pytest.raises(NonFiniteLoss, match=r"train: non-finite loss at step 7 \(loss=nan.*grad_norm=nan\); training "
                                            r"stopped, the last finite checkpoint is .*checkpoint.pt \(step 4\)"):
        _run(tmp_path, nan_from_step_6, checkpoint_every=4, log_every=5)
    state = checkpoint.load(tmp_path / "checkpoint.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [line["step"] for line in _lines(tmp_path)] == list(range(1, 7))  # the finite steps only


def test_a_diverging_learning_rate_stops_at_the_first_non_finite_step(tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step \d+ .*no checkpoint was written"):
        _run(tmp_path, lr=1e30, grad_clip=None, warmup_steps=0, checkpoint_every=0)
    assert not (tmp_path / "checkpoint.pt").exists()
    lines = _lines(tmp_path)
    assert all(torch.isfinite(torch.tensor([line["loss"], line["grad_norm"]])).all() for line in lines)


def test_resume_refuses_other_settings_naming_them_and_the_file(tmp_path):
    _run(tmp_path, steps=4, settings={"seed": 0, "batch_size": 8})
    with pytest.raises(ValueError, match=r"cannot resume from '.*checkpoint.pt': it was written with other settings "
                                         r"\(lr 0.01 -> 0.02, seed 0 -> 1\)"):
        _run(tmp_path, resume=True, steps=4, lr=2e-2, settings={"seed": 1, "batch_size": 8})
    with pytest.raises(ValueError, match=r"other settings \(steps 4 -> 6\)"):
        _run(tmp_path, resume=True, steps=6, settings={"seed": 0, "batch_size": 8})
    # What only changes when checkpoints are written, how often lines are logged or where it runs may differ.
    _run(tmp_path, resume=True, steps=4, checkpoint_every=1, log_every=3, settings={"seed": 0, "batch_size": 8})


def test_a_finished_run_resumed_reports_its_final_loss_and_throughput(tmp_path):
    _, straight = _run(tmp_path, checkpoint_every=5)
    assert straight.final_loss == straight.losses[-1]
    _, again = _run(tmp_path, resume=True, checkpoint_every=5)
    assert again.losses == [] and again.final_loss == straight.final_loss and again.items_per_s > 0


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path, monkeypatch):
    _run(tmp_path, steps=4)
    before = (tmp_path / "checkpoint.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"^no space left writing .*checkpoint.pt$"):
        _run(tmp_path, steps=4, checkpoint_every=2)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no temporary left


def test_metrics_lines_and_learning_rate_schedule(tmp_path):
    _, result = _run(tmp_path, steps=10, warmup_steps=4, log_every=3)
    lines = _lines(tmp_path)
    assert [line["step"] for line in lines] == list(range(1, 11))
    assert {"loss", "accuracy", "grad_norm", "lr"} <= set(lines[0])
    assert "items_per_s" in lines[-1] and result.items_per_s > 0
    lrs = [line["lr"] for line in lines]
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])  # linear warm-up to lr
    assert all(a > b for a, b in itertools.pairwise(lrs[3:]))  # then a cosine decay
    assert lrs[-1] == pytest.approx(0.1 * 1e-2)  # down to min_lr_ratio * lr at the last step


def test_gradient_clipping(tmp_path):
    # After fit, the parameters keep the last step's gradient: clipped to grad_clip, while the logged grad_norm
    # is the norm before clipping.
    for clip in (1e-3, None):
        torch.manual_seed(0)
        task = _Task()
        fit(task, _batches(), _config(steps=2, grad_clip=clip), tmp_path / str(clip))
        logged = _lines(tmp_path / str(clip))[-1]["grad_norm"]
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in task.parameters()])).item()
        assert logged > 1e-2
        assert norm == pytest.approx(1e-3 if clip else logged, rel=1e-5)


def test_amp_modes():
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cpu) is None
    assert amp_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        amp_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="amp must be one of"):
        TrainConfig(amp="fp8")


def test_bf16_autocast_on_cpu_trains(tmp_path):
    _, result = _run(tmp_path, steps=3, amp="bf16")
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))


def test_bad_checkpoints_are_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load(garbage)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="not a kdfast training checkpoint"):
        fit(_Task(), _batches(), _config(), tmp_path, resume=foreign)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_model(_Task(), tmp_path / "missing.pt")
    checkpoint.save(tmp_path / "other.pt", step=1, model=nn.Linear(2, 2).state_dict())
    with pytest.raises(ValueError, match="does not fit this model"):
        load_model(_Task(), tmp_path / "other.pt")


def test_batches_are_a_function_of_the_step_and_split_over_ranks():
    batches = _batches()
    whole = batches.indices(7)
    assert batches.indices(7, 0, 2) + batches.indices(7, 1, 2) == whole
    assert _batches().indices(7) == whole  # no hidden position
    epoch = [i for step in range(5) for i in batches.indices(step)]
    assert sorted(epoch) == list(range(40))  # each epoch visits every sample once
    with pytest.raises(ValueError, match="divisible by the world size"):
        batches.indices(0, 0, 3)
