"""CLIP score: the parquet's `clip_{arch}_similarity_score`, read during the scan (DataComp's baseline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..pool import SCORE_COLUMN
from ..recipe import Stage
from .base import (
    Method,
    RunSettings,
    Score,
    arch_param,
    check_arch,
    check_fraction,
    name,
    one_of,
    register,
    stage_params,
)


@dataclass
class ClipScoreParams:
    arch: str | None = arch_param()


def prepare(p: ClipScoreParams, run: RunSettings) -> Score:
    column = SCORE_COLUMN[check_arch(p.arch, "clip_score")]
    return Score(column=column, info={"column": column})


register(Method("clip_score", "the parquet's CLIP score (clip_{arch}_similarity_score)", ClipScoreParams, prepare))


def clip_stage(options: dict[str, Any], select: str, method: str) -> Stage:
    """The CLIP-score stage of a `--name` preset: `--fraction` or `--threshold` of the whole pool."""
    one_of(options.get("fraction"), options.get("threshold"), "--fraction", "--threshold", method)
    check_fraction(options.get("fraction"), "--fraction")
    return Stage("clip_score", stage_params("clip_score", options), options.get("fraction"),
                 options.get("threshold"), select)


@name("clip_score", "DataComp CLIP-score filter: keep score >= threshold (or the score at rank ⌊N·f⌋)")
def _clip_score(options: dict[str, Any]) -> list[Stage]:
    return [clip_stage(options, "datacomp", "clip_score")]
