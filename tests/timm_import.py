"""Import the real timm beside a CPU-only torch (``from timm_import import timm``).

timm imports torchvision at import time (``FrozenBatchNorm2d``, the data transforms), though its ViT code never
calls a torchvision op. torchvision's wheels on PyPI are linked against the CUDA build of torch: beside the CPU
wheel its C++ library (``torchvision/_C.so``) does not load. torchvision allows that (each C++ op then raises
"Couldn't load custom C++ ops" when called), except that ``torchvision._meta_registrations`` registers fake kernels
for ``torchvision::nms`` and ``torchvision::qnms`` without checking, and that fails because the ops were never
declared. Here the two ops are declared, with the schemas torchvision's C++ library gives them, when and only when
that library does not load; everything imported afterwards is the installed torchvision and timm, unchanged.

That torchvision must not be importable by everything in the environment: transformers (and so peft) imports
torchvision whenever it is installed, and would fail on the same error in any process that did not come through
here. So it is installed in a folder of its own, ``<venv>/timm-torchvision``, which only this module puts on
``sys.path``; a torchvision installed the usual way (one whose C++ library loads) is used as is. Install
(torchvision 0.28 is the release for torch 2.13; ``--no-deps`` keeps pip from replacing the CPU torch)::

    pip install --no-deps timm==1.0.31
    pip install --no-deps --target "$VIRTUAL_ENV/timm-torchvision" torchvision==0.28.0
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import torch

_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_declared: list[torch.library.Library] = []  # kept alive: a Library's definitions go with it


#: The folder of a torchvision that only the timm tests see (see the module docstring).
PRIVATE_TORCHVISION = os.path.join(sys.prefix, "timm-torchvision")


def _torchvision_library_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None and os.path.isdir(PRIVATE_TORCHVISION):
        sys.path.append(PRIVATE_TORCHVISION)
        spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        # torchvision 0.(m + 15) is the release made for torch 2.m (0.26 for 2.11, 0.28 for 2.13).
        release = f"0.{int(torch.__version__.split('.')[1]) + 15}.*"
        raise ImportError(
            f"timm needs torchvision: pip install --no-deps --target {PRIVATE_TORCHVISION} 'torchvision=={release}'"
        )
    # Whether torchvision imports as it is, asked of a fresh interpreter: a load attempted here could fail where
    # torchvision's own succeeds (it first puts its bundled libraries on the loader's path), and declaring the ops
    # before such a load aborts the process (a duplicate registration), as with torch 2.14's CUDA build.
    probe = f"import sys; sys.path.append({PRIVATE_TORCHVISION!r}); import torchvision"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=300).returncode == 0


def _declare_torchvision_ops() -> None:
    if _declared or _torchvision_library_loads():
        return
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        library.define(schema)
    _declared.append(library)


_declare_torchvision_ops()

import timm  # noqa: E402
import timm.layers  # noqa: E402,F401
import timm.models.vision_transformer  # noqa: E402,F401

__all__ = ["timm"]
