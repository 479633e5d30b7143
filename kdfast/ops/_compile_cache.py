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
import importlib.util
from pathlib import Path

import torch

_OPS = Path(__file__).resolve().parent


def _kernels_dir() -> Path | None:
    # kdfast.kernels lives in the repository's kernels/ (setup.py maps it); found without importing Triton
    spec = importlib.util.find_spec("kdfast.kernels")
    return Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None


def ops_digest() -> str:
    """A short hash of kdfast/ops/*.py and the Triton kernel modules (whose layouts some fakes read, such as the
    fused slot attention's saved activations): it changes whenever a custom op's schema, fake or autograd does."""
    digest = hashlib.sha256()
    kernels = _kernels_dir()
    paths = sorted(_OPS.glob("*.py")) + (sorted(kernels.glob("*.py")) if kernels else [])
    for path in paths:
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
