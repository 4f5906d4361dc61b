"""Every selection method, one file each; importing this package registers them all.

`METHODS` (recipe scores) and `NAMES` (`varalign filter --name` presets) are filled by the modules
below; `base.py` holds the two contracts (Score, Selector), the parameter fields and the registries.
"""

from __future__ import annotations

from typing import Any

from ..recipe import Recipe
from . import clip_score, datacomp_rules, image_based, negcliploss, normsim, vas, vas_d  # noqa: F401 - registers
from .base import METHODS, NAMES, Method, Name, RunSettings, Score, Selector, name, param, register

__all__ = ["METHODS", "NAMES", "Method", "Name", "RunSettings", "Score", "Selector", "name", "param", "register",
           "recipe_for_name"]


@name("no_filter", "every uid of the pool")
def _no_filter(options: dict[str, Any]) -> list:
    return []


_ORDER = ("no_filter", "basic_filter", "text_based", "image_based", "image_based_intersect_clip_score", "clip_score",
          "laion2b", "vas", "vas_d", "negcliploss", "cs_new")  # DataComp's baselines first, as baselines.py lists them
_names = dict(NAMES)
NAMES.clear()
NAMES.update({n: _names[n] for n in _ORDER if n in _names} | _names)


def _load_plugins() -> None:
    """Methods other packages register under the `varalign.methods` entry-point group (see the README's
    "Adding a method"): importing the entry point's module registers them."""
    from importlib.metadata import entry_points  # noqa: PLC0415

    from ..errors import VaralignError  # noqa: PLC0415

    for ep in entry_points(group="varalign.methods"):
        try:
            ep.load()
        except Exception as exc:  # noqa: BLE001 - a broken plugin: one line naming it
            raise VaralignError(f"cannot load the method plugin {ep.name!r} ({ep.value}): {exc}") from None


_load_plugins()


def recipe_for_name(n: str, options: dict[str, Any]) -> Recipe:
    """The recipe of `--name n` with the given `varalign filter` options."""
    from ..errors import VaralignError  # noqa: PLC0415

    if n not in NAMES:
        raise VaralignError(f"--name must be one of {', '.join(NAMES)}, got {n!r}")
    return Recipe(n, NAMES[n].description, NAMES[n].build({**options, "name": n}))
