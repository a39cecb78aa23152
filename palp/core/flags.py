"""Command-line flags derived from the settings dataclasses of ``palp.core.settings``.

A field that is a flag is declared with ``flag(default, help=...)``: its metadata carries the
help text and, where needed, the flag's name, its ``--help`` section, its choices and metavar.
The flag's default is the field's and its parser follows the field's type: ``int``; ``float``
-> ``finite_float`` (nan and inf refused at parsing); ``bool`` -> ``on_off`` (with ``bare``, the
flag alone is ``on``); ``list[int]`` ->
``steps_list``. ``arguments(cls)`` lists the ``add_argument`` calls; the CLI makes them in a loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing

FLAG = "flag"  # the metadata key of a field's flag


def finite_float(value: str) -> float:
    """A float flag: nan and inf are refused here (they would train or sample garbage silently)."""
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {value!r}") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{value!r} is not a finite number")
    return x


def int_or_auto(value: str) -> int | None:
    """A whole number >= 1, or ``auto`` (None: the program finds the value)."""
    if value == "auto":
        return None
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"use a whole number or auto, not {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"use a whole number >= 1 or auto, not {value!r}")
    return n


def on_off(value: str) -> bool:
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError("use on or off")
    return value == "on"


def step_numbers(text: str) -> list[int]:
    """``"100,200,300"`` -> [100, 200, 300]; ValueError for anything else."""
    return [int(v) for v in text.split(",") if v.strip()]


def steps_list(value: str) -> list[int]:
    try:
        return step_numbers(value)
    except ValueError:
        raise argparse.ArgumentTypeError("use comma-separated step numbers, e.g. 100,200,300") from None


@dataclasses.dataclass(frozen=True)
class Flag:
    help: str | None = None
    section: str = ""  # the --help section (an argument group's title); "": the command's own options
    name: str = ""  # default: --field-name
    choices: tuple = ()
    metavar: str | None = None
    auto: bool = False  # an ``int | None`` field whose None is spelled ``auto`` on the command line
    bare: bool = False  # a ``bool`` flag that may be given alone (``--flag`` is ``--flag on``)


def flag(default=dataclasses.MISSING, *, factory=dataclasses.MISSING, help: str | None = None, section: str = "",
         name: str = "", choices=(), metavar: str | None = None, auto: bool = False, bare: bool = False):
    """A dataclass field that is also a command-line flag (no default: a required flag)."""
    return dataclasses.field(default=default, default_factory=factory,
                             metadata={FLAG: Flag(help, section, name, tuple(choices), metavar, auto, bare)})


_PARSERS = {int: int, float: finite_float, bool: on_off, list[int]: steps_list, str: None, list[str]: None}
_REPEATED = (list[str],)  # a flag given once per value (action="append")


def _parser(hint):
    """The flag parser of a field's type (``X | None``: X's)."""
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return _PARSERS[hint]


def flag_fields(cls) -> list[dataclasses.Field]:
    """The fields of the settings dataclass ``cls`` that are flags, in order."""
    return [f for f in dataclasses.fields(cls) if FLAG in f.metadata]


def arguments(cls, **choices) -> list[tuple[str, str, dict]]:
    """(section, flag name, ``add_argument`` keywords) of each flag of ``cls``; ``choices``: the
    choices of fields whose options are known only above palp.core.settings (``scheduler=SCHEDULERS``)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in flag_fields(cls):
        spec = f.metadata[FLAG]
        parse = int_or_auto if spec.auto else _parser(hints[f.name])
        kw = {"dest": f.name, "help": spec.help, **({"action": "append"} if hints[f.name] in _REPEATED else {}),
              **({"nargs": "?", "const": True} if spec.bare else {})}
        if f.default_factory is not dataclasses.MISSING:
            kw["default"] = f.default_factory()
        elif f.default is not dataclasses.MISSING:
            kw["default"] = f.default
        else:
            kw["required"] = True
        kw.update({k: v for k, v in (("type", parse), ("choices", spec.choices or choices.get(f.name)),
                                     ("metavar", spec.metavar or {on_off: "on|off", int_or_auto: "N|auto"}.get(parse))) if v})
        out.append((spec.section, spec.name or "--" + f.name.replace("_", "-"), kw))
    return out


def settings(args: argparse.Namespace, cls) -> dict:
    """The values the flags of ``cls`` parsed into, by field name."""
    return {f.name: getattr(args, f.name) for f in flag_fields(cls)}
