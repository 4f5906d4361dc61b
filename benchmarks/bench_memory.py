"""Peak memory of `varalign filter` against pool size, per method: the slope in bytes per row.

    python benchmarks/bench_memory.py                                  # every method, 8/16/32 shards of 62,500 rows
    python benchmarks/bench_memory.py --methods clip_score,vas --shards 4,8,16 --repeats 3
    python benchmarks/bench_memory.py --fixed_cost                     # 1,000 shards of 1,000 rows vs 10 of 100,000

Each run is `varalign filter ...` in a fresh child process. Its peak is the kernel's high-water mark
of the process's resident set (VmHWM in /proc/<pid>/status, read by the child as it exits: reset at
exec, unlike ru_maxrss, which a child inherits from the parent it forked from). While it runs, the
parent also samples the child's RssAnon (heap, arrays) and RssFile (pages of mapped files, e.g. the
page cache behind a memory map) every 20 ms, to say which of the two a peak is made of.

The pools have the same rows per shard at every size, so a per-row structure shows up as a slope
and a per-worker block (one shard in flight per worker) as the intercept. The slope (bytes per
row) is a least-squares line through every (rows, peak) point; its projections to DataComp
medium (128M rows) and large (1.28B) are `intercept + slope * rows`, with 12.8M (small) too.

The pools are cheap to make at any size: one template shard is generated (`synth.make_shard`,
realistic uid/url/text columns and all four embedding members), every other shard hard-links the
template's npz and writes its own parquet with fresh uids and jittered CLIP scores. A hard link is
a separate name for the same file: reading it costs the same, and so does mapping it.

`--fixed_cost` times `varalign filter` (clip_score and vas) on the same rows cut into 10 shards
and into 1,000 shards: the per-shard fixed cost is the difference divided by the extra shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MB = 1 << 20


# -- pools --------------------------------------------------------------------------------------------------
def template_shard(data: Path, rows: int) -> Path:
    """One generated shard of `rows` rows (parquet + npz), made once."""
    stem = data / f"mem_template_{rows}" / "t"
    if not (stem.parent / ".complete").exists():
        from varalign.synth import SynthWorld, make_shard  # noqa: PLC0415

        stem.parent.mkdir(parents=True, exist_ok=True)
        print(f"generating a {rows:,}-row template shard in {stem.parent} (once) ...", file=sys.stderr)
        make_shard(SynthWorld.make(0), str(stem), 0, rows)
        (stem.parent / ".complete").touch()
    return stem


def replicated_pool(data: Path, rows: int, shards: int) -> Path:
    """`shards` shards of `rows` rows: the template's npz hard-linked, a parquet of fresh uids each."""
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    from varalign.uids import uids_to_hex  # noqa: PLC0415

    pool = data / f"mem_pool_{rows}x{shards}"
    if (pool / ".complete").exists():
        return pool
    stem = template_shard(data, rows)
    pool.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(f"{stem}.parquet")
    print(f"writing {pool} ({shards} shards of {rows:,} rows) ...", file=sys.stderr)
    for i in range(shards):
        name = pool / f"{i:08d}"
        rng = np.random.default_rng([1234, i])
        words = rng.integers(0, np.iinfo(np.uint64).max, size=(rows, 2), dtype=np.uint64, endpoint=True)
        uids = np.empty(rows, dtype="u8,u8")
        uids["f0"], uids["f1"] = words[:, 0], words[:, 1]
        t = table.set_column(table.schema.get_field_index("uid"), "uid", uids_to_hex(uids))
        for col in ("clip_l14_similarity_score", "clip_b32_similarity_score"):
            v = t.column(col).to_numpy() + rng.normal(0, 0.01, rows)
            t = t.set_column(t.schema.get_field_index(col), col, pa.array(v.astype(t.schema.field(col).type.to_pandas_dtype())))
        npz = Path(f"{name}.npz")
        if not npz.exists():
            os.link(f"{stem}.npz", npz)
        pq.write_table(t, f"{name}.parquet")
    (pool / ".complete").touch()
    return pool


def assets(data: Path) -> dict[str, Path]:
    """The small inputs some methods need: a VAS target, NormSim proxies, centroids, ImageNet-1k stand-ins."""
    root = data / "mem_assets"
    paths = {"target": root / "target_l14.npy", "proxy": root / "proxy", "centroids": root / "centroids.npy",
             "cache": root / "datacomp_cache"}
    if (root / ".complete").exists():
        return paths
    from varalign.synth import make_target  # noqa: PLC0415

    root.mkdir(parents=True, exist_ok=True)
    make_target(paths["target"])
    rng = np.random.default_rng(5)
    paths["proxy"].mkdir(exist_ok=True)
    g = rng.standard_normal((1000, 768)).astype(np.float32)
    np.save(paths["proxy"] / "g.npy", g / np.linalg.norm(g, axis=1, keepdims=True))
    c = rng.standard_normal((256, 768)).astype(np.float32)
    np.save(paths["centroids"], c / np.linalg.norm(c, axis=1, keepdims=True))
    import torch  # noqa: PLC0415 - DataComp's ImageNet-1k feature files are torch dicts

    paths["cache"].mkdir(exist_ok=True)
    for i in range(5):  # stand-ins for DataComp's in1k_clip_vit_l14_{0..4}.pt
        f = rng.standard_normal((2000, 768)).astype(np.float32)
        torch.save({"image_features": torch.from_numpy(f / np.linalg.norm(f, axis=1, keepdims=True))},
                   paths["cache"] / f"in1k_clip_vit_l14_{i}.pt")
    (root / ".complete").touch()
    return paths


def method_args(a: dict[str, Path]) -> dict[str, list[str]]:
    """Every `--name` (and VAS-D's low-rank mode), with small negCLIPLoss batches to keep it quick."""
    cs = ["--arch", "l14", "--fraction", "0.45"]
    ncl = ["--batch_size", "256", "--average_num", "1"]
    ib = ["--centroid_path", str(a["centroids"]), "--cache_path", str(a["cache"])]
    return {
        "no_filter": ["--name", "no_filter"],
        "clip_score": ["--name", "clip_score", "--arch", "l14", "--fraction", "0.3"],
        "basic_filter": ["--name", "basic_filter"],
        "text_based": ["--name", "text_based"],
        "laion2b": ["--name", "laion2b"],
        "image_based": ["--name", "image_based", *ib],
        "image_based_intersect_clip_score": ["--name", "image_based_intersect_clip_score", "--arch", "l14",
                                             "--fraction", "0.3", *ib],
        "vas": ["--name", "vas", *cs, "--fraction_vas", "0.3", "--target", str(a["target"])],
        "vas_d": ["--name", "vas_d", *cs, "--fraction_vas", "0.3", "--num_iters", "3"],
        "vas_d_lowrank": ["--name", "vas_d", *cs, "--fraction_vas", "0.3", "--num_iters", "3", "--vas_d_mode",
                          "lowrank", "--vas_d_rank", "64"],
        "negcliploss": ["--name", "negcliploss", "--arch", "l14", "--fraction", "0.3", *ncl],
        "cs_new": ["--name", "cs_new", "--arch", "l14", "--fraction", "0.3", "--fraction_vas", "0.2", *ncl,
                   "--proxy_path", str(a["proxy"]), "--norm", "2"],
    }


# -- one run -----------------------------------------------------------------------------------------------
def status_kb(pid: int | str, *keys: str) -> dict[str, int]:
    """Fields of /proc/<pid>/status, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k = line.split(":", 1)[0]
        if k in keys:
            out[k] = int(line.split()[1])
    return out


def child(argv: list[str]) -> None:
    """Run `varalign filter argv` in this process, then print its wall time and high-water mark as JSON."""
    from varalign.cli import main  # noqa: PLC0415

    t0 = time.perf_counter()
    code = main(["filter", *argv])
    wall = time.perf_counter() - t0
    hwm = status_kb("self", "VmHWM")["VmHWM"] * 1024
    print(json.dumps({"code": code, "wall_s": wall, "peak_bytes": hwm}))


def measure(pool: Path, argv: list[str], out: Path, workers: int) -> dict:
    """One `varalign filter` run in a child process: its peak (VmHWM) and the largest RssAnon/RssFile seen."""
    argv = [*argv, "--metadata_dir", str(pool), "--save_path", str(out), "--num_workers", str(workers), "--quiet",
            "--overwrite"]
    out.unlink(missing_ok=True)  # a re-run with the same config would be a no-op
    proc = subprocess.Popen([sys.executable, __file__, "--child", "--", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    seen = {"RssAnon": 0, "RssFile": 0}

    def sample() -> None:
        while proc.poll() is None:
            try:
                for k, v in status_kb(proc.pid, *seen).items():
                    seen[k] = max(seen[k], v)
            except (OSError, ValueError):
                return
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode:
        raise RuntimeError(f"varalign filter {' '.join(argv)} failed:\n{stderr[-3000:]}")
    r = json.loads(stdout.strip().splitlines()[-1])
    return r | {"anon_bytes": seen["RssAnon"] * 1024, "file_bytes": seen["RssFile"] * 1024}


def fit(rows: list[int], peaks: list[float]) -> dict:
    """Least-squares line peak = intercept + slope * rows; the slope's standard error."""
    x, y = np.asarray(rows, dtype=np.float64), np.asarray(peaks, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (intercept + slope * x)
    dof = max(1, len(x) - 2)
    se = float(np.sqrt(resid @ resid / dof / max(1e-300, ((x - x.mean()) ** 2).sum())))
    return {"slope_bytes_per_row": float(slope), "slope_se": se, "intercept_bytes": float(intercept),
            **{f"at_{n}": float(intercept + slope * n) for n in (12_800_000, 128_000_000, 1_280_000_000)}}


def slopes(args: argparse.Namespace) -> list[dict]:
    data = Path(args.data_dir)
    shard_counts = [int(s) for s in args.shards.split(",")]
    pools = {s: replicated_pool(data, args.rows_per_shard, s) for s in shard_counts}
    everything = method_args(assets(data))
    methods = list(everything) if args.methods == "all" else args.methods.split(",")
    out_dir = data / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{args.rows_per_shard:,} rows per shard, {args.num_workers} workers, {os.cpu_count()} CPUs "
          f"(load {os.getloadavg()[0]:.1f}); peak = VmHWM, median of {args.repeats}\n")
    head = " | ".join(f"{s * args.rows_per_shard / 1e6:g}M rows" for s in shard_counts)
    print(f"| method | {head} | slope (B/row) | at 12.8M | at 128M | at 1.28B |")
    print("|---|" + "---|" * (len(shard_counts) + 4))
    for method in methods:
        points, runs = [], []
        # one uncounted run first: a method's one-off work (image_based's centroid cache) is not a peak of the pool
        measure(pools[shard_counts[0]], everything[method], out_dir / f"mem_{method}.npy", args.num_workers)
        for s in shard_counts:
            reps = [measure(pools[s], everything[method], out_dir / f"mem_{method}.npy", args.num_workers)
                    for _ in range(args.repeats)]
            runs.append({"shards": s, "rows": s * args.rows_per_shard, "runs": reps})
            points += [(s * args.rows_per_shard, r["peak_bytes"]) for r in reps]
        f = fit([p[0] for p in points], [p[1] for p in points])
        med = [float(np.median([r["peak_bytes"] for r in x["runs"]])) for x in runs]
        cells = " | ".join(f"{m / MB:,.0f} MB" for m in med)
        if args.verbose:
            for x in runs:
                print("  ", x["rows"], [(round(r["peak_bytes"] / MB), round(r["anon_bytes"] / MB), round(r["file_bytes"] / MB),
                                        round(r["wall_s"], 1)) for r in x["runs"]], file=sys.stderr)
        print(f"| {method} | {cells} | {f['slope_bytes_per_row']:.2f} ± {f['slope_se']:.2f} | "
              f"{f['at_12800000'] / MB:,.0f} MB | {f['at_128000000'] / MB:,.0f} MB | "
              f"{f['at_1280000000'] / MB:,.0f} MB |", flush=True)
        results.append({"method": method, "argv": everything[method], "sizes": runs} | f)
    return results


def fixed_cost(args: argparse.Namespace) -> list[dict]:
    """Wall time of the same rows in 10 shards and in 1,000 shards (the second number is per shard)."""
    data = Path(args.data_dir)
    everything = method_args(assets(data))
    layouts = [(100_000, 10), (1_000, 1_000)]
    pools = {lay: replicated_pool(data, *lay) for lay in layouts}
    out_dir = data / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    print(f"{args.num_workers} workers, {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}); "
          f"wall = median of {args.repeats}, both layouts in turn\n")
    print("| method | 10 × 100,000 | 1,000 × 1,000 | ratio | per extra shard |\n|---|---|---|---|---|")
    for method in args.fixed_methods.split(","):
        walls: dict = {lay: [] for lay in layouts}
        for _ in range(args.repeats):  # interleaved, so a change in the machine's load hits both
            for lay in layouts:
                walls[lay].append(measure(pools[lay], everything[method], out_dir / f"fixed_{method}.npy",
                                          args.num_workers)["wall_s"])
        few, many = (float(np.median(walls[lay])) for lay in layouts)
        per = (many - few) / (layouts[1][1] - layouts[0][1])
        print(f"| {method} | {few:.2f} s | {many:.2f} s | {many / few:.2f}× | {per * 1e3:.1f} ms |", flush=True)
        results.append({"method": method, "walls": {f"{r}x{s}": walls[(r, s)] for r, s in layouts},
                        "ratio": many / few, "per_shard_s": per})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="all", help="comma-separated (see method_args), or all")
    ap.add_argument("--shards", default="8,16,32", help="three (or more) pool sizes, in shards")
    ap.add_argument("--rows_per_shard", type=int, default=62_500)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--num_workers", type=int, default=2)
    ap.add_argument("--fixed_cost", action="store_true", help="time 10 vs 1,000 shards instead")
    ap.add_argument("--fixed_methods", default="clip_score,vas")
    ap.add_argument("--data_dir", default=str(HERE / "_data"))
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--verbose", action="store_true", help="every run's peak, RssAnon, RssFile (MB) and wall (s)")
    ap.add_argument("--child", action="store_true")
    args, rest = ap.parse_known_args()
    if args.child:
        child([a for a in rest if a != "--"])
        return
    sys.path.insert(0, str(ROOT / "src"))
    results = fixed_cost(args) if args.fixed_cost else slopes(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
