"""The two contracts a method implements, its parameters, and the registry.

- A **Score** maps one shard's alive rows to one column: a parquet column read during the scan
  (`column`), or `fn(shard=, rows=, **kwargs)` run per shard through the executor. A boolean column
  is a rule (keep where true); a number is cut by the stage's fraction or threshold.
- A **Selector** maps the alive rows of the whole pool to a keep mask and may run several passes
  (VAS-D); it sees the engine only through `engine.context.Context`.

A method is one file in this folder: a parameter dataclass (each field made by `param()`: type,
default, help, checks, its command-line flag), a `prepare(params, run) -> Score | Selector` that
checks them and loads what the kernels need, and `register(...)`. Registering makes it a recipe
score, a `varalign filter --list` line, and its flags part of `varalign filter` (an option is
written once; its default lives in its dataclass). `--name` presets are registered with `name()`.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import VaralignError
from ..pool import ARCHS

if TYPE_CHECKING:
    from ..engine.context import Context, Mask
    from ..recipe import Stage


# -- parameters -------------------------------------------------------------------------------------
def param(default: Any = None, *, help: str, flag: str | None = "", type: Callable | None = None,
          choices: tuple | None = None, low: float | None = None, finite: bool = False, path: bool = False,
          check: Callable[[Any], Any] | None = None) -> Any:
    """A parameter field. `flag`: its `varalign filter` flag (default: the field name; None: recipe
    only). `low`: smallest allowed value; `finite`: NaN/inf refused; `path`: a file the run reads;
    `check(value)`: raises VaralignError for a bad value."""
    meta = {"help": help, "flag": flag, "type": type, "choices": choices, "low": low, "finite": finite,
            "path": path, "check": check}
    return field(default=default, metadata={"varalign": meta})


@dataclass(frozen=True)
class Flag:
    """One command-line flag generated from a parameter field."""

    dest: str
    type: Callable | None
    help: str
    choices: tuple | None
    default: Any
    action: str | None = None


def fields_of(params_cls: type) -> list[tuple[dataclasses.Field, dict]]:
    return [(f, f.metadata["varalign"]) for f in dataclasses.fields(params_cls) if "varalign" in f.metadata]


def flag_name(f: dataclasses.Field, meta: dict) -> str | None:
    return None if meta["flag"] is None else (meta["flag"] or f.name)


def flags_of(params_cls: type) -> list[Flag]:
    out = []
    for f, meta in fields_of(params_cls):
        name = flag_name(f, meta)
        if name is None:
            continue
        typ = meta["type"] or (f.type if isinstance(f.type, type) else _type_from_default(f.default))
        action = "store_true" if typ is bool else None
        out.append(Flag(name, None if action else typ, meta["help"], meta["choices"], f.default, action))
    return out


def _type_from_default(default: Any) -> Callable | None:
    if isinstance(default, bool):
        return bool
    if isinstance(default, int):
        return int
    if isinstance(default, float):
        return float
    return str


def check_value(name: str, value: Any, meta: dict) -> None:
    """The checks a field declares, with the flag's name in the message."""
    if value is None:
        return
    if meta["choices"] and value not in meta["choices"]:
        raise VaralignError(f"--{name} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    typ = meta["type"]
    if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise VaralignError(f"--{name} must be an integer, got {value!r}")
    if meta["finite"] and isinstance(value, (int, float)) and not math.isfinite(value):
        raise VaralignError(f"--{name} must be a finite number, got {value}")
    if meta["low"] is not None and isinstance(value, (int, float)) and not value >= meta["low"]:
        kind = "an integer" if typ is int else "a number"
        raise VaralignError(f"--{name} must be {kind} >= {meta['low']:g}, got {value!r}")
    if meta["check"] is not None:
        meta["check"](value)


def build_params(params_cls: type, values: dict[str, Any]) -> Any:
    """An instance of `params_cls` from `values` (keyed by field name; missing = the field's default)."""
    kwargs = {}
    for f, meta in fields_of(params_cls):
        if f.name in values and values[f.name] is not None:
            check_value(flag_name(f, meta) or f.name, values[f.name], meta)
            kwargs[f.name] = values[f.name]
    return params_cls(**kwargs)


ARCH_HELP = "which CLIP embeddings/score columns to use (l14: 768-d, b32: 512-d)"


def arch_param() -> Any:
    return param(None, help=ARCH_HELP, choices=tuple(ARCHS), type=str)


def check_arch(arch: str | None, method: str) -> str:
    if arch not in ARCHS:
        raise VaralignError(f"{method} needs --arch {' or '.join(ARCHS)} (in a recipe stage: arch = \"l14\"; "
                            f"got {arch!r})")
    return arch


# -- what a method prepares -----------------------------------------------------------------------
@dataclass
class Score:
    """One column per shard: `column` (read from the parquet in the scan) or `fn(shard=, rows=, **kwargs)`."""

    column: str | None = None
    fn: Callable[..., Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    members: list[tuple[str, int | None]] = field(default_factory=list)  # npz (key, dim) validated up front
    every_shard: bool = False  # also run on shards with no alive rows (checks every embedding)
    info: dict[str, Any] = field(default_factory=dict)  # goes into the manifest
    inputs: list[str] = field(default_factory=list)  # files it reads (never an output)


class Selector(ABC):
    """The alive rows of the whole pool → a keep mask (may run several passes)."""

    members: list[tuple[str, int | None]] = []
    info: dict[str, Any] = {}
    inputs: list[str] = []

    @abstractmethod
    def select(self, ctx: Context, stage: Stage, alive: Mask) -> Mask:
        """Which alive rows the stage keeps."""


@dataclass(frozen=True)
class RunSettings:
    """Run-wide settings a method may read (the `varalign filter` options that are not a method's)."""

    files_path: str | None = None
    cache_path: str | None = None
    seed: int = 0
    device: str = "cpu"
    download: bool = False


@dataclass(frozen=True)
class Method:
    """A registered method: recipe score `name`, its parameters and how to prepare it."""

    name: str
    description: str
    params: type
    prepare: Callable[[Any, RunSettings], Score | Selector]
    keep: str = "number"  # "number": fraction or threshold; "rule": a boolean (no cut); "fraction": fraction only
    uses_device: bool = False  # runs its math on --device (else a note says it stays on the CPU)


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (tests that register an example)."""
    METHODS.pop(name, None)


# -- --name presets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Name:
    """A `varalign filter --name`: DataComp's / the reference's flags → the stages of a recipe."""

    name: str
    description: str
    build: Callable[[dict[str, Any]], list[Stage]]


NAMES: dict[str, Name] = {}


def name(n: str, description: str) -> Callable[[Callable[[dict[str, Any]], list[Stage]]], Callable]:
    """Decorator: register `build(options) -> [Stage, ...]` as `--name n`."""
    def wrap(build: Callable[[dict[str, Any]], list[Stage]]) -> Callable:
        NAMES[n] = Name(n, description, build)
        return build
    return wrap


def stage_params(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """A method's parameters picked from the `varalign filter` options (by flag name), given ones only."""
    out = {}
    for f, meta in fields_of(METHODS[method].params):
        flag = flag_name(f, meta)
        if flag is not None and options.get(flag) is not None:
            out[f.name] = options[flag]
    return out


def one_of(a: float | None, b: float | None, na: str, nb: str, method: str) -> None:
    if (a is None) == (b is None):
        raise VaralignError(f"{method} needs exactly one of {na} or {nb}")


def check_fraction(value: float | None, flag: str) -> None:
    if value is not None and not (0.0 < value <= 1.0):
        raise VaralignError(f"{flag} must be in (0, 1], got {value}")


def check_fractions_shrink(options: dict[str, Any]) -> None:
    fv, f = options.get("fraction_vas"), options.get("fraction")
    check_fraction(fv, "--fraction_vas")
    if fv is not None and f is not None and fv > f:
        raise VaralignError(f"--fraction_vas ({fv}) cannot exceed --fraction ({f})")
