"""Keep torch.compile's on-disk caches from serving graphs compiled against another version of kdfast's ops.

Inductor's FX graph cache keys a graph by its code and its inputs' metadata, not by the fake (meta)
implementations of the custom ops inside it. When an op's fake changes the dtype or shape of an intermediate (as
``gini_kl_statistics``'s class sums did, float32 -> float64), a warm cache would replay kernels compiled for the
old metadata on the new outputs: silently wrong numbers. Adding a digest of the op sources to
``torch.compiler.config.cache_key_tag`` (torch >= 2.6; older versions have no such tag) puts kdfast's version in
every cache key, so a change to the ops is a cache miss.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

_OPS = Path(__file__).resolve().parent


def ops_digest() -> str:
    """A short hash of kdfast/ops/*.py: it changes whenever a custom op's schema, fake or autograd does."""
    digest = hashlib.sha256()
    for path in sorted(_OPS.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def tag_compile_caches() -> None:
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    tag = f"kdfast-ops-{ops_digest()}"
    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag};{tag}" if config.cache_key_tag else tag
