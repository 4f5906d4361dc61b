"""Proof that a refactor changed nothing: run every method and command on fixed inputs, digest the outputs.

    python benchmarks/golden.py --out /tmp/after                       # this checkout
    python benchmarks/golden.py --out /tmp/before --src /tmp/old/src   # another checkout's code, same inputs
    python benchmarks/golden.py --compare /tmp/before /tmp/after       # every output byte-identical?

Inputs (built by this script, deterministic): a synthetic pool of 6,000 rows in 7 shards of uneven
size, a target, NormSim proxy embeddings, centroids, webdataset shards of real digit images. Each
command runs in a fresh child process (`python -m varalign ...`, PYTHONPATH = `--src`); every file it
writes is digested (SHA-256), except manifests, of which the counts and thresholds are digested.
Compare on one machine only: BLAS results may differ in the last bits between CPUs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def build_inputs(root: Path) -> dict[str, Path]:
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    from experiment_data import make_train_shards  # noqa: PLC0415

    from varalign.synth import make_pool, make_target  # noqa: PLC0415

    paths = {"pool": root / "pool", "target": root / "files" / "variance" / "variance_imagenet_1k.npy",
             "proxy": root / "proxy", "centroids": root / "centroids.npy", "shards": root / "shards",
             "files": root / "files", "recipe": root / "recipe.toml", "given": root / "given.npy",
             "cache": root / "datacomp_cache"}
    if (root / "done").exists():
        return paths
    make_pool(paths["pool"], num_samples=6000, num_shards=7, seed=11)
    make_target(paths["target"], seed=11, n=2000)
    rng = np.random.default_rng(11)
    paths["proxy"].mkdir(parents=True)
    g = rng.standard_normal((300, 768)).astype(np.float32)
    np.save(paths["proxy"] / "g.npy", g / np.linalg.norm(g, axis=1, keepdims=True))
    c = rng.standard_normal((24, 768)).astype(np.float32)
    np.save(paths["centroids"], c / np.linalg.norm(c, axis=1, keepdims=True))
    make_train_shards(paths["shards"], n=300, per_shard=100)
    import torch  # noqa: PLC0415 - DataComp's ImageNet-1k feature files are torch dicts

    paths["cache"].mkdir()
    for i in range(5):  # stand-ins for DataComp's in1k_clip_vit_l14_{0..4}.pt (image_based's second pass)
        f = rng.standard_normal((40, 768)).astype(np.float32)
        torch.save({"image_features": torch.from_numpy(f / np.linalg.norm(f, axis=1, keepdims=True))},
                   paths["cache"] / f"in1k_clip_vit_l14_{i}.pt")
    paths["recipe"].write_text(
        'name = "vas_or_ncl"\nop = "union"\n'
        '[[parts]]\nname = "a"\n[[parts.stages]]\nscore = "clip_score"\narch = "l14"\nfraction = 0.4\n'
        '[[parts.stages]]\nscore = "vas"\narch = "l14"\nfraction = 0.2\n'
        f'target = "{paths["target"]}"\n'
        '[[parts]]\nname = "b"\n[[parts.stages]]\nscore = "negcliploss"\narch = "l14"\nfraction = 0.1\n'
        'batch_size = 512\naverage_num = 2\n')
    (root / "done").write_text("")
    return paths


def commands(p: dict[str, Path], out: Path) -> dict[str, list[str]]:
    pool, flt = str(p["pool"]), ["filter", "--metadata_dir", str(p["pool"]), "--num_workers", "2", "--quiet"]

    def f(name: str, *extra: str, scores: bool = False) -> list[str]:
        o = out / name
        return [*flt, "--save_path", str(o / "s.npy"), *(["--save_scores", str(o / "s.parquet")] if scores else []),
                *extra]

    cs = ["--arch", "l14", "--fraction", "0.45"]
    return {
        "no_filter": f("no_filter", "--name", "no_filter"),
        "clip_score_fraction": f("clip_score_fraction", "--name", "clip_score", "--arch", "l14", "--fraction", "0.3",
                                 scores=True),
        "clip_score_threshold": f("clip_score_threshold", "--name", "clip_score", "--arch", "b32", "--threshold",
                                  "0.3"),
        "vas_target": f("vas_target", "--name", "vas", *cs, "--fraction_vas", "0.3", "--target", str(p["target"]),
                        scores=True),
        "vas_named": f("vas_named", "--name", "vas", *cs, "--threshold_vas", "0.01", "--target_variance_name",
                       "imagenet-1k", "--files_path", str(p["files"])),
        "vas_given": f("vas_given", "--name", "vas", "--arch", "l14", "--fraction", "0.6", "--fraction_vas", "0.4",
                       "--target", str(p["target"]), "--given_uids_path", str(p["given"])),
        "vas_d_exact": f("vas_d_exact", "--name", "vas_d", *cs, "--fraction_vas", "0.3", "--num_iters", "10",
                         scores=True),
        "vas_d_lowrank": f("vas_d_lowrank", "--name", "vas_d", *cs, "--fraction_vas", "0.3", "--num_iters", "10",
                           "--vas_d_mode", "lowrank", "--vas_d_rank", "32", scores=True),
        "negcliploss": f("negcliploss", "--name", "negcliploss", "--arch", "l14", "--fraction", "0.3",
                         "--batch_size", "512", "--average_num", "3", scores=True),
        "negcliploss_normsim": f("negcliploss_normsim", "--name", "cs_new", "--arch", "l14", "--fraction", "0.3",
                                 "--fraction_vas", "0.2", "--batch_size", "512", "--average_num", "2",
                                 "--proxy_path", str(p["proxy"]), "--norm", "2", scores=True),
        "basic_filter": f("basic_filter", "--name", "basic_filter", scores=True),
        "text_based": f("text_based", "--name", "text_based"),
        "laion2b": f("laion2b", "--name", "laion2b"),
        "image_based": f("image_based", "--name", "image_based", "--centroid_path", str(p["centroids"]),
                         "--cache_path", str(p["cache"]), scores=True),
        "image_based_clip": f("image_based_clip", "--name", "image_based_intersect_clip_score", "--arch", "l14",
                              "--fraction", "0.4", "--centroid_path", str(p["centroids"]), "--cache_path",
                              str(p["cache"])),
        "recipe_preset": f("recipe_preset", "--recipe", "vas_small", "--files_path", str(p["files"]), scores=True),
        "recipe_union": f("recipe_union", "--recipe", str(p["recipe"]), scores=True),
        "target": ["target", pool, "--save_path", str(out / "target" / "t.npy"), "--quiet"],
        "embed": ["embed", str(p["shards"]), "--output_dir", str(out / "embed"), "--model", "varalign-tiny",
                  "--random_init", "--arch", "b32", "--batch_size", "64", "--quiet"],
        "embed_clip_score": ["filter", "--metadata_dir", str(out / "embed"), "--name", "clip_score", "--arch", "b32",
                             "--fraction", "0.5", "--save_path", str(out / "embed_clip_score" / "s.npy"), "--quiet"],
        "reshard": ["reshard", "-i", str(p["shards"]), "-o", str(out / "reshard"), "-s",
                    str(out / "embed_clip_score" / "s.npy"), "--shard-size", "64", "-q"],
    }


def digest_outputs(folder: Path) -> dict[str, str]:
    out = {}
    for f in sorted(folder.rglob("*")):
        if not f.is_file():
            continue
        rel = str(f.relative_to(folder))
        if f.name.endswith("manifest.json") or f.name == "embed.json":
            m = json.loads(f.read_text())
            keep = {k: m.get(k) for k in ("counts", "thresholds", "rows", "dim", "trace")}
            out[rel] = hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
        elif f.name == "meta.json":
            m = json.loads(f.read_text())
            m.pop("seconds", None)
            m.get("args", {}).pop("output_dir", None)
            m.pop("output_dir", None)
            m.get("args", {}).pop("subset_file", None)
            m.get("args", {}).pop("input_dir", None)
            m.get("args", {}).pop("num_workers", None)
            out[rel] = hashlib.sha256(json.dumps(m, sort_keys=True).encode()).hexdigest()
        else:
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def run(args: argparse.Namespace) -> None:
    out = Path(args.out).resolve()
    inputs = build_inputs(Path(args.inputs).resolve())
    if not inputs["given"].exists():  # a restriction for --given_uids_path: every other uid of the pool
        sys.path.insert(0, str(ROOT / "src"))
        from varalign import filter_pool  # noqa: PLC0415
        from varalign.uids import save_subset  # noqa: PLC0415

        every = filter_pool(inputs["pool"], None, "no_filter", quiet=True).uids
        save_subset(inputs["given"], np.asarray(every)[::2])
    env = dict(os.environ, PYTHONPATH=str(Path(args.src).resolve()), HF_HUB_OFFLINE="1")
    results = {}
    for name, argv in commands(inputs, out).items():
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "varalign", *argv], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
        folder = out / name
        results[name] = {"seconds": round(time.perf_counter() - t0, 2), "files": digest_outputs(folder)}
        print(f"{name:<24} {results[name]['seconds']:6.1f} s  {len(results[name]['files'])} files", flush=True)
    (out / "digests.json").write_text(json.dumps(results, indent=1) + "\n")


def compare(a: Path, b: Path) -> int:
    da = json.loads((a / "digests.json").read_text())
    db = json.loads((b / "digests.json").read_text())
    bad = 0
    for name in sorted(set(da) | set(db)):
        fa, fb = da.get(name, {}).get("files"), db.get(name, {}).get("files")
        same = fa == fb
        bad += not same
        detail = "" if same else f"  differs: {sorted(k for k in set(fa or {}) | set(fb or {}) if (fa or {}).get(k) != (fb or {}).get(k))}"
        print(f"{name:<24} {'identical' if same else 'DIFFERENT'}{detail}")
    print(f"{len(set(da) | set(db)) - bad} identical, {bad} different")
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for the outputs and digests.json")
    ap.add_argument("--inputs", default=str(HERE / "_data" / "golden_inputs"), help="where the inputs are built")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the varalign source tree to run")
    ap.add_argument("--only", nargs="+", help="run only these commands")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="compare two --out folders")
    args = ap.parse_args()
    if args.compare:
        sys.exit(compare(Path(args.compare[0]), Path(args.compare[1])))
    if not args.out:
        ap.error("give --out (or --compare A B)")
    run(args)


if __name__ == "__main__":
    main()
