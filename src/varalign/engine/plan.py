"""What a run is made of and what it depends on: each stage's method prepared from its parameters (and
the run's options of the same flag), and the identities that name resumable work and the plan digest."""

from __future__ import annotations

import os
from typing import Any

from .. import storage
from ..errors import VaralignError
from ..methods import METHODS
from ..methods.base import RunSettings, Score, Selector, build_params, fields_of, flag_name
from ..recipe import Recipe, Stage
from ..workdir import digest


def prepare_stage(stage: Stage, options: dict[str, Any], settings: RunSettings) -> Score | Selector:
    """The stage's method, ready to run: its parameters are the stage's, and for those the stage does not
    set, the `varalign filter` options of the same flag (e.g. `--fasttext_model` for a recipe's rules)."""
    if stage.score not in METHODS:
        raise VaralignError(f"unknown score {stage.score!r} (see `varalign filter --list`)")
    method = METHODS[stage.score]
    values = dict(stage.params)
    for f, meta in fields_of(method.params):
        flag = flag_name(f, meta)
        if f.name not in values and flag is not None and options.get(flag) is not None:
            values[f.name] = options[flag]
    unknown = set(values) - {f.name for f, _ in fields_of(method.params)}
    if unknown:
        raise VaralignError(f"stage {stage.label!r}: {stage.score} has no parameter {sorted(unknown)[0]!r}")
    return method.prepare(build_params(method.params, values), settings)


# -- identities (what a resumed or re-run task depends on) -----------------------------------------------
def listing(shards: list) -> list[list]:
    """Every shard file's name, size and change stamp (mtime locally, the ETag in a store)."""
    out = []
    for s in shards:
        for f in (s.parquet, s.npz):
            if f:
                meta = storage.info(f)
                stamp = meta.get("mtime_ns", meta.get("etag", meta.get("versionid", meta.get("lastmodified"))))
                out.append([os.path.basename(f), meta["size"], stamp])
    return out


def file_digest(path: Any) -> str:
    meta = storage.info(path)
    return digest(str(path) if storage.is_url(path) else os.path.abspath(path), meta["size"],
                  meta.get("mtime_ns", meta.get("etag")))


def stage_identity(stage: Stage, prep: Score | Selector) -> list:
    return [stage.score, plain(stage.params), stage.fraction, stage.threshold, stage.select, stage.label,
            plain(prep.info)]


def recipe_identity(recipe: Recipe, prepared: dict[int, Score | Selector]) -> list:
    if recipe.op:
        return [recipe.op, [recipe_identity(p, prepared) for p in recipe.parts]]
    return [stage_identity(s, prepared[id(s)]) for s in recipe.stages]


def plain(params: dict) -> dict:
    return {k: (v if isinstance(v, (str, int, float, bool, type(None))) else str(v)) for k, v in params.items()}
