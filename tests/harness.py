"""Shared test helpers: the (device, backend) cases, fresh random inputs, comparison with the float64 reference."""

from __future__ import annotations

import os

import pytest
import torch

from kdfast import _backend

# Relative error ||out - ref|| / ||ref|| against the float64 reference (design.md section 4).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _cases() -> list:
    """(device, backend) pairs this machine can run; the others are listed as skips with the reason."""
    has_cuda = torch.cuda.is_available()
    cases = []
    for device, backend in [
        ("cpu", "reference"), ("cpu", "cpp"), ("cpu", "triton"),
        ("cuda", "reference"), ("cuda", "triton"), ("cuda", "cuda"),
    ]:
        marks = []
        if device == "cuda" and not has_cuda:
            marks.append(pytest.mark.skip(reason="needs a CUDA device"))
        elif device == "cpu" and backend == "triton" and not _backend.triton_interpreting():
            marks.append(pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))
        elif device == "cpu" and backend == "cpp" and _backend.extension_error() and not os.environ.get("CI"):
            # Outside CI a missing compiler is a skip; in CI the extension must be there, so the test fails.
            marks.append(pytest.mark.skip(reason=_backend.extension_error()))
        cases.append(pytest.param(device, backend, id=f"{device}-{backend}", marks=marks))
    return cases


CASES = _cases()


def implemented_cases(op: str) -> list:
    """The (device, backend) cases of the backends ``op``'s table declares (kdfast._backend)."""
    import kdfast.ops  # noqa: F401 - importing the ops registers their tables

    return [case for case in CASES if case.values[1] in _backend.implementations(op)]


def rand(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Fresh random normal values with no exact zeros, so masks and signs are exercised."""
    x = torch.randn(shape, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 1e-3), x)
    return x.to(dtype=dtype, device=device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (absolute when ref is zero); inf when NaN or inf patterns differ."""
    out64, ref64 = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference shape {tuple(ref64.shape)}")
    if not torch.equal(out64.isnan(), ref64.isnan()) or not torch.isfinite(out64[~ref64.isnan()]).all():
        return float("inf")
    out64, ref64 = out64.nan_to_num(0.0), ref64.nan_to_num(0.0)
    denominator = ref64.norm().item()
    difference = (out64 - ref64).norm().item()
    # An exactly-zero quantity (the gradient of a cosine when D == 1) has only float64 rounding left in ref:
    # there the error is absolute.
    return difference / denominator if denominator > 1e-9 else difference


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output") -> None:
    """Compare with the float64 reference at the tolerance of ``dtype``; NaN never passes unless ref has it."""
    error = relative_error(out, ref)
    assert error <= TOLERANCE[dtype], f"{what}: relative error {error:.3g} > {TOLERANCE[dtype]:g} ({dtype})"


def dtypes(device: str, backend: str) -> list[torch.dtype]:
    """The dtypes a backend is tested in on a device."""
    if device == "cuda":
        return [torch.float32, torch.float16, torch.bfloat16, torch.float64]
    # numpy, which runs the Triton interpreter, has no bfloat16.
    return [torch.float32, torch.float64] + ([] if backend == "triton" else [torch.bfloat16])


# The dtypes a test can be parametrised over, in the order their cases are listed, with their test ids.
DTYPE_IDS = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dtype_params(*dtypes_: torch.dtype, **values: tuple) -> list:
    """pytest params of the given dtypes, each with its id (``float32``, ...), for ``parametrize("dtype", ...)``.

    ``values`` gives one more value per dtype, in the same order, for tests that pair each dtype with something
    (a tolerance, temperatures): ``dtype_params(torch.float32, torch.bfloat16, tol=(1e-5, 2e-2))`` makes the params
    of ``parametrize(("dtype", "tol"), ...)``.
    """
    for name, column in values.items():
        if len(column) != len(dtypes_):
            raise ValueError(f"{name} has {len(column)} values for {len(dtypes_)} dtypes")
    return [pytest.param(dtype, *(column[i] for column in values.values()), id=DTYPE_IDS[dtype])
            for i, dtype in enumerate(dtypes_)]


def _untested_reason(device: str, backend: str, dtype: torch.dtype) -> str:
    if device == "cpu" and backend == "triton" and dtype == torch.bfloat16:
        return "the Triton interpreter runs on numpy, which has no bfloat16"
    return f"{backend} on {device} is not tested in {DTYPE_IDS[dtype]}"


def dtype_cases(cases: list) -> list:
    """(device, backend, dtype) params: each (device, backend) case of ``cases`` times each dtype :func:`dtypes`
    tests it in, with ids like ``cpu-cpp-bfloat16``; for ``parametrize(("device", "backend", "dtype"), ...)``.

    A dtype that another backend is tested in on the same device but this one is not (bfloat16 under the Triton
    interpreter) is listed as a skip with the reason; the case's own marks (no CUDA device, ...) are kept.
    """
    on_device: dict[str, set] = {}
    for case in cases:
        device, backend = case.values
        on_device.setdefault(device, set()).update(dtypes(device, backend))
    params = []
    for case in cases:
        device, backend = case.values
        tested = dtypes(device, backend)
        for dtype in DTYPE_IDS:
            if dtype in tested:
                marks = list(case.marks)
            elif dtype in on_device[device]:
                marks = [*case.marks, pytest.mark.skip(reason=_untested_reason(device, backend, dtype))]
            else:
                continue
            params.append(pytest.param(device, backend, dtype, id=f"{case.id}-{DTYPE_IDS[dtype]}", marks=marks))
    return params


def leaf(x: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    """A fresh autograd leaf with x's values."""
    return x.detach().requires_grad_(requires_grad)


def grads_of(outputs, inputs, grad_outputs):
    """torch.autograd.grad of one output or several, each incoming gradient cast to its output's dtype."""
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    grad_outputs = [grad_outputs] if isinstance(grad_outputs, torch.Tensor) else list(grad_outputs)
    return torch.autograd.grad(outputs, inputs, [g.to(o.dtype) for o, g in zip(outputs, grad_outputs)])


def compile_for_gpu(kernels: list[tuple[str, str, dict, int]], pointer_dtype: str = "fp32", arch: int = 90) -> list[dict]:
    """Compile Triton kernels, each ``(module, kernel name, constexprs, num_warps)``, for an NVIDIA GPU without one,
    with Triton's bundled ptxas.

    Runs in one fresh interpreter without TRITON_INTERPRET (under it the kernels are not compilable objects).
    Pointer arguments (``*_ptr``) point to ``pointer_dtype``, ``scale``/``eps``/``ln_eps`` are float64, every
    other runtime argument is a 32-bit integer. A compile error raises. Returns, per kernel, the shared memory
    the launch asks for ("DYNAMIC_SHARED") and, when Triton ships cuobjdump, the cubin's "REG", "STACK" and
    "SHARED".
    """
    import json
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    request = json.dumps([kernels, pointer_dtype, arch])
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_GPU, request], check=False, capture_output=True, text=True,
                          env=env)
    if done.returncode != 0:
        raise RuntimeError(f"a kernel does not compile for sm_{arch}:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


_COMPILE_FOR_GPU = """
import importlib, json, os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

kernels, pointer_dtype, arch = json.loads(sys.argv[1])
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
results = []
for module, kernel, constexprs, num_warps in kernels:
    fn = getattr(importlib.import_module(module), kernel)
    def arg_type(name):
        if name in constexprs:
            return "constexpr"
        if name.endswith("_ptr"):
            return "*" + pointer_dtype
        return "fp64" if name in ("scale", "eps", "ln_eps") else "i32"
    signature = {name: arg_type(name) for name in fn.arg_names}
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps})
    resources = {"DYNAMIC_SHARED": compiled.metadata.shared}
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True,
                                   text=True).stdout
        resources.update({key: int(value) for key, value in re.findall(r"(REG|STACK|SHARED):(\\d+)", usage)})
    results.append(resources)
print(json.dumps(results))
"""
