"""Agreement of VAS-D's fast mode (`--vas_d_mode lowrank --vas_d_rank r`) with the exact mode, on any pool.

    python benchmarks/bench_lowrank.py benchmarks/_data/minicomp/metadata     # the real-image mini pool
    python benchmarks/bench_lowrank.py POOL --ranks 32,64,128,256 --iters 20 --json out.json
    python benchmarks/bench_lowrank.py POOL --stress_alpha 0.5    # a flat-spectrum stress test

For each rank it runs VAS-D (L/14 features, CLIP top 45% -> VAS-D top 30%, `--iters` rounds) in the
low-rank mode and reports the Jaccard index of its subset with the exact mode's, and the wall time
of both. Synthetic pools have a low-dimensional concept structure, so the agreement there flatters
the fast mode; run this on real embeddings (e.g. the mini-DataComp pool of `varalign minicomp build`,
embedded by a CLIP trained on real images) before relying on it. `--stress_alpha A` replaces the pool's
image embeddings (in a copy) by Gaussian rows whose covariance has eigenvalues i^-A (i = 1..D),
unit-normalised: the smaller A, the flatter the spectrum and the harder for a rank-r projection.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from varalign import filter_pool


def stress_pool(pool: Path, out: Path, alpha: float, arch: str, seed: int = 0) -> Path:
    """A copy of `pool` whose `{arch}_img` rows are drawn with a power-law spectrum (the rest unchanged)."""
    from varalign.npz import write_npz  # noqa: PLC0415
    from varalign.pool import ARCHS, discover_shards, image_key  # noqa: PLC0415

    dim = ARCHS[arch]
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    scale = (np.arange(1, dim + 1) ** (-alpha / 2))[:, None] * basis.T  # rows ~ N(0, B diag(i^-a) B^T)
    out.mkdir(parents=True, exist_ok=True)
    for shard in discover_shards(pool, need_npz=True):
        with np.load(shard.npz, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        x = rng.standard_normal((shard.num_rows, dim)) @ scale
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        arrays[image_key(arch)] = x.astype(np.float16)
        write_npz(out / Path(shard.npz).name, arrays, 1)
        shutil.copyfile(shard.parquet, out / Path(shard.parquet).name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pool", help="a DataComp-format metadata directory (parquet + npz)")
    ap.add_argument("--ranks", default="16,32,64,128,256")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--fraction", type=float, default=0.45)
    ap.add_argument("--fraction_vas", type=float, default=0.3)
    ap.add_argument("--arch", default="l14")
    ap.add_argument("--stress_alpha", type=float, default=None,
                    help="replace the image embeddings by power-law-spectrum rows (eigenvalues i^-A)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    base = {"arch": args.arch, "fraction": args.fraction, "fraction_vas": args.fraction_vas,
            "num_iters": args.iters, "quiet": True}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.stress_alpha is not None:
            args.pool = stress_pool(Path(args.pool), Path(tmp) / "stress", args.stress_alpha, args.arch)
            print(f"stress test: image embeddings with eigenvalues i^-{args.stress_alpha}")
        t0 = time.perf_counter()
        exact = filter_pool(args.pool, Path(tmp) / "exact.npy", "vas_d", **base)
        t_exact = time.perf_counter() - t0
        ref = set(exact.uids.tolist())
        print(f"pool {args.pool}: {exact.counts['pool']:,} samples; exact VAS-D keeps {len(ref):,} "
              f"({t_exact:.1f} s)")
        print("| rank | Jaccard vs exact | wall (s) | exact wall (s) |\n|---|---|---|---|")
        for rank in (int(r) for r in args.ranks.split(",")):
            t0 = time.perf_counter()
            fast = filter_pool(args.pool, Path(tmp) / f"r{rank}.npy", "vas_d", vas_d_mode="lowrank",
                               vas_d_rank=rank, **base)
            wall = time.perf_counter() - t0
            got = set(fast.uids.tolist())
            jac = len(ref & got) / len(ref | got)
            rows.append({"rank": rank, "jaccard": jac, "wall_s": wall, "exact_wall_s": t_exact})
            print(f"| {rank} | {jac:.4f} | {wall:.1f} | {t_exact:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"pool": str(args.pool), "samples": exact.counts["pool"],
                                               "stress_alpha": args.stress_alpha, "options": base,
                                               "results": rows}, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
