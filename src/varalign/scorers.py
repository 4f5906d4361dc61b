"""The scorer registry: what each `score` of a recipe stage reads and which per-shard function computes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import VaralignError
from .pool import ARCHS, SCORE_COLUMN, image_key
from .scores.vas import vas_shard
from .target import load_target, target_path_for


@dataclass
class Context:
    """Run-wide settings a scorer may need."""

    files_path: str | None = None
    cache_path: str | None = None
    seed: int = 0
    device: str = "cpu"


@dataclass
class Prepared:
    """A stage's scorer, ready to run: a parquet column, a per-shard function, or the VAS-D selector."""

    kind: str  # "column" | "shard" | "vas_d"
    column: str | None = None
    fn: Callable[..., Any] | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    members: list[tuple[str, int | None]] = field(default_factory=list)  # npz (key, dim) validated up front
    every_shard: bool = False  # also run on shards with no surviving rows (checks every embedding)
    info: dict[str, Any] = field(default_factory=dict)  # goes into the manifest


@dataclass(frozen=True)
class ScorerInfo:
    description: str
    prepare: Callable[[dict[str, Any], Context], Prepared]
    rule: bool = False  # a boolean keep/drop rule rather than a number


def _arch(params: dict[str, Any], name: str) -> str:
    arch = params.get("arch")
    if arch not in ARCHS:
        raise VaralignError(f"{name} needs arch = one of {', '.join(ARCHS)} (got {arch!r})")
    return arch


def _clip_score(params: dict[str, Any], ctx: Context) -> Prepared:
    arch = _arch(params, "clip_score")
    return Prepared("column", column=SCORE_COLUMN[arch], info={"column": SCORE_COLUMN[arch]})


def _vas(params: dict[str, Any], ctx: Context) -> Prepared:
    arch = _arch(params, "vas")
    path = params.get("target")
    if path is None:
        name = params.get("target_variance_name")
        files_path = params.get("files_path", ctx.files_path)
        if name is None:
            raise VaralignError("vas needs a target: --target PATH, or --target_variance_name NAME --files_path DIR")
        if files_path is None:
            raise VaralignError("--target_variance_name needs --files_path DIR (target read from DIR/variance/)")
        path = target_path_for(files_path, name)
    target = load_target(path, ARCHS[arch])
    key = image_key(arch)
    return Prepared("shard", fn=vas_shard, kwargs={"key": key, "target": target, "device": ctx.device},
                    members=[(key, ARCHS[arch])],
                    every_shard=True, info={"target": str(path), "target_sha256": _sha256(Path(path))})


def _vas_d(params: dict[str, Any], ctx: Context) -> Prepared:
    arch = _arch(params, "vas_d")
    iters = params.get("num_iters")
    if not isinstance(iters, int) or iters < 1:
        raise VaralignError("vas_d needs --num_iters >= 1")
    mode = params.get("mode", "exact")
    rank = params.get("rank", 128)
    if mode not in ("exact", "lowrank"):
        raise VaralignError(f"vas_d mode must be 'exact' or 'lowrank', got {mode!r}")
    if mode == "lowrank" and not (isinstance(rank, int) and 1 <= rank <= ARCHS[arch]):
        raise VaralignError(f"vas_d rank must be an integer in [1, {ARCHS[arch]}], got {rank!r}")
    key = image_key(arch)
    info = {"num_iters": iters, "mode": mode} | ({"rank": rank} if mode == "lowrank" else {})
    return Prepared("vas_d", kwargs={"key": key, "dim": ARCHS[arch], "num_iters": iters, "mode": mode, "rank": rank},
                    members=[(key, ARCHS[arch])], info=info)


SCORERS: dict[str, ScorerInfo] = {
    "clip_score": ScorerInfo("the parquet's CLIP score (clip_{arch}_similarity_score)", _clip_score),
    "vas": ScorerInfo("Variance Alignment Score f^T S f against a target second moment S (image embeddings)", _vas),
    "vas_d": ScorerInfo("VAS-D: greedy VAS against the selection itself (first target: the whole pool)", _vas_d),
}


def prepare(score: str, params: dict[str, Any], ctx: Context) -> Prepared:
    if score not in SCORERS:
        raise VaralignError(f"unknown score {score!r} (see `varalign filter --list`)")
    return SCORERS[score].prepare(params, ctx)


def rule_scores() -> set[str]:
    return {name for name, info in SCORERS.items() if info.rule}


def _sha256(path: Path) -> str:
    import hashlib  # noqa: PLC0415

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
