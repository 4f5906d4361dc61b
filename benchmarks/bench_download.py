"""`varalign download` against a local image server: images/s, bytes fetched and written, the whole pool
vs a 30% subset, and DataComp's own download_upstream.py on the same metadata, in one run.

    python benchmarks/bench_download.py [--images 4000] [--processes 2] [--threads 32] [--repeats 3]
        [--datacomp_repo DIR] [--json benchmarks/results_download.json]

The pool: `--images` real images (scikit-learn's digits upscaled to about `--size` px with photo-like
grain, JPEG), served by `varalign.download.servers.LocalServer` on 127.0.0.1 (no faults), in
metadata files of 1,000 rows (so one shard per file, as with DataComp's 10,000 per shard). Runs, each a
fresh command (its start-up included):
  1. `varalign download` of the whole pool (metadata present, so the Hub is skipped);
  2. `varalign filter --name clip_score --arch l14 --fraction 0.3` on the metadata, then
     `varalign download --subset` of it;
  3. with `--datacomp_repo` (a checkout of mlfoundations/datacomp whose download_upstream.py and
     scale_configs.py run; cloudpathlib importable): `download_upstream.py --metadata_dir` on the same
     metadata and the same process/thread counts.
Per run: wall time, images written per second, bytes the server sent, bytes of shards on disk, and the
peak resident memory of the whole process tree (sampled every 0.2 s from /proc). With `--repeats k` the
downloads run k times in turn (into fresh folders) and the median time is kept (all times are in the JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from varalign.download.servers import LocalServer, digit_images, encode, image_pool, write_metadata


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants."""
    parents, rss = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            parents[pid] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            rss[pid] = int((stat.parent / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, grew = {root}, True
    while grew:
        new = {p for p, pp in parents.items() if pp in tree} - tree
        tree |= new
        grew = bool(new)
    return sum(rss.get(p, 0) for p in tree)


def timed(cmd: list[str], server: LocalServer, env: dict, log: Path) -> dict:
    """Run `cmd`; wall seconds, bytes the server sent meanwhile, peak memory of the process tree."""
    sent0 = server.bytes_sent
    peak = [0]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss(proc.pid))
                time.sleep(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        sampler.join()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{cmd[:4]} failed (exit {rc}); see {log}")
    return {"seconds": round(wall, 2), "bytes_fetched": server.bytes_sent - sent0, "peak_rss_bytes": peak[0]}


def shard_summary(shards: Path) -> dict:
    ok = sum(json.loads(p.read_text())["successes"] for p in shards.glob("*_stats.json"))
    disk = sum(p.stat().st_size for p in shards.iterdir() if p.is_file())
    return {"images_written": ok, "shard_bytes": disk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=4000)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1, help="run the downloads this many times; keep the median")
    ap.add_argument("--datacomp_repo", help="checkout of mlfoundations/datacomp (runs its download_upstream.py)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--keep", help="build everything in this folder and keep it (default: a temp folder)")
    args = ap.parse_args()

    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-download-"))
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} is not empty")
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    flags = ["--processes_count", str(args.processes), "--thread_count", str(args.threads)]
    results: dict = {"machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
                     "images": args.images, "size": args.size, "processes": args.processes, "threads": args.threads}
    with LocalServer(max_seconds=3600) as server:
        t0 = time.perf_counter()
        pictures = [encode(img) for img in digit_images(args.images, size=args.size, seed=0, noise=12.0)]
        cols = image_pool(server, pictures)
        meta = root / "metadata"
        write_metadata(cols, str(meta), rows_per_file=1000)
        results["pool"] = {"build_seconds": round(time.perf_counter() - t0, 1), "image_bytes": sum(map(len, pictures)),
                           "metadata_files": len(list(meta.glob("*.parquet")))}
        va = [sys.executable, "-m", "varalign"]
        t = time.perf_counter()
        subprocess.run([*va, "filter", "--name", "clip_score", "--arch", "l14", "--fraction", "0.3",
                        "--metadata_dir", str(meta), "--save_path", str(root / "clip_l14_30.npy"), "--quiet"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        results["filter_seconds"] = round(time.perf_counter() - t, 2)
        runs: dict[str, list] = {}
        for k in range(args.repeats):
            cmds = {"varalign_full": [*va, "download", "--data_dir", str(root / f"full{k}"), "--metadata_dir", str(meta),
                                      *flags, "--quiet"],
                    "varalign_subset": [*va, "download", "--data_dir", str(root / f"subset{k}"), "--metadata_dir",
                                        str(meta), *flags, "--subset", str(root / "clip_l14_30.npy"), "--quiet"]}
            if args.datacomp_repo:
                repo = Path(args.datacomp_repo).resolve()
                cmds["datacomp_full"] = [sys.executable, str(repo / "download_upstream.py"), "--data_dir",
                                         str(root / f"datacomp{k}"), "--metadata_dir", str(meta), *flags]
            for key, cmd in cmds.items():
                run_env = env
                if key == "datacomp_full":
                    run_env = dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(repo), env.get("PYTHONPATH")])))
                out = Path(cmd[cmd.index("--data_dir") + 1])
                r = {**timed(cmd, server, run_env, root / f"{out.name}.log"), **shard_summary(out / "shards")}
                if key != "datacomp_full":
                    r["estimated_bytes"] = _report(out)["estimated_bytes"]
                runs.setdefault(key, []).append(r)
                if not args.keep:
                    shutil.rmtree(out)
        for key, rs in runs.items():
            best = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]
            results[key] = {**best, "all_seconds": [r["seconds"] for r in rs]}
    for key in ("varalign_full", "varalign_subset", "datacomp_full"):
        if key in results:
            r = results[key]
            r["images_per_second"] = round(r["images_written"] / r["seconds"], 1)
    print(_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(root)


def _report(data_dir: Path) -> dict:
    return json.loads((data_dir / "download_report.json").read_text())


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _table(results: dict) -> str:
    names = {"varalign_full": "varalign download (pool)", "varalign_subset": "varalign download --subset 30%",
             "datacomp_full": "DataComp download_upstream.py (pool)"}
    head = f"{'run':<38}{'images':>8}{'seconds':>9}{'img/s':>8}{'fetched MB':>12}{'shards MB':>11}{'peak RSS MB':>13}"
    lines = [f"{results['machine']['cpu']}, {results['machine']['cores']} cores; {results['images']:,} images "
             f"(~{results['size']} px), {results['processes']} processes x {results['threads']} threads", head,
             "-" * len(head)]
    for key, name in names.items():
        if key in results:
            r = results[key]
            lines.append(f"{name:<38}{r['images_written']:>8,}{r['seconds']:>9.1f}{r['images_per_second']:>8.1f}"
                         f"{r['bytes_fetched'] / 1e6:>12.1f}{r['shard_bytes'] / 1e6:>11.1f}"
                         f"{r['peak_rss_bytes'] / 1e6:>13.0f}")
    lines.append(f"filter (clip_score 30%): {results['filter_seconds']:.1f} s; shard size estimated before the "
                 f"download: {results['varalign_full']['estimated_bytes'] / 1e6:.1f} MB (pool), "
                 f"{results['varalign_subset']['estimated_bytes'] / 1e6:.1f} MB (subset)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
