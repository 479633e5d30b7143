"""``kdfast train slotmatch``: a SlotContrast-style teacher on multi-object video, then a SlotMatch student.

Model (SlotContrast, scaled down): frozen encoder features -> an MLP (with a learned position embedding) ->
kdfast.nn.SlotAttention, frame by frame (3 iterations on the first frame, 2 after), the slots of one frame
carried to the next by a small transformer predictor -> an MLP broadcast decoder that reconstructs the encoder
features and whose alpha masks segment the frame. Teacher loss: reconstruction + 0.5 x the slot contrastive
loss (kdfast.nn.SlotContrastLoss). Student (a smaller slot width, predictor and decoder): reconstruction +
0.5 x contrast + the slot matching loss (kdfast.nn.SlotMatchLoss, Hungarian pairing) between its slots, projected
to the teacher's width, and the frozen teacher's slots.

The encoder stands in for SlotContrast's frozen DINO: on the embedded ``moving-shapes`` videos it is a fixed
random projection of 4x4 patches; with ``--data features.npy|.pt`` the precomputed features are used as they are.
The report: video FG-ARI and mBO of teacher and student on held-out videos (when masks are available) for the
decoder masks (SlotContrast's choice) and the slot-attention masks, with the score of the true masks sampled on
the token grid as the bound, parameter counts, training throughput and inference frames per second.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.nn import SlotAttention, SlotContrastLoss, SlotMatchLoss
from kdfast.train import data, distributed, metrics
from kdfast.train.loop import fit, load_model
from kdfast.train.recipes._common import (Options, apply_backend, config, finish, parameter_count, prepare,
                                          seed_everything)
from kdfast.train.recipes._settings import setting

STEPS, BATCH_SIZE, LR = 500, 8, 1e-3
FRAMES, IMAGE_SIZE, PATCH, FEATURE_DIM, SLOTS, EVAL_VIDEOS = 4, 32, 4, 64, 7, 64
# Narrow slots: with 64-wide slots the slots of these simple frames jointly encode everything and never compete
# for the tokens (the attention stays a mixture); 16-wide slots group the tokens by object within a few hundred
# steps. The student keeps the slot width and shrinks the MLPs, the predictor and the decoder.
TEACHER = {"slot_dim": 16, "hidden": 128, "predictor_heads": 2}
STUDENT = {"slot_dim": 16, "hidden": 32, "predictor_heads": 2}


@dataclass
class Settings:
    """The slotmatch recipe's sizes and schedule (``kdfast train slotmatch --set key=value``)."""

    MAY_BE_ZERO = ("warmup_steps", "checkpoint_every", "match_weight")

    steps: int = setting(STEPS, "optimiser steps of the teacher and of the student")
    batch_size: int = setting(BATCH_SIZE, "global batch size (clips)")
    lr: float = setting(LR, "peak learning rate (AdamW)")
    warmup_steps: int = setting(50, "linear warm-up steps")
    checkpoint_every: int = setting(100, "steps between checkpoints (0: at the end and when stopped only)")
    frames: int = setting(FRAMES, "frames per clip")
    image_size: int = setting(IMAGE_SIZE, "frame side in pixels (frame images are resized to it)")
    patch: int = setting(PATCH, "patch side of the frozen encoder (tokens per frame: (image_size / patch)^2)")
    feature_dim: int = setting(FEATURE_DIM, "width of the frozen encoder's features")
    slots: int = setting(SLOTS, "slots per frame")
    train_videos: int = setting(2000, "synthetic training clips")
    eval_videos: int = setting(EVAL_VIDEOS, "synthetic held-out clips")
    teacher_slot_dim: int = setting(TEACHER["slot_dim"], "teacher's slot width")
    teacher_hidden: int = setting(TEACHER["hidden"], "teacher's MLP width")
    teacher_predictor_heads: int = setting(TEACHER["predictor_heads"], "teacher's predictor attention heads")
    student_slot_dim: int = setting(STUDENT["slot_dim"], "student's slot width")
    student_hidden: int = setting(STUDENT["hidden"], "student's MLP width")
    student_predictor_heads: int = setting(STUDENT["predictor_heads"], "student's predictor attention heads")
    match_weight: float = setting(1.0, "weight of the student's slot matching loss")

    def check(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"--set image_size={self.image_size}: must be a multiple of patch ({self.patch})")
        for model in ("teacher", "student"):
            dim, heads = getattr(self, f"{model}_slot_dim"), getattr(self, f"{model}_predictor_heads")
            if dim % heads:
                raise ValueError(f"--set {model}_slot_dim={dim}: must be a multiple of {model}_predictor_heads ({heads})")

    def model(self, name: str) -> dict[str, int]:
        return {key: getattr(self, f"{name}_{key}") for key in ("slot_dim", "hidden", "predictor_heads")}


class PatchEncoder(nn.Module):
    """A frozen random projection of non-overlapping patches: (B, T, 3, H, W) -> (B, T, N, C) features."""

    def __init__(self, patch: int = PATCH, dim: int = FEATURE_DIM, seed: int = 0):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.proj.weight.shape, generator=generator) / (3 * patch * patch) ** 0.5)
            self.proj.bias.zero_()
        self.requires_grad_(False)

    def forward(self, video: Tensor) -> Tensor:
        b, t = video.shape[:2]
        features = self.proj(video.flatten(0, 1)).flatten(2).transpose(1, 2)
        return F.layer_norm(features, features.shape[-1:]).view(b, t, -1, features.shape[-1])


class MLPDecoder(nn.Module):
    """SlotContrast's MLP decoder: each slot broadcast to the N positions (+ a position embedding), an MLP to C
    features and an alpha logit; softmax of the alphas over slots = masks; reconstruction = masked sum."""

    def __init__(self, slot_dim: int, out_dim: int, num_tokens: int, hidden: int):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 1, num_tokens, slot_dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_dim + 1))

    def forward(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        out = self.mlp(slots[:, :, None] + self.pos)  # (B, K, N, C + 1)
        masks = out[..., -1].softmax(1)
        return (masks[..., None] * out[..., :-1]).sum(1), masks


class SlotVideoModel(nn.Module):
    """Features (B, T, N, C) -> slots (B, T, K, D), reconstruction (B, T, N, C), decoder masks (B, T, K, N) and
    the grouper's attention masks (B, T, K, N)."""

    def __init__(self, feature_dim: int, num_tokens: int, num_slots: int, slot_dim: int, hidden: int,
                 predictor_heads: int):
        super().__init__()
        self.num_slots = num_slots
        self.input_mlp = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, hidden), nn.ReLU(),
                                       nn.Linear(hidden, slot_dim))
        self.pos = nn.Parameter(torch.randn(1, num_tokens, slot_dim) * 0.02)
        self.slots_mu = nn.Parameter(torch.randn(1, 1, slot_dim) * slot_dim**-0.5)
        self.slots_log_sigma = nn.Parameter(torch.full((1, 1, slot_dim), -1.0))
        self.grouper = SlotAttention(slot_dim, slot_dim, hidden_dim=2 * slot_dim, n_iters=3)
        self.predictor = nn.TransformerEncoderLayer(slot_dim, predictor_heads, 2 * slot_dim, dropout=0.0,
                                                    batch_first=True, norm_first=True)
        self.decoder = MLPDecoder(slot_dim, feature_dim, num_tokens, 2 * hidden)

    def forward(self, features: Tensor) -> dict[str, Tensor]:
        b, t, n, _ = features.shape
        inputs = self.input_mlp(features) + self.pos[:, None]
        noise = torch.randn(b, self.num_slots, self.slots_mu.shape[-1], device=features.device, dtype=inputs.dtype)
        slots = self.slots_mu + self.slots_log_sigma.exp() * noise
        per_frame, attention = [], []
        for frame in range(t):
            grouped = self.grouper(slots, inputs[:, frame], n_iters=3 if frame == 0 else 2)
            per_frame.append(grouped["slots"])
            attention.append(grouped["masks"])
            slots = self.predictor(grouped["slots"])
        slots = torch.stack(per_frame, 1)
        reconstruction, masks = self.decoder(slots.flatten(0, 1))
        return {"slots": slots, "reconstruction": reconstruction.view(b, t, n, -1),
                "masks": masks.view(b, t, self.num_slots, n), "attention": torch.stack(attention, 1)}


def _features(encoder: nn.Module | None, batch: dict[str, Tensor]) -> Tensor:
    return batch["features"] if encoder is None else encoder(batch["video"])


class TeacherTask(nn.Module):
    """Reconstruction + 0.5 x slot contrast (SlotContrast)."""

    def __init__(self, model: SlotVideoModel, encoder: nn.Module | None):
        super().__init__()
        self.model, self.encoder, self.contrast = model, encoder, SlotContrastLoss(temperature=0.1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        features = _features(self.encoder, batch)
        out = self.model(features)
        reconstruction = F.mse_loss(out["reconstruction"], features)
        contrast = self.contrast(out["slots"])
        return {"loss": reconstruction + 0.5 * contrast, "reconstruction": reconstruction, "contrast": contrast}


class StudentTask(nn.Module):
    """Reconstruction + 0.5 x slot contrast + slot matching with the frozen teacher (SlotMatch)."""

    def __init__(self, model: SlotVideoModel, teacher: SlotVideoModel, encoder: nn.Module | None,
                 teacher_dim: int, match_weight: float = 1.0):
        super().__init__()
        self.model, self.encoder, self.match_weight = model, encoder, match_weight
        self.teacher = teacher.requires_grad_(False).eval()
        self.project = nn.Linear(model.slots_mu.shape[-1], teacher_dim)
        self.contrast, self.match = SlotContrastLoss(temperature=0.1), SlotMatchLoss(matching="hungarian")

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        features = _features(self.encoder, batch)
        out = self.model(features)
        with torch.no_grad():
            teacher_slots = self.teacher(features)["slots"]
        reconstruction = F.mse_loss(out["reconstruction"], features)
        contrast = self.contrast(out["slots"])
        match = self.match(self.project(out["slots"]).flatten(0, 1), teacher_slots.flatten(0, 1).to(out["slots"].dtype))
        loss = reconstruction + 0.5 * contrast + self.match_weight * match
        return {"loss": loss, "reconstruction": reconstruction, "contrast": contrast, "slot_match": match}


@torch.no_grad()
def evaluate(model: SlotVideoModel, encoder: nn.Module | None, held_out, device) -> dict[str, float]:
    """Video FG-ARI and mBO (when there are true masks) of the decoder's masks and of the grouper's attention,
    upsampled from the token grid to the frames; the same for the true masks sampled on the token grid (the
    bound of a token-level segmentation); and inference frames per second.

    The initial slots are drawn from a fixed seed (without disturbing the training RNG): scores are repeatable."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        return _evaluate(model, encoder, held_out, device)


def _evaluate(model: SlotVideoModel, encoder: nn.Module | None, held_out, device) -> dict[str, float]:
    model.eval()
    scores: dict[str, list[Tensor]] = {}
    frames, seconds = 0, 0.0
    for batch in data.evaluation_batches(held_out, 16):
        batch = {k: v.to(device) for k, v in batch.items()}
        started = time.perf_counter()
        out = model(_features(encoder, batch))
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - started
        frames += out["masks"].shape[0] * out["masks"].shape[1]
        if "masks" not in batch:
            continue
        true = batch["masks"]
        side = int(out["masks"].shape[-1] ** 0.5)
        # The best a token-level segmentation can do: the true masks sampled on the token grid.
        grid = F.interpolate(true.float(), size=(side, side), mode="nearest").flatten(2)
        for name, labels in (("decoder", out["masks"].argmax(2)), ("attention", out["attention"].argmax(2)),
                             ("token-grid bound", grid.long())):
            pred = F.interpolate(labels.view(*labels.shape[:2], side, side).float(), size=true.shape[-2:],
                                 mode="nearest").long()
            scores.setdefault(f"FG-ARI ({name})", []).append(metrics.fg_ari(true, pred))
            scores.setdefault(f"mBO ({name})", []).append(metrics.mean_best_overlap(true, pred))
    model.train()
    return {"frames/s (inference)": frames / seconds, **{k: float(torch.cat(v).nanmean()) for k, v in scores.items()}}


def datasets(options: Options, settings: Settings):
    if options.data is None:
        size, frames = settings.image_size, settings.frames
        return (data.MovingShapes(settings.train_videos, frames, size, seed=options.seed, split="train"),
                data.MovingShapes(settings.eval_videos, frames, size, seed=options.seed, split="held-out"),
                "moving-shapes (synthetic)")
    real = data.open_video_data(options.data, settings.frames, settings.image_size)
    train, held_out = data.split(real, 0.1, options.seed)
    return train, held_out, options.data


def run(options: Options) -> dict:
    settings, identity, out = prepare(options, "slotmatch", Settings)
    apply_backend(options.backend)
    train, held_out, source = datasets(options, settings)
    sample = train[0]
    encoder = PatchEncoder(settings.patch, settings.feature_dim, seed=options.seed) if "video" in sample else None
    features = _features(encoder, {k: v[None] for k, v in sample.items()})
    num_tokens, feature_dim = features.shape[-2:]
    batches = data.Batches(train, settings.batch_size, seed=options.seed)

    def phase(name: str):
        return config(options, f"slotmatch [{name}]", steps=settings.steps, lr=settings.lr,
                      warmup_steps=settings.warmup_steps, items_per_sample=settings.frames)

    seed_everything(options.seed)
    teacher = SlotVideoModel(feature_dim, num_tokens, settings.slots, **settings.model("teacher"))
    teacher_task = TeacherTask(teacher, encoder)
    rows = []
    if options.teacher is not None:
        step = load_model(teacher_task, options.teacher)
        teacher_row = {"model": "teacher", "trained": f"loaded ({options.teacher}, step {step})"}
        device = distributed.device_for(options.device, distributed.setup(options.device))
        teacher_task.to(device)
    else:
        result = fit(teacher_task, batches, phase("teacher"), out / "teacher", resume=options.resume,
                     settings=identity)
        device = torch.device(result.device)
        teacher_row = {"model": "teacher", "trained": f"{result.step} steps", "train frames/s": result.items_per_s,
                       "final loss": result.final_loss}
    rows.append({**teacher_row, "parameters": parameter_count(teacher), **evaluate(teacher, encoder, held_out, device)})

    seed_everything(options.seed + 1)
    student = SlotVideoModel(feature_dim, num_tokens, settings.slots, **settings.model("student"))
    student_task = StudentTask(student, teacher, encoder, settings.teacher_slot_dim, settings.match_weight)
    result = fit(student_task, batches, phase("student"), out / "student", resume=options.resume, settings=identity)
    rows.append({"model": "student (SlotMatch)", "trained": f"{result.step} steps", "train frames/s": result.items_per_s,
                 "final loss": result.final_loss,
                 "parameters": parameter_count(student), **evaluate(student, encoder, held_out, device)})
    report = {"recipe": "slotmatch", "data": source, "held-out videos": len(held_out), "frames per clip": settings.frames,
              "tokens per frame": num_tokens, "slots": settings.slots, "device": str(device),
              "backend": options.backend or "auto", "world size": result.world,
              "parameter ratio (teacher / student)": rows[0]["parameters"] / rows[1]["parameters"], "rows": rows}
    return finish(report, out, settings)
