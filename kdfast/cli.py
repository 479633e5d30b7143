"""The ``kdfast`` command (also ``python -m kdfast``).

    kdfast train <recipe> [--steps N] [--batch-size B] [--lr LR] [--checkpoint-every N] [--set KEY=VALUE ...]
                          [--device auto|cpu|cuda] [--backend auto|reference|...] [--data PATH] [--out DIR]
                          [--resume | --overwrite] [--seed S] [--amp auto|off|bf16|fp16] [--teacher PATH_OR_NAME]
                          [--no-progress] [--debug]
    kdfast train <recipe> --help         the recipe's settings (--set keys) and their defaults
    kdfast bench [report.py options]     the benchmark report (benchmarks/report.py of a source checkout)
    kdfast info                          backends available, devices, versions

Recipes: slotmatch, wecolora, gini (kdfast.train.recipes). Under torchrun, ``kdfast train`` trains with DDP.

Exit codes: 0 done; 2 a user error (one line naming the flag or file; ``--debug`` or KDFAST_DEBUG=1 shows the
traceback); 3 training stopped by the finite-loss guard; 128 + N stopped by signal N (130 Ctrl-C, 143 SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

# The standard library only at import: torch and the recipes are imported inside main(), after its SIGTERM handler
# is in place, so that a SIGTERM while they load (seconds) ends with one line too.
RECIPES = ("slotmatch", "wecolora", "gini")  # kdfast.train.recipes.RECIPES, without importing the package


class Stopped(BaseException):
    """SIGTERM outside a training phase (start-up, evaluation): nothing to checkpoint, stop with one line."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def _recipe_module(recipe: str):
    from kdfast.train.recipes import RECIPES as modules

    return importlib.import_module(modules[recipe])


def _recipe_settings_help(recipe: str | None) -> str | None:
    if recipe not in RECIPES:
        return "kdfast train <recipe> --help lists the recipe's settings (--set keys) and their defaults."
    from kdfast.train.recipes._settings import describe

    return f"settings of {recipe} (--set KEY=VALUE; defaults shown):\n" + describe(_recipe_module(recipe).Settings)


def _parser(recipe: str | None = None) -> argparse.ArgumentParser:
    from kdfast._backend import BACKENDS
    from kdfast.train.loop import AMP_MODES

    parser = argparse.ArgumentParser(prog="kdfast", description="kdfast: fused kernels for knowledge distillation")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,bench,info}")
    train = commands.add_parser("train", help="run a recipe (slotmatch, wecolora, gini)",
                                epilog=_recipe_settings_help(recipe), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", help=f"one of: {', '.join(RECIPES)}")
    train.add_argument("--steps", type=int, help="optimiser steps of each training phase (default: the recipe's)")
    train.add_argument("--batch-size", type=int, help="global batch size (default: the recipe's)")
    train.add_argument("--lr", type=float, help="peak learning rate of each phase (default: the recipe's)")
    train.add_argument("--checkpoint-every", type=int, metavar="N",
                       help="steps between checkpoints (default: the recipe's, 100; 0: only at the end and when stopped)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="a recipe setting (repeatable); kdfast train <recipe> --help lists them")
    train.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:i")
    train.add_argument("--backend", choices=BACKENDS, help="kdfast ops' backend (default: KDFAST_BACKEND, else auto);"
                       " 'reference' runs the same recipe on the eager reference")
    train.add_argument("--data", help="real local data instead of the embedded synthetic set (see the README)")
    train.add_argument("--out", help="run directory: checkpoints, metrics.jsonl, report.json (default runs/<recipe>)")
    reuse = train.add_mutually_exclusive_group()
    reuse.add_argument("--resume", action="store_true", help="continue from the checkpoints under --out (the "
                       "settings must be the ones stored in them)")
    reuse.add_argument("--overwrite", action="store_true", help="train afresh in an --out that holds a previous run")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--amp", choices=AMP_MODES, default="auto", help="auto: bf16/fp16 on CUDA, off on CPU")
    train.add_argument("--teacher", help="slotmatch: a teacher checkpoint; wecolora: a timm model name or checkpoint")
    train.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    train.add_argument("--debug", action="store_true", help="show the traceback of an error (also KDFAST_DEBUG=1)")
    bench = commands.add_parser("bench", help="run the benchmark report (benchmarks/report.py)", add_help=False)
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    commands.add_parser("info", help="backends available, devices, versions")
    return parser


def _train(args: argparse.Namespace) -> int:
    from kdfast.train.recipes._common import Options, format_report
    from kdfast.train.recipes._settings import parse_pairs

    if args.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {args.recipe!r}; the recipes are: {', '.join(RECIPES)}")
    for name, floor in (("steps", 1), ("batch_size", 1), ("checkpoint_every", 0)):
        value = getattr(args, name)
        if value is not None and value < floor:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {floor}, got {value}")
    if args.lr is not None and not 0 < args.lr < float("inf"):
        raise ValueError(f"--lr must be a finite number > 0, got {args.lr}")
    if args.data is not None and not Path(args.data).expanduser().exists():
        raise FileNotFoundError(f"--data: {args.data!r} does not exist")
    if args.teacher is not None and not args.teacher.startswith("timm:") and not Path(args.teacher).is_file():
        raise FileNotFoundError(f"--teacher: no checkpoint file {args.teacher!r}")
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "recipe", "debug", "overrides")}
    options = Options(**fields, overrides=parse_pairs(args.overrides))
    out = options.out_dir(args.recipe)
    if options.resume and not any(out.glob("**/checkpoint.pt")):
        raise FileNotFoundError(f"--resume: no checkpoint under {str(out)!r} (nothing to resume)")
    recipe = _recipe_module(args.recipe)
    import torch

    # x86 cores take ~100x longer on denormal floats, and a trained model's softmaxes make many: the slotmatch
    # teacher's step took 30-40% longer after 200 steps than at its start, and no longer once denormals are flushed
    # to zero (float32 values below 1.2e-38 become 0; torch's intra-op threads follow the flag).
    flushing = torch.set_flush_denormal(True)
    try:
        report = recipe.run(options)
    finally:
        if flushing:
            torch.set_flush_denormal(False)
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
    debug = "--debug" in argv or os.environ.get("KDFAST_DEBUG", "") not in ("", "0")
    # SIGTERM outside a training phase (fit installs its own handler, which checkpoints), start-up included: one
    # line, no traceback.
    previous = signal.signal(signal.SIGTERM, _stop) if _in_main_thread() else None
    try:
        if argv[:1] == ["bench"]:  # everything after it, --help included, belongs to report.py
            args = argparse.Namespace(command="bench", rest=argv[1:])
        else:  # the recipe (the word after "train") picks the settings that --help lists
            args = _parser(argv[1] if argv[:1] == ["train"] and len(argv) > 1 else None).parse_args(argv)
        if args.command == "train":
            return _train(args)
        if args.command == "bench":
            return _bench(args.rest)
        return _info()
    except Stopped as stop:
        return _fail(stop, debug, f"stopped by {stop.args[0]} outside a training phase (--resume continues from "
                     "the last checkpoint)", 128 + stop.signum)
    except KeyboardInterrupt as stop:
        if _is_a(stop, "TrainingInterrupted"):
            where = f"; checkpoint: {stop.path} (continue with --resume)" if stop.path else ""
            print(f"kdfast: {signal.Signals(stop.signum).name}: stopped after step {stop.step}{where}", file=sys.stderr)
            return 128 + stop.signum
        return _fail(stop, debug, "aborted (Ctrl-C)", 130)
    except (OSError, ValueError, TypeError, ImportError, RuntimeError) as exc:  # OSError: a missing file, a full disk
        if isinstance(exc, RuntimeError) and not _is_a(exc, "NonFiniteLoss"):
            raise
        return _fail(exc, debug, str(exc), 3 if _is_a(exc, "NonFiniteLoss") else 2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _fail(exc: BaseException, debug: bool, message: str, code: int) -> int:
    """One line on stderr (the traceback before it with --debug); the exit code."""
    if debug:
        traceback.print_exception(exc)
    lines = message.strip().splitlines() or [type(exc).__name__]
    more = " (--debug shows the rest)" if len(lines) > 1 and not debug else ""
    print(f"kdfast: error: {lines[0]}{more}" if code in (2, 3) else f"kdfast: {lines[0]}", file=sys.stderr)
    return code


def _is_a(exc: BaseException, name: str) -> bool:
    """Whether exc is kdfast.train.loop's exception class ``name`` (never so when the loop was not imported)."""
    loop = sys.modules.get("kdfast.train.loop")
    return loop is not None and isinstance(exc, getattr(loop, name))


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
