"""Throughput of negCLIPLoss and NormSim on one generated shard, next to the bare BLAS rate.

    python benchmarks/bench_scores.py                       # 200k-row shard, all of it
    python benchmarks/bench_scores.py --ncl 1 10:32768 --normsim-rows 2048   # K=10 on one batch

negCLIPLoss runs `negcliploss_shard` (read both members, then K repeats of B-row batches) on
every row. NormSim costs |T|·D·2 flop per candidate row (1.5 GFLOP at |T| = 1M), so the direct
p = ∞ / p = 2 passes score only `--normsim-rows` rows (evenly spaced) of the shard through
`normsim_shard` (which still inflates the whole member), and a compute-only rate on the same
rows already in RAM; the Gram form of p = 2 scores every row. The ceiling is the same GEMM
work at the float32 GFLOP/s measured here for the shapes the scorers use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
D = 768


def ensure_shard(root: Path, rows: int):
    from varalign.pool import discover_shards  # noqa: PLC0415
    from varalign.synth import make_pool  # noqa: PLC0415

    pool = root / f"pool_{rows}_1"
    if not (pool / ".complete").exists():
        print(f"generating a {rows:,}-row shard in {pool} (once) ...", file=sys.stderr)
        make_pool(pool, rows, 1)
        (pool / ".complete").touch()
    return discover_shards(pool, need_npz=True)[0]


def ensure_target(root: Path, rows: int) -> Path:
    """Random unit-norm float16 target rows (timing does not depend on their values)."""
    path = root / f"normsim_target_{rows}.npy"
    if not path.exists():
        print(f"generating a {rows:,}-row target in {path} (once) ...", file=sys.stderr)
        rng = np.random.default_rng(0)
        out = np.lib.format.open_memmap(path.with_suffix(".tmp"), mode="w+", dtype=np.float16, shape=(rows, D))
        for s in range(0, rows, 65536):
            x = rng.standard_normal((min(65536, rows - s), D), dtype=np.float32)
            out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        out.flush()
        del out
        path.with_suffix(".tmp").rename(path)
    return path


def gemm_gflops(m: int, n: int, repeat: int = 3) -> float:
    """float32 GFLOP/s of (m × D) @ (D × n) with data in RAM (best of `repeat`)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, D), dtype=np.float32)
    b = rng.standard_normal((n, D), dtype=np.float32)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b.T
        best = min(best, time.perf_counter() - t0)
    return 2 * m * n * D / best / 1e9


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


def bench_ncl(shard, runs: list[str], batch: int) -> list[dict]:
    """Each run is "K" (every row) or "K:ROWS" (the first ROWS rows of the shard)."""
    from varalign.scores.negcliploss import ROW_BLOCK, negcliploss_shard, read_rows  # noqa: PLC0415

    rate = gemm_gflops(ROW_BLOCK, batch)
    out = []
    for run in runs:
        k, _, limit = run.partition(":")
        k, n = int(k), min(int(limit or shard.num_rows), shard.num_rows)
        rows = np.arange(n, dtype=np.int64)
        read_s, _ = timed(lambda rows=rows: (read_rows(shard, "l14_img", rows), read_rows(shard, "l14_txt", rows)))
        flop = sum(2 * min(batch, n - s) ** 2 * D for s in range(0, n, batch))
        wall, _ = timed(negcliploss_shard, shard, rows, batch_size=batch, average_num=k, seed=0)
        ceil = n / (k * flop / (rate * 1e9))
        out.append({"score": f"negCLIPLoss B={batch} K={k}", "rows": n, "wall_s": wall, "rows_per_s": n / wall,
                    "compute_rows_per_s": n / (wall - read_s), "blas_rows_per_s": ceil, "gflops": rate,
                    "read_s": read_s})
    return out


def bench_normsim(shard, targets: list[Path], m: int) -> list[dict]:
    from varalign.scores.negcliploss import read_rows  # noqa: PLC0415
    from varalign.scores.normsim import NormSimTarget, normsim_scores, normsim_shard  # noqa: PLC0415

    n = shard.num_rows
    some = np.unique(np.linspace(0, n - 1, m).astype(np.int64))
    feats = read_rows(shard, "l14_img", some)
    rate = gemm_gflops(4096, 8192)
    out = []
    for path in targets:
        tgt = NormSimTarget((str(path),))
        t = tgt.rows
        tgt.chunks().__next__()  # page in the header / first chunk
        for p in ("inf", 2):
            wall, _ = timed(normsim_shard, shard, some, tgt, p, gram=False)
            comp, _ = timed(normsim_scores, feats, tgt, p, gram=False)
            out.append({"score": f"NormSim{'∞' if p == 'inf' else p} |T|={t:,}", "rows": len(some),
                        "wall_s": wall, "rows_per_s": len(some) / wall, "compute_rows_per_s": len(some) / comp,
                        "blas_rows_per_s": rate * 1e9 / (2 * t * D), "gflops": rate})
        gram_s, _ = timed(tgt.gram)
        wall, _ = timed(normsim_shard, shard, np.arange(n, dtype=np.int64), tgt, 2)
        qrate = gemm_gflops(n, D, repeat=1)
        out.append({"score": f"NormSim2 (Gram) |T|={t:,}", "rows": n, "wall_s": wall, "rows_per_s": n / wall,
                    "gram_s": gram_s, "blas_rows_per_s": qrate * 1e9 / (2 * D * D), "gflops": qrate})
    return out


def table(results: list[dict]) -> str:
    lines = ["| score | rows | wall s | rows/s (shard) | rows/s (compute) | rows/s (BLAS) | GFLOP/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        comp = f"{r['compute_rows_per_s']:,.0f}" if "compute_rows_per_s" in r else "-"
        lines.append(f"| {r['score']} | {r['rows']:,} | {r['wall_s']:.1f} | {r['rows_per_s']:,.0f} | {comp} "
                     f"| {r['blas_rows_per_s']:,.0f} | {r['gflops']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="rows of the generated shard")
    ap.add_argument("--batch", type=int, default=32768)
    ap.add_argument("--ncl", nargs="*", default=["1", "10"],
                    help='negCLIPLoss runs: "K" scores every row, "K:ROWS" the first ROWS rows')
    ap.add_argument("--targets", type=int, nargs="*", default=[100_000, 1_000_000])
    ap.add_argument("--normsim-rows", type=int, default=4096, help="rows scored by the direct NormSim passes")
    ap.add_argument("--data", type=Path, default=HERE / "_data")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    shard = ensure_shard(args.data, args.rows)
    targets = [ensure_target(args.data, t) for t in args.targets]
    results = bench_ncl(shard, args.ncl, args.batch) + bench_normsim(shard, targets, args.normsim_rows)
    print(f"{os.cpu_count()} CPUs, numpy {np.__version__}; shard {shard.npz} ({shard.num_rows:,} rows)")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
