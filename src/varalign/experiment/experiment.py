"""run_exp.sh in one call: for each subset file reshard -> train -> evaluate, then one comparison table.

Layout under `output_dir`: `shards/{subset}/` (resharded data), `output/{subset}_{scale}_seed_{seed}/`
(checkpoints, info.json, eval_results.jsonl), `comparison.md` + `comparison.json`. Each stage is skipped
when its output is complete, so re-running the same command resumes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..atomic import atomic_path, save_json
from ..errors import VaralignError
from .evaluate import evaluate
from .reshard import reshard
from .tasks import GROUPS, TASK_BY_KEY, format_score
from .train import read_info, train


def run_experiment(input_dir: str | os.PathLike, subset_files: list[str | os.PathLike],
                   output_dir: str | os.PathLike, *, scale: str, eval_data_dir: str | os.PathLike,
                   seeds: tuple[int, ...] | list[int] = (0,), tasks: list[str] | None = None,
                   num_workers: int | None = None, overwrite: bool = False, train_options: dict | None = None,
                   eval_batch_size: int = 64, custom_tasks: dict[str, str | os.PathLike] | None = None,
                   tasks_dir: str | os.PathLike | None = None, task_kinds: dict[str, str] | None = None,
                   quiet: bool = False) -> list[dict]:
    """Run the whole loop for every subset file; returns the comparison rows (also written to disk).

    A subset named `no_filter` trains on `input_dir` itself (as run_exp.sh does).
    `train_options` are extra keyword arguments for `train` (e.g. `train_num_samples`, `workers`).
    `custom_tasks`, `tasks_dir` and `task_kinds` add your own tasks, as in `evaluate`.
    """
    out = Path(output_dir)
    names = [Path(s).name.removesuffix(".npy") for s in subset_files]
    if len(set(names)) != len(names):
        raise VaralignError("two subset files have the same name (their outputs would collide)")
    for s, name in zip(subset_files, names, strict=True):
        if name != "no_filter" and not Path(s).is_file():
            raise VaralignError("subset file not found", s)
    rows = []
    for subset, name in zip(subset_files, names, strict=True):
        t0 = time.time()
        data_dir = Path(input_dir) if name == "no_filter" else out / "shards" / name
        samples = None
        if name != "no_filter":
            samples = _reshard_once(input_dir, subset, data_dir, num_workers, overwrite, quiet)
        for seed in seeds:
            exp_name = f"{name}_{scale}_seed_{seed}"
            exp_dir = out / "output" / exp_name
            if not _trained(exp_dir):
                _say(f"experiment: train {exp_name}", quiet)
                train(scale, str(data_dir), str(out / "output"), exp_name, seed=seed, quiet=quiet,
                      **(train_options or {}))
            _say(f"experiment: evaluate {exp_name}", quiet)
            report = evaluate(exp_dir, eval_data_dir, tasks=tasks, batch_size=eval_batch_size, quiet=quiet,
                              custom_tasks=custom_tasks, tasks_dir=tasks_dir, task_kinds=task_kinds)
            rows.append({"subset": name, "seed": seed, "samples": samples, "exp_dir": str(exp_dir),
                         "groups": {g: report.groups[g]["score"] for g in GROUPS},
                         "group_detail": report.groups, "main_metrics": report.main_metrics,
                         "missing": report.missing, "seconds": round(time.time() - t0, 1)})
    save_json(out / "comparison.json", rows)
    with atomic_path(out / "comparison.md", ".md") as tmp:
        tmp.write_text(comparison_table(rows))
    return rows


def _reshard_once(input_dir: str | os.PathLike, subset: str | os.PathLike, data_dir: Path,
                  num_workers: int | None, overwrite: bool, quiet: bool) -> int:
    meta_path = data_dir / "meta.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("args", {}).get("subset_file") == str(subset) and meta.get("args", {}).get("input_dir") == \
                str(input_dir):
            _say(f"experiment: reuse {data_dir}", quiet)
            return int(meta["output_samples"])
    _say(f"experiment: reshard {subset} -> {data_dir}", quiet)
    result = reshard(input_dir, data_dir, subset, num_workers=num_workers, overwrite=overwrite, quiet=quiet)
    return result.output_samples


def _trained(exp_dir: Path) -> bool:
    if not (exp_dir / "info.json").exists():
        return False
    try:
        return Path(read_info(exp_dir)["checkpoint"]).exists()
    except VaralignError:
        return False


def comparison_table(rows: list[dict]) -> str:
    """One row per subset × seed: samples, DataComp's group scores, then every evaluated task (custom ones last)."""
    keys = [k for k in TASK_BY_KEY if any(k in r["main_metrics"] for r in rows)]
    keys += sorted({k for r in rows for k in r["main_metrics"] if k not in TASK_BY_KEY})
    head = ["subset", "seed", "samples", *GROUPS,
            *(TASK_BY_KEY[k].name if k in TASK_BY_KEY else f"{k} (custom)" for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["subset"], str(r["seed"]), "-" if r["samples"] is None else f"{r['samples']:,}"]
        cells += [format_score(r["group_detail"][g]) for g in GROUPS]
        cells += [f"{r['main_metrics'][k]:.4f}" if k in r["main_metrics"] else "missing" for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    missing = sorted({k for r in rows for k in r["missing"]})
    if missing:
        lines += ["", f"Missing tasks ({len(missing)}), not averaged over: " + ", ".join(missing)]
    return "\n".join(lines) + "\n"


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr)
