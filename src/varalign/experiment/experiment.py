"""run_exp.sh in one call: for each subset file reshard -> train -> evaluate, then one comparison table.

Layout under `output_dir`: `shards/{subset}/` (resharded data), `output/{subset}_{scale}_seed_{seed}/`
(checkpoints, info.json, eval_results.jsonl), `comparison.md` + `comparison.json`.

Resume: `Loop` records each reshard and each training as a step of the work directory
`{output_dir}/.experiment-work` (`workdir.Steps`: the step's output files and sizes, and the identity
of its inputs and settings), so re-running the same command skips what is done and redoes a step whose
inputs changed or whose outputs went missing. `varalign minicomp run` runs the same loop.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..atomic import atomic_path, save_json
from ..errors import VaralignError
from ..guard import lock, lock_file_for
from ..owned import check_replaceable
from ..owned import record as record_owned
from ..workdir import Steps, WorkDir, digest
from .evaluate import evaluate
from .reshard import reshard
from .tasks import GROUPS, TASK_BY_KEY, format_score
from .train import data_fingerprint, same_data_dir, train

WORK_DIR = ".experiment-work"
COMPARISON = ("comparison.json", "comparison.md")  # the loop's own files in --output_dir


class Loop:
    """The steps of run_exp.sh for one output directory: a subset resharded once (`data`), each model trained
    once (`train`), any other step recorded the same way (`step`), all in the work directory
    `{output_dir}/{WORK_DIR}`. Use as a context manager (it locks the work directory)."""

    def __init__(self, output_dir: str | os.PathLike, input_dir: str | os.PathLike, *, runs_dir: str = "output",
                 num_workers: int | None = None, overwrite: bool = False, quiet: bool = False) -> None:
        self.out, self.input_dir = Path(output_dir), Path(input_dir)
        self.runs_dir = self.out / runs_dir
        self.num_workers, self.overwrite, self.quiet = num_workers, overwrite, quiet
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> Loop:
        self.out.mkdir(parents=True, exist_ok=True)
        root = self.out / WORK_DIR
        self._stack.enter_context(lock(lock_file_for(root.absolute()), f"the work directory {root}"))
        self.work = WorkDir(root, "experiment loop")  # every step carries its own key
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def step(self, phase: str, name: str, key: object, run: Callable[[], tuple[Sequence[Path], dict]]) -> dict:
        """`run()` -> (output files, info) unless step `phase`/`name` is done with the same `key`; its info."""
        steps, k = Steps(self.work, phase), digest(key)
        info = steps.done(name, k)
        if info is None:
            files, info = run()
            steps.finish(name, files, info, k)
        return info

    def data(self, subset: str | os.PathLike, name: str) -> tuple[Path, int | None]:
        """The training data of subset `name` (`no_filter`: the input itself) and its sample count."""
        if name == "no_filter":
            return self.input_dir, None
        data_dir = self.out / "shards" / name
        key = ["reshard", os.path.realpath(self.input_dir), os.path.realpath(subset), _stamp(subset)]
        reused = True

        def run() -> tuple[list[Path], dict]:
            nonlocal reused
            reused = False
            _say(f"experiment: reshard {subset} -> {data_dir}", self.quiet)
            r = reshard(self.input_dir, data_dir, subset, num_workers=self.num_workers, overwrite=self.overwrite,
                        quiet=self.quiet)
            shards = [data_dir / r.output_shard_format.format(i) for i in range(r.output_shard_count)]
            return [data_dir / "meta.json", *shards], {"samples": r.output_samples}

        info = self.step("reshard", name, key, run)
        if reused:
            _say(f"experiment: reuse {data_dir}", self.quiet)
        return data_dir, int(info["samples"])

    def train(self, exp_name: str, scale: str, data_dir: Path, seed: int, options: dict | None = None) -> Path:
        """Train `exp_name` (in `{runs_dir}/{exp_name}`) unless done with the same data and settings."""
        options = {"quiet": self.quiet, **(options or {})}
        # the data by its folder (however spelled) and content; what shows progress changes nothing in the model
        key = ["train", scale, same_data_dir(str(data_dir)), data_fingerprint(str(data_dir)), seed,
               sorted((k, repr(v)) for k, v in options.items() if k not in ("quiet", "progress"))]

        def run() -> tuple[list[Path], dict]:
            _say(f"experiment: train {exp_name}", self.quiet)
            # the loop's own run folder: a training of other data there is the loop's earlier one, redone
            r = train(scale, str(data_dir), str(self.runs_dir), exp_name, seed=seed, restart=True, **options)
            return [Path(r.info_path), Path(r.checkpoint)], {"exp_dir": r.exp_dir}

        return Path(self.step("train", exp_name, key, run)["exp_dir"])


def _stamp(path: str | os.PathLike) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def run_experiment(input_dir: str | os.PathLike, subset_files: list[str | os.PathLike],
                   output_dir: str | os.PathLike, *, scale: str, eval_data_dir: str | os.PathLike | None = None,
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
    if eval_data_dir is not None and not Path(eval_data_dir).is_dir():  # found out before training, not after
        raise VaralignError("eval data directory not found", eval_data_dir)
    check_replaceable(out, COMPARISON, overwrite,  # the user's comparison files are never replaced unasked
                      known_by=(COMPARISON[0], {"subset", "seed", "groups"}))
    rows = []
    with Loop(out, input_dir, num_workers=num_workers, overwrite=overwrite, quiet=quiet) as loop:
        for subset, name in zip(subset_files, names, strict=True):
            t0 = time.time()
            data_dir, samples = loop.data(subset, name)
            for seed in seeds:
                exp_name = f"{name}_{scale}_seed_{seed}"
                exp_dir = loop.train(exp_name, scale, data_dir, seed, train_options)
                _say(f"experiment: evaluate {exp_name}", quiet)
                report = evaluate(exp_dir, eval_data_dir, tasks=tasks, batch_size=eval_batch_size, quiet=quiet,
                                  custom_tasks=custom_tasks, tasks_dir=tasks_dir, task_kinds=task_kinds,
                                  overwrite=overwrite)
                rows.append({"subset": name, "seed": seed, "samples": samples, "exp_dir": str(exp_dir),
                             "groups": {g: report.groups[g]["score"] for g in GROUPS},
                             "group_detail": report.groups, "main_metrics": report.main_metrics,
                             "missing": report.missing, "seconds": round(time.time() - t0, 1)})
    save_json(out / "comparison.json", rows)
    with atomic_path(out / "comparison.md", ".md") as tmp:
        tmp.write_text(comparison_table(rows))
    record_owned(out, COMPARISON)
    return rows


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
