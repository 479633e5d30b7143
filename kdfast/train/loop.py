"""The training loop: a task module, a batch function and a config in; the loss curve and a checkpoint out.

A *task* is an ``nn.Module`` whose ``forward(batch)`` returns a dict of scalar tensors with a ``"loss"`` key (the
other entries are logged). Everything the step needs that has state (models, loss modules with buffers such as
GiniKLLoss's warm-up counter) lives in the task, so its state_dict is the whole model state of a checkpoint.
*batches* is a callable ``(step, rank, world) -> dict of tensors``, a pure function of the step (see
kdfast.train.data.Batches), so resuming needs no data-loader state.

One call of :func:`fit` trains ``config.steps`` steps with AdamW, linear warm-up then cosine decay, optional AMP
(bf16 or fp16 on CUDA, off on CPU by default) and gradient clipping; writes JSON lines to ``<out>/metrics.jsonl``
and shows a tqdm bar with the loss and the throughput; saves ``<out>/checkpoint.pt`` every
``checkpoint_every`` steps, at the end and when interrupted (Ctrl-C, SIGTERM); and resumes from it exactly:
model, optimiser, scheduler, gradient scaler and every RNG, so the loss curve is the one of an uninterrupted run
(bitwise on CPU). Under torchrun it trains with DistributedDataParallel, each rank on its slice of the batch.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from kdfast.train import checkpoint, distributed

AMP_MODES = ("auto", "off", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Settings of one training run (one :func:`fit`).

    steps: optimiser steps in all (a resumed run continues up to it). lr, weight_decay: AdamW.
    warmup_steps: linear warm-up of the learning rate; then a cosine decay to ``min_lr_ratio * lr``.
    grad_clip: clip the global gradient norm to this (None or 0: no clipping; the norm is logged either way).
    amp: ``auto`` (bf16 on CUDA where supported, else fp16; off on CPU), ``off``, ``bf16`` or ``fp16`` (CUDA).
    device: ``auto``, ``cpu``, ``cuda`` or ``cuda:i``. log_every: steps per JSON line.
    checkpoint_every: steps between checkpoints (0: only at the end and when interrupted).
    items_per_sample: how many items a sample counts for in the throughput (frames per video clip).
    """

    steps: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    amp: str = "auto"
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 0
    progress: bool = True
    description: str = "train"
    items_per_sample: int = 1

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {', '.join(AMP_MODES)}, got {self.amp!r}")
        if self.log_every < 1 or self.checkpoint_every < 0:
            raise ValueError(f"log_every must be >= 1 and checkpoint_every >= 0, got {self.log_every}, "
                             f"{self.checkpoint_every}")


@dataclass
class Result:
    """What one :func:`fit` call did. losses: the losses of the steps it ran (steps ``first_step`` to ``step``),
    averaged over the ranks; items_per_s: throughput after the first step (items of ``items_per_sample``)."""

    losses: list[float] = field(default_factory=list)
    first_step: int = 0
    step: int = 0
    items_per_s: float = float("nan")
    final_loss: float | None = None  # the loss of the last step, also when a resumed run had nothing left to train
    seconds: float = 0.0
    checkpoint: Path | None = None
    device: str = "cpu"
    world: int = 1


class NonFiniteLoss(RuntimeError):
    """Raised at the first step whose loss, a logged loss term or the gradient norm is not finite: training stops
    there and no checkpoint of the diverged model is written, so ``<out>/checkpoint.pt`` stays the last finite one."""

    def __init__(self, description: str, step: int, terms: dict[str, float], path: Path | None, saved_step: int):
        bad = ", ".join(f"{k}={v}" for k, v in terms.items())
        kept = f"the last finite checkpoint is {path} (step {saved_step})" if path else "no checkpoint was written"
        super().__init__(f"{description}: non-finite loss at step {step} ({bad}); training stopped, {kept}")
        self.step, self.terms, self.path = step, terms, path
        self._arguments = (description, step, terms, path, saved_step)

    def __reduce__(self):  # pickles (a training in a background process raises it there)
        return type(self), self._arguments


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C (or SIGTERM) once the checkpoint of the last finished step is written."""

    def __init__(self, step: int, path: Path | None, signum: int = signal.SIGINT):
        super().__init__(f"interrupted after step {step}" + (f"; checkpoint written to {path}" if path else ""))
        self.step, self.path, self.signum = step, path, signum

    def __reduce__(self):
        return type(self), (self.step, self.path, self.signum)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an ``amp`` mode on a device (None: no autocast)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("amp='fp16' needs a CUDA device (on CPU use 'bf16' or 'off')")
    return torch.bfloat16 if mode == "bf16" else torch.float16


def _grad_scaler(enabled: bool):
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3
        return torch.amp.GradScaler("cuda", enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def _schedule(config: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        decay_steps = max(1, config.steps - config.warmup_steps)
        progress = min(1.0, (step + 1 - config.warmup_steps) / decay_steps)  # the last step at the minimum
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class _StopOnSignal:
    """First Ctrl-C/SIGTERM: finish the step, checkpoint and stop. Second Ctrl-C: stop at once."""

    def __init__(self, enabled: bool):
        self.requested, self.signum = False, signal.SIGINT
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        if signum == signal.SIGINT:  # someone at a terminal: say that the step is being finished (a scheduler's
            # SIGTERM gets only the final line)
            print("\nCtrl-C: stopping after this step and writing a checkpoint (Ctrl-C again to abort without one)",
                  file=sys.stderr, flush=True)

    def __enter__(self):
        if self.enabled:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _batch_size(batch: dict) -> int:
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))


class _Log:
    """JSON lines on the main rank; on resume, the lines past the checkpoint's step are dropped."""

    def __init__(self, path: Path | None, resume_step: int | None):
        self.path = path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


# The TrainConfig fields that change what a run computes: a resumed run must have the same (checkpoint_every,
# log_every, device and the progress bar may differ).
RUN_FIELDS = ("steps", "lr", "weight_decay", "warmup_steps", "min_lr_ratio", "grad_clip", "amp", "items_per_sample")


def fit(task: nn.Module, batches: Callable[..., dict], config: TrainConfig, out: str | Path | None = None,
        resume: bool | str | Path = False, settings: dict | None = None) -> Result:
    """Train ``task`` on ``batches`` for ``config.steps`` steps (module docstring).

    Args:
        task: module whose ``forward(batch)`` returns a dict of scalars with a ``"loss"``.
        batches: ``(step, rank, world) -> batch`` (a dict of tensors; the rank's slice of the global batch).
        out: directory of ``checkpoint.pt`` and ``metrics.jsonl`` (None: neither is written).
        resume: True to continue from ``<out>/checkpoint.pt`` when it exists, or a checkpoint path.
        settings: what identifies the run (a recipe's settings, seed, data): stored in every checkpoint; resuming
            from a checkpoint with other settings (or another config's RUN_FIELDS) is a ValueError naming them.

    Raises:
        TrainingInterrupted: after Ctrl-C or SIGTERM, once the checkpoint is written.
        NonFiniteLoss: at the first step with a non-finite loss term or gradient norm (no checkpoint of it).
    """
    context = distributed.setup(config.device)
    device = distributed.device_for(config.device, context)
    out = Path(out) if out is not None else None
    ckpt_path = out / "checkpoint.pt" if out is not None else None
    task.to(device)
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    dtype = amp_dtype(config.amp, device)
    scaler = _grad_scaler(dtype == torch.float16)

    start, stored = 0, {}
    identity = {**{k: getattr(config, k) for k in RUN_FIELDS}, **(settings or {})}
    resume_from = (ckpt_path if resume is True else Path(resume) if resume else None)
    if resume_from is not None and (resume is not True or resume_from.exists()):
        state = checkpoint.load(resume_from)
        stored_run = {k: state.get("config", {}).get(k) for k in RUN_FIELDS}
        stored_settings = state.get("settings") if settings is not None else {}
        checkpoint.check_settings(resume_from, None if stored_settings is None else {**stored_run, **stored_settings},
                                  identity)
        try:
            task.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise ValueError(f"checkpoint {str(resume_from)!r} does not fit this model "
                             f"({str(exc).splitlines()[0]})") from exc
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        checkpoint.set_rng_state(rng[context.rank % len(rng)] if isinstance(rng, list) else rng)
        start = int(state["step"])
        stored = {"final_loss": state.get("final_loss"), "items_per_s": state.get("items_per_s", float("nan"))}
        if start > config.steps:
            raise ValueError(f"checkpoint {str(resume_from)!r} is at step {start}, past steps={config.steps}")
    log = _Log(out / "metrics.jsonl" if out is not None and context.is_main else None, start if start else None)

    model = task
    if context.distributed:
        # find_unused_parameters: a task may hold parameters its loss never reaches (the initial slots of an
        # implicitly differentiated slot attention get no gradient); DDP would otherwise stop at the second step.
        model = nn.parallel.DistributedDataParallel(task, device_ids=[device.index] if device.type == "cuda" else None,
                                                    find_unused_parameters=True)

    def save(step: int) -> Path | None:
        rng = checkpoint.rng_state()
        if context.distributed:
            gathered = [None] * context.world
            torch.distributed.all_gather_object(gathered, rng)
            rng = gathered
        if ckpt_path is None or not context.is_main:
            return None
        # The last loss and the throughput: a run resumed after its last step still reports them.
        final_loss = result.losses[-1] if result.losses else stored.get("final_loss")
        rate = _rate(timed_items, timed_from) or stored.get("items_per_s")
        return checkpoint.save(ckpt_path, step=step, model=task.state_dict(), optimizer=optimizer.state_dict(),
                               scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), rng=rng,
                               config=asdict(config), settings=settings, world=context.world,
                               final_loss=final_loss, items_per_s=rate)

    result = Result(first_step=start, step=start, device=str(device), world=context.world)
    # Under fp16 the gradient scaler skips steps whose gradients overflow: an infinite norm there is expected.
    guard = _Guard(config.description, check_grad_norm=not scaler.is_enabled())
    guard.saved = (ckpt_path, start) if start else (None, 0)
    progress = _progress(config, start, context)
    pending: list[tuple[int, list[str], torch.Tensor, float]] = []
    started = time.perf_counter()
    timed_from, timed_items = None, 0
    with _StopOnSignal(enabled=True) as stop:
        try:
            for step in range(start, config.steps):
                batch = _to(batches(step, context.rank, context.world), device)
                items = _batch_size(batch) * context.world * config.items_per_sample
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    outputs = model(batch)
                loss = outputs["loss"]
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = nn.utils.clip_grad_norm_(params, config.grad_clip or float("inf"))
                lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                keys = [k for k, v in outputs.items() if isinstance(v, torch.Tensor) and v.numel() == 1]
                values = torch.stack([outputs[k].detach().double().reshape(()) for k in keys])
                # One all-reduce for all the logged scalars (the grad norm is already global after DDP's averaging).
                values = torch.cat([distributed.mean(values, context), grad_norm.detach().double().reshape(1)])
                pending.append((step + 1, [*keys, "grad_norm"], values, lr))
                result.step = step + 1
                if timed_from is None:
                    timed_from = time.perf_counter()
                else:
                    timed_items += items
                stopping = _agree(stop.requested, context, device)
                checkpoint_due = stopping or (config.checkpoint_every and result.step % config.checkpoint_every == 0)
                # The guard sees every step before a checkpoint is written: no checkpoint holds a diverged model.
                if result.step % config.log_every == 0 or result.step == config.steps or checkpoint_due:
                    _flush(pending, result, log, progress, timed_from, timed_items, guard)
                if checkpoint_due:
                    result.checkpoint = save(result.step) or result.checkpoint
                    guard.saved = (result.checkpoint, result.step)
                if stopping:
                    progress.close()
                    distributed.barrier(context)
                    raise TrainingInterrupted(result.step, result.checkpoint, stop.signum)
            _flush(pending, result, log, progress, timed_from, timed_items, guard)
        finally:
            progress.close()
    result.seconds = time.perf_counter() - started
    if timed_items:
        result.items_per_s = _rate(timed_items, timed_from)
    elif result.step > start:  # a single step: its own time, warm-up included
        result.items_per_s = items / result.seconds
    else:  # nothing left to train: what the run that wrote the checkpoint measured
        result.items_per_s = stored.get("items_per_s", float("nan"))
    result.final_loss = result.losses[-1] if result.losses else stored.get("final_loss")
    if ckpt_path is not None and (result.step > start or not ckpt_path.exists()):
        result.checkpoint = save(result.step) or result.checkpoint
    elif ckpt_path is not None:
        result.checkpoint = ckpt_path  # already complete: nothing trained
    distributed.barrier(context)
    return result


def _rate(items: int, since: float | None) -> float | None:
    return items / (time.perf_counter() - since) if items and since is not None else None


def _agree(requested: bool, context: distributed.Context, device: torch.device) -> bool:
    """Whether any rank was asked to stop: all ranks must stop at the same step or the others would hang."""
    if not context.distributed:
        return requested
    flag = torch.tensor([float(requested)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def _progress(config: TrainConfig, start: int, context: distributed.Context):
    from tqdm.auto import tqdm

    return tqdm(total=config.steps, initial=start, desc=config.description, dynamic_ncols=True,
                disable=not (config.progress and context.is_main), leave=True)


class _Guard:
    """Finds the first step with a non-finite loss term (or gradient norm) among the pending steps."""

    def __init__(self, description: str, check_grad_norm: bool):
        self.description, self.check_grad_norm = description, check_grad_norm
        self.saved: tuple[Path | None, int] = (None, 0)  # the last finite checkpoint and its step

    def check(self, step: int, record: dict) -> None:
        bad = {k: v for k, v in record.items()
               if isinstance(v, float) and not math.isfinite(v) and (k != "grad_norm" or self.check_grad_norm)}
        if bad:
            raise NonFiniteLoss(self.description, step, bad, *self.saved)


def _flush(pending, result: Result, log: _Log, progress, timed_from, timed_items, guard: _Guard | None = None) -> None:
    """Move the pending steps' scalars to the host (one sync per log interval) and log one line per step; the
    guard stops at the first non-finite step, after logging the steps before it."""
    if not pending:
        return
    keys = pending[0][1]
    values = torch.stack([v for _, _, v, _ in pending]).tolist()
    rate = timed_items / (time.perf_counter() - timed_from) if timed_items else None
    for (step, _, _, lr), row in zip(pending, values):
        record = {"step": step, **dict(zip(keys, row)), "lr": lr}
        if guard is not None:
            guard.check(step, record)
        result.losses.append(record["loss"])
        if rate is not None and step == pending[-1][0]:
            record["items_per_s"] = rate
        log.write(record)
    progress.update(pending[-1][0] - progress.n)
    postfix = {"loss": f"{record['loss']:.4f}"}
    if rate is not None:
        postfix["items/s"] = f"{rate:.1f}"
    progress.set_postfix(postfix, refresh=False)
    pending.clear()


def load_model(task: nn.Module, path: str | Path) -> int:
    """Load the model state of a training checkpoint into ``task``; the step it was saved at."""
    state = checkpoint.load(path)
    try:
        task.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise ValueError(f"checkpoint {str(path)!r} does not fit this model: {exc}") from exc
    return int(state["step"])

