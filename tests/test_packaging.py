"""How kdfast installs and imports: the in-tree kernels/ never takes the top-level name `kernels` (a PyPI package
that transformers, and through it peft, imports), the wheel ships the kernels as kdfast.kernels only, and a build
asked to require the C++ extension fails rather than install without it.

Each check runs in a fresh interpreter started from the repository root, where Python puts the checkout first on
sys.path: the situation in which the folder could shadow an installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_from_root(code: str, extra_path: Path | None = None, *flags: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def assert_ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.fixture
def stand_in(tmp_path):
    """A folder holding a top-level package `kernels` that is not kdfast's."""
    package = tmp_path / "kernels"
    package.mkdir()
    (package / "__init__.py").write_text("STAND_IN = 'the installed kernels'\n")
    return tmp_path


def test_import_kernels_gives_the_installed_package_not_the_checkout(stand_in):
    assert_ran(run_from_root(
        "import kernels, sys\n"
        "assert getattr(kernels, 'STAND_IN', None) == 'the installed kernels', kernels\n"
        "assert sys.modules['kernels'] is kernels\n",
        stand_in,
    ))


def test_kdfast_kernels_import_and_run_beside_a_top_level_kernels(stand_in):
    assert_ran(run_from_root(
        "import torch, kernels, kdfast.ops as ops, kdfast.reference as ref\n"
        "import kdfast.kernels.slot_match as launchers\n"
        "assert launchers.__file__.startswith(%r), launchers.__file__\n"
        "assert kernels.STAND_IN == 'the installed kernels'\n"
        "a, b = torch.randn(2, 3, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)\n"
        "out = ops.slot_cosine_similarity(a, b, backend='triton')\n"
        "torch.testing.assert_close(out, ref.slot_cosine_similarity(a, b), rtol=1e-12, atol=1e-12)\n"
        % str(ROOT / "kernels"),
        stand_in,
    ))


def test_import_peft_from_the_checkout_gets_the_installed_kernels():
    """peft imports transformers, which imports the PyPI package `kernels` (CUDAProperties among others)."""
    assert_ran(run_from_root(
        "import peft, kdfast.ops, kernels, importlib.metadata as md\n"
        "from pathlib import Path\n"
        "where = Path(kernels.__file__).resolve()\n"
        "assert not where.is_relative_to(%r), where\n"
        "assert where.is_relative_to(Path(md.distribution('kernels').locate_file('')).resolve()), where\n"
        % str(ROOT / "kernels"),
    ))


def test_without_an_installed_kernels_the_checkout_folder_is_no_top_level_package():
    # -S: no site-packages, so nothing but the checkout could answer `import kernels`
    result = run_from_root("import kernels", None, "-S")
    assert result.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in result.stderr, result.stderr


def _build_wheel(tmp_path: Path, **env_vars: str) -> subprocess.CompletedProcess:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("kdfast", "kernels", "csrc"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    env = {k: v for k, v in os.environ.items() if not k.startswith("KDFAST_")} | env_vars
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
         str(source)],
        env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_the_wheel_has_no_top_level_kernels(tmp_path):
    built = _build_wheel(tmp_path, KDFAST_NO_EXTENSION="1")
    assert_ran(built)
    (wheel,) = (tmp_path / "dist").glob("kdfast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert "kernels" not in top_level, sorted(top_level)
    assert {"kdfast/kernels/__init__.py", "kdfast/kernels/slot_match.py", "kdfast/kernels/_launch.py"} <= set(names)
    assert not any(name.startswith("kdfast/tests") or name.startswith("kdfast/benchmarks") for name in names)


@pytest.mark.slow
def test_a_build_that_must_have_the_extension_fails_without_it(tmp_path):
    built = _build_wheel(tmp_path, KDFAST_NO_EXTENSION="1", KDFAST_REQUIRE_EXTENSION="1")
    assert built.returncode != 0
    assert "KDFAST_REQUIRE_EXTENSION=1 asks for the C++ extension" in built.stdout + built.stderr
