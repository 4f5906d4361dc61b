"""negCLIPLoss (the negCLIPLoss_NormSim paper): CLIP score minus the batch log-sum-exp terms, and its
`--name` preset (`cs_new`): negCLIPLoss top ⌊N·f⌋, then NormSim top ⌊N·f_vas⌋ when f_vas < f."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import VaralignError
from ..pool import ARCHS, image_key, text_key
from ..recipe import Stage
from ..scores.negcliploss import DEFAULT_AVERAGE_NUM, DEFAULT_BATCH_SIZE, DEFAULT_TEMPERATURE, negcliploss_shard
from .base import (
    Method,
    RunSettings,
    Score,
    arch_param,
    check_arch,
    check_fraction,
    name,
    one_of,
    param,
    register,
    stage_params,
)


@dataclass
class NegClipLossParams:
    arch: str | None = arch_param()
    temperature: float = param(DEFAULT_TEMPERATURE, type=float, low=1e-300, finite=True,
                               help=f"negcliploss: τ (default {DEFAULT_TEMPERATURE})")
    batch_size: int = param(DEFAULT_BATCH_SIZE, type=int, low=1,
                            help=f"negcliploss: batch size B (default {DEFAULT_BATCH_SIZE}); vas_d/image_based: "
                                 "accepted (bounds memory only in the reference)")
    average_num: int = param(DEFAULT_AVERAGE_NUM, type=int, low=1,
                             help=f"negcliploss: K random batchings averaged (default {DEFAULT_AVERAGE_NUM})")


def prepare(p: NegClipLossParams, run: RunSettings) -> Score:
    arch = check_arch(p.arch, "negcliploss")
    kw = {"temperature": float(p.temperature), "batch_size": int(p.batch_size), "average_num": int(p.average_num)}
    if kw["temperature"] <= 0 or kw["batch_size"] < 2 or kw["average_num"] < 1:
        raise VaralignError(f"negcliploss needs temperature > 0, batch_size >= 2, average_num >= 1 (got {kw})")
    keys = {"img_key": image_key(arch), "txt_key": text_key(arch)}
    return Score(fn=negcliploss_shard, kwargs=keys | kw | {"seed": run.seed, "device": run.device},
                 members=[(image_key(arch), ARCHS[arch]), (text_key(arch), ARCHS[arch])], info=kw | {"seed": run.seed})


register(Method("negcliploss", "negCLIPLoss: CLIP score minus the batch log-sum-exp terms (τ, B, K; seeded)",
                NegClipLossParams, prepare, uses_device=True))

_DESCRIPTION = ("negCLIPLoss top ⌊N·f⌋; with --fraction_vas < --fraction, then NormSim top ⌊N·f_vas⌋ "
                "(the negCLIPLoss paper's cs_new)")


def _cs_new(options: dict[str, Any]) -> list[Stage]:
    """negCLIPLoss top ⌊N·f⌋, then (if --fraction_vas < --fraction) NormSim top ⌊N·f_vas⌋."""
    fv, f = options.get("fraction_vas"), options.get("fraction")
    one_of(f, options.get("threshold"), "--fraction", "--threshold", options["name"])
    check_fraction(f, "--fraction")
    check_fraction(fv, "--fraction_vas")
    if None not in (fv, f) and fv > f:
        raise VaralignError(f"--fraction_vas ({fv}) cannot exceed --fraction ({f})")
    stages = [Stage("negcliploss", stage_params("negcliploss", options), f, options.get("threshold"))]
    if options.get("threshold_vas") is not None or (fv is not None and fv != f):
        if options.get("proxy_path") is None and options.get("proxy_name") not in (None, "imagenet_1k", "imagenet-1k"):
            raise VaralignError("--proxy_name: only imagenet_1k is built in; pass --proxy_path DIR for others")
        norm = {k: v for k, v in stage_params("normsim", options).items() if k != "target_name"}
        stages.append(Stage("normsim", norm, fv, options.get("threshold_vas")))
    return stages


name("negcliploss", _DESCRIPTION)(_cs_new)
name("cs_new", "alias of negcliploss (the name in the negCLIPLoss_NormSim reference scripts)")(_cs_new)
