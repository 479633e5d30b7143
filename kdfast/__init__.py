"""kdfast: fused kernels for knowledge distillation of vision models.

``kdfast.ops`` is the functional API, ``kdfast.nn`` the drop-in modules, ``kdfast.reference`` the plain-PyTorch
specification every backend is tested against. ``kdfast.info()`` says which backends this install has.
"""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # kdfast.patch / kdfast.unpatch, imported on first use so that `import kdfast` stays light. Importing the
    # submodule kdfast/patch.py binds the name `patch` to the module: the function takes the name back (use
    # `from kdfast.patch import ...` for the module's other names).
    if name in ("patch", "unpatch", "PatchReport"):
        import importlib

        module = importlib.import_module("kdfast.patch")
        globals().update(patch=module.patch, unpatch=module.unpatch, PatchReport=module.PatchReport)
        return globals()[name]
    raise AttributeError(f"module 'kdfast' has no attribute {name!r}")


def info() -> dict[str, str]:
    """Backends and versions of this install: each backend maps to "available" or the reason it is not."""
    import importlib

    import torch

    from kdfast import _backend

    triton = _backend.triton_error()
    extension = _backend.extension_error()
    has_cuda = torch.cuda.is_available()
    if triton is None and not has_cuda:
        if _backend.triton_interpreting():
            triton = _backend.interpreter_error() or "interpreter only (TRITON_INTERPRET=1)"
        else:
            triton = "no CUDA device; set TRITON_INTERPRET=1 to run the kernels on CPU"
    return {
        "kdfast": __version__,
        "torch": torch.__version__,
        "triton version": "none" if _backend.triton_error() else importlib.import_module("triton").__version__,
        "devices": "cpu" + (f", cuda ({torch.cuda.get_device_name()})" if has_cuda else ""),
        "reference": "available",
        "cpp": extension or "available",
        "cuda": extension or ("available" if has_cuda else "no CUDA device"),
        "triton": triton or "available",
    }
