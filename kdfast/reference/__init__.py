"""Plain-PyTorch reference implementations of every kdfast op.

This package is the executable specification (design.md section 3) and the test oracle of every fused
kernel. It is written to read like the equations, not to be fast. It is standalone: it imports torch and
nothing from the rest of kdfast (numpy and scipy are imported lazily inside :func:`slot_assignment`).

One module per op family, each with its section of design.md:

* :mod:`.slot_attention` (3.1): the core and its explicit backward, one iteration, the loop; also
  :data:`SLOT_ATTENTION_PARAMS`, the parameter order of kdfast's compiled iteration ops;
* :mod:`.slot_match` (3.2): slot cosine similarity, the Hungarian assignment, the matching loss;
* :mod:`.slot_contrastive_loss` (3.2): SlotContrast's temporal contrastive loss;
* :mod:`.lora` (3.3): LoRA linear, per-slice LoRA qkv, LoRA attention;
* :mod:`.gini_kl` (3.4): Gini impurity and KL, in one call and in two stages (statistics, finish).

Every name is re-exported here: ``kdfast.reference.<name>`` is the way to use them.

Numerics
--------
Every function computes in an *accumulation dtype* (:func:`._common.accumulator_dtype`) and casts its
results back to the input dtype:

* float16 / bfloat16 inputs are upcast to float32 (``.float()``) first,
* float32 stays float32, float64 stays float64 (use float64 for gradcheck and as the oracle).

The gini_kl backward and two-stage functions compute in float64 for every input dtype (see
:func:`gini_kl_backward`). Outputs have the (promoted) floating dtype of the inputs unless a docstring says
otherwise. Autograd flows through everything except where a docstring says "no gradient".

Validation
----------
Shapes, dtypes, devices and values are not checked here: torch's own errors are all a bad input gets (the
public ops in :mod:`kdfast.ops` validate). The one thing checked is a mode argument: an unknown ``matching``
(:func:`slot_match_loss`), ``reduction`` (the losses), ``gru_hidden`` (the slot-attention iteration) or
``target`` (:func:`gini_kl`) raises ValueError.

Notation: B batch, K student/query slots, M teacher slots, N tokens, D feature dim, T frames,
C classes, F features, r LoRA rank. ``<x, y>`` is the dot product over the last axis.
"""

from __future__ import annotations

from .gini_kl import (
    gini_impurity,
    gini_kl,
    gini_kl_backward,
    gini_kl_from_statistics,
    gini_kl_from_statistics_backward,
    gini_kl_statistics,
    gini_kl_statistics_backward,
)
from .lora import lora_attention, lora_linear, lora_qkv
from .slot_attention import (
    LAYER_NORM_EPS,
    SLOT_ATTENTION_PARAMS,
    slot_attention,
    slot_attention_core,
    slot_attention_core_backward,
    slot_attention_step,
)
from .slot_contrastive_loss import CONTRASTIVE_NORMALIZE_EPS, slot_contrastive_loss
from .slot_match import slot_assignment, slot_cosine_similarity, slot_match_loss

__all__ = [
    "CONTRASTIVE_NORMALIZE_EPS",
    "LAYER_NORM_EPS",
    "SLOT_ATTENTION_PARAMS",
    "gini_impurity",
    "gini_kl",
    "gini_kl_backward",
    "gini_kl_from_statistics",
    "gini_kl_from_statistics_backward",
    "gini_kl_statistics",
    "gini_kl_statistics_backward",
    "lora_attention",
    "lora_linear",
    "lora_qkv",
    "slot_assignment",
    "slot_attention",
    "slot_attention_core",
    "slot_attention_core_backward",
    "slot_attention_step",
    "slot_contrastive_loss",
    "slot_cosine_similarity",
    "slot_match_loss",
]
