"""Builds kdfast, and its C++/CUDA extension kdfast._C against the torch that is installed.

    pip install --no-build-isolation -e .

- C++ CPU sources (csrc/*.cpp, csrc/cpu/*.cpp) are always compiled; CUDA sources (csrc/cuda/*.cu) only where
  torch has CUDA and a CUDA toolkit is found.
- Without torch in the build environment (pip's isolated builds), without a compiler, or with
  KDFAST_NO_EXTENSION=1, the package installs without the extension and runs on the reference and Triton
  backends; kdfast warns once when it falls back.
"""

import glob
import os
import warnings

from setuptools import find_packages, setup

PACKAGES = find_packages(include=["kdfast", "kdfast.*"]) + ["kdfast.kernels"]
PACKAGE_DIR = {"kdfast": "kdfast", "kdfast.kernels": "kernels"}


def _extension_args():
    if os.environ.get("KDFAST_NO_EXTENSION") == "1":
        return {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("kdfast: torch is not importable at build time; installing without the C++ extension "
                      "(use `pip install --no-build-isolation`)")
        return {}

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
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
                warnings.warn(f"kdfast: building the C++ extension failed ({exc}); the cpp/cuda backends are "
                              "unavailable and ops fall back to the reference")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}}


setup(packages=PACKAGES, package_dir=PACKAGE_DIR, **_extension_args())
