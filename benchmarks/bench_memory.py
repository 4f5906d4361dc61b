"""Peak RSS of `varalign filter` against pool size: it should not grow with the pool.

    python benchmarks/bench_memory.py                     # 1M (10 shards) and 4M (40 shards) pools
    python benchmarks/bench_memory.py --pools 1000000:10 --methods vas

Each run is `varalign filter ...` in a fresh child process, which reports its own peak RSS
(VmHWM from /proc/self/status: reset at exec, unlike ru_maxrss which a child inherits from the
parent that forked it). The pools are generated once by bench_filter.ensure_pool.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

METHODS = {
    "clip_score": ["--name", "clip_score", "--arch", "l14", "--fraction", "0.3"],
    "vas": ["--name", "vas", "--arch", "l14", "--fraction", "0.45", "--fraction_vas", "0.3"],
}


def vm_hwm_mb() -> float:
    """This process's peak resident set size, MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(argv: list[str]) -> None:
    """Run `varalign filter argv` in this process, then print its wall time and peak RSS as JSON."""
    from varalign.cli import main  # noqa: PLC0415

    t0 = time.perf_counter()
    code = main(["filter", *argv])
    print(json.dumps({"code": code, "wall_s": time.perf_counter() - t0, "peak_rss_mb": vm_hwm_mb()}))


def measure(pool: Path, target: Path, method: str, out: Path, workers: int) -> dict:
    """One `varalign filter` run in a child process."""
    argv = METHODS[method] + ["--metadata_dir", str(pool), "--save_path", str(out), "--num_workers", str(workers),
                              "--quiet"]
    if method == "vas":
        argv += ["--target", str(target)]
    out.unlink(missing_ok=True)  # a re-run with the same config would be a no-op
    cmd = [sys.executable, __file__, "--child", "--", *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"command": "varalign filter " + " ".join(argv)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", default="1000000:10,4000000:40", help="samples:shards, comma-separated")
    ap.add_argument("--methods", default="clip_score,vas")
    ap.add_argument("--num_workers", type=int, default=2)
    ap.add_argument("--data_dir", default=str(HERE / "_data"))
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--child", action="store_true")
    args, rest = ap.parse_known_args()
    if args.child:
        child([a for a in rest if a != "--"])
        return
    sys.path.insert(0, str(HERE))
    from bench_filter import ensure_pool  # noqa: PLC0415

    rows = []
    print("| method | pool | shards | peak RSS (MB) | wall (s) |\n|---|---|---|---|---|")
    for spec in args.pools.split(","):
        samples, shards = (int(x) for x in spec.split(":"))
        pool, target = ensure_pool(Path(args.data_dir), samples, shards)
        for method in args.methods.split(","):
            out = Path(args.data_dir) / "out" / f"mem_{method}_{samples}.npy"
            r = measure(pool, target, method, out, args.num_workers)
            rows.append({"method": method, "samples": samples, "shards": shards} | r)
            print(f"| {method} | {samples:,} | {shards} | {r['peak_rss_mb']:,.0f} | {r['wall_s']:.1f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
