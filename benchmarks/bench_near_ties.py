"""What image_based's near-tie decision costs: the centroid search with it (`scores.image_based._argmax_numpy`,
and `backend.argmax_on` with `exact=` on a torch device) next to the same search without it (float32 argmax
only), in one run on the same rows, and the share of rows decided again in float64.

    python benchmarks/bench_near_ties.py                         # 8,192 rows x 20,000 centroids, numpy
    python benchmarks/bench_near_ties.py --device torch-cpu      # also the torch kernels (cuda on a GPU)
    python benchmarks/bench_near_ties.py --centroids 100000      # DataComp's centroid count

Rows and centroids are synthetic L/14-like embeddings (`varalign.synth`): the centroids are rows of the same
world, as k-means centroids sit among the rows they summarise. Each timing is the best of `--repeats`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--centroids", type=int, default=20000)
    ap.add_argument("--device", default="cpu", help="cpu (numpy only), or a torch device also timed")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from varalign.backend import NEAR_TIE, DeviceMatrix, argmax_on, max_norm  # noqa: PLC0415
    from varalign.scores.image_based import _SCORE_BYTES, _argmax_numpy  # noqa: PLC0415
    from varalign.synth import SynthWorld  # noqa: PLC0415

    world = SynthWorld.make(0)
    concepts = list(range(0, 60, 3))
    cent = world.downstream(args.centroids, concepts, seed=1).astype(np.float32)
    q = world.downstream(args.rows, concepts, seed=2).astype(np.float32)
    ct = cent.T

    def plain() -> np.ndarray:  # the search without the near-tie decision
        out = np.empty(len(q), dtype=np.int64)
        step = max(16, _SCORE_BYTES // (4 * len(cent)))
        for s in range(0, len(q), step):
            out[s : s + step] = np.argmax(q[s : s + step] @ ct, axis=1)
        return out

    s = q @ ct
    top = np.partition(s, -2, axis=1)[:, -2:]
    gap = np.abs(top[:, 1] - top[:, 0])
    near = float((gap <= NEAR_TIE * np.linalg.norm(q, axis=1) * max_norm(cent)).mean())
    changed = int((plain() != _argmax_numpy(q, cent)).sum())
    res = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "rows": args.rows,
           "centroids": args.centroids, "near_share": near, "rows_changed": changed}
    res["numpy_plain_s"] = best_of(plain, args.repeats)
    res["numpy_s"] = best_of(lambda: _argmax_numpy(q, cent), args.repeats)
    print(f"numpy: {res['numpy_s']:.3f} s with the near-tie decision, {res['numpy_plain_s']:.3f} s without "
          f"(x{res['numpy_s'] / res['numpy_plain_s']:.3f}); {near:.4%} of rows decided again in float64, "
          f"{changed} changed", flush=True)
    if args.device != "cpu":
        m = DeviceMatrix.from_array(cent, args.device)
        exact = (DeviceMatrix.from_array(cent, args.device, split=False), max_norm(cent))
        q16 = q.astype(np.float16)
        res["device"] = args.device
        res["device_plain_s"] = best_of(lambda: argmax_on(q16, m, args.device), args.repeats)
        res["device_s"] = best_of(lambda: argmax_on(q16, m, args.device, exact=exact), args.repeats)
        print(f"{args.device}: {res['device_s']:.3f} s with, {res['device_plain_s']:.3f} s without "
              f"(x{res['device_s'] / res['device_plain_s']:.3f})", flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
