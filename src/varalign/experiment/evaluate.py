"""Zero-shot evaluation on DataComp's 38 tasks through clip_benchmark, from local webdataset copies.

A task's data is looked up as `{data_dir}/{task}` or `{data_dir}/wds_{task with / -> -}_test` (the
layout of DataComp's download_evalsets.py), each holding `test/nshards.txt`, `test/{0..n-1}.tar`
and `classnames.txt` + `zeroshot_classification_templates.txt` (classification) or
`dataset_type.txt` = `retrieval`. Results are appended to `eval_results.jsonl` one task at a time
(DataComp's line format; tasks already there are skipped, so a killed run resumes), then aggregated
into `eval_summary.json` and `eval_results.md`. Missing tasks are listed, never averaged over.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, save_json
from ..errors import VaralignError
from .tasks import GROUPS, TASKS, aggregate, format_score, get_task
from .train import CUSTOM_MODELS, read_info

RESULTS = "eval_results.jsonl"
SUMMARY = "eval_summary.json"
TABLE = "eval_results.md"


@dataclass
class EvalReport:
    """Per-task main metrics, the aggregation, and what is missing (with why)."""

    output_dir: str
    main_metrics: dict[str, float] = field(default_factory=dict)
    groups: dict[str, dict] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def task_dir(data_dir: str | os.PathLike, task: str) -> Path | None:
    """Where a task's local webdataset copy is, or None."""
    root = Path(data_dir)
    for cand in (root / task, root / f"wds_{task.replace('/', '-')}_test"):
        if (cand / "test" / "nshards.txt").exists():
            return cand
    return None


def read_results(path: str | os.PathLike) -> dict[str, dict]:
    """`eval_results.jsonl` -> {task key: line}; a bad line names the file and line number."""
    out: dict[str, dict] = {}
    p = Path(path)
    if not p.exists():
        return out
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            out[rec["key"]] = rec
            float(rec["metrics"]["main_metric"])
        except (ValueError, KeyError, TypeError):
            raise VaralignError(f"line {n} is not a result line with key and metrics.main_metric", p) from None
    return out


def load_model(info: dict, device: str):
    """(model, preprocess, tokenizer) of a training run's checkpoint, in eval mode on `device`."""
    import open_clip

    model_name = info["model"]
    config = info.get("model_config") or CUSTOM_MODELS.get(model_name)
    if config is not None and model_name not in open_clip.list_models():
        cfg_dir = Path(tempfile.mkdtemp(prefix="varalign-model-"))
        (cfg_dir / f"{model_name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(cfg_dir / f"{model_name}.json")
    checkpoint = info["checkpoint"]
    if checkpoint and not Path(checkpoint).exists() and "/" in str(checkpoint):
        raise VaralignError("checkpoint not found", checkpoint)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint, device=device)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise VaralignError(f"cannot load model {model_name!r} ({' '.join(str(exc).split())[:200]})",
                            checkpoint) from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def evaluate(train_output_dir: str | os.PathLike | None = None, data_dir: str | os.PathLike = ".", *,
             output_dir: str | os.PathLike | None = None, batch_size: int = 64, tasks: list[str] | None = None,
             num_workers: int = 0, device: str | None = None, use_model: tuple[str, str] | None = None,
             quiet: bool = False) -> EvalReport:
    """Evaluate a trained model (`info.json` in `train_output_dir`, or `use_model=(arch, checkpoint)`).

    `tasks` defaults to all 38; tasks whose data is absent, or that need DataComp's special
    evaluators, are reported in `missing` and keep their groups' scores None.
    """
    start = time.time()
    if use_model is not None:
        info = {"model": use_model[0], "checkpoint": use_model[1]}
    elif train_output_dir is not None:
        info = read_info(train_output_dir)
    else:
        raise VaralignError("give --train_output_dir or --use_model")
    out = Path(output_dir or train_output_dir or ".")
    out.mkdir(parents=True, exist_ok=True)
    keys = [get_task(t).key for t in tasks] if tasks else [t.key for t in TASKS]
    results_path = out / RESULTS
    done = read_results(results_path)
    report = EvalReport(str(out))
    todo = []
    for key in keys:
        task = get_task(key)
        if key in done:
            continue
        where = task_dir(data_dir, key)
        if task.kind == "special":
            report.missing[key] = f"{task.main_metric} needs DataComp's own evaluator (add its line to {RESULTS})"
        elif where is None:
            report.missing[key] = f"no data in {data_dir} ({key}/test/nshards.txt)"
        else:
            todo.append((task, where))
    if todo:
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, preprocess, tokenizer = load_model(info, device)
        for i, (task, where) in enumerate(todo, 1):
            if not quiet:
                print(f"evaluate [{i}/{len(todo)}] {task.key}", file=sys.stderr)
            t0 = time.time()
            metrics = _run_task(task, where, model, preprocess, tokenizer, device, batch_size, num_workers, quiet)
            record = {"key": task.key, "dataset": task.name, "metrics": metrics, "seconds": round(time.time() - t0, 2)}
            with open(results_path, "a") as fh:  # one line per finished task: resumable
                fh.write(json.dumps(record) + "\n")
            done[task.key] = record
    report.main_metrics = {k: float(done[k]["metrics"]["main_metric"]) for k in keys if k in done}
    scored = {k: v for k, v in report.main_metrics.items()}
    report.groups = aggregate(scored)
    report.seconds = round(time.time() - start, 2)
    save_json(out / SUMMARY, {"main_metrics": report.main_metrics, "groups": report.groups,
                              "missing": report.missing, "info": {k: info.get(k) for k in ("model", "checkpoint")}})
    with atomic_path(out / TABLE, ".md") as tmp:
        tmp.write_text(markdown_table(report))
    return report


def _run_task(task, where: Path, model, preprocess, tokenizer, device: str, batch_size: int,
              num_workers: int, quiet: bool) -> dict:
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.metrics import zeroshot_retrieval as zsr

    try:
        kind = "zeroshot_retrieval" if task.kind == "retrieval" else "zeroshot_classification"
        ds = build_dataset(f"wds/{task.key}", root=str(where), transform=preprocess, split="test", download=False,
                           task=kind)
    except (OSError, ValueError, AssertionError) as exc:
        raise VaralignError(f"cannot open task data ({exc})", where) from None
    loader = torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, shuffle=False,
                                         num_workers=num_workers)
    if task.kind == "retrieval":
        m = zsr.evaluate(model, loader, tokenizer, device=device, amp=False, recall_k_list=[1, 5, 10])
        m["mean_recall@1"] = 0.5 * (m["text_retrieval_recall@1"] + m["image_retrieval_recall@1"])
    else:
        if not ds.classes or not ds.templates:
            raise VaralignError("classification task needs classnames.txt and zeroshot_classification_templates.txt",
                                where)
        classifier = zsc.zero_shot_classifier(model, tokenizer, ds.classes, ds.templates, device, amp=False)
        logits, target = zsc.run_classification(model, classifier, loader, device, amp=False)
        m = classification_metrics(logits.numpy(), target.numpy())
    m["main_metric"] = m[task.main_metric]
    return {k: float(v) for k, v in m.items()}


def classification_metrics(logits: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """acc1, acc5 (≥ 5 classes) and mean_per_class_recall (balanced accuracy over present classes)."""
    pred = logits.argmax(axis=1)
    m = {"acc1": float((pred == target).mean())}
    if logits.shape[1] >= 5:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        m["acc5"] = float((top5 == target[:, None]).any(axis=1).mean())
    classes = np.unique(target)
    m["mean_per_class_recall"] = float(np.mean([(pred[target == c] == c).mean() for c in classes]))
    return m


def markdown_table(report: EvalReport) -> str:
    """DataComp's groups, then every task's main metric; missing tasks marked with the reason."""
    lines = ["| group | score |", "|---|---|"]
    for g in GROUPS:
        lines.append(f"| {g} | {format_score(report.groups[g])} |")
    lines += ["", "| task | metric | value |", "|---|---|---|"]
    for t in TASKS:
        if t.key in report.main_metrics:
            v = report.main_metrics[t.key]
            lines.append(f"| {t.name} (`{t.key}`) | {t.main_metric} | {v:.4f} |" if math.isfinite(v) else
                         f"| {t.name} (`{t.key}`) | {t.main_metric} | nan |")
        else:
            reason = report.missing.get(t.key, "not requested")
            lines.append(f"| {t.name} (`{t.key}`) | {t.main_metric} | missing: {reason} |")
    return "\n".join(lines) + "\n"
