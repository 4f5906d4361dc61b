"""VAS ∩ CLIP score: VAS(i) = f_iᵀ S f_i of the image embedding against a target second moment S."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..assets import file_sha256
from ..errors import VaralignError
from ..pool import ARCHS, image_key
from ..recipe import Stage
from ..scores.vas import vas_shard
from ..target import load_target, target_path_for
from .base import (
    Method,
    RunSettings,
    Score,
    arch_param,
    check_arch,
    check_fraction,
    check_fractions_shrink,
    name,
    one_of,
    param,
    register,
    stage_params,
)
from .clip_score import clip_stage


@dataclass
class VasParams:
    arch: str | None = arch_param()
    target: str | None = param(None, help="target second-moment matrix, .npy or .pt (D×D)", path=True)
    target_variance_name: str | None = param(
        None, help="read the target from FILES_PATH/variance/variance_{name}.pt|.npy")
    files_path: str | None = param(None, flag=None, help="the VAS reference's files folder (default: --files_path)")


def prepare(p: VasParams, run: RunSettings) -> Score:
    arch = check_arch(p.arch, "vas")
    if p.target is not None and p.target_variance_name is not None:
        raise VaralignError("--target and --target_variance_name both choose the same input: give one")
    path = p.target
    if path is None:
        files_path = p.files_path or run.files_path
        if p.target_variance_name is None:
            raise VaralignError("vas needs a target: --target PATH, or --target_variance_name NAME --files_path DIR")
        if files_path is None:
            raise VaralignError("--target_variance_name needs --files_path DIR (target read from DIR/variance/)")
        path = target_path_for(files_path, p.target_variance_name)
    target = load_target(path, ARCHS[arch])
    key = image_key(arch)
    return Score(fn=vas_shard, kwargs={"key": key, "target": target, "device": run.device},
                 members=[(key, ARCHS[arch])], every_shard=True, inputs=[str(path)],
                 info={"target": str(path), "target_sha256": file_sha256(Path(path))})


register(Method("vas", "Variance Alignment Score f^T S f against a target second moment S (image embeddings)",
                VasParams, prepare, uses_device=True))


@name("vas", "VAS ∩ CLIP score: top ⌊N·f⌋ by CLIP score, then top ⌊N·f_vas⌋ by VAS against a target")
def _vas(options: dict[str, Any]) -> list[Stage]:
    first = clip_stage(options, "top_k", "vas")
    one_of(options.get("fraction_vas"), options.get("threshold_vas"), "--fraction_vas", "--threshold_vas", "vas")
    check_fraction(options.get("fraction_vas"), "--fraction_vas")
    check_fractions_shrink(options)
    return [first, Stage("vas", stage_params("vas", options), options.get("fraction_vas"),
                         options.get("threshold_vas"))]
