"""Every Triton kernel of kdfast compiled for an H100/H200 (sm_90) without a GPU, at the launches a GPU would make.

The launchers are called on "meta" tensors at the design presets (design.md 3 and 5, benchmarks/presets.py) and at
the edge of each size limit; each ``kernel[grid](...)`` is captured instead of run, so the constexprs (block sizes,
flags), num_warps and num_stages compiled here are exactly the ones the launcher picks for a non-CPU device. The
captured launches are then compiled in a fresh interpreter (no TRITON_INTERPRET) with Triton's bundled ptxas, and
a kernel fails the test when it does not compile, when it asks for more shared memory than an sm_90 block has, or
when it spills more than the budget written next to its launcher (``SM90_SPILL_BUDGET`` in its kernels module).

``python -m pytest -s tests/test_gpu_compile.py`` prints the registers / spills / shared memory table;
``KDFAST_SM90_TABLE=path`` also writes it as markdown (benchmarks/results/sm90-resources.md is that file).

Not checked here: run time, and the compile's pointer-alignment specialisation (the JIT adds ``tt.divisibility``
hints for 16-byte aligned pointers and strides, which can widen loads; these compiles assume no alignment).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

from benchmarks.presets import GINI_KL, LORA_RANKS, SLOTCONTRAST, VIT_B16

# The most shared memory one block may use on an H100/H200 (cudaDevAttrMaxSharedMemoryPerBlockOptin, sm_90).
SM90_SHARED_LIMIT = 232448

MODULES = ["slot_match", "slot_contrastive_loss", "lora", "gini_kl", "slot_attention", "slot_attention_iterations"]

def _module(name):
    return importlib.import_module(f"kdfast.kernels.{name}")


def _kernels_of(module) -> dict:
    """The launchable kernels of a kernels module: its @triton.jit functions named ``*_kernel``."""
    return {name: value for name, value in vars(module).items()
            if name.endswith("_kernel") and isinstance(value, triton.runtime.KernelInterface)}


def budget(module_name: str, kernel: str) -> int:
    return _module(module_name).SM90_SPILL_BUDGET[kernel]


# ----------------------------------------------------------------------------------------------- capture

@dataclass
class Launch:
    """One captured ``kernel[grid](...)``: what a compile needs."""

    module: str
    kernel: str
    signature: dict  # argument name -> Triton type ("*fp32", "i32", "fp64", ...) or "constexpr"
    constexprs: dict
    num_warps: int
    num_stages: int | None
    cases: list = field(default_factory=list)  # the cases that launch it

    def key(self) -> str:
        return json.dumps([self.module, self.kernel, self.signature, self.constexprs, self.num_warps,
                           self.num_stages], sort_keys=True)


_POINTEE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
            torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _scalar_type(value, annotation) -> str:
    text = str(annotation)
    if "float64" in text or text == "fp64":
        return "fp64"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"  # how the JIT types an unannotated Python float
    raise TypeError(f"cannot type argument {value!r}")


def _launch_of(kernel, args, kwargs) -> Launch:
    import inspect

    fn = kernel.fn
    parameters = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in parameters], args))
    bound.update({k: v for k, v in kwargs.items() if k in bound or any(p.name == k for p in parameters)})
    signature, constexprs = {}, {}
    for p in parameters:
        if "constexpr" in str(p.annotation):
            signature[p.name] = "constexpr"
            constexprs[p.name] = bound.get(p.name, p.default)
            continue
        value = bound[p.name]
        if isinstance(value, torch.Tensor):
            signature[p.name] = "*" + _POINTEE[value.dtype]
        else:
            signature[p.name] = _scalar_type(value, p.annotation)
    return Launch(fn.__module__, fn.__name__, signature, constexprs, kwargs.get("num_warps", 4),
                  kwargs.get("num_stages"))


@contextlib.contextmanager
def captured_launches():
    """Within it, every kdfast kernel launch is recorded (as a Launch) and not run."""
    launches = []
    classes = {type(kernel) for name in MODULES for kernel in _kernels_of(_module(name)).values()}
    originals = {cls: cls.run for cls in classes}

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(_launch_of(self, args, kwargs))

    try:
        for cls in classes:
            cls.run = run
        yield launches
    finally:
        for cls, original in originals.items():
            cls.run = original


# ------------------------------------------------------------------------------------------- the launches

def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def slot_match_calls(B, K, D, dtype):
    sm = _module("slot_match")
    a, b = _meta(B, K, D, dtype=dtype), _meta(B, K, D, dtype=dtype)
    assignment = _meta(B, K, dtype=torch.int64)
    sm.slot_cosine_similarity_forward(a, b, 1e-8)
    sm.slot_cosine_similarity_backward(_meta(B, K, K, dtype=dtype), a, b, 1e-8)
    for pairing in (None, assignment):
        sm.slot_match_loss_forward(a, b, pairing, 1e-8)
        sm.slot_match_loss_backward(_meta(B, K, dtype=dtype), a, b, pairing, 1e-8, 1.0 / (B * K))
    if K <= sm.MAX_ASSIGNMENT_SLOTS:
        # the pairing is decided on float32 cosines whatever the loss's dtype (kdfast.ops.slot_match)
        sm.slot_assignment(_meta(B, K, K, dtype=_acc(dtype)))


def slot_contrastive_calls(B, T, K, D, dtype):
    sc = _module("slot_contrastive_loss")
    slots = _meta(B, T, K, D, dtype=dtype)
    for batch_contrast in (True, False):
        sc.slot_contrastive_loss_forward(slots, 0.1, batch_contrast, 1e-12)
        stats = _meta(T - 1, B * K, dtype=_acc(dtype))
        sc.slot_contrastive_loss_backward(_meta(T - 1, B, K, dtype=dtype), slots, stats, stats, 0.1, batch_contrast,
                                          1e-12, 1.0 / ((T - 1) * B * K))


def lora_calls(M, I, O, r, dtype, dropout_p, heads=None):
    lora = _module("lora")
    seed = torch.tensor(1234)
    x2d, weight, bias = _meta(M, I, dtype=dtype), _meta(O, I, dtype=dtype), _meta(O, dtype=dtype)
    a, b = _meta(r, I, dtype=dtype), _meta(O, r, dtype=dtype)
    lora.lora_linear_forward(x2d, weight, bias, a, b, 2.0, dropout_p, seed)
    lora.lora_linear_backward(_meta(M, O, dtype=dtype), x2d, weight, bias, a, b, 2.0, dropout_p, seed, [True] * 5)
    if heads is not None:  # the qkv Linear of a ViT block: O == 3 I
        B, T = 1, M
        x = _meta(B, T, I, dtype=dtype)
        pairs = [(_meta(r, I, dtype=dtype), _meta(I, r, dtype=dtype))] * 3
        lora.lora_qkv_forward(x, _meta(3 * I, I, dtype=dtype), _meta(3 * I, dtype=dtype), pairs, 1.0, heads)
        grads = [_meta(B, heads, T, I // heads, dtype=dtype)] * 3
        lora.lora_qkv_backward(grads, x, _meta(3 * I, I, dtype=dtype), _meta(3 * I, dtype=dtype), pairs, 1.0, heads,
                               [True] * 9)


def gini_kl_calls(B, F, H, W, C, dtype):
    gk = _module("gini_kl")
    activations = _meta(B, F, H, W, dtype=dtype) if H * W > 1 else _meta(B, F, dtype=dtype)
    labels = _meta(B, dtype=torch.int64)
    gk.gini_kl_statistics_forward(activations, labels, C)
    gk.gini_kl_statistics_backward(_meta(C, F, dtype=torch.float64), activations, labels)
    # the table is float64 class sums for every activation dtype (kdfast.ops.gini_kl)
    sums, counts = _meta(C, F, dtype=torch.float64), _meta(C, dtype=torch.int64)
    for uniform in (False, True):
        gk.gini_kl_from_statistics_forward(sums, counts, uniform, 1e-10)
        grad = _meta(dtype=torch.float64)
        gk.gini_kl_from_statistics_backward(grad, grad, sums, counts, uniform, 1e-10, table=None)


def slot_attention_core_calls(B, K, N, D, dtype):
    sa = _module("slot_attention")
    # the geometry a CUDA tensor gets (the launcher reads the device type; meta would get the interpreter's tiles)
    _, block_n, _, _, chunk, *_ = sa._geometry(B, K, N, D, D, dtype, torch.device("cuda"))
    q, k, v = _meta(B, K, D, dtype=dtype), _meta(B, N, D, dtype=dtype), _meta(B, N, D, dtype=dtype)
    updates, _attn, norm = sa.slot_attention_core_forward(q, k, v, D**-0.5, 1e-8, True, block_n, chunk)
    for grad_attn in (_meta(B, K, N, dtype=dtype), None):
        sa.slot_attention_core_backward(_meta(B, K, D, dtype=dtype), grad_attn, q, k, v, updates, norm, D**-0.5, 1e-8,
                                        block_n, chunk)


def slot_attention_iterations_calls(B, K, N, inp, D, dtype, both_hiddens=False):
    it = _module("slot_attention_iterations")
    Dh = 4 * D
    shapes = {"norm_w": (D,), "norm_b": (D,), "wq": (D, D), "bq": None, "w_ih": (3 * D, D), "w_hh": (3 * D, D),
              "b_ih": (3 * D,), "b_hh": (3 * D,), "mlp_norm_w": (D,), "mlp_norm_b": (D,), "w1": (Dh, D), "b1": (Dh,),
              "w3": (D, Dh), "b3": (D,)}
    params = [None if shapes[name] is None else _meta(*shapes[name], dtype=dtype) for name in it.PARAMETERS]
    slots, k, v = _meta(B, K, D, dtype=dtype), _meta(B, N, D, dtype=dtype), _meta(B, N, D, dtype=dtype)
    for hidden_normed in (True, False) if both_hiddens and ALL else (True,):
        _out, _attn, act = it.slot_attention_forward(slots, k, v, params, 3, D**-0.5, 1e-8, 1e-5, hidden_normed, True, 3)
        it.slot_attention_backward(_meta(B, K, D, dtype=dtype), _meta(B, K, N, dtype=dtype), k, v, params, act, 3,
                                   D**-0.5, 1e-8, hidden_normed)


# The compiles take ~3 s each on 2 cores, so CI compiles every geometry once: float32 at every preset, bfloat16 at
# the first preset of each op (the same tiles; the loads and stores convert) and the limits in float32.
# KDFAST_SM90_ALL=1 adds bfloat16 at every preset, float16 at the first and float64 at the limits (what
# benchmarks/results/sm90-resources.md holds; ~10 minutes on 2 cores).
ALL = os.environ.get("KDFAST_SM90_ALL") == "1"
HALF = (torch.float32, torch.bfloat16, torch.float16)


def _dtypes(first: bool):
    if ALL:
        return HALF if first else HALF[:2]
    return HALF[:2] if first else HALF[:1]
NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}


def _cases():
    """(op, case id, call): every design preset in float32 and the half dtypes the op takes, then each limit."""
    cases = []
    for i, (name, p) in enumerate(SLOTCONTRAST.items()):
        for dtype in _dtypes(i == 0):
            tag = f"{name}-{NAMES[dtype]}"
            cases.append(("slot_match", tag, lambda p=p, d=dtype: slot_match_calls(p.batch, p.slots, p.slot_dim, d)))
            cases.append(("slot_contrastive_loss", tag,
                          lambda p=p, d=dtype: slot_contrastive_calls(p.batch, p.frames, p.slots, p.slot_dim, d)))
            cases.append(("slot_attention", tag,
                          lambda p=p, d=dtype: slot_attention_core_calls(p.batch, p.slots, p.tokens, p.slot_dim, d)))
        # the fused iterations take float32 and float64 (half precision is upcast by the op)
        cases.append(("slot_attention_iterations", f"{name}-float32",
                      lambda p=p, i=i: slot_attention_iterations_calls(p.batch, p.slots, p.tokens, p.inp_dim,
                                                                       p.slot_dim, torch.float32, i == 0)))
    M, C = VIT_B16.batch * VIT_B16.tokens, VIT_B16.dim
    for i, (rank_name, r) in enumerate(LORA_RANKS.items()):
        for dtype in _dtypes(i == 0):
            cases.append(("lora", f"vit-b16-qkv-{rank_name}-{NAMES[dtype]}",
                          lambda r=r, d=dtype: lora_calls(M, C, 3 * C, r, d, 0.0, heads=VIT_B16.heads)))
            cases.append(("lora", f"vit-b16-fc1-{rank_name}-dropout-{NAMES[dtype]}",
                          lambda r=r, d=dtype: lora_calls(M, C, VIT_B16.hidden, r, d, 0.1)))
    for i, (name, p) in enumerate(GINI_KL.items()):
        for dtype in _dtypes(i == 0):
            cases.append(("gini_kl", f"{name}-{NAMES[dtype]}",
                          lambda p=p, d=dtype: gini_kl_calls(p.batch, p.features, p.height, p.width, p.classes, d)))

    # The limits: the largest sizes each launcher accepts (its MAX_* constants), in float32 and float64, whose
    # tiles take the most shared memory.
    sm, sc, sa = _module("slot_match"), _module("slot_contrastive_loss"), _module("slot_attention")
    for dtype in (torch.float32, torch.float64) if ALL else (torch.float32,):
        tag = NAMES[dtype]
        cases.append(("slot_match", f"limit-K{sm.MAX_SLOTS}-D1000-{tag}",
                      lambda d=dtype: slot_match_calls(4, sm.MAX_SLOTS, 1000, d)))
        cases.append(("slot_match", f"limit-assignment-K{sm.MAX_ASSIGNMENT_SLOTS}-{tag}",
                      lambda d=dtype: slot_match_calls(4, sm.MAX_ASSIGNMENT_SLOTS, 64, d)))
        cases.append(("slot_contrastive_loss", f"limit-D{sc.MAX_DIM}-{tag}",
                      lambda d=dtype: slot_contrastive_calls(64, 4, 15, sc.MAX_DIM, d)))
        # K x D at the slot tile limit (half as many elements in float64) both ways, and the widest D
        tile = sa.slot_tile_limit(dtype == torch.float64)
        for K, D in ((sa.MAX_SLOTS, tile // sa.MAX_SLOTS), (tile // sa.MAX_DIM, sa.MAX_DIM)):
            cases.append(("slot_attention", f"limit-K{K}-D{D}-{tag}",
                          lambda K=K, D=D, d=dtype: slot_attention_core_calls(8, K, 1369, D, d)))
            cases.append(("slot_attention_iterations", f"limit-K{K}-D{D}-{tag}",
                          lambda K=K, D=D, d=dtype: slot_attention_iterations_calls(8, K, 1369, D, D, d)))
        cases.append(("gini_kl", f"limit-flat-C1000-F32-{tag}", lambda d=dtype: gini_kl_calls(256, 32, 1, 1, 1000, d)))
        cases.append(("lora", f"limit-rank256-{tag}", lambda d=dtype: lora_calls(1000, 768, 768, 256, d, 0.1, heads=12)))
    return cases


CASES = _cases()


# -------------------------------------------------------------------------------------------- compiling

_COMPILE = r"""
import importlib, json, os, re, subprocess, sys, tempfile
from concurrent.futures import ProcessPoolExecutor
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

ARCH = 90
try:  # the ptxas Triton itself runs for this arch (Triton 3.9: ptxas-blackwell for sm_90 and later)
    from triton.backends.nvidia.compiler import get_ptxas
    PTXAS = get_ptxas(ARCH).path
except ImportError:  # Triton 3.6
    from triton import knobs
    PTXAS = knobs.nvidia.ptxas.path

def compile_one(request):
    module, kernel, signature, constexprs, num_warps, num_stages = request
    fn = getattr(importlib.import_module(module), kernel)
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget("cuda", ARCH, 32),
                                  options=options)
    except Exception as error:  # reported per kernel: the test names it
        return {"error": f"{type(error).__name__}: {str(error)[-3000:]}"}
    result = {"shared": compiled.metadata.shared}
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        done = subprocess.run([PTXAS, "-v", f"--gpu-name=sm_{ARCH}a", ptx, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": "ptxas: " + done.stderr[-3000:]}
    info = done.stderr
    # ptxas -v reports every function of the cubin: the entry (the kernel) and any helper it did not inline
    entry = re.search(r"Compiling entry function '([^']+)'", info)
    properties = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", info)
    used = re.search(r"Used (\d+) registers", info[entry.end():]) if entry else None
    if not entry or not used or not properties:
        return {"error": "unreadable ptxas -v output: " + info[-2000:]}
    result.update(registers=int(used.group(1)), stack=max(int(p[0]) for p in properties),
                  spill_stores=sum(int(p[1]) for p in properties), spill_loads=sum(int(p[2]) for p in properties),
                  ptxas=info if os.environ.get("KDFAST_SM90_PTXAS_LOG") else None)
    return result

if __name__ == "__main__":
    requests = json.loads(sys.stdin.read())
    with ProcessPoolExecutor(max_workers=int(sys.argv[1])) as pool:
        print(json.dumps(list(pool.map(compile_one, requests))))
"""


def compile_launches(launches: list[Launch]) -> list[dict]:
    """Compile each launch for sm_90 in fresh interpreters (Triton imported without TRITON_INTERPRET)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    requests = [[launch.module, launch.kernel, launch.signature, launch.constexprs, launch.num_warps,
                 launch.num_stages] for launch in launches]
    script = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"kdfast_sm90_compile_{os.getpid()}.py")
    with open(script, "w") as f:
        f.write(_COMPILE)
    try:
        workers = str(max(1, min(4, os.cpu_count() or 1)))
        done = subprocess.run([sys.executable, script, workers], input=json.dumps(requests), capture_output=True,
                              text=True, env=env, check=False)
    finally:
        os.unlink(script)
    if done.returncode != 0:
        raise RuntimeError(f"the sm_90 compile process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def compiled():
    """Every distinct captured launch and its sm_90 resources, with the cases that make it."""
    unique: dict[str, Launch] = {}
    for op, case, call in CASES:
        with captured_launches() as launches:
            call()
        assert launches, f"{op} {case} launched no kernel"
        for launch in launches:
            unique.setdefault(launch.key(), launch).cases.append(f"{op} {case}")
    launches = list(unique.values())
    results = compile_launches(launches)
    _print_table(launches, results)
    return launches, results


def _short(constexprs: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in constexprs.items())


def _print_table(launches, results):
    lines = [("| kernel | constexprs | dtype | warps | stages | registers | spill stores / loads (B) | stack (B) "
             "| shared (B) | cases |"), "|" + " --- |" * 10]
    for launch, result in sorted(zip(launches, results), key=lambda pair: (pair[0].module, pair[0].kernel)):
        pointers = sorted({t[1:] for t in launch.signature.values() if t.startswith("*")} - {"i64", "i32"})
        if "error" in result:
            row = ["compile error"] + [""] * 4
        else:
            row = [str(result["registers"]), f"{result['spill_stores']} / {result['spill_loads']}",
                   str(result["stack"]), str(result["shared"])]
        lines.append(f"| {launch.kernel} | {_short(launch.constexprs)} | {','.join(pointers)} | {launch.num_warps} "
                     f"| {launch.num_stages if launch.num_stages is not None else 'default'} | " + " | ".join(row)
                     + f" | {'; '.join(launch.cases)} |")
    table = "\n".join(lines)
    print("\n" + table)
    path = os.environ.get("KDFAST_SM90_TABLE")
    if path:
        with open(path, "w") as f:
            f.write(_TABLE_HEADER.format(triton=triton.__version__, torch=torch.__version__) + table + "\n")


_TABLE_HEADER = """# sm_90 resources of every Triton kernel

Compiled for sm_90a without a GPU by tests/test_gpu_compile.py (Triton {triton}, its bundled ptxas; torch {torch}),
at the launches the launchers make for a CUDA tensor at the design presets and at their size limits. Registers,
spill stores / loads and stack frame per thread from `ptxas -v`; shared memory is what the launch asks for
(Triton's metadata; at most 232448 bytes per block on H100/H200). No alignment specialisation is assumed.
Regenerate: `KDFAST_SM90_TABLE=benchmarks/results/sm90-resources.md python -m pytest -q -s tests/test_gpu_compile.py`.

"""


# ---------------------------------------------------------------------------------------------------- tests

def test_every_kernel_is_launched_by_a_case():
    """A kernel that no case launches is a kernel nobody compiled: adding one without a case here fails."""
    launched = set()
    for _, _, call in CASES:
        with captured_launches() as launches:
            call()
        launched.update((launch.module, launch.kernel) for launch in launches)
    missing = [f"{name}.{kernel}" for name in MODULES for kernel in _kernels_of(_module(name))
               if (_module(name).__name__, kernel) not in launched]
    assert not missing, f"kernels no case of tests/test_gpu_compile.py launches: {missing}"


@pytest.mark.parametrize("module_name", MODULES)
def test_kernels_compile_for_sm90_within_budget(compiled, module_name):
    launches, results = compiled
    module = _module(module_name).__name__
    failures = []
    checked = 0
    for launch, result in zip(launches, results):
        if launch.module != module:
            continue
        checked += 1
        where = f"{launch.kernel} [{_short(launch.constexprs)}, warps={launch.num_warps}] for {launch.cases[0]}"
        if "error" in result:
            failures.append(f"{where}: does not compile: {result['error']}")
            continue
        if result["shared"] > SM90_SHARED_LIMIT:
            failures.append(f"{where}: asks for {result['shared']} bytes of shared memory > {SM90_SHARED_LIMIT}")
        allowed = budget(module_name, launch.kernel)
        if result["spill_stores"] is None or result["spill_stores"] > allowed:
            failures.append(f"{where}: spills {result['spill_stores']} bytes > budget {allowed}")
    assert checked, f"no launch of {module} was compiled"
    assert not failures, "\n".join(failures)
