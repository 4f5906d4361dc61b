"""NormSim-p / NormSim-∞ (the negCLIPLoss_NormSim paper): how close an image embedding is to a target set,
the p-norm over the target rows of their inner products with it."""

from __future__ import annotations

from dataclasses import dataclass

from ..assets import IN1K_FEATURES, find_asset
from ..errors import VaralignError
from ..pool import ARCHS, image_key
from .base import Method, RunSettings, Score, arch_param, check_arch, param, register


def _parse_p(value: float | str) -> float:
    from ..scores.normsim import parse_p  # noqa: PLC0415

    return parse_p(value)


@dataclass
class NormSimParams:
    arch: str | None = arch_param()
    p: float | str = param("inf", flag="norm", type=str, check=_parse_p,
                           help="negcliploss → NormSim: p (a number, or inf; >= 100 means inf)")
    target: str | list | None = param(None, flag="proxy_path", path=True,
                                      help="NormSim target: a folder (or file) of .npy/.pt target embeddings")
    target_name: str | None = param(None, flag="proxy_name", help="NormSim target: imagenet_1k (DataComp's "
                                                                  "in1k_clip_vit_l14_*.pt)")
    key: str | None = param(None, flag=None, help="array key inside the target's .pt files")
    cache_path: str | None = param(None, flag=None, help="DataComp asset folder (default: --cache_path)")


def prepare(p: NormSimParams, run: RunSettings) -> Score:
    from ..scores.normsim import NormSimTarget, normsim_shard, parse_p  # noqa: PLC0415

    arch = check_arch(p.arch, "normsim")
    order = parse_p(p.p)
    if p.target is not None and p.target_name is not None:
        raise VaralignError("--proxy_path and --proxy_name both choose the same input: give one")
    if p.target is not None:
        files = p.target if isinstance(p.target, list) else [p.target]
        key = p.key
    elif (p.target_name or "imagenet_1k") in ("imagenet_1k", "imagenet-1k"):
        files = [str(find_asset(n, p.cache_path or run.cache_path, run.download)) for n in IN1K_FEATURES]
        key = "image_features"
    else:
        raise VaralignError("normsim needs --proxy_path (files/folders of embeddings) or --proxy_name imagenet_1k "
                            "(in a recipe stage: target = PATH or target_name = 'imagenet_1k')")
    target = NormSimTarget.from_paths(files, key=key, dim=ARCHS[arch]).prepare(order, run.device)
    return Score(fn=normsim_shard, kwargs={"target": target, "p": order, "key": image_key(arch), "device": run.device},
                 members=[(image_key(arch), ARCHS[arch])], every_shard=True, inputs=[str(f) for f in target.files],
                 info={"p": "inf" if order == float("inf") else order, "target": [str(f) for f in target.files],
                       "target_rows": target.rows})


register(Method("normsim", "NormSim-p / NormSim-∞ of the image embedding against a target embedding set",
                NormSimParams, prepare, uses_device=True))
