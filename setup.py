"""Builds kdfast, and its C++/CUDA extension kdfast._C against the torch that is installed.

    pip install --no-build-isolation -e .

- C++ CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled; CUDA sources (csrc/cuda/*.cu) only where
  torch has CUDA and a CUDA toolkit is found.
- Without torch in the build environment (pip's isolated builds), without a compiler, or with
  KDFAST_NO_EXTENSION=1, the package installs without the extension and runs on the reference and Triton
  backends; kdfast warns once when it falls back.
- KDFAST_REQUIRE_EXTENSION=1 (CI sets it) makes any of those an error instead, so that a build which drops the
  extension cannot pass for a good one.
- The C++ standard is the one torch's cpp_extension picks for the torch it builds against (C++17 up to torch 2.12,
  C++20 from 2.13, whose headers refuse anything older): kdfast passes no -std of its own.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["kdfast", "kdfast.*"]) + ["kdfast.kernels"]
PACKAGE_DIR = {"kdfast": "kdfast", "kdfast.kernels": "kernels"}


REQUIRE_EXTENSION = os.environ.get("KDFAST_REQUIRE_EXTENSION") == "1"


def _without_extension(reason):
    if REQUIRE_EXTENSION:
        raise RuntimeError(f"kdfast: {reason}, and KDFAST_REQUIRE_EXTENSION=1 asks for the C++ extension")
    warnings.warn(f"kdfast: {reason}; the cpp/cuda backends are unavailable and ops fall back to the reference")
    return {}


def _extension_args():
    if os.environ.get("KDFAST_NO_EXTENSION") == "1":
        return _without_extension("KDFAST_NO_EXTENSION=1")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return _without_extension("torch is not importable at build time (use `pip install --no-build-isolation`)")

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cxx_flags = ["-O3", "-fopenmp"]
    kwargs = {
        "name": "kdfast._C",
        "sources": sources + (cuda_sources if with_cuda else []),
        "include_dirs": [os.path.abspath("csrc")],
        "extra_compile_args": {"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]} if with_cuda else {"cxx": cxx_flags},
        "extra_link_args": ["-fopenmp"],
        "define_macros": [("KDFAST_WITH_CUDA", "1")] if with_cuda else [],
    }
    extension = (cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension)(**kwargs)

    class OptionalBuildExtension(cpp_extension.BuildExtension):
        """A failed compile leaves a working pure-Python install, with the reason printed."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any build failure means "no extension", never no install
                _without_extension(f"building the C++ extension failed ({exc})")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, **_extension_args())
