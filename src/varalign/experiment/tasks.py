"""DataComp's 38 scored evaluation tasks and its aggregation (aggregate_scores.py definitions)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import VaralignError

IMAGENET = "ImageNet"
SHIFTS = "ImageNet dist. shifts"
VTAB = "VTAB"
RETRIEVAL = "Retrieval"
AVERAGE = "Average over 38 datasets"
GROUPS = (IMAGENET, SHIFTS, VTAB, RETRIEVAL, AVERAGE)


@dataclass(frozen=True)
class Task:
    """One scored task: DataComp key, display name, main metric, aggregation group, evaluator kind.

    `kind` is `classification` or `retrieval` (run here through clip_benchmark) or `special`
    (WinoGAViL, WILDS and fairness metrics need DataComp's own evaluators: add their result lines to
    `eval_results.jsonl` yourself, or they are reported missing).
    """

    key: str
    name: str
    main_metric: str
    group: str | None
    kind: str = "classification"


def _t(key: str, name: str, metric: str = "acc1", group: str | None = None, kind: str = "classification") -> Task:
    return Task(key, name, metric, group, kind)


TASKS: tuple[Task, ...] = (
    _t("imagenet1k", "ImageNet 1k", group=IMAGENET),
    _t("imagenet_sketch", "ImageNet Sketch", group=SHIFTS),
    _t("imagenetv2", "ImageNet v2", group=SHIFTS),
    _t("imagenet-a", "ImageNet-A", group=SHIFTS),
    _t("imagenet-o", "ImageNet-O", group=SHIFTS),
    _t("imagenet-r", "ImageNet-R", group=SHIFTS),
    _t("objectnet", "ObjectNet", group=SHIFTS),
    _t("vtab/caltech101", "Caltech-101", "mean_per_class_recall", VTAB),
    _t("vtab/cifar100", "CIFAR-100", group=VTAB),
    _t("vtab/clevr_count_all", "CLEVR Counts", group=VTAB),
    _t("vtab/clevr_closest_object_distance", "CLEVR Distance", group=VTAB),
    _t("vtab/dtd", "Describable Textures", group=VTAB),
    _t("vtab/eurosat", "EuroSAT", group=VTAB),
    _t("vtab/flowers", "Oxford Flowers-102", "mean_per_class_recall", VTAB),
    _t("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", group=VTAB),
    _t("vtab/pcam", "PatchCamelyon", group=VTAB),
    _t("vtab/pets", "Oxford-IIIT Pet", "mean_per_class_recall", VTAB),
    _t("vtab/resisc45", "RESISC45", group=VTAB),
    _t("vtab/svhn", "SVHN", group=VTAB),
    _t("sun397", "SUN397", group=VTAB),
    _t("retrieval/flickr_1k_test_image_text_retrieval", "Flickr", "mean_recall@1", RETRIEVAL, "retrieval"),
    _t("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", "mean_recall@1", RETRIEVAL, "retrieval"),
    _t("misc/winogavil", "WinoGAViL", "jaccard_score_10-12", RETRIEVAL, "special"),
    _t("cifar10", "CIFAR-10"),
    _t("country211", "Country211"),
    _t("food101", "Food-101"),
    _t("gtsrb", "GTSRB"),
    _t("mnist", "MNIST"),
    _t("voc2007", "Pascal VOC 2007"),
    _t("renderedsst2", "Rendered SST2"),
    _t("cars", "Stanford Cars"),
    _t("stl10", "STL-10"),
    _t("fgvc_aircraft", "FGVC Aircraft", "mean_per_class_recall"),
    _t("wilds/iwildcam", "iWildCam", "F1-macro_all", kind="special"),
    _t("wilds/camelyon17", "Camelyon17"),
    _t("wilds/fmow", "FMoW", "acc_worst_region", kind="special"),
    _t("fairness/dollar_street", "Dollar Street", "acc_top5_wg", kind="special"),
    _t("fairness/geode", "GeoDE", "acc_wg", kind="special"),
)
TASK_BY_KEY: dict[str, Task] = {t.key: t for t in TASKS}
assert len(TASK_BY_KEY) == 38


def group_members(group: str) -> list[str]:
    """Task keys averaged in `group` (unweighted)."""
    if group == AVERAGE:
        return [t.key for t in TASKS]
    return [t.key for t in TASKS if t.group == group]


def get_task(key: str) -> Task:
    try:
        return TASK_BY_KEY[key]
    except KeyError:
        raise VaralignError(f"unknown task {key!r} (one of DataComp's 38 keys, e.g. imagenet1k, vtab/cifar100)") from None


def aggregate(main_metrics: Mapping[str, float | None]) -> dict[str, dict]:
    """DataComp's group scores from `{task key: main metric}`.

    Each group gets `{"score", "n", "total", "missing"}`. A group with any task missing (absent,
    None or NaN) has `score` None: missing tasks are listed, never averaged over.
    """
    unknown = sorted(set(main_metrics) - set(TASK_BY_KEY))
    if unknown:
        raise VaralignError(f"unknown task {unknown[0]!r} in results")
    out: dict[str, dict] = {}
    for group in GROUPS:
        keys = group_members(group)
        values = {k: main_metrics.get(k) for k in keys}
        missing = [k for k, v in values.items() if v is None or (isinstance(v, float) and math.isnan(v))]
        present = [float(v) for k, v in values.items() if k not in missing]
        score = sum(present) / len(keys) if not missing else None
        out[group] = {"score": score, "n": len(present), "total": len(keys), "missing": missing}
    return out


def format_score(entry: dict) -> str:
    """`0.5312`, or `— (2/3; missing: a, b)` for an incomplete group."""
    if entry["score"] is not None:
        return f"{entry['score']:.4f}"
    return f"— ({entry['n']}/{entry['total']} tasks)"
