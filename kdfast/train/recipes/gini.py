"""``kdfast train gini``: a small ResNet trained with CE + Gini + KL (arXiv 2202.07073) against CE alone.

Both runs start from the same seed (same initial weights, same batches); the Gini/KL terms act on the last
stage's activations and switch on after a warm-up of a quarter of the steps (kdfast.nn.GiniKLLoss). The report
gives the held-out accuracy of both runs, the final Gini impurity and KL of the features, and the throughput.
Data: the embedded ``shapes`` (6 classes) or ``--data`` (an ImageFolder directory or a CIFAR-style .npz).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdfast.nn import GiniKLLoss
from kdfast.train import data
from kdfast.train.loop import fit
from kdfast.train.recipes._common import (Options, apply_backend, config, finish, parameter_count, prepare,
                                          seed_everything)
from kdfast.train.recipes._settings import setting

STEPS, BATCH_SIZE, LR, IMAGE_SIZE, EVAL_SAMPLES = 300, 64, 2e-3, 32, 1000


@dataclass
class Settings:
    """The gini recipe's sizes and schedule (``kdfast train gini --set key=value``)."""

    MAY_BE_ZERO = ("warmup_steps", "checkpoint_every", "gini_weight", "kl_weight")

    steps: int = setting(STEPS, "optimiser steps of each run")
    batch_size: int = setting(BATCH_SIZE, "global batch size")
    lr: float = setting(LR, "peak learning rate (AdamW)")
    warmup_steps: int = setting(20, "linear warm-up steps")
    checkpoint_every: int = setting(100, "steps between checkpoints (0: at the end and when stopped only)")
    image_size: int = setting(IMAGE_SIZE, "image side in pixels (--data images are resized to it)")
    widths: tuple[int, ...] = setting((16, 32, 64), "channels of the ResNet's stages")
    train_samples: int = setting(10_000, "synthetic training images")
    eval_samples: int = setting(EVAL_SAMPLES, "synthetic held-out images")
    gini_weight: float = setting(0.5, "weight of the Gini term")
    kl_weight: float = setting(0.5, "weight of the KL term")


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A small ResNet: a strided 3x3 stem and one basic block per stage. forward: (B, 3, H, W) -> (logits (B, C),
    the last stage's activations (B, F, H/8, W/8))."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        # A strided stem (32x32 -> 16x16) keeps a 2-core CPU run to minutes; the last stage is 4x4, as on CIFAR.
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stages = nn.Sequential(*[_Block(widths[max(0, i - 1)], w, 1 if i == 0 else 2) for i, w in enumerate(widths)])
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        features = self.stages(self.stem(images))
        return self.head(features.mean((2, 3))), features


class ClassifierTask(nn.Module):
    """CE, plus GiniKLLoss on the last stage's activations when ``criterion`` is given."""

    def __init__(self, net: SmallResNet, criterion: GiniKLLoss | None = None):
        super().__init__()
        self.net, self.criterion = net, criterion

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits, features = self.net(batch["image"])
        labels = batch["label"]
        ce = F.cross_entropy(logits, labels)
        outputs = {"ce": ce, "accuracy": (logits.argmax(1) == labels).float().mean()}
        loss = ce
        if self.criterion is not None:
            loss = loss + self.criterion(features.float(), labels)
            outputs.update(gini=self.criterion.gini, kl=self.criterion.kl)
        outputs["loss"] = loss
        return outputs


@torch.no_grad()
def evaluate(net: SmallResNet, held_out, num_classes: int, device) -> dict[str, float]:
    """Held-out accuracy, and the Gini impurity and KL of the last stage's activations over the whole set."""
    net.eval()
    correct, total, features, labels = 0, 0, [], []
    for batch in data.evaluation_batches(held_out, 256):
        logits, f = net(batch["image"].to(device))
        correct += int((logits.argmax(1).cpu() == batch["label"]).sum())
        total += len(batch["label"])
        features.append(f.float().abs().mean((2, 3)).cpu())
        labels.append(batch["label"])
    net.train()
    criterion = GiniKLLoss(num_classes).eval()
    criterion(torch.cat(features), torch.cat(labels))
    return {"accuracy": correct / total, "gini": float(criterion.gini), "kl": float(criterion.kl)}


def datasets(options: Options, settings: Settings):
    if options.data is None:
        return (data.Shapes(num_samples=settings.train_samples, size=settings.image_size, seed=options.seed,
                            split="train"),
                data.Shapes(num_samples=settings.eval_samples, size=settings.image_size, seed=options.seed,
                            split="held-out"),
                data.Shapes.num_classes, "shapes (synthetic)")
    real = data.open_image_data(options.data, settings.image_size)
    train, held_out = data.split(real, 0.1, options.seed)
    return train, held_out, real.num_classes, options.data


def run(options: Options) -> dict:
    if options.teacher is not None:
        raise ValueError("--teacher: the gini recipe trains no teacher (it compares CE + Gini/KL with CE alone)")
    settings, identity, out = prepare(options, "gini", Settings)
    apply_backend(options.backend)
    train, held_out, num_classes, source = datasets(options, settings)
    batches = data.Batches(train, settings.batch_size, seed=options.seed)
    rows = []
    for name, with_gini in (("ce", False), ("ce+gini+kl", True)):
        seed_everything(options.seed)  # same initial weights and batches for both runs
        net = SmallResNet(num_classes, settings.widths)
        cfg = config(options, f"gini [{name}]", steps=settings.steps, lr=settings.lr,
                     warmup_steps=settings.warmup_steps, log_every=10)
        criterion = (GiniKLLoss(num_classes, settings.gini_weight, settings.kl_weight, warmup_steps=cfg.steps // 4,
                                sync_ddp=True) if with_gini else None)
        result = fit(ClassifierTask(net, criterion), batches, cfg, out / name, resume=options.resume,
                     settings=identity)
        scores = evaluate(net, held_out, num_classes, result.device)
        rows.append({"run": name, "held-out accuracy": scores["accuracy"], "feature gini": scores["gini"],
                     "feature kl": scores["kl"], "final train loss": result.final_loss,
                     "images/s": result.items_per_s, "steps": result.step})
    report = {"recipe": "gini", "data": source, "classes": num_classes, "held-out samples": len(held_out),
              "parameters": parameter_count(SmallResNet(num_classes, settings.widths)), "device": result.device,
              "backend": options.backend or "auto", "world size": result.world,
              "accuracy gain (ce+gini+kl - ce)": rows[1]["held-out accuracy"] - rows[0]["held-out accuracy"],
              "rows": rows}
    return finish(report, out, settings)
