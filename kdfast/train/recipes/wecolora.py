"""``kdfast train wecolora``: weight copy + LoRA few-shot distillation of a ViT (WeCoLoRA).

The teacher is kdfast.models.VisionTransformer trained briefly on ``shapes`` (CE; by default the shapes are
centred: a ViT trained from scratch for a minute probes only ~0.27 on shapes anywhere in the image, 0.95 on centred
ones, see /work/shared/findings/recipes.md), a kdfast checkpoint of that
teacher (``--teacher run/teacher/checkpoint.pt``), or a timm model (``--teacher timm:<name>``, needs timm; images
are resized to its input size). The student is kdfast.wecolora.build_student (every other block kept, LoRA on
q, k, v, proj, fc1, fc2; only the adapters train), trained on a few-shot subset with the L1 feature loss on the
last block's output. The report gives, on held-out images, the feature error against the teacher and the
linear-probe accuracy of the average-pooled final tokens, for the teacher, the weight-copy-only student and the
LoRA student, and (``plain_lora``) a student with LoRA on q and v only (plain LoRA, the paper's ablation).
It writes ``curves.png`` and ends with a few sentences of what was shown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.models.vit import VisionTransformer
from kdfast.train import data, distributed, pictures
from kdfast.train.loop import fit, load_model
from kdfast.train.recipes._common import (Options, apply_backend, config, finish, parameter_count, prepare,
                                          seed_everything)
from kdfast.train.recipes._settings import setting
from kdfast.wecolora import build_student, feature_distillation_loss, last_block_output

TEACHER_STEPS, STUDENT_STEPS, BATCH_SIZE, IMAGE_SIZE = 750, 600, 64, 32
# 166 images per class: ~10% of the training set. The few-shot set size decides the gap (findings: 96 images gave
# +0.02 over weight copy, 498 gave +0.10, 996 gave +0.105).
FEW_SHOT_PER_CLASS, PROBE_TRAIN, HELD_OUT, REDUCTION, RANK = 166, 600, 600, 2, 8
VIT = {"img_size": IMAGE_SIZE, "patch_size": 8, "embed_dim": 64, "depth": 6, "num_heads": 2}
# A ViT trained from scratch for a few minutes needs an easier task than the gini recipe's shapes to learn at all.
EASY_SHAPES = {"noise": 0.05, "radius": (0.25, 0.45)}


@dataclass
class Settings:
    """The wecolora recipe's sizes and schedule (``kdfast train wecolora --set key=value``)."""

    MAY_BE_ZERO = ("teacher_warmup_steps", "student_warmup_steps", "checkpoint_every", "weight_decay", "jitter")
    STEP_FIELDS = ("teacher_steps", "student_steps")  # what --steps sets
    LR_FIELDS = ("teacher_lr", "student_lr")  # what --lr sets

    teacher_steps: int = setting(TEACHER_STEPS, "optimiser steps of the teacher")
    student_steps: int = setting(STUDENT_STEPS, "optimiser steps of the student")
    batch_size: int = setting(BATCH_SIZE, "global batch size")
    teacher_lr: float = setting(1e-3, "teacher's peak learning rate (2e-3 did not learn in 320 steps)")
    student_lr: float = setting(2e-3, "student's peak learning rate")
    teacher_warmup_steps: int = setting(50, "teacher's linear warm-up steps")
    student_warmup_steps: int = setting(20, "student's linear warm-up steps")
    weight_decay: float = setting(0.05, "teacher's AdamW weight decay")
    checkpoint_every: int = setting(100, "steps between checkpoints (0: at the end and when stopped only)")
    image_size: int = setting(IMAGE_SIZE, "image side in pixels (--data images are resized to it)")
    patch_size: int = setting(VIT["patch_size"], "ViT patch side")
    embed_dim: int = setting(VIT["embed_dim"], "ViT width")
    depth: int = setting(VIT["depth"], "ViT blocks of the teacher")
    num_heads: int = setting(VIT["num_heads"], "ViT attention heads")
    train_samples: int = setting(10_000, "synthetic training images")
    few_shot_per_class: int = setting(FEW_SHOT_PER_CLASS, "distillation images per class")
    probe_train: int = setting(PROBE_TRAIN, "synthetic images the linear probe trains on")
    held_out: int = setting(HELD_OUT, "synthetic held-out images")
    reduction: int = setting(REDUCTION, "the student keeps every reduction-th block")
    rank: int = setting(RANK, "LoRA rank")
    centred: bool = setting(True, "synthetic shapes near the image centre (false: anywhere)")
    jitter: float = setting(0.0, "with centred: largest offset of a shape's centre from the image centre (pixels)")
    plain_lora: bool = setting(True, "also train a student with LoRA on q and v only (plain LoRA)")
    pictures: bool = setting(True, "write curves.png")

    def check(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"--set image_size={self.image_size}: must be a multiple of patch_size ({self.patch_size})")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"--set embed_dim={self.embed_dim}: must be a multiple of num_heads ({self.num_heads})")
        if self.reduction > self.depth:
            raise ValueError(f"--set reduction={self.reduction}: must be <= depth ({self.depth})")

    def vit(self) -> dict[str, int]:
        return {"img_size": self.image_size, "patch_size": self.patch_size, "embed_dim": self.embed_dim,
                "depth": self.depth, "num_heads": self.num_heads}


class _Resize(nn.Module):
    """Resizes images to a model's input size (timm teachers at 224)."""

    def __init__(self, model: nn.Module, size: int | None):
        super().__init__()
        self.model, self.size = model, size

    def forward(self, images: Tensor) -> Tensor:
        if self.size is not None and images.shape[-1] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return images


class ClassifierTask(nn.Module):
    """CE of the teacher's head on the average-pooled final tokens (timm's ``global_pool="avg"``): a ViT trained
    from scratch for a few hundred steps learns much faster from pooled tokens than from its class token."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.model.head(self.model.forward_features(batch["image"]).mean(1))
        return {"loss": F.cross_entropy(logits, batch["label"]),
                "accuracy": (logits.argmax(1) == batch["label"]).float().mean()}


class DistillTask(nn.Module):
    """WeCoLoRA's objective: L1 between the student's and the frozen teacher's last block outputs."""

    def __init__(self, student: nn.Module, teacher: nn.Module, size: int | None):
        super().__init__()
        self.student, self.teacher, self.resize = student, teacher.requires_grad_(False).eval(), _Resize(teacher, size)

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = self.resize(batch["image"])
        with torch.no_grad():
            target = last_block_output(self.teacher, images)
        return {"loss": feature_distillation_loss(last_block_output(self.student, images), target)}


def _teacher(options: Options, settings: Settings, num_classes: int) -> tuple[nn.Module, int | None, str]:
    """The teacher model, the image size it needs (None: the data's), and how it was obtained."""
    spec = options.teacher
    if spec is not None and spec.startswith("timm:"):
        try:
            import timm
        except ImportError as exc:
            raise ImportError("--teacher timm:<name> needs timm (pip install timm)") from exc
        model = timm.create_model(spec.removeprefix("timm:"), pretrained=True, num_classes=num_classes)
        return model, model.patch_embed.img_size[0], f"timm {spec.removeprefix('timm:')} (pretrained)"
    return VisionTransformer(num_classes=num_classes, **settings.vit()), None, "kdfast ViT"


@torch.no_grad()
def _features(model: nn.Module, resize: _Resize, dataset, device) -> tuple[Tensor, Tensor, Tensor]:
    """Last-block tokens (for the feature error), pooled normalised tokens (for the probe), labels."""
    model.eval()
    tokens, cls, labels = [], [], []
    for batch in data.evaluation_batches(dataset, 128):
        images = resize(batch["image"].to(device))
        blocks = last_block_output(model, images)
        tokens.append(blocks.float().cpu())
        cls.append(model.norm(blocks).mean(1).float().cpu())  # average-pooled tokens: robust for a small teacher
        labels.append(batch["label"])
    return torch.cat(tokens), torch.cat(cls), torch.cat(labels)


def linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int) -> float:
    """Accuracy of a logistic-regression probe (full-batch L-BFGS, standardised features, light L2)."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = nn.Linear(train_x.shape[1], num_classes)
    optimizer = torch.optim.LBFGS(probe.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(probe(train_x), train_y) + 1e-3 * probe.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float((probe(test_x).argmax(1) == test_y).float().mean())


def _few_shot(dataset, num_classes: int, per_class: int) -> data.TensorDataset:
    chosen, counts = [], [0] * num_classes
    for i in range(len(dataset)):
        label = int(dataset[i]["label"])
        if counts[label] < per_class:
            chosen.append(dataset[i])
            counts[label] += 1
        if len(chosen) == per_class * num_classes:
            break
    return data.TensorDataset(**data.collate(chosen))


def datasets(options: Options, settings: Settings):
    if options.data is None:
        shapes, size = data.Shapes.num_classes, settings.image_size
        easy = {**EASY_SHAPES, "jitter": settings.jitter if settings.centred else None}
        where = f"within {settings.jitter:g} px of the centre" if settings.centred else "anywhere"
        return (data.Shapes(settings.train_samples, size, seed=options.seed, split="train", **easy),
                data.Shapes(settings.probe_train + settings.held_out, size, seed=options.seed, split="held-out",
                            **easy), shapes, f"shapes (synthetic; larger shapes, less noise, {where})")
    real = data.open_image_data(options.data, settings.image_size)
    train, held_out = data.split(real, 0.3, options.seed)
    return train, held_out, real.num_classes, options.data


def run(options: Options) -> dict:
    started = time.perf_counter()
    settings, identity, out = prepare(options, "wecolora", Settings)
    apply_backend(options.backend)
    train, evaluation, num_classes, source = datasets(options, settings)
    split_at = len(evaluation) // 2
    probe_train = torch.utils.data.Subset(evaluation, range(split_at))
    held_out = torch.utils.data.Subset(evaluation, range(split_at, len(evaluation)))
    batch_size = settings.batch_size

    seed_everything(options.seed)
    teacher, size, origin = _teacher(options, settings, num_classes)
    teacher_task = ClassifierTask(teacher)
    if options.teacher is None:
        cfg = config(options, "wecolora [teacher]", steps=settings.teacher_steps, lr=settings.teacher_lr,
                     warmup_steps=settings.teacher_warmup_steps, weight_decay=settings.weight_decay)
        result = fit(teacher_task, data.Batches(train, batch_size, options.seed), cfg, out / "teacher",
                     resume=options.resume, settings=identity)
        origin, device = f"kdfast ViT trained {result.step} steps (CE)", torch.device(result.device)
    else:
        if not options.teacher.startswith("timm:"):
            step = load_model(teacher_task, Path(options.teacher))
            origin = f"kdfast ViT loaded from {options.teacher} (step {step})"
        device = distributed.device_for(options.device, distributed.setup(options.device))
        teacher.to(device)

    few_shot = _few_shot(train, num_classes, settings.few_shot_per_class)
    weight_copy = build_student(teacher, settings.reduction, settings.rank).to(device)  # B = 0: the weight copy
    students = [("WeCoLoRA student", "student", None)]
    if settings.plain_lora:
        students.append(("LoRA on q, v only", "student_qv", ("lora_A.q", "lora_B.q", "lora_A.v", "lora_B.v")))
    trained = []
    for name, folder, only in students:
        student = build_student(teacher, settings.reduction, settings.rank).to(device)
        if only is not None:  # plain LoRA: the other adapters stay frozen at B = 0 (they add nothing)
            for key, p in student.named_parameters():
                if p.requires_grad and not any(f".attn.{o}." in key for o in only):
                    p.requires_grad_(False)
        cfg = config(options, f"wecolora [{folder}]", steps=settings.student_steps, lr=settings.student_lr,
                     warmup_steps=settings.student_warmup_steps)
        result = fit(DistillTask(student, teacher, size),
                     data.Batches(few_shot, min(batch_size, len(few_shot)), options.seed), cfg, out / folder,
                     resume=options.resume, settings=identity)
        trained.append((name, student, result))

    resize = _Resize(teacher, size)
    teacher_tokens, *_ = _features(teacher, resize, held_out, device)
    rows = []
    models = [("teacher", teacher), ("weight copy only", weight_copy), *[(n, m) for n, m, _ in trained]]
    for name, model in models:
        tokens, x_test, y_test = _features(model, resize, held_out, device)
        _, x_train, y_train = _features(model, resize, probe_train, device)
        rows.append({"model": name, "blocks": len(model.blocks), "parameters": parameter_count(model),
                     "trainable": parameter_count(model, trainable_only=True) if name != "teacher" else None,
                     "feature L1 to teacher": float((tokens - teacher_tokens).abs().mean()),
                     "linear-probe accuracy": linear_probe(x_train, y_train, x_test, y_test, num_classes)})
    result = trained[0][2]
    report = {"recipe": "wecolora", "data": source, "teacher": origin, "few-shot images": len(few_shot),
              "probe train / held-out images": f"{len(probe_train)} / {len(held_out)}",
              "reduction factor": settings.reduction, "LoRA rank": settings.rank, "device": str(device),
              "backend": options.backend or "auto", "world size": result.world,
              "student distillation images/s": result.items_per_s, "rows": rows}
    report["pictures"] = []
    if settings.pictures and distributed.Context().is_main:
        series = {} if options.teacher is not None else {"teacher (CE)": out / "teacher" / "metrics.jsonl"}
        series.update({name + " (L1)": out / folder / "metrics.jsonl" for name, folder, _ in students})
        picture = pictures.curves(out, series, "wecolora: training loss")
        report["pictures"] = [picture.name] if picture else []
    seconds = time.perf_counter() - started
    teacher_row, copy_row, student_row = rows[:3]
    probe = "linear-probe accuracy"
    report["summary"] = {"probe_teacher": teacher_row[probe], "probe_weight_copy": copy_row[probe],
                         "probe_wecolora": student_row[probe],
                         "feature_l1_weight_copy": copy_row["feature L1 to teacher"],
                         "feature_l1_wecolora": student_row["feature L1 to teacher"], "seconds": seconds}
    qv = ""
    if settings.plain_lora:
        report["summary"]["probe_lora_qv"] = rows[3][probe]
        report["summary"]["feature_l1_lora_qv"] = rows[3]["feature L1 to teacher"]
        qv = f" LoRA on q and v only reaches {rows[3][probe]:.2f} (feature L1 {rows[3]['feature L1 to teacher']:.3f})."
    report["conclusion"] = (
        f"The teacher probes {teacher_row[probe]:.2f} on {len(held_out)} held-out images. Keeping one block in "
        f"{settings.reduction} (weight copy alone) drops the probe to {copy_row[probe]:.2f} (feature L1 "
        f"{copy_row['feature L1 to teacher']:.3f}); training LoRA on q, k, v, proj, fc1 and fc2 on {len(few_shot)} "
        f"images (WeCoLoRA) brings it to {student_row[probe]:.2f} (feature L1 "
        f"{student_row['feature L1 to teacher']:.3f}), {student_row[probe] - copy_row[probe]:+.2f} over weight copy."
        f"{qv}")
    report["wall seconds"] = seconds
    return finish(report, out, settings)
