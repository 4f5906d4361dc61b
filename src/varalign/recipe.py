"""Recipes: a selection is a list of stages (score → keep rule), or a set operation over recipes.

A stage scores the rows that survived the previous stage and keeps some of them:
- `fraction` f with `select = "top_k"`: exactly ⌊N·f⌋ rows, N = the whole pool (VAS/negCLIPLoss reference);
- `fraction` f with `select = "datacomp"`: rows scoring >= the (⌊N·f⌋+1)-th largest (DataComp's clip_score);
- `threshold` t: rows scoring >= t;
- neither, for a rule (a boolean score such as `basic_filter`): the rows where it is true.

The paper recipes are presets: `VAS ∩ CLIP score` = `clip_score top 45% of pool → vas top 30% of pool`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VaralignError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SELECT_MODES = ("top_k", "datacomp")
STAGE_KEYS = {"score", "fraction", "threshold", "select", "label"}
PRESET_DIR = Path(__file__).parent / "recipes"


@dataclass
class Stage:
    """One score and its keep rule; `params` go to the scorer (arch, target, temperature, ...)."""

    score: str
    params: dict[str, Any] = field(default_factory=dict)
    fraction: float | None = None
    threshold: float | None = None
    select: str = "top_k"
    label: str = ""

    def __post_init__(self) -> None:
        self.label = self.label or self.score


@dataclass
class Recipe:
    """Sequential `stages`, or `op` ('intersection' / 'union') over independent `parts`."""

    name: str
    description: str = ""
    stages: list[Stage] = field(default_factory=list)
    op: str | None = None
    parts: list[Recipe] = field(default_factory=list)

    def all_stages(self) -> list[Stage]:
        return [s for p in self.parts for s in p.all_stages()] if self.op else list(self.stages)


def validate_recipe(recipe: Recipe, rule_scores: set[str], known: set[str],
                    fraction_only: set[str] | frozenset[str] = frozenset()) -> None:
    """Check a recipe before any work: known scores, one keep rule per stage, fractions that shrink.
    `rule_scores` keep where true (no cut); `fraction_only` take a fraction of the pool, never a threshold."""
    if recipe.op:
        if recipe.op not in ("intersection", "union"):
            raise VaralignError(f"recipe {recipe.name!r}: op must be 'intersection' or 'union', got {recipe.op!r}")
        if len(recipe.parts) < 2 or recipe.stages:
            raise VaralignError(f"recipe {recipe.name!r}: an op needs >= 2 parts and no stages of its own")
        for part in recipe.parts:
            validate_recipe(part, rule_scores, known, fraction_only)
        return
    previous = 1.0
    labels = set()
    for stage in recipe.stages:
        where = f"recipe {recipe.name!r}, stage {stage.label!r}"
        if stage.score not in known:
            raise VaralignError(f"{where}: unknown score {stage.score!r} (see `varalign filter --list`)")
        if stage.label in labels:
            raise VaralignError(f"{where}: two stages share the label {stage.label!r}; set `label`")
        labels.add(stage.label)
        if stage.score in rule_scores:
            if stage.fraction is not None or stage.threshold is not None:
                raise VaralignError(f"{where}: a rule keeps the rows where it holds; drop fraction/threshold")
            continue
        if stage.score in fraction_only:
            if stage.fraction is None or stage.threshold is not None:
                raise VaralignError(f"{where}: {stage.score} needs a fraction of the pool (not a threshold)")
        elif (stage.fraction is None) == (stage.threshold is None):
            raise VaralignError(f"{where}: give exactly one of fraction or threshold")
        if stage.select not in SELECT_MODES:
            raise VaralignError(f"{where}: select must be one of {SELECT_MODES}, got {stage.select!r}")
        if stage.fraction is not None:
            if not 0.0 < stage.fraction <= 1.0:
                raise VaralignError(f"{where}: fraction must be in (0, 1], got {stage.fraction}")
            if stage.fraction > previous:
                raise VaralignError(f"{where}: fraction {stage.fraction} exceeds the previous stage's {previous} "
                                    "(fractions are of the whole pool)")
            previous = stage.fraction


def load_recipe(path_or_name: str | os.PathLike) -> Recipe:
    """Read a recipe TOML file, or a shipped preset by name (`varalign filter --list`)."""
    path = Path(path_or_name)
    if not path.exists():
        preset = PRESET_DIR / f"{path_or_name}.toml"
        if not preset.exists():
            raise VaralignError("recipe not found (neither a file nor a preset name)", path)
        path = preset
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise VaralignError(f"cannot read recipe ({exc})", path) from None
    except tomllib.TOMLDecodeError as exc:
        raise VaralignError(f"recipe is not valid TOML ({exc})", path) from None
    recipe = _recipe_from_dict(data, path.stem, path.parent, path)
    _check_selects(recipe, path)
    return recipe


def _check_selects(recipe: Recipe, source: Path) -> None:
    """A recipe file (or a part of one) without stages would keep the whole pool: surely a mistake (`--name
    no_filter` says it on purpose). An op that is not one `validate_recipe` knows is left for it to name."""
    if recipe.op in ("intersection", "union"):
        for part in recipe.parts:
            _check_selects(part, source)
    elif not recipe.op and not recipe.stages:
        raise VaralignError(f"recipe {recipe.name!r} has no stages (and no op over parts): it would keep the "
                            "whole pool", source)


def _recipe_from_dict(data: dict, default_name: str, base: Path, source: Path) -> Recipe:
    unknown = set(data) - {"name", "description", "stages", "op", "parts"}
    if unknown:
        raise VaralignError(f"unknown recipe key {sorted(unknown)[0]!r}", source)
    for key in ("name", "description", "op"):
        _check_type(data, key, str, "a string", source)
    for key in ("stages", "parts"):
        if not (isinstance(data.get(key, []), list) and all(isinstance(x, dict) for x in data.get(key, []))):
            raise VaralignError(f"`{key}` must be a list of tables ([[{key}]] blocks), got {data[key]!r}", source)
    parts = [_recipe_from_dict(p, f"{default_name}.{i}", base, source) for i, p in enumerate(data.get("parts", []))]
    stages = []
    for raw in data.get("stages", []):
        if "score" not in raw:
            raise VaralignError("every stage needs `score = ...`", source)
        for key in ("score", "select", "label"):
            _check_type(raw, key, str, "a string", source)
        for key in ("fraction", "threshold"):
            if key in raw and (isinstance(raw[key], bool) or not isinstance(raw[key], (int, float))):
                raise VaralignError(f"stage {raw['score']!r}: {key} must be a number, got {raw[key]!r}", source)
        for key, value in raw.items():
            paths = value if isinstance(value, list) else [value]
            if key not in STAGE_KEYS and _is_path_key(key) and not (paths and all(isinstance(v, str) for v in paths)):
                raise VaralignError(f"stage {raw['score']!r}: {key} must be a path (a string) or a list of paths, "
                                    f"got {value!r}", source)
        params = {k: _resolve(k, v, base) for k, v in raw.items() if k not in STAGE_KEYS}
        stages.append(Stage(raw["score"], params, raw.get("fraction"), raw.get("threshold"),
                            raw.get("select", "top_k"), raw.get("label", "")))
    return Recipe(data.get("name", default_name), data.get("description", ""), stages, data.get("op"), parts)


def _check_type(table: dict, key: str, kind: type, words: str, source: Path) -> None:
    if key in table and not isinstance(table[key], kind):
        raise VaralignError(f"`{key}` must be {words}, got {table[key]!r}", source)


PATH_KEYS = {"centroids", "target_features", "fasttext_model", "wordnet_dir"}  # scorer parameters that are paths


def _is_path_key(key: str) -> bool:
    return key in PATH_KEYS or key.endswith(("path", "target", "_file"))


def _resolve(key: str, value: Any, base: Path) -> Any:
    """Relative paths in a recipe are relative to the recipe file (never the current folder: a missing file is
    reported where the recipe says it is); `~` is the home folder; URLs (`s3://...`) are left as they are."""
    if isinstance(value, list) and _is_path_key(key):  # several files (NormSim targets, ImageNet features)
        return [_resolve(key, v, base) for v in value]
    if not (_is_path_key(key) and isinstance(value, str)) or "://" in value:
        return value
    value = os.path.expanduser(value)
    return value if os.path.isabs(value) else str(base / value)


def list_presets() -> dict[str, str]:
    """Shipped preset recipes: name -> description."""
    out = {}
    for path in sorted(PRESET_DIR.glob("*.toml")):
        out[path.stem] = load_recipe(path).description
    return out
