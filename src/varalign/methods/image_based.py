"""DataComp's image-based filter: the caption rule, and the image's nearest (max inner product) centroid
is the nearest centroid of at least one ImageNet-1k train image; and its intersection with CLIP score."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import storage
from ..assets import file_sha256
from ..errors import VaralignError
from ..npz import load_npy
from ..pool import ARCHS
from ..recipe import Stage
from .base import Method, RunSettings, Score, check_fraction, name, one_of, param, register, stage_params
from .clip_score import clip_stage
from .datacomp_rules import fasttext_model, fasttext_param, rule_stage

SCALES = ("small", "medium", "large", "xlarge")


@dataclass
class ImageBasedParams:
    centroids: str | None = param(None, flag="centroid_path", path=True,
                                  help="image_based*: your own centroids (.npy or .pt), e.g. from `varalign centroids`")
    image_based_scale: str | None = param(None, choices=SCALES, type=str,
                                          help="image_based*: which DataComp centroid file ({scale}_centroids.pt)")
    fasttext_model: str | None = fasttext_param()
    target_features: str | list | None = param(None, flag=None, help="ImageNet-1k features (default: DataComp's)")
    cache_path: str | None = param(None, flag=None, help="DataComp asset folder (default: --cache_path)")


def prepare(p: ImageBasedParams, run: RunSettings) -> Score:
    from ..scores.image_based import image_based_shard  # noqa: PLC0415

    if p.centroids is not None and p.image_based_scale is not None:
        raise VaralignError("--centroid_path and --image_based_scale both choose the same input: give one")
    centroids, allowed, info = image_based_assets(p, run)
    model = fasttext_model(p.fasttext_model, p.cache_path, run)
    return Score(fn=image_based_shard, members=[("l14_img", ARCHS["l14"])],
                 kwargs={"centroids": centroids, "allowed": allowed, "model_path": model, "device": run.device},
                 info=info,
                 inputs=[info["centroids"], *([model] if model else [])])


def image_based_assets(p: ImageBasedParams, run: RunSettings) -> tuple[Any, Any, dict[str, Any]]:
    """DataComp's centroids and the set S of centroids nearest to an ImageNet-1k train image.

    S costs one pass over 1.28M ImageNet features; it is cached beside the centroid file (or, where that
    folder is not writable, in `storage.cache_dir()`), keyed by the centroids' and the features' sha256.
    """
    from ..assets import IN1K_FEATURES, find_asset, iter_in1k_features, load_centroids, load_pt  # noqa: PLC0415
    from ..atomic import save_npy  # noqa: PLC0415
    from ..scores.image_based import target_centroid_set  # noqa: PLC0415

    cache = p.cache_path or run.cache_path
    if p.centroids is not None:
        cpath = Path(p.centroids)
    else:
        if p.image_based_scale not in SCALES:
            raise VaralignError("image_based needs --image_based_scale {small,medium,large,xlarge} or --centroid_path "
                                "PATH (in a recipe stage: image_based_scale = ... or centroids = PATH)")
        cpath = find_asset(f"{p.image_based_scale}_centroids", cache, run.download)
    centroids = load_centroids(cpath)
    if centroids.shape[1] != ARCHS["l14"]:
        raise VaralignError(f"centroids have dim {centroids.shape[1]}; image_based uses L/14 (768)", cpath)
    feats = p.target_features
    sources = [Path(f) for f in (feats if isinstance(feats, list) else [feats])] if feats else \
        [find_asset(n, cache, run.download) for n in IN1K_FEATURES]
    key = file_sha256(cpath)[:12] + "-" + "-".join(file_sha256(f)[:8] for f in sources)
    name = f".{cpath.stem}.allowed-{key}.npy"
    # beside the centroids, or (a read-only folder: a shared or mounted asset store) in varalign's own cache
    places = [cpath.parent / name, storage.cache_dir() / name]
    cached = next((c for c in places if c.is_file()), None)
    if cached is not None:
        allowed = load_npy(cached)
    else:
        it = (load_pt(f, "image_features") if f.suffix != ".npy" else load_npy(f) for f in sources) \
            if feats else iter_in1k_features(cache, run.download)
        allowed = target_centroid_set(centroids, it, device=run.device)
        for place in places:
            try:
                place.parent.mkdir(parents=True, exist_ok=True)
                save_npy(place, allowed)
                break
            except (OSError, VaralignError):
                continue  # not writable here: the next place; with none, S is computed again next time
    info = {"centroids": str(cpath), "centroids_sha256": file_sha256(cpath), "allowed_centroids": int(allowed.sum())}
    return centroids, allowed, info


register(Method("image_based", "DataComp image-based: caption rule and nearest (max inner product) centroid is "
                "nearest to an ImageNet-1k train image", ImageBasedParams, prepare, keep="rule", uses_device=True))


@name("image_based", "DataComp image-based: caption rule and an image cluster that holds ImageNet-1k images")
def _image_based(options: dict[str, Any]) -> list[Stage]:
    return [rule_stage("image_based", options)]


@name("image_based_intersect_clip_score", "DataComp image-based ∩ CLIP score (threshold-at-rank on the pool)")
def _image_based_clip(options: dict[str, Any]) -> list[Stage]:
    one_of(options.get("fraction"), options.get("threshold"), "--fraction", "--threshold",
           "image_based_intersect_clip_score")
    check_fraction(options.get("fraction"), "--fraction")
    return [clip_stage(options, "datacomp", "image_based_intersect_clip_score"),
            Stage("image_based", stage_params("image_based", options))]
