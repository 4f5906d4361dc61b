"""Zero-shot evaluation on DataComp's 38 tasks, and on your own tasks, through clip_benchmark, from local
webdataset copies.

A task's data is looked up as `{data_dir}/{task}` or `{data_dir}/wds_{task with / -> -}_test` (the
layout of DataComp's download_evalsets.py), each holding `test/nshards.txt`, `test/{0..n-1}.tar`
and `classnames.txt` + `zeroshot_classification_templates.txt` (classification) or
`dataset_type.txt` = `retrieval`. Results are appended to `eval_results.jsonl` one task at a time
(DataComp's line format; tasks already there are skipped, so a killed run resumes), then aggregated
into `eval_summary.json` and `eval_results.md`. Missing tasks are listed, never averaged over.

Custom tasks (`custom_tasks={name: folder}`, or every task folder of `tasks_dir`) use the same `wds/`
layout; each is zero-shot classification or retrieval, detected from its files (`dataset_type.txt` =
`retrieval`, else classification) or forced with `task_kinds={name: kind}`. They are reported beside
DataComp's tasks (same result lines, summary and table) and never enter DataComp's group averages.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import pickle
import sys
import tarfile
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_path, cached_sha256, save_json
from ..errors import VaralignError
from ..owned import check_replaceable
from ..owned import record as record_owned
from ..ptfile import checkpoint_problem
from .tasks import GROUPS, TASK_BY_KEY, TASKS, Task, aggregate, format_score, get_task
from .train import CUSTOM_MODELS, read_info
from .wds import ends_whole

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
    # custom tasks: {name: {"kind", "path", "main_metric" (metric name)}}; their values are in main_metrics
    custom: dict[str, dict] = field(default_factory=dict)


def task_dir(data_dir: str | os.PathLike, task: str) -> Path | None:
    """Where a task's local webdataset copy is, or None."""
    root = Path(data_dir)
    for cand in (root / task, root / f"wds_{task.replace('/', '-')}_test"):
        if (cand / "test" / "nshards.txt").exists():
            return cand
    return None


CUSTOM_KINDS = ("classification", "retrieval")
# DataComp's download_evalsets.py folder names -> task keys
_WDS_NAMES = {f"wds_{k.replace('/', '-')}_test": k for k in TASK_BY_KEY}


def custom_task(name: str, path: str | os.PathLike, kind: str | None = None) -> Task:
    """A custom task folder in clip_benchmark's `wds/` layout, checked; its kind is detected unless given.

    Retrieval when `dataset_type.txt` says `retrieval`, else classification (which needs `classnames.txt`
    and `zeroshot_classification_templates.txt`). A missing file is one error naming the folder and file.
    """
    where = Path(path)
    if not name or "=" in name or name in TASK_BY_KEY:
        raise VaralignError(f"custom task name {name!r} must be non-empty, without '=', and not one of "
                            "DataComp's 38 task keys (put such a folder under --data_dir)")
    if not where.is_dir():
        raise VaralignError(f"custom task {name!r}: folder not found", where)
    if kind is None:
        type_file = where / "dataset_type.txt"
        declared = type_file.read_text().strip().lower() if type_file.exists() else "classification"
        if declared not in CUSTOM_KINDS:
            raise VaralignError(f"dataset_type.txt says {declared!r}; custom tasks are classification or "
                                f"retrieval (force one with --task_kind {name}=KIND)", where)
        kind = declared
    elif kind not in CUSTOM_KINDS:
        raise VaralignError(f"task kind of {name!r} must be classification or retrieval, got {kind!r}")
    check_task_files(where, kind)
    return Task(name, name, "mean_recall@1" if kind == "retrieval" else "acc1", None, kind)


def check_task_files(where: str | os.PathLike, kind: str) -> None:
    """Raise one error naming the folder and the first file a `kind` task in the `wds/` layout lacks."""
    where = Path(where)
    needed = ["test/nshards.txt"]
    if kind == "classification":
        needed += ["classnames.txt", "zeroshot_classification_templates.txt"]
    for rel in needed:
        if not (where / rel).is_file():
            raise VaralignError(f"missing {rel} (a {kind} task in clip_benchmark's wds layout)", where)
    try:
        nshards = int((where / "test" / "nshards.txt").read_text().strip())
    except ValueError:
        raise VaralignError("test/nshards.txt is not a number", where) from None
    for i in range(nshards):
        if not (where / "test" / f"{i}.tar").is_file():
            raise VaralignError(f"missing test/{i}.tar (test/nshards.txt says {nshards})", where)


def check_task_tars(where: str | os.PathLike) -> None:
    """Every shard of a task (`test/nshards.txt` of them) a whole tar: one line naming the first that is not."""
    where = Path(where)
    try:
        nshards = int((where / "test" / "nshards.txt").read_text().strip())
    except (OSError, ValueError):
        return  # the layout checks (or clip_benchmark) name what is wrong
    for i in range(nshards):
        _check_whole_tar(where / "test" / f"{i}.tar")


def _check_whole_tar(path: Path) -> None:
    """A task shard is a tar whose every member is whole (a test set is small: every header is read, no data)."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = tar.getmembers()
            whole = ends_whole(tar)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise VaralignError(f"not a readable tar ({' '.join(str(exc).split())[:200]})", path) from None
    if not members:
        raise VaralignError("empty tar (no sample)", path)
    if not whole:
        end = members[-1].offset_data + members[-1].size
        raise VaralignError(f"truncated tar (no end-of-archive blocks after its last member, at byte {end:,} of "
                            f"{path.stat().st_size:,})", path)


def find_tasks(tasks_dir: str | os.PathLike) -> dict[str, Path]:
    """{name: folder} of every task folder (one with a `test/` subfolder) directly under `tasks_dir`.

    A folder named by a DataComp key (`mnist`, or download_evalsets.py's `wds_vtab-cifar100_test`) keeps
    that key, so it is evaluated and aggregated as that DataComp task.
    """
    root = Path(tasks_dir)
    if not root.is_dir():
        raise VaralignError("tasks folder not found", root)
    found = {_WDS_NAMES.get(p.name, p.name): p for p in sorted(root.iterdir()) if (p / "test").is_dir()}
    if not found:
        raise VaralignError("no task folders here (each needs test/nshards.txt and test/0.tar ...)", root)
    return found


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


def model_id(info: dict) -> dict:
    """What a result line records of the model it measured: its name and its checkpoint's SHA-256 (a pretrained
    tag, or a file not there, as given). A line of another model is redone, never reported for this one."""
    checkpoint = info.get("checkpoint")
    if checkpoint and Path(str(checkpoint)).is_file():
        checkpoint = "sha256:" + cached_sha256(checkpoint)
    return {"model": info.get("model"), "checkpoint": checkpoint}


def _of_model(record: dict | None, mid: dict) -> bool:
    """A result line measured this model (a line without `model_id`: an earlier varalign's, or one added by
    hand for DataComp's own evaluators, is taken as it is)."""
    return record is not None and record.get("model_id", mid) == mid


def load_model(info: dict, device: str):
    """(model, preprocess, tokenizer) of a training run's checkpoint, in eval mode on `device`."""
    import open_clip

    model_name = info["model"]
    config = info.get("model_config") or CUSTOM_MODELS.get(model_name)
    if config is not None and model_name not in open_clip.list_models():
        with tempfile.TemporaryDirectory(prefix="varalign-model-") as cfg_dir:  # read at once, then removed
            (Path(cfg_dir) / f"{model_name}.json").write_text(json.dumps(config))
            open_clip.add_model_config(Path(cfg_dir) / f"{model_name}.json")
    checkpoint = info["checkpoint"]
    if checkpoint and not Path(checkpoint).exists() and "/" in str(checkpoint):
        raise VaralignError("checkpoint not found", checkpoint)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the failure is reported
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=checkpoint,
                                                                         device=device)
    except (RuntimeError, ValueError, KeyError, AttributeError, TypeError, EOFError, pickle.UnpicklingError) as exc:
        # a checkpoint that is not one (a .npy, a pickle torch's weights_only loader refuses, a truncated file)
        raise VaralignError(f"cannot load model {model_name!r} ({checkpoint_problem(exc, checkpoint)})",
                            checkpoint) from None
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


def evaluate(train_output_dir: str | os.PathLike | None = None, data_dir: str | os.PathLike | None = None, *,
             output_dir: str | os.PathLike | None = None, batch_size: int = 64, tasks: list[str] | None = None,
             custom_tasks: dict[str, str | os.PathLike] | None = None, tasks_dir: str | os.PathLike | None = None,
             task_kinds: dict[str, str] | None = None, num_workers: int = 0, device: str | None = None,
             use_model: tuple[str, str] | None = None, quiet: bool = False, overwrite: bool = False) -> EvalReport:
    """Evaluate a trained model (`info.json` in `train_output_dir`, or `use_model=(arch, checkpoint)`).

    DataComp tasks: `tasks` (keys), by default all 38 when `data_dir` is given or no custom task is; their
    data is looked up in `data_dir` (default: the current folder). Tasks whose data is absent, or that
    need DataComp's special evaluators, are reported in `missing` and keep their groups' scores None.
    Custom tasks: `custom_tasks={name: folder}` and every task folder of `tasks_dir` (see `find_tasks`;
    folders there named by a DataComp key are that DataComp task); `task_kinds={name: "classification" |
    "retrieval"}` forces a custom task's kind. Their main metric (acc1, or mean_recall@1) is in
    `main_metrics` under the name; `custom` says kind and folder. They are not in DataComp's groups.
    An `eval_summary.json` or `eval_results.md` in the output folder that varalign did not write (`owned`) is
    not replaced unless `overwrite`.
    """
    start = time.time()
    if use_model is not None:
        info = {"model": use_model[0], "checkpoint": use_model[1]}
    elif train_output_dir is not None:
        info = read_info(train_output_dir)
    else:
        raise VaralignError("give --train_output_dir or --use_model")
    out = Path(output_dir or train_output_dir or ".")
    custom: dict[str, Path] = {}
    located: dict[str, Path] = {}  # DataComp tasks found in tasks_dir
    if tasks_dir is not None:
        for name, where in find_tasks(tasks_dir).items():
            (located if name in TASK_BY_KEY else custom)[name] = where
    for key, where in located.items():
        if get_task(key).kind != "special":
            check_task_files(where, get_task(key).kind)
    for name, where in (custom_tasks or {}).items():
        if name in custom:
            raise VaralignError(f"two custom tasks are named {name!r}")
        custom[name] = Path(where)
    unknown = sorted(set(task_kinds or {}) - set(custom))
    if unknown:
        raise VaralignError(f"task kind given for {unknown[0]!r}, which is not a custom task")
    custom_list = [custom_task(n, w, (task_kinds or {}).get(n)) for n, w in custom.items()]
    if tasks:
        keys = [get_task(t).key for t in tasks]
    elif data_dir is not None or not (custom or located):
        keys = [t.key for t in TASKS]
    else:
        keys = list(located)
    for key in located:
        if key not in keys:
            keys.append(key)
    if data_dir is not None and not Path(data_dir).is_dir():  # else every task would be reported missing
        raise VaralignError("eval data directory not found", data_dir)
    data_dir = "." if data_dir is None else data_dir
    check_replaceable(out, (SUMMARY, TABLE), overwrite, known_by=(SUMMARY, {"main_metrics", "groups", "missing"}))
    results_path = out / RESULTS
    done = read_results(results_path)
    mid = model_id(info)
    other = sorted(k for k, r in done.items() if not _of_model(r, mid))
    if other and not quiet:
        print(f"evaluate: {len(other)} result(s) in {results_path} are of another model or checkpoint: redone",
              file=sys.stderr)
    done = {k: r for k, r in done.items() if k not in other}
    report = EvalReport(str(out))
    todo = []
    for key in keys:
        task = get_task(key)
        if key in done:
            continue
        where = located.get(key) or task_dir(data_dir, key)
        if task.kind == "special":
            report.missing[key] = f"{task.main_metric} needs DataComp's own evaluator (add its line to {RESULTS})"
        elif where is None:
            report.missing[key] = f"no data in {data_dir} ({key}/test/nshards.txt)"
        else:
            todo.append((task, where, False))
    for task in custom_list:
        where = custom[task.key]
        report.custom[task.key] = {"kind": task.kind, "path": str(where), "main_metric": task.main_metric}
        prev = done.get(task.key)
        if prev is None or prev.get("path") != str(where) or prev.get("kind") != task.kind:
            done.pop(task.key, None)
            todo.append((task, where, True))
    for _task, where, _custom in todo:  # the tasks still to run, before the model is loaded
        check_task_tars(where)
    out.mkdir(parents=True, exist_ok=True)
    if todo:
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, preprocess, tokenizer = load_model(info, device)
        for i, (task, where, is_custom) in enumerate(todo, 1):
            if not quiet:
                print(f"evaluate [{i}/{len(todo)}] {task.key}", file=sys.stderr)
            t0 = time.time()
            metrics = _run_task(task, where, model, preprocess, tokenizer, device, batch_size, num_workers, quiet,
                                custom=is_custom)
            record = {"key": task.key, "dataset": task.name, "metrics": metrics, "seconds": round(time.time() - t0, 2),
                      "model_id": mid}
            if is_custom:
                record.update({"custom": True, "kind": task.kind, "path": str(where)})
            with open(results_path, "a") as fh:  # one line per finished task: resumable
                fh.write(json.dumps(record) + "\n")
            done[task.key] = record
    report.main_metrics = {k: float(done[k]["metrics"]["main_metric"]) for k in [*keys, *custom] if k in done}
    report.groups = aggregate({k: v for k, v in report.main_metrics.items() if k in TASK_BY_KEY})
    report.seconds = round(time.time() - start, 2)
    save_json(out / SUMMARY, {"main_metrics": report.main_metrics, "groups": report.groups,
                              "missing": report.missing, "custom_tasks": report.custom,
                              "info": {k: info.get(k) for k in ("model", "checkpoint")}})
    with atomic_path(out / TABLE, ".md") as tmp:
        tmp.write_text(markdown_table(report))
    record_owned(out, (SUMMARY, TABLE))
    return report


def _run_task(task: Task, where: Path, model, preprocess, tokenizer, device: str, batch_size: int,
              num_workers: int, quiet: bool, custom: bool = False) -> dict:
    import torch
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from clip_benchmark.metrics import zeroshot_retrieval as zsr

    ds = _custom_dataset(task, where, preprocess) if custom else _datacomp_dataset(task, where, preprocess)
    loader = torch.utils.data.DataLoader(ds.batched(batch_size), batch_size=None, shuffle=False,
                                         num_workers=num_workers)
    with _progress_bars((zsc, zsr), enabled=not quiet):
        m = _metrics(task, ds, where, model, tokenizer, loader, device, zsc, zsr)
    m["main_metric"] = m[task.main_metric]
    return {k: float(v) for k, v in m.items()}


@contextlib.contextmanager
def _progress_bars(modules: tuple, enabled: bool) -> Iterator[None]:
    """clip_benchmark's own tqdm bars (module-level `tqdm` names), silenced for --quiet."""
    if enabled:
        yield
        return
    saved = [(m, m.tqdm) for m in modules if hasattr(m, "tqdm")]
    for m, bar in saved:
        m.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        for m, bar in saved:
            m.tqdm = bar


def _metrics(task: Task, ds, where: Path, model, tokenizer, loader, device: str, zsc, zsr) -> dict:
    try:
        if task.kind == "retrieval":
            m = zsr.evaluate(model, loader, tokenizer, device=device, amp=False, recall_k_list=[1, 5, 10])
            m["mean_recall@1"] = 0.5 * (m["text_retrieval_recall@1"] + m["image_retrieval_recall@1"])
        else:
            if not ds.classes or not ds.templates:
                raise VaralignError("classification task needs classnames.txt and "
                                    "zeroshot_classification_templates.txt", where)
            classifier = zsc.zero_shot_classifier(model, tokenizer, ds.classes, ds.templates, device, amp=False)
            logits, target = zsc.run_classification(model, classifier, loader, device, amp=False)
            m = classification_metrics(logits.numpy(), target.numpy())
    except (ValueError, KeyError, tarfile.TarError, EOFError) as exc:  # a sample without the expected .cls / .txt /
        # image member, or a shard that is not a whole tar
        if isinstance(exc, VaralignError):
            raise
        raise VaralignError(f"cannot read the {task.kind} task's samples ({' '.join(str(exc).split())[:200]})",
                            where) from None
    return m


def _datacomp_dataset(task: Task, where: Path, preprocess):
    from clip_benchmark.datasets.builder import build_dataset

    try:
        kind = "zeroshot_retrieval" if task.kind == "retrieval" else "zeroshot_classification"
        return build_dataset(f"wds/{task.key}", root=str(where), transform=preprocess, split="test",
                             download=False, task=kind)
    except (OSError, ValueError, AssertionError) as exc:
        raise VaralignError(f"cannot open task data ({exc})", where) from None


def _custom_dataset(task: Task, where: Path, preprocess):
    """clip_benchmark's `build_wds_dataset`, with the kind given instead of read from dataset_type.txt."""
    import webdataset as wds

    nshards = int((where / "test" / "nshards.txt").read_text().strip())
    ds = wds.WebDataset(str(where / "test" / f"{{0..{nshards - 1}}}.tar"), nodesplitter=lambda src: src,
                        shardshuffle=False)
    ds = ds.decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
    if task.kind == "retrieval":
        ds = ds.to_tuple("webp;png;jpg;jpeg", "txt").map_tuple(preprocess, str.splitlines)
        ds.classes = ds.templates = None
    else:
        ds = ds.to_tuple("webp;png;jpg;jpeg", "cls").map_tuple(preprocess, None)
        ds.classes = _lines(where / "classnames.txt")
        ds.templates = _lines(where / "zeroshot_classification_templates.txt")
    return ds


def _lines(path: Path) -> list[str]:
    return [x.strip() for x in path.read_text().splitlines() if x.strip()]


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
    for name, c in report.custom.items():
        v = report.main_metrics.get(name, math.nan)
        lines.append(f"| {name} (custom {c['kind']}: `{c['path']}`) | {c['main_metric']} | "
                     + (f"{v:.4f} |" if math.isfinite(v) else "nan |"))
    return "\n".join(lines) + "\n"
