"""The ``kdfast`` command (also ``python -m kdfast``).

    kdfast train <recipe> [--steps N] [--batch-size B] [--device auto|cpu|cuda] [--backend auto|reference|...]
                          [--data PATH] [--out DIR] [--resume] [--seed S] [--amp auto|off|bf16|fp16]
                          [--lr LR] [--teacher PATH_OR_NAME] [--no-progress]
    kdfast bench [report.py options]     the benchmark report (benchmarks/report.py of a source checkout)
    kdfast info                          backends available, devices, versions

Recipes: slotmatch, wecolora, gini (kdfast.train.recipes). Under torchrun, ``kdfast train`` trains with DDP.
"""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
from pathlib import Path

from kdfast._backend import BACKENDS
from kdfast.train.loop import AMP_MODES, TrainingInterrupted
from kdfast.train.recipes import RECIPES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdfast", description="kdfast: fused kernels for knowledge distillation")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,bench,info}")
    train = commands.add_parser("train", help="run a recipe (slotmatch, wecolora, gini)")
    train.add_argument("recipe", help=f"one of: {', '.join(RECIPES)}")
    train.add_argument("--steps", type=int, help="optimiser steps of each training phase (default: the recipe's)")
    train.add_argument("--batch-size", type=int, help="global batch size (default: the recipe's)")
    train.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:i")
    train.add_argument("--backend", choices=BACKENDS, help="kdfast ops' backend (default: KDFAST_BACKEND, else auto);"
                       " 'reference' runs the same recipe on the eager reference")
    train.add_argument("--data", help="real local data instead of the embedded synthetic set (see the README)")
    train.add_argument("--out", help="run directory: checkpoints, metrics.jsonl, report.json (default runs/<recipe>)")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoints under --out")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--amp", choices=AMP_MODES, default="auto", help="auto: bf16/fp16 on CUDA, off on CPU")
    train.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    train.add_argument("--teacher", help="slotmatch: a teacher checkpoint; wecolora: a timm model name or checkpoint")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    bench = commands.add_parser("bench", help="run the benchmark report (benchmarks/report.py)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    commands.add_parser("info", help="backends available, devices, versions")
    return parser


def _train(args: argparse.Namespace) -> int:
    from kdfast.train.recipes._common import Options, format_report

    if args.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {args.recipe!r}; the recipes are: {', '.join(RECIPES)}")
    for name in ("steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.data is not None and not Path(args.data).expanduser().exists():
        raise FileNotFoundError(f"--data: {args.data!r} does not exist")
    options = Options(**{k: v for k, v in vars(args).items() if k not in ("command", "recipe")})
    out = options.out_dir(args.recipe)
    if options.resume and not any(out.glob("**/checkpoint.pt")):
        raise FileNotFoundError(f"--resume: no checkpoint under {str(out)!r} (nothing to resume)")
    recipe = importlib.import_module(RECIPES[args.recipe])
    report = recipe.run(options)
    if _is_main():
        print(format_report(report))
        print(f"report written to {out / 'report.json'}")
    return 0


def _is_main() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _bench(rest: list[str]) -> int:
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"
    if not script.is_file():
        raise FileNotFoundError("kdfast bench runs benchmarks/report.py of a source checkout; none found next to "
                                f"this install ({script})")
    return subprocess.call([sys.executable, str(script), *rest])


def _info() -> int:
    import kdfast

    for key, value in kdfast.info().items():
        print(f"{key:>10}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after it, --help included, belongs to report.py
        args = argparse.Namespace(command="bench", rest=argv[1:])
    else:
        args = _parser().parse_args(argv)
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "bench":
            return _bench(args.rest)
        return _info()
    except TrainingInterrupted as stop:
        where = f"; checkpoint: {stop.path} (continue with --resume)" if stop.path else ""
        print(f"kdfast: interrupted after step {stop.step}{where}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("kdfast: aborted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, TypeError, ImportError) as exc:
        print(f"kdfast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
