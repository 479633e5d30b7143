"""Smoke test of every public op on one device against the float64 reference: values and gradients.

    python benchmarks/gpu_smoke.py --out DIR [--device cuda|cpu] [--tiny]

Each op runs at one design preset (movi-c for the slot ops, one ViT-B/16 block at batch 2 for LoRA, the ResNet-18
map for gini_kl) on every kdfast backend the device has (CUDA: triton and cuda where declared; CPU: cpp and, under
TRITON_INTERPRET=1, triton), in float32 and on CUDA also bfloat16, and is compared with backend="reference" on
float64 copies of the same inputs: relative error ||out - ref|| / ||ref|| of each output and of each input's
gradient (a fixed random incoming gradient) against design.md's tolerance (1e-5 float32, 1e-2 bfloat16).
``--tiny`` runs small shapes (the CI dry run). Writes DIR/smoke.md and DIR/smoke.json; exit status 1 when a
case fails or errors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import kdfast
from benchmarks.presets import GINI_KL, SLOTCONTRAST, VIT_B16
from kdfast import (
    _backend,
    ops,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _rand(*shape, generator):
    x = torch.randn(shape, dtype=torch.float64, generator=generator)
    return torch.where(x.abs() < 1e-3, torch.full_like(x, 1e-3), x)


def cases(tiny: bool, generator):
    """(name, op name in kdfast's tables, function(backend, *tensors), float64 tensors, which get gradients)."""
    p = SLOTCONTRAST["movi-c"]
    B, T, K, N, D = (2, 3, 5, 37, 24) if tiny else (p.batch, p.frames, p.slots, p.tokens, p.slot_dim)
    r = lambda *shape: _rand(*shape, generator=generator)
    # slot attention parameters (videosaur state_dict names), small values as an initialised module has
    params = {"norm_slots.weight": 1 + 0.1 * r(D), "norm_slots.bias": 0.1 * r(D), "to_q.weight": r(D, D) / D**0.5,
              "gru.weight_ih": r(3 * D, D) / D**0.5, "gru.weight_hh": r(3 * D, D) / D**0.5,
              "gru.bias_ih": 0.1 * r(3 * D), "gru.bias_hh": 0.1 * r(3 * D),
              "mlp.layers.0.weight": 1 + 0.1 * r(D), "mlp.layers.0.bias": 0.1 * r(D),
              "mlp.layers.1.weight": r(4 * D, D) / D**0.5, "mlp.layers.1.bias": 0.1 * r(4 * D),
              "mlp.layers.3.weight": r(D, 4 * D) / (2 * D**0.5), "mlp.layers.3.bias": 0.1 * r(D)}
    names = list(params)
    Bv, Tv, C, heads, rank = (2, 9, 32, 2, 4) if tiny else (2, VIT_B16.tokens, VIT_B16.dim, VIT_B16.heads, 16)
    g = GINI_KL["resnet18"]
    Bg, F, H, W, classes = (6, 10, 2, 3, 4) if tiny else (g.batch, g.features, g.height, g.width, g.classes)
    labels = torch.randint(0, classes, (Bg,), generator=generator)

    def lora_pair(out_features, in_features):
        return r(rank, in_features) / in_features**0.5, 0.1 * r(out_features, rank)

    qkv = [*lora_pair(C, C), *lora_pair(C, C), *lora_pair(C, C)]
    return [
        ("slot_cosine_similarity", "slot_cosine_similarity",
         lambda b, x, y: ops.slot_cosine_similarity(x, y, backend=b), [r(B, K, D), r(B, K, D)], [0, 1]),
        ("slot_match_loss[index]", "slot_match_loss",
         lambda b, x, y: ops.slot_match_loss(x, y, backend=b), [r(B, K, D), r(B, K, D)], [0]),
        ("slot_match_loss[hungarian]", "slot_match_loss",
         lambda b, x, y: ops.slot_match_loss(x, y, "hungarian", backend=b), [r(B, K, D), r(B, K + 2, D)], [0]),
        ("slot_assignment", "slot_assignment",
         lambda b, s: ops.slot_assignment(s, backend=b), [r(B, K, K + 2)], []),
        ("slot_contrastive_loss", "slot_contrastive_loss",
         lambda b, s: ops.slot_contrastive_loss(s, backend=b), [r(B, T, K, D)], [0]),
        ("slot_attention_core", "slot_attention_core",
         lambda b, q, k, v: ops.slot_attention_core(q, k, v, backend=b), [r(B, K, D), r(B, N, D), r(B, N, D)],
         [0, 1, 2]),
        ("slot_attention[fused, 3 iterations]", "slot_attention_core",
         lambda b, s, k, v, *w: ops.slot_attention(s, k, v, dict(zip(names, w)), 3, backend=b),
         [r(B, K, D), r(B, N, D), r(B, N, D), *params.values()], list(range(3 + len(names)))),
        ("lora_linear", "lora_linear",
         lambda b, x, w, bias, a, bb: ops.lora_linear(x, w, bias, a, bb, 2.0, backend=b),
         [r(Bv, Tv, C), r(4 * C, C) / C**0.5, r(4 * C), *lora_pair(4 * C, C)], [0, 1, 2, 3, 4]),
        ("lora_qkv", "lora_qkv",
         lambda b, x, w, bias, *l: ops.lora_qkv(x, w, bias, l[0:2], l[2:4], l[4:6], 1.0, heads, backend=b),
         [r(Bv, Tv, C), r(3 * C, C) / C**0.5, r(3 * C), *qkv], list(range(9))),
        ("lora_attention", "lora_qkv",
         lambda b, x, w, bias, wp, bp, *l: ops.lora_attention(x, w, bias, l[0:2], l[2:4], l[4:6], wp, bp, l[6:8], 1.0,
                                                              heads, backend=b),
         [r(Bv, Tv, C), r(3 * C, C) / C**0.5, r(3 * C), r(C, C) / C**0.5, r(C), *qkv, *lora_pair(C, C)],
         list(range(13))),
        ("gini_kl", "gini_kl_statistics",
         lambda b, a: ops.gini_kl(a, labels.to(a.device), classes, backend=b), [r(Bg, F, H, W)], [0]),
        ("gini_kl[uniform, 2-D]", "gini_kl_statistics",
         lambda b, a: ops.gini_kl(a, labels.to(a.device), classes, "uniform", backend=b), [r(Bg, F)], [0]),
    ]


def backends_for(op: str, device: str) -> list[str]:
    declared = _backend.implementations(op)
    wanted = ("triton", "cuda") if device == "cuda" else ("cpp", "triton")
    found = []
    for name in wanted:
        if name not in declared:
            continue
        if name == "triton" and device == "cpu" and not _backend.triton_interpreting():
            continue
        if name == "cpp" and _backend.extension_error():
            continue
        found.append(name)
    return found


def _outputs(result):
    result = (result,) if isinstance(result, torch.Tensor) else tuple(result)
    return [t for t in result if isinstance(t, torch.Tensor)]


def _relative(out, ref):
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape or not torch.isfinite(out).all():
        return float("inf")
    norm = ref.norm().item()
    return (out - ref).norm().item() / (norm if norm > 1e-9 else 1.0)


def run_case(fn, op, inputs64, grad_of, backend, dtype, device, generator):
    """The largest relative error over outputs and gradients, and what it was (for the table)."""
    def evaluate(tensors, which):
        leaves = [t.detach().clone().requires_grad_(i in grad_of) for i, t in enumerate(tensors)]
        outs = _outputs(fn(which, *leaves))
        floating = [o for o in outs if o.is_floating_point()]
        grads = []
        if grad_of:
            weights = [torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7 + i))
                       for i, o in enumerate(floating)]
            total = sum((o.double() * w.to(o.device)).sum() for o, w in zip(floating, weights))
            grads = torch.autograd.grad(total, [leaves[i] for i in grad_of], allow_unused=True)
        return outs, grads

    ref_outs, ref_grads = evaluate([t.to(device) for t in inputs64], "reference")
    outs, grads = evaluate([t.to(device=device, dtype=dtype) for t in inputs64], backend)
    worst, where = 0.0, "-"
    for i, (o, ref) in enumerate(zip(outs, ref_outs)):
        if not o.is_floating_point():  # an assignment: exact
            error = 0.0 if torch.equal(o.cpu(), ref.cpu()) else float("inf")
        else:
            error = _relative(o, ref)
        if error >= worst:
            worst, where = error, f"output {i}"
    for i, (gr, ref) in zip(grad_of, zip(grads, ref_grads)):
        error = 0.0 if gr is None and ref is None else _relative(gr, ref) if gr is not None else float("inf")
        if error >= worst:
            worst, where = error, f"grad of input {i}"
    return worst, where


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="small shapes (the CI dry run)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    dtypes = [torch.float32] + ([torch.bfloat16] if args.device == "cuda" else [])
    rows, failed = [], 0
    for name, op, fn, inputs64, grad_of in cases(args.tiny, torch.Generator().manual_seed(0)):
        for backend in backends_for(op, args.device):
            for dtype in dtypes:
                start = time.perf_counter()
                try:
                    error, where = run_case(fn, op, inputs64, grad_of, backend, dtype, args.device, None)
                    ok = error <= TOLERANCE[dtype]
                    status = "ok" if ok else "FAIL"
                except Exception as exc:  # noqa: BLE001 - one op's failure must not hide the others' results
                    error, where, ok, status = float("nan"), f"{type(exc).__name__}: {exc}"[:300], False, "ERROR"
                    traceback.print_exc()
                failed += not ok
                row = {"op": name, "backend": backend, "dtype": str(dtype).removeprefix("torch."), "status": status,
                       "max_relative_error": error, "where": where, "tolerance": TOLERANCE[dtype],
                       "seconds": round(time.perf_counter() - start, 3)}
                rows.append(row)
                print(f"{status:5} {name} {backend} {row['dtype']}: {error:.3g} ({where})", flush=True)
    header = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "kdfast": kdfast.info(), "tiny": args.tiny}
    (args.out / "smoke.json").write_text(json.dumps({"header": header, "rows": rows}, indent=1, default=str))
    lines = [f"# Smoke test on {header['device']} (torch {torch.__version__})", "",
             "| op | backend | dtype | status | max rel. error | where | tolerance | s |", "|" + " --- |" * 8]
    lines += [f"| {r['op']} | {r['backend']} | {r['dtype']} | {r['status']} | {r['max_relative_error']:.3g} "
              f"| {r['where']} | {r['tolerance']:g} | {r['seconds']} |" for r in rows]
    (args.out / "smoke.md").write_text("\n".join(lines) + "\n")
    print(f"{len(rows) - failed} of {len(rows)} smoke cases pass")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
