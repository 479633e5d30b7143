"""A recipe's settings: a dataclass whose defaults are the recipe's sizes and schedule, set from the command line
with ``--set key=value`` (and the shortcuts ``--steps``, ``--batch-size``, ``--lr``, ``--checkpoint-every``).

Each field is declared with :func:`setting` (a default and a one-line help). Integers must be >= 1 and floats
finite and > 0, except the fields a recipe names in ``MAY_BE_ZERO``; a recipe's ``check()`` adds its own rules
(e.g. the image size a multiple of the patch). Errors name the ``--set`` key and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

# The command-line shortcuts and the fields they set (a recipe names its per-phase fields in STEP_FIELDS/LR_FIELDS).
SHORTCUTS = {"steps": "--steps", "batch_size": "--batch-size", "lr": "--lr", "checkpoint_every": "--checkpoint-every"}


def setting(default: Any, help: str) -> Any:  # noqa: A002 - argparse's word
    return dataclasses.field(default=default, metadata={"help": help})


def _types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _parse(key: str, text: str, kind: Any) -> Any:
    """``text`` as the type of field ``key``: int, float, bool, str or a comma-separated tuple of ints."""
    try:
        if kind is bool:
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError
            return text.lower() in ("1", "true", "yes")
        if typing.get_origin(kind) is tuple:
            return tuple(int(part) for part in text.split(",") if part.strip())
        return kind(text)
    except ValueError:
        expected = {int: "an integer", float: "a number", bool: "true or false"}.get(kind, "comma-separated integers")
        raise ValueError(f"--set {key}={text}: expected {expected}") from None


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """``["key=value", ...]`` (repeated ``--set``) -> ``{key: value}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair}: expected key=value (see kdfast train <recipe> --help for the keys)")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def resolve(cls, recipe: str, overrides: dict[str, Any], shortcuts: dict[str, Any]) -> Any:
    """The settings of a run: the defaults of ``cls``, then ``overrides`` (``--set``; strings are parsed), then
    the shortcuts given (``{"steps": 10, ...}``, None = not given; ``steps`` and ``lr`` set every phase's field)."""
    types = _types(cls)
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in types:
            raise ValueError(f"--set {key}: not a setting of the {recipe} recipe; its settings are: {', '.join(types)}")
        values[key] = _parse(key, value, types[key]) if isinstance(value, str) and types[key] is not str else value
    phase_fields = {"steps": getattr(cls, "STEP_FIELDS", ("steps",)), "lr": getattr(cls, "LR_FIELDS", ("lr",))}
    for name, value in shortcuts.items():
        if value is not None:
            values.update({key: value for key in phase_fields.get(name, (name,))})
    settings = cls(**values)
    validate(settings)
    return settings


def validate(settings) -> None:
    zero_ok = getattr(settings, "MAY_BE_ZERO", ())
    for f in dataclasses.fields(settings):
        value, floor = getattr(settings, f.name), 0 if f.name in zero_ok else 1
        numbers = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and not value:
            raise ValueError(f"--set {f.name}=: expected at least one integer")
        for number in numbers:
            if isinstance(number, bool) or not isinstance(number, (int, float)):
                continue
            if isinstance(number, float) and not (math.isfinite(number) and (number > 0 or floor == 0 and number == 0)):
                raise ValueError(f"--set {f.name}={value}: expected a finite number > 0{' or 0' if floor == 0 else ''}")
            if isinstance(number, int) and number < floor:
                raise ValueError(f"--set {f.name}={value}: expected an integer >= {floor}")
    if hasattr(settings, "check"):
        settings.check()


def as_dict(settings) -> dict[str, Any]:
    return dataclasses.asdict(settings)


def describe(cls) -> str:
    """The settings of a recipe with their defaults and help, for ``kdfast train <recipe> --help``."""
    flags = dict(SHORTCUTS)
    flags.update({key: "--steps" for key in getattr(cls, "STEP_FIELDS", ())})
    flags.update({key: "--lr" for key in getattr(cls, "LR_FIELDS", ())})
    lines = []
    for f in dataclasses.fields(cls):
        default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        shortcut = f" ({flags[f.name]})" if f.name in flags else ""
        lines.append(f"  {f.name}={default}".ljust(30) + f" {f.metadata.get('help', '')}{shortcut}")
    return "\n".join(lines)
