"""Triton kernels of kdfast, one module per op; installed as ``kdfast.kernels`` and imported lazily by kdfast.ops.

This folder is never the top-level package ``kernels``. Python puts the working directory (or a script's folder)
first on ``sys.path``, so from a checkout this folder would shadow the PyPI package ``kernels``, which transformers
(and through it peft) imports. When it is imported under that top-level name, it hands the name over: the next
``kernels`` on ``sys.path`` is loaded in its place, or the import fails as if this folder were not there.

Why not a namespace portion (no ``__init__.py``), which a regular package of the same name always beats: setuptools'
editable finder cannot resolve a mapped subpackage (``kdfast.kernels -> kernels/``) that has no ``__init__.py``, so
``pip install -e .`` would lose the kernels.
"""

if __name__ != "kdfast.kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    def _yield_top_level_name(name):
        checkout = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        search_path = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != checkout]
        spec = importlib.machinery.PathFinder.find_spec(name, search_path)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (kdfast's kernels/ folder is kdfast.kernels)",
                                      name=name)
        module = importlib.util.module_from_spec(spec)
        # The import system returns whatever sys.modules holds for the name once this file has run.
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise

    _yield_top_level_name(__name__)
