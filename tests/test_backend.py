"""Backend selection: explicit requests are strict, KDFAST_BACKEND falls back loudly once, auto is fastest."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from harness import rand

import kdfast
from kdfast import _backend, ops, reference


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())
    monkeypatch.setattr(_backend, "_resolved", {})
    monkeypatch.delenv("KDFAST_BACKEND", raising=False)


def resolve_match_loss(requested, device_type="cpu"):
    return _backend.resolve("slot_match_loss", requested, device_type)


@pytest.mark.skipif(not os.environ.get("CI"), reason="outside CI a machine without a compiler may lack kdfast._C")
def test_ci_has_the_compiled_extension():
    assert _backend.extension_error() is None
    assert resolve_match_loss("auto") == "cpp"


def test_kernel_outputs_are_poisoned_in_tests():
    from kdfast.kernels import _launch

    assert _launch.POISON, "tests must run with KDFAST_POISON=1 so an unwritten output cannot pass"


def test_explicit_backend_is_strict():
    x = rand(2, 3, 4)
    with pytest.raises(ValueError, match=r"backend='cuda' cannot run here: the op has no cuda implementation"):
        ops.slot_match_loss(x, x, backend="cuda")
    with pytest.raises(ValueError, match=r"backend='cpp' cannot run here: the cpp backend runs on cpu tensors"):
        resolve_match_loss("cpp", "cuda")
    with pytest.raises(ValueError, match=r"has no cuda implementation"):
        ops.slot_attention_core(x, x, x, backend="cuda")


def test_unknown_backend_names_its_source(monkeypatch):
    x = rand(2, 3, 4)
    with pytest.raises(ValueError, match=r"backend must be one of auto, triton, cuda, cpp, reference; got 'gpu'"):
        ops.slot_match_loss(x, x, backend="gpu")
    monkeypatch.setenv("KDFAST_BACKEND", "gpu")
    with pytest.raises(ValueError, match=r"KDFAST_BACKEND must be one of"):
        ops.slot_match_loss(x, x)


def test_environment_preference_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "cuda")
    q, k, v = rand(2, 3, 8), rand(2, 5, 8), rand(2, 5, 8)
    with pytest.warns(RuntimeWarning, match=r"slot_attention_core: KDFAST_BACKEND=cuda cannot run here"):
        updates, _ = ops.slot_attention_core(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.slot_attention_core(q, k, v)  # the second call is silent
    torch.testing.assert_close(updates, reference.slot_attention_core(q, k, v)[0])


def test_environment_preference_is_used_where_it_can_run(monkeypatch):
    monkeypatch.setenv("KDFAST_BACKEND", "reference")
    assert resolve_match_loss(None) == "reference"
    if _backend.extension_error() is None:
        monkeypatch.setenv("KDFAST_BACKEND", "cpp")
        assert resolve_match_loss(None) == "cpp"


def test_auto_prefers_compiled_kernels_and_warns_once_when_they_are_missing(monkeypatch):
    if _backend.extension_error() is None:
        assert resolve_match_loss("auto") == "cpp"
    monkeypatch.setattr(_backend, "extension_error", lambda: "no compiler in this test")
    monkeypatch.setattr(_backend, "_resolved", {})
    with pytest.warns(RuntimeWarning, match=r"slot_match_loss: cpp backend unavailable \(no compiler in this test\); using reference"):
        assert resolve_match_loss("auto") == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_match_loss("auto") == "reference"


def test_auto_never_picks_the_triton_interpreter():
    assert resolve_match_loss("auto", "cpu") != "triton"


def test_info_reports_every_backend():
    info = kdfast.info()
    assert set(info) >= {"kdfast", "torch", "devices", "reference", "cpp", "cuda", "triton"}
    assert info["reference"] == "available"


def test_compile_caches_are_keyed_by_the_op_sources():
    """A warm inductor cache must not replay graphs compiled against other fakes of kdfast's ops (a changed output
    dtype would be read as the old one): importing kdfast.ops tags every compile-cache key with their digest."""
    import kdfast.ops  # noqa: F401 - the import tags the caches
    from kdfast.ops import _compile_cache

    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        pytest.skip("this torch has no torch.compiler.config.cache_key_tag (< 2.6)")
    digest = _compile_cache.ops_digest()
    assert len(digest) == 16 and f"kdfast-ops-{digest}" in config.cache_key_tag
    _compile_cache.tag_compile_caches()  # idempotent: the tag is not appended twice
    assert config.cache_key_tag.count("kdfast-ops-") == 1


@pytest.mark.parametrize(("triton_version", "numpy_version", "runs"), [
    ("3.6.0", "2.4.1", False), ("3.7.1", "2.5.0", False), ("3.6.0", "2.3.5", True), ("3.8.0", "2.4.1", True),
    ("3.10.0", "2.5.0", True),
])
def test_interpreter_refuses_numpy_it_cannot_run_with_a_one_line_reason(monkeypatch, triton_version, numpy_version,
                                                                         runs):
    """Triton 3.6's interpreter fails inside kernels that loop to a loaded bound under numpy >= 2.4: the triton
    backend on CPU tensors says so, naming both versions and the fix, instead of a TypeError from a kernel."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _backend.interpreter_error.cache_clear()
    try:
        if runs:
            assert _backend.interpreter_error() is None
            assert resolve_match_loss("triton") == "triton"
            return
        reason = _backend.interpreter_error()
        assert "\n" not in reason and triton_version in reason and numpy_version in reason
        assert "numpy<2.4" in reason and "Triton >= 3.8" in reason
        with pytest.raises(ValueError, match=r"backend='triton' cannot run here: Triton .*'s interpreter"):
            resolve_match_loss("triton")
    finally:
        _backend.interpreter_error.cache_clear()
