"""VAS and VAS-D on a GPU (`--device cuda`) next to the same runs on the machine's CPUs.

    python benchmarks/bench_gpu.py                                  # 1M samples, 16 shards
    python benchmarks/bench_gpu.py --pools 1000000:16,4000000:32 --json gpu.json

Run it on a machine with a CUDA GPU and torch. For every pool it runs, each in a fresh child process
(bench_filter.py's, reporting wall time, peak RSS, peak GPU memory): `vas` (L/14, 45% -> 30%) and `vas_d` (45% -> 30%, exact and
lowrank r=128) on `--device cpu` (numpy/BLAS, all cores) and `--device cuda`, and checks that the
GPU's subset has the same uids as the CPU's (exact ties aside: both pick the earliest row, but float32
sums in another order can reorder two scores that differ in the last bit). The ceilings are the bare
products on data already decoded: numpy/BLAS on all cores for the CPU rows, torch on the GPU with the
candidates resident for the GPU rows. Results are appended to `--json` after every run, so a run cut
short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_filter import blas_seconds, ensure_pool, load_candidates, run_method, vas_d_passes  # noqa: E402


def gpu_seconds(feats: np.ndarray, target: np.ndarray, device: str, repeats: int = 3) -> float:
    """F @ S and the row-wise dot for `feats` already on the GPU (float16 there, float32 products)."""
    import torch  # noqa: PLC0415

    dev = torch.device("cpu" if device == "torch-cpu" else device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
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
    return best


def jaccard(a: Path, b: Path) -> float:
    x, y = set(np.load(a).tolist()), set(np.load(b).tolist())
    return len(x & y) / max(1, len(x | y))


def bench_pool(samples: int, shards: int, root: Path, args: argparse.Namespace, record) -> None:
    t0 = time.perf_counter()
    pool, target_path = ensure_pool(root, samples, shards)
    print(f"\npool: {samples:,} samples in {shards} shards ({time.perf_counter() - t0:.0f} s to generate)",
          flush=True)
    target = np.load(target_path)
    feats = load_candidates(pool, 0.45)
    cpu_pass = blas_seconds(feats, target, repeats=2)
    gpu_pass = gpu_seconds(feats, target, args.gpu)
    del feats
    rounds = vas_d_passes(args.iters)
    vas = {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "target": str(target_path)}
    vas_d = {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "num_iters": args.iters}
    low = vas_d | {"vas_d_mode": "lowrank", "vas_d_rank": args.rank}
    plan = [("vas", "vas", vas, 1.0), ("vas_d exact", "vas_d", vas_d, rounds),
            (f"vas_d lowrank r={args.rank}", "vas_d", low, 0.0)]
    print("| method | device | wall (s) | samples/s | peak RSS (MB) | peak GPU mem (MB) | ceiling (s) | "
          "wall / ceiling | Jaccard vs cpu |", flush=True)
    print("|---|---|---|---|---|---|---|---|---|", flush=True)
    for label, name, opts, passes in plan:
        outs = {}
        for device in ("cpu", args.gpu):
            if device == "cpu" and samples > 1_000_000 and (
                (args.skip_cpu_exact and label == "vas_d exact") or (args.skip_cpu_vas and label == "vas")
            ):
                continue
            out = root / "out" / f"gpu_{samples}_{label.replace(' ', '_').replace('=', '')}_{device}.npy"
            out.unlink(missing_ok=True)
            r = run_method(pool, out, name, opts | {"device": device})
            outs[device] = out
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", default="1000000:16", help="comma-separated SAMPLES:SHARDS")
    ap.add_argument("--iters", type=int, default=20, help="VAS-D iterations")
    ap.add_argument("--rank", type=int, default=128, help="rank of the VAS-D lowrank mode")
    ap.add_argument("--skip_cpu_exact", action="store_true", help="no exact VAS-D on the CPU above 1M samples")
    ap.add_argument("--gpu", default="cuda", help="the torch device to compare (torch-cpu: a dry run without GPU)")
    ap.add_argument("--skip_cpu_vas", action="store_true", help="no vas on the CPU above 1M samples")
    ap.add_argument("--data_dir", default=str(HERE / "_data"))
    ap.add_argument("--json", default=None, help="write the results here (after every run)")
    args = ap.parse_args()
    import torch  # noqa: PLC0415

    if args.gpu.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("bench_gpu.py: torch sees no CUDA device")
    info = {"machine": platform.machine(), "cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if args.gpu.startswith("cuda") else args.gpu}
    print(json.dumps(info), flush=True)
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        if args.json:
            tmp = Path(args.json + ".tmp")
            tmp.write_text(json.dumps({"info": info, "results": rows}, indent=2))
            tmp.replace(args.json)

    root = Path(args.data_dir)
    for spec in args.pools.split(","):
        samples, shards = (int(x) for x in spec.split(":"))
        bench_pool(samples, shards, root, args, record)


if __name__ == "__main__":
    main()
