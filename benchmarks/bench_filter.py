"""Throughput and peak memory of `varalign filter` on a generated pool, next to the BLAS ceiling.

    python benchmarks/bench_filter.py                 # 1M samples, 10 shards
    python benchmarks/bench_filter.py --samples 200000 --shards 4 --iters 5

Each method runs in a fresh child process (wall time and its own peak RSS). The ceiling is
the bare float32 BLAS product the method does (F @ S and the row-wise dot over the rows it
scores), on the same data already decoded in RAM, with all cores: what an ideal
implementation that had nothing to read or decode would take. The second ceiling adds the time
to read every embedding member once on all cores (inflate + CRC when the npz is compressed, as
`np.savez_compressed` writes it; a plain read + CRC when stored, as `np.savez` writes it): work
every method that needs the embeddings must do before any arithmetic, so on a compressed pool it
is the honest floor. The "ceiling / wall" columns are the share of that ceiling reached (100% =
ideal). A second table times the
decode primitives we chose between (inflate: zlib vs zlib-ng; float16 -> float32: numpy
astype vs lookup table vs torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> None:
    from varalign import filter_pool  # noqa: PLC0415

    opts = json.loads(args.child_opts)
    t0 = time.perf_counter()
    res = filter_pool(args.pool, args.out, args.child, quiet=True, **opts)
    wall = time.perf_counter() - t0
    rss = _vm_hwm()
    gpu = None  # peak GPU memory of a --device cuda run
    device = str(opts.get("device", "cpu"))
    if "torch" in sys.modules and device.startswith("cuda"):
        gpu = sys.modules["torch"].cuda.max_memory_allocated(device)
    print(json.dumps({"wall": wall, "rss": rss, "gpu_bytes": gpu, "counts": res.counts, "timings": res.timings}))


def _vm_hwm() -> int:
    """Peak RSS of this process in bytes (VmHWM resets at exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def ensure_pool(root: Path, samples: int, shards: int, stored: bool = False) -> tuple[Path, Path]:
    from varalign.synth import make_pool, make_target  # noqa: PLC0415

    pool = root / f"pool_{samples}_{shards}"
    done = pool / ".complete"
    if not done.exists():
        print(f"generating {samples:,}-sample pool in {pool} (once) ...", file=sys.stderr)
        make_pool(pool, samples, shards, num_workers=os.cpu_count() or 1)
        done.touch()
    target = root / "target_l14.npy"
    if not target.exists():
        make_target(target)
    if stored:
        pool = stored_copy(pool, root / f"pool_{samples}_{shards}_stored")
    return pool, target


def stored_copy(pool: Path, out: Path) -> Path:
    """The same pool with uncompressed npz members (what `np.savez` writes instead of `savez_compressed`)."""
    import shutil  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    if (out / ".complete").exists():
        return out
    print(f"writing an uncompressed-npz copy of {pool} in {out} (once) ...", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    for src in sorted(pool.glob("*.npz")):
        with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out / src.name, "w", zipfile.ZIP_STORED) as zout:
            for info in zin.infolist():
                with zin.open(info) as fin, zout.open(info.filename, "w", force_zip64=True) as fout:
                    shutil.copyfileobj(fin, fout, 1 << 24)
        shutil.copyfile(src.with_suffix(".parquet"), out / src.with_suffix(".parquet").name)
    (out / ".complete").touch()
    return out


def run_method(pool: Path, out: Path, name: str, opts: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--child_opts", json.dumps(opts), "--pool", str(pool),
           "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{name} {opts} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_candidates(pool: Path, rows_frac: float) -> np.ndarray:
    """Decoded float32 l14_img rows for the ceiling measurement (the first `rows_frac` of the pool)."""
    from varalign.npz import read_member  # noqa: PLC0415
    from varalign.pool import discover_shards, embedding_member  # noqa: PLC0415

    parts, need = [], None
    shards = discover_shards(pool, need_npz=True)
    total = sum(s.num_rows for s in shards)
    need = int(total * rows_frac)
    for s in shards:
        if need <= 0:
            break
        arr = read_member(embedding_member(s, "l14_img"))[:need].astype(np.float32)
        parts.append(arr)
        need -= len(arr)
    return np.concatenate(parts)


def vas_d_passes(iters: int) -> float:
    """VAS-D's scoring work in full passes over the 45% candidates: the rounds score a set shrinking
    linearly from 45% to 30% of the pool."""
    return sum(0.45 - (0.15 * i / iters) for i in range(iters)) / 0.45


def blas_seconds(feats: np.ndarray, target: np.ndarray, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for s in range(0, len(feats), 65536):
            f = feats[s : s + 65536]
            np.einsum("ij,ij->i", f @ target, f)
        best = min(best, time.perf_counter() - t0)
    return best


def read_seconds(pool: Path) -> float:
    """Wall time to read every shard's l14_img member once (inflate + CRC for a compressed member,
    a plain read + CRC for a stored one) on all cores, nothing else: the floor a method that needs
    every embedding pays on top of its arithmetic."""
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    from varalign.npz import _iter_raw  # noqa: PLC0415
    from varalign.pool import discover_shards, embedding_member  # noqa: PLC0415

    members = [embedding_member(s, "l14_img") for s in discover_shards(pool, need_npz=True)]

    def one(m) -> int:
        return sum(len(chunk) for chunk in _iter_raw(m))

    best = float("inf")
    for _ in range(2):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count() or 1) as ex:
            list(ex.map(one, members))
        best = min(best, time.perf_counter() - t0)
    return best


def decode_table(pool: Path) -> list[tuple[str, float]]:
    """GB/s of each decode primitive on one shard's l14_img member."""
    from zlib_ng import zlib_ng  # noqa: PLC0415

    from varalign.backend import _F16_TO_F32  # noqa: PLC0415
    from varalign.npz import _iter_raw  # noqa: PLC0415
    from varalign.pool import discover_shards, embedding_member  # noqa: PLC0415

    shard = discover_shards(pool, need_npz=True)[0]
    member = embedding_member(shard, "l14_img")
    with open(member.path, "rb") as fh:
        fh.seek(member.data_offset)
        raw = fh.read(member.compress_size)
    rows = []
    for name, lib in (("inflate: zlib (np.load)", zlib), ("inflate: zlib-ng (varalign)", zlib_ng)):
        t0 = time.perf_counter()
        out = lib.decompressobj(-15).decompress(raw)
        rows.append((name, len(out) / (time.perf_counter() - t0) / 1e9))
    half = np.frombuffer(b"".join(_iter_raw(member)), dtype=np.float16, offset=member.header_len).reshape(member.shape)
    gb = half.nbytes / 1e9
    t0 = time.perf_counter()
    half.astype(np.float32)
    rows.append(("f16->f32: numpy astype", gb / (time.perf_counter() - t0)))
    t0 = time.perf_counter()
    _F16_TO_F32[half.view(np.uint16)]
    rows.append(("f16->f32: lookup table (no torch)", gb / (time.perf_counter() - t0)))
    try:
        import torch  # noqa: PLC0415

        out = np.empty(half.shape, np.float32)
        src = torch.from_numpy(half.copy())
        t0 = time.perf_counter()
        torch.from_numpy(out).copy_(src)
        rows.append((f"f16->f32: torch copy_ ({torch.get_num_threads()} threads)", gb / (time.perf_counter() - t0)))
    except ImportError:
        pass
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--iters", type=int, default=20, help="VAS-D iterations")
    ap.add_argument("--rank", type=int, default=128, help="rank of the VAS-D lowrank mode")
    ap.add_argument("--small", type=int, default=65536, help="rows for the negCLIPLoss/NormSim rows")
    ap.add_argument("--normsim_target", type=int, default=100_000, help="NormSim target rows |G|")
    ap.add_argument("--no_baselines", action="store_true", help="skip the caption-rule/negCLIPLoss/NormSim table")
    ap.add_argument("--only_baselines", action="store_true", help="only the caption-rule/negCLIPLoss/NormSim table")
    ap.add_argument("--stored", action="store_true",
                    help="run on an uncompressed-npz copy of the pool (np.savez rather than savez_compressed)")
    ap.add_argument("--only", default=None, help="comma-separated labels of the methods to run (e.g. vas)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per method; the table shows the median")
    ap.add_argument("--data_dir", default=str(HERE / "_data"))
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child")
    ap.add_argument("--child_opts")
    ap.add_argument("--pool")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    root = Path(args.data_dir)
    pool, target_path = ensure_pool(root, args.samples, args.shards, args.stored)
    if args.only_baselines:
        baselines_table(pool, root, args)
        return
    target = np.load(target_path)
    vas_d = {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "num_iters": args.iters}
    methods = [
        ("clip_score", "clip_score", {"arch": "l14", "fraction": 0.3}, 0),
        ("vas", "vas", {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "target": str(target_path)}, 1),
        ("vas_d", "vas_d", vas_d, args.iters),
        (f"vas_d lowrank r={args.rank}", "vas_d", vas_d | {"vas_d_mode": "lowrank", "vas_d_rank": args.rank}, 0),
    ]
    if args.only:
        wanted = set(args.only.split(","))
        methods = [m for m in methods if m[0] in wanted]
    feats = load_candidates(pool, 0.45)
    one_pass = blas_seconds(feats, target, repeats=2)
    del feats
    read_floor = read_seconds(pool)
    n = args.samples
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, numpy {np.__version__}")
    kind = "uncompressed (stored) npz" if args.stored else "compressed npz"
    print(f"pool: {n:,} synthetic samples in {args.shards} shards (l14_img float16, {kind})\n")
    print(f"reading every l14_img member once (all cores, {'inflate + ' if not args.stored else ''}CRC): "
          f"{read_floor:.2f} s\n")
    print("| method | wall (s) | samples/s | peak RSS (MB) | BLAS ceiling (s) | ceiling / wall | "
          "BLAS + read ceiling (s) | ceiling / wall |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    outputs = {}
    for label, name, opts, passes in methods:
        out = root / "out" / f"{label.replace(' ', '_').replace('=', '')}.npy"
        runs = []
        for _ in range(args.repeats):
            out.unlink(missing_ok=True)  # a re-run with the same config would be a no-op
            runs.append(run_method(pool, out, name, opts))
        r = sorted(runs, key=lambda x: x["wall"])[len(runs) // 2]  # the median run
        r["rss"] = max(x["rss"] for x in runs)
        outputs[label] = out
        ceiling = one_pass * (vas_d_passes(passes) if name == "vas_d" else passes)
        with_read = ceiling + read_floor if ceiling else 0.0  # every embedding method reads each member once
        row = {"method": label, "wall_s": r["wall"], "samples_per_s": n / r["wall"], "peak_rss_mb": r["rss"] / 1e6,
               "ceiling_s": ceiling, "ceiling_with_read_s": with_read, "read_floor_s": read_floor,
               "walls_s": [x["wall"] for x in runs], "counts": r["counts"], "timings": r["timings"]}
        results.append(row)
        ratio = f"{ceiling / r['wall']:.0%}" if ceiling else "-"
        ratio_read = f"{with_read / r['wall']:.0%}" if with_read else "-"
        print(f"| {label}{' (' + str(args.iters) + ' iters)' if name == 'vas_d' else ''} | {r['wall']:.1f} | "
              f"{n / r['wall']:,.0f} | {r['rss'] / 1e6:,.0f} | {ceiling:.1f} | {ratio} | {with_read:.1f} | "
              f"{ratio_read} |")
    low = [label for label in outputs if label.startswith("vas_d lowrank")]
    if "vas_d" in outputs and low:
        exact = set(np.load(outputs["vas_d"]).tolist())
        fast = set(np.load(outputs[low[0]]).tolist())
        print(f"\nVAS-D lowrank vs exact: Jaccard {len(exact & fast) / len(exact | fast):.4f} "
              f"({len(exact):,} uids each)")
    print("\n| decode primitive | GB/s |\n|---|---|")
    dec = [] if args.stored else decode_table(pool)
    for name, rate in dec:
        print(f"| {name} | {rate:.2f} |")
    extra = [] if args.no_baselines else baselines_table(pool, root, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"samples": n, "results": results, "decode": dec, "baselines": extra},
                                              indent=2))


def baselines_table(pool: Path, root: Path, args: argparse.Namespace) -> list[dict]:
    """The other methods: the caption rules on the whole pool; negCLIPLoss and NormSim (whose cost per
    row is ~B·D and ~|G|·D multiply-adds) on a `--small` subset of the pool via --given_uids_path."""
    import pyarrow.parquet as pq  # noqa: PLC0415

    from varalign.synth import SynthWorld  # noqa: PLC0415
    from varalign.uids import (
        hex_to_uids,  # noqa: PLC0415
        save_subset,  # noqa: PLC0415
    )

    first = sorted(pool.glob("*.parquet"))[0]  # rows of ONE shard: negCLIPLoss batches never cross shards
    uid_col = pq.read_table(first, columns=["uid"]).column("uid")
    save_subset(root / "small_subset.npy", hex_to_uids(uid_col.slice(0, args.small)))
    target_rows = SynthWorld.make(0).downstream(args.normsim_target, list(range(0, 60, 3)))
    np.save(root / "normsim_target.npy", target_rows)
    small = {"given_uids_path": str(root / "small_subset.npy")}
    rows = [
        ("basic_filter", "basic_filter", {}, None),
        ("text_based", "text_based", {}, None),
        ("laion2b", "laion2b", {}, None),
        (f"negcliploss B=32768 K=1 ({args.small:,} rows)", "negcliploss",
         small | {"arch": "l14", "fraction": 0.3, "average_num": 1, "batch_size": 32768}, "ncl"),
        (f"negcliploss → NormSim∞, |G|={args.normsim_target:,} ({args.small:,} rows)", "negcliploss",
         small | {"arch": "l14", "fraction": 1.0, "fraction_vas": 0.2, "average_num": 1, "batch_size": 32768,
                  "proxy_path": str(root / "normsim_target.npy")}, "ncl+ns"),
    ]
    f = load_candidates(pool, min(1.0, 65536 / args.samples))[:32768]
    t0 = time.perf_counter()
    sim = f[:4096] @ f.T  # one row block of a B = 32768 batch: the product and the exp it needs
    np.exp((sim - 1.0) / 0.01, out=sim)
    sim.sum(axis=1)
    ncl_ceiling_per_row = (time.perf_counter() - t0) / 4096
    g = target_rows.astype(np.float32)
    t0 = time.perf_counter()
    for start in range(0, len(g), 8192):  # the bare products of 4096 rows with every target row
        f[:4096] @ g[start : start + 8192].T
    ns_ceiling_per_row = (time.perf_counter() - t0) / 4096
    print("\n| method | rows | wall (s) | rows/s | peak RSS (MB) | BLAS(+exp) ceiling (s) |\n|---|---|---|---|---|---|")
    out = []
    for label, name, opts, kind in rows:
        dest = root / "out" / f"{name}_{kind or 'all'}.npy"
        dest.unlink(missing_ok=True)
        r = run_method(pool, dest, name, opts)
        n = r["counts"]["pool"]
        ceiling = {"ncl": n * ncl_ceiling_per_row, "ncl+ns": n * (ncl_ceiling_per_row + ns_ceiling_per_row)}
        c = ceiling.get(kind)
        out.append({"method": label, "rows": n, "wall_s": r["wall"], "peak_rss_mb": r["rss"] / 1e6, "ceiling_s": c})
        print(f"| {label} | {n:,} | {r['wall']:.1f} | {n / r['wall']:,.0f} | {r['rss'] / 1e6:,.0f} | "
              f"{f'{c:.1f}' if c else '-'} |")
    return out


if __name__ == "__main__":
    main()
