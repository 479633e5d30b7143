"""kdfast's functional API: drop-in fused replacements for the eager code of the three papers.

Every function validates its inputs, picks a backend (``backend=`` argument, else ``KDFAST_BACKEND``, else
``auto``) and calls one ``torch.library`` custom op in the ``kdfast`` namespace, with a fake implementation and
an autograd formula, so the ops work under autograd and torch.compile(fullgraph=True).
"""

from kdfast.ops import _autocast
from kdfast.ops._compile_cache import tag_compile_caches
from kdfast.ops.gini_kl import gini_impurity, gini_kl, gini_kl_from_statistics, gini_kl_statistics
from kdfast.ops.lora import lora_attention, lora_linear, lora_qkv
from kdfast.ops.slot_attention import slot_attention, slot_attention_core
from kdfast.ops.slot_contrastive_loss import slot_contrastive_loss
from kdfast.ops.slot_match import slot_assignment, slot_cosine_similarity, slot_match_loss

__all__ = [
    "gini_impurity",
    "gini_kl",
    "gini_kl_from_statistics",
    "gini_kl_statistics",
    "lora_attention",
    "lora_linear",
    "lora_qkv",
    "slot_assignment",
    "slot_attention",
    "slot_attention_core",
    "slot_contrastive_loss",
    "slot_cosine_similarity",
    "slot_match_loss",
]

_autocast.register()
tag_compile_caches()
