"""`varalign minicomp run`: filter the mini pool with each method, train a `tiny` CLIP from scratch on every
subset with the same number of samples seen, evaluate on the mini downstream tasks, over seeds.

Writes `{run_dir}/subsets/{method}.npy`, `{run_dir}/shards/{method}/`, `{run_dir}/train/{method}_seed_{s}/`
(checkpoint + `minicomp_eval.json`), and `{run_dir}/results.md` / `results.json`: mean ± std of each task's
main metric per method, and the share of each hidden noise kind (`label_*`) that each method kept.
A method whose inputs are missing here (fastText model for `basic_filter`, centroids for `image_based`) is
reported as skipped with the reason, never silently dropped.

The loop is the experiment loop's (`experiment.experiment.Loop`, layout `shards/` and `train/` under the run
directory): each selection, reshard, training and evaluation is a step of its work directory, reused on
a re-run with the same build and settings. `varalign demo` is a front of this module and of `build`.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..atomic import atomic_path, save_json
from ..errors import VaralignError
from ..owned import check_replaceable
from ..owned import record as record_owned
from ..uids import hex_to_uids, isin_sorted, load_subset, save_subset, sort_uids
from .build import CAPTION_KINDS, IMAGE_KINDS, LABEL_COLUMNS, finished
from .plot import write_plot

# method -> filter_pool options ({target}, {normsim}, {files} filled in); `random` is drawn here
METHODS: dict[str, dict] = {
    "no_filter": {"name": "no_filter"},
    "random_30": {"name": "random", "fraction": 0.3},
    "clip_score_30": {"name": "clip_score", "fraction": 0.3},
    "vas_clip_score": {"name": "vas", "fraction": 0.45, "fraction_vas": 0.3, "target": "{target}"},
    "vas_other_clip_score": {"name": "vas", "fraction": 0.45, "fraction_vas": 0.3, "target": "{target_other}"},
    "vas_d_clip_score": {"name": "vas_d", "fraction": 0.45, "fraction_vas": 0.3, "num_iters": 10},
    "negcliploss_30": {"name": "negcliploss", "fraction": 0.3},
    "negcliploss_normsim": {"name": "negcliploss", "fraction": 0.45, "fraction_vas": 0.3, "proxy_path": "{normsim}"},
    "basic_filter": {"name": "basic_filter"},
    "image_based": {"name": "image_based"},
}
DESCRIPTIONS = {
    "no_filter": "everything",
    "random_30": "random 30%",
    "clip_score_30": "CLIP score top 30%",
    "vas_clip_score": "CLIP score top 45%, then VAS (downstream target) top 30% of the pool",
    "vas_other_clip_score": "CLIP score top 45%, then VAS (one source's training split as target: the ImageNet "
                            "stand-in) top 30%",
    "vas_d_clip_score": "CLIP score top 45%, then VAS-D (10 rounds) top 30%",
    "negcliploss_30": "negCLIPLoss top 30%",
    "negcliploss_normsim": "negCLIPLoss top 45%, then NormSim-inf (downstream features) top 30%",
    "basic_filter": "DataComp's basic rules: English caption, length, image size and aspect ratio",
    "image_based": "DataComp's image_based: pool clusters nearest to the downstream features",
}

RESULTS = ("results.json", "results.md", "results.svg")  # what a run writes into its folder


def pool_labels(metadata_dir: Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The pool's uids (in shard order) and its hidden `label_*` columns."""
    import pyarrow.parquet as pq

    uids, labels = [], {c: [] for c in LABEL_COLUMNS}
    for p in sorted(metadata_dir.glob("*.parquet")):
        t = pq.read_table(p, columns=["uid", *LABEL_COLUMNS])
        uids.append(hex_to_uids(t.column("uid"), p))
        for c in LABEL_COLUMNS:
            labels[c] += t.column(c).to_pylist()
    return np.concatenate(uids), {c: np.array(v) for c, v in labels.items()}


def kept_share(pool_uids: np.ndarray, labels: dict[str, np.ndarray], kept: np.ndarray) -> dict[str, dict[str, float]]:
    """{label column: {kind: share of the pool's samples of that kind that the subset `kept`}}, for the caption
    and image kinds (every kind of CAPTION_KINDS/IMAGE_KINDS, then any other; NaN for a kind absent here)."""
    mask = isin_sorted(pool_uids, kept)
    out: dict[str, dict[str, float]] = {}
    for col, kinds in (("label_caption_kind", CAPTION_KINDS), ("label_image_kind", IMAGE_KINDS)):
        present = set(labels[col].tolist())
        out[col] = {}
        for k in (*kinds, *sorted(present - set(kinds))):
            sel = labels[col] == k
            out[col][k] = float(mask[sel].mean()) if sel.any() else float("nan")
    return out


def filter_options(method: str, build_dir: Path, arch: str) -> tuple[str, dict]:
    """`method`'s `filter_pool` name and options on the build in `build_dir` (its targets filled in)."""
    opts = dict(METHODS[method])
    name = opts.pop("name")
    fill = {"{target}": str(build_dir / "files" / "variance" / "variance_downstream.npy"),
            "{normsim}": str(build_dir / "files" / "normsim_downstream"),
            "{target_other}": str(build_dir / "files" / "variance" / "variance_other.npy")}
    opts = {k: fill.get(v, v) if isinstance(v, str) else v for k, v in opts.items()}
    if name in ("clip_score", "vas", "vas_d", "negcliploss"):
        opts["arch"] = arch
    return name, opts


def select(method: str, build_dir: Path, save_path: Path, seed: int = 0, arch: str = "l14", **options):
    """Write `method`'s subset of the pool to `save_path`; returns filter_pool's result (`random_30`, drawn
    here: None) and the subset's size. `options`: more filter_pool options (`save_scores`, `num_workers`)."""
    from ..engine import filter_pool

    name, opts = filter_options(method, build_dir, arch)
    metadata = build_dir / "metadata"
    if opts.get("target") and not Path(opts["target"]).exists():
        raise VaralignError("this build has no such VAS target (a v4 build has no `other` target: rebuild with "
                            "the v5 preset)", opts["target"])
    if name == "random":
        uids, _ = pool_labels(metadata)
        rng = np.random.default_rng([seed, 7])
        pick = uids[rng.permutation(len(uids))[: int(len(uids) * opts["fraction"])]]
        save_subset(save_path, sort_uids(pick))
        return None, len(pick)
    if name == "image_based":
        opts = {"recipe": str(_image_based_recipe(build_dir, save_path.parent))}
        name = None
    r = filter_pool(metadata, save_path, name=name, quiet=True, **opts, **options)
    return r, len(r.uids)


def _select_once(method: str, build_dir: Path, sub: Path, arch: str) -> tuple[list[Path], dict]:
    """The select step: `method`'s subset, unless one is there already (`varalign demo` writes its subsets with
    this same `select`, with their scores, before `--train` runs this loop in its folder)."""
    if not sub.exists():
        select(method, build_dir, sub, arch=arch, num_workers=1)
    return [sub], {"samples": int(len(load_subset(sub)))}


def _image_based_recipe(build_dir: Path, out_dir: Path) -> Path:
    """DataComp's image_based on the mini pool: k-means centroids of the pool (DataComp's recipe,
    K = pool / 128 as DataComp-small's 12.8M / 100k), and the downstream training split's features
    standing in for ImageNet-1k train."""
    from ..centroids import build_centroids
    from ..pool import discover_shards

    centroids = build_dir / "centroids" / "pool_centroids.npy"
    if not centroids.exists():
        rows = sum(s.num_rows for s in discover_shards(build_dir / "metadata", need_npz=True))
        build_centroids(build_dir / "metadata", k=max(8, rows // 128), niter=20, seed=0, save_path=centroids)
    features = build_dir / "files" / "normsim_downstream" / "train_features.npy"
    centroids, features = centroids.resolve(), features.resolve()  # a recipe's relative paths are its folder's
    recipe = out_dir / "image_based.toml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text('name = "image_based"\ndescription = "DataComp image_based on the mini pool"\n'
                      f'[[stages]]\nscore = "image_based"\ncentroids = "{centroids}"\n'
                      f'target_features = ["{features}"]\n')
    return recipe


def _evaluate(exp_dir: Path, eval_dir: Path) -> tuple[list[Path], dict[str, float]]:
    """Every task folder of the build's `eval/` through `varalign evaluate`'s custom tasks (`mnist` is
    DataComp's key; the `minicomp_*` folders are custom tasks); its file and {task: main metric}."""
    from ..experiment.evaluate import evaluate

    report = evaluate(exp_dir, tasks_dir=eval_dir, batch_size=256, quiet=True)
    save_json(exp_dir / "minicomp_eval.json", report.main_metrics)
    return [exp_dir / "minicomp_eval.json"], report.main_metrics


def run(build_dir: str | os.PathLike, run_dir: str | os.PathLike, *, methods: list[str] | None = None,
        seeds: list[int] | None = None, train_num_samples: int = 12_800, batch_size: int = 64,
        quiet: bool = False, overwrite: bool = False) -> dict:
    """Run every method (default: all of METHODS) over `seeds` (default [0]); returns the results dict.
    A results.json / .md / .svg in `run_dir` that varalign did not write is not replaced unless `overwrite`."""
    from ..experiment.experiment import Loop

    build_dir, run_dir = Path(build_dir), Path(run_dir)
    manifest = finished(build_dir)
    if manifest is None:
        raise VaralignError("not a finished `varalign minicomp build` directory", build_dir)
    arch = manifest["config"]["arch"]
    methods = methods or list(METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise VaralignError(f"unknown method(s) {', '.join(unknown)} (one of {', '.join(METHODS)})")
    seeds = seeds or [0]
    check_replaceable(run_dir, RESULTS, overwrite, known_by=(RESULTS[0], {"methods", "skipped", "seeds"}))
    pool_uids, labels = pool_labels(build_dir / "metadata")
    results: dict = {"methods": {}, "skipped": {}, "train_num_samples": train_num_samples, "seeds": seeds}
    build_id = manifest["config"]
    train_options = {"train_num_samples": train_num_samples, "batch_size": batch_size, "num_checkpoints": 1,
                     "log_every_n_steps": 10, "progress": True}

    def log(msg: str) -> None:
        if not quiet:
            tqdm.write(f"minicomp run: {msg}", file=sys.stderr)

    # one step per (method, seed): filter, reshard, train, evaluate; finished ones are reused
    bar = tqdm(total=len(methods) * len(seeds), desc="minicomp run", unit="run", disable=quiet, file=sys.stderr)
    with Loop(run_dir, build_dir / "shards", runs_dir="train", num_workers=1, overwrite=True, quiet=True) as loop:
        for method in methods:
            bar.set_postfix_str(method)
            sub = run_dir / "subsets" / f"{method}.npy"
            try:
                loop.step("select", method, ["select", build_id, METHODS[method]],
                          lambda m=method, sub=sub: _select_once(m, build_dir, sub, arch))
            except VaralignError as exc:
                results["skipped"][method] = str(exc)
                log(f"{method}: skipped ({exc})")
                bar.update(len(seeds))
                continue
            kept = load_subset(sub)
            share = kept_share(pool_uids, labels, kept)
            data_dir, _ = loop.data(sub, method)
            per_seed = []
            for seed in seeds:
                exp = f"{method}_seed_{seed}"
                t = time.time()
                evaluated = True

                def train_and_evaluate(exp=exp, data_dir=data_dir, seed=seed, method=method) -> tuple[list[Path], dict]:
                    nonlocal evaluated
                    evaluated = False
                    # progress: a bar of the samples seen, moved by open_clip_train's log line every 10 steps
                    exp_dir = loop.train(exp, "tiny", data_dir, seed, {**train_options, "quiet": quiet})
                    bar.set_postfix_str(f"{method}: evaluating")
                    return _evaluate(exp_dir, build_dir / "eval")

                per_seed.append(loop.step("evaluate", exp, ["evaluate", build_id, exp, train_options],
                                          train_and_evaluate))
                if not evaluated:
                    log(f"{exp}: {len(kept):,} samples, {per_seed[-1]} ({time.time() - t:.0f} s)")
                bar.update()
            tasks = sorted(per_seed[0])
            per_seed = [{**s, AVERAGE: float(np.mean([s[k] for k in tasks]))} for s in per_seed]
            results["methods"][method] = {
                "samples": int(len(kept)),
                "metrics": {k: {"mean": float(np.mean([s[k] for s in per_seed])),
                                "std": float(np.std([s[k] for s in per_seed]))} for k in [*tasks, AVERAGE]},
                "per_seed": {str(seed): s for seed, s in zip(seeds, per_seed, strict=True)},
                # the kinds present in the pool, sorted (NaN: a kind the pool has none of)
                "kept_share": {c: {k: round(v, 4) for k, v in sorted(kinds.items()) if v == v}
                               for c, kinds in share.items()},
            }
    bar.close()
    results["paired"] = paired_table(results)
    save_json(run_dir / "results.json", results)
    with atomic_path(run_dir / "results.md", ".md") as tmp:
        tmp.write_text(results_table(results))
    write_plot(run_dir / "results.json", run_dir / "results.svg")
    record_owned(run_dir, RESULTS)
    return results


AVERAGE = "average"  # the mean of a run's task metrics (DataComp's "average over tasks" column)
BASELINE = "clip_score_30"  # what the paired comparison compares every method with


def paired(a: list[float], b: list[float]) -> dict:
    """The paired comparison of `a` with `b` (same seeds, in the same order): per-seed differences d = a - b,
    their mean, standard deviation (n - 1), standard error sd/√n, and the pre-registered verdict
    (docs/minicomp.md): "a better" when mean > 2·SE, "b better" when mean < -2·SE, else "inconclusive"."""
    d = np.asarray(a, float) - np.asarray(b, float)
    n = len(d)
    if n == 0 or len(a) != len(b):
        raise ValueError("paired needs two equally long, non-empty lists")
    mean = float(d.mean())
    if n == 1:  # no spread to compare with (None, not NaN: the results stay valid JSON and compare equal)
        return {"n": 1, "diffs": [mean], "mean": mean, "sd": None, "se": None, "verdict": "inconclusive"}
    sd = float(d.std(ddof=1))
    se = float(sd / np.sqrt(n))
    verdict = "a better" if mean > 2 * se else "b better" if mean < -2 * se else "inconclusive"
    return {"n": n, "diffs": [float(x) for x in d], "mean": mean, "sd": sd, "se": se, "verdict": verdict}


def paired_table(results: dict, baseline: str = BASELINE) -> dict:
    """{method: paired(method's per-seed average, baseline's)} for every other method run with the same seeds,
    plus each task's mean difference; {} without the baseline."""
    rows = results["methods"]
    if baseline not in rows:
        return {}
    seeds = [str(s) for s in results["seeds"]]
    base = rows[baseline]["per_seed"]
    out = {}
    for m, r in rows.items():
        if m == baseline or set(seeds) - set(r["per_seed"]):
            continue
        p = paired([r["per_seed"][s][AVERAGE] for s in seeds], [base[s][AVERAGE] for s in seeds])
        p["tasks"] = {t: float(np.mean([r["per_seed"][s][t] - base[s][t] for s in seeds]))
                      for t in r["per_seed"][seeds[0]] if t != AVERAGE}
        out[m] = p
    return out


def results_table(results: dict) -> str:
    """Markdown: per method, samples and mean ± std per task; then the share of each noise kind kept."""
    rows = results["methods"]
    if not rows:
        return "no method ran\n"
    tasks = sorted(next(iter(rows.values()))["metrics"])
    if AVERAGE in tasks:
        tasks = [t for t in tasks if t != AVERAGE] + [AVERAGE]
    kinds = [(c, v) for c in ("label_caption_kind", "label_image_kind")
             for v in next(iter(rows.values()))["kept_share"][c]]
    n = len(results["seeds"])
    lines = [f"Tiny CLIP trained from scratch, {results['train_num_samples']:,} samples seen, {n} seed(s): "
             + ("main metric mean ± std." if n > 1 else "main metric (one seed: no spread to show)."),
             "", "| method | samples | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for m, r in rows.items():
        cells = [f"{r['metrics'][t]['mean']:.3f}" + (f" ± {r['metrics'][t]['std']:.3f}" if n > 1 else "")
                 for t in tasks]
        lines.append(f"| {m} | {r['samples']:,} | " + " | ".join(cells) + " |")
    lines += ["", "Share of each hidden noise kind kept:", "",
              "| method | " + " | ".join(f"{v}" for _, v in kinds) + " |", "|---|" + "---|" * len(kinds)]
    for m, r in rows.items():
        lines.append(f"| {m} | " + " | ".join(f"{r['kept_share'][c][v]:.2f}" for c, v in kinds) + " |")
    paired_rows = results.get("paired") or {}
    if paired_rows:
        lines += ["", f"Paired per seed against {BASELINE} (d = method − {BASELINE} on the average over tasks; "
                  "SE = sd(d)/√n; pre-registered: > 2 SE better, < −2 SE worse, else inconclusive):", "",
                  "| method | d per seed | mean d | SE | mean d / SE | verdict |", "|---|---|---|---|---|---|"]
        for m, p in paired_rows.items():
            se = f"{p['se']:.4f}" if p["se"] is not None else "–"
            ratio = f"{p['mean'] / p['se']:+.1f}" if p["se"] else "–"
            verdict = {"a better": "better", "b better": "worse"}.get(p["verdict"], p["verdict"])
            lines.append(f"| {m} | " + " ".join(f"{x:+.3f}" for x in p["diffs"])
                         + f" | {p['mean']:+.4f} | {se} | {ratio} | {verdict} |")
    for m, why in results["skipped"].items():
        lines.append(f"\nskipped {m}: {why}")
    return "\n".join(lines) + "\n"
