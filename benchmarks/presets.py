"""The shapes the benchmarks run at: design.md's presets, written once.

Every bench_<op>.py takes its shapes from here; a preset's name is part of the benchmark ids and of the report's
groups (benchmarks/report.py), so renaming one renames rows of every report after it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class SlotContrastPreset:
    """A SlotContrast config (design.md 3.1): the slot attention grouper's shapes and the training batch."""

    batch: int  # B, per GPU
    frames: int  # T, frames of a training clip (processed frame by frame by the grouper)
    tokens: int  # N, encoder tokens per frame
    inp_dim: int  # width of the encoder features
    slot_dim: int  # D
    slots: int  # K; teachers have as many slots as students


# Batch 64 per GPU, clips of 4 frames. Small enough for the 2-core CPU machines as they are for the slot matching
# and contrastive losses (B, K, D); slot attention runs them at SLOT_ATTENTION_CPU_BATCH there.
SLOTCONTRAST = {
    "movi-c": SlotContrastPreset(batch=64, frames=4, tokens=576, inp_dim=64, slot_dim=64, slots=11),
    "movi-e": SlotContrastPreset(batch=64, frames=4, tokens=576, inp_dim=128, slot_dim=128, slots=15),
    "ytvis": SlotContrastPreset(batch=64, frames=4, tokens=1369, inp_dim=64, slot_dim=64, slots=7),
}
SLOT_ATTENTION_CPU_BATCH = 8

# SlotContrast's temperature of the slot-slot contrastive loss.
CONTRASTIVE_TEMPERATURE = 0.1


@dataclass(frozen=True)
class GiniKLPreset:
    """The penultimate feature map of one of the paper's classifiers (design.md 3.4) and its class count."""

    batch: int  # B
    features: int  # F
    height: int  # H
    width: int  # W
    classes: int  # C


GINI_KL = {
    "resnet50-cifar100": GiniKLPreset(batch=200, features=2048, height=4, width=4, classes=100),
    "resnet18": GiniKLPreset(batch=128, features=512, height=4, width=4, classes=100),
    "imagenet": GiniKLPreset(batch=256, features=2048, height=7, width=7, classes=1000),
}
# On the 2-core CPU machines the ImageNet map (100 MB of float32, ~0.3 s per eager fwd+bwd) is run at a quarter of
# the batch; the CIFAR presets run as they are.
GINI_KL_CPU = {**GINI_KL, "imagenet": replace(GINI_KL["imagenet"], batch=64)}


@dataclass(frozen=True)
class ViTPreset:
    """A ViT's block shapes (design.md 3.3) and the batch it trains at."""

    batch: int  # B
    tokens: int  # T, patches + cls token
    dim: int  # C
    heads: int
    hidden: int  # MLP width


VIT_B16 = ViTPreset(batch=128, tokens=197, dim=768, heads=12, hidden=3072)  # ViT-B/16 at 224
VIT_B16_CPU_BATCH = 4  # M = 788 tokens: a run within minutes on 2 cores
# LoRA ranks: 4 and 16 as PEFT configs commonly use, 128 as WeCoLoRA did (the LoRA GEMMs a quarter of the FLOPs).
LORA_RANKS = {"r4": 4, "r16": 16, "r128": 128}
