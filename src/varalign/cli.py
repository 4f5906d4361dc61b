"""The `varalign` command: parses and validates flags, then calls the library. No logic here."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

from .errors import VaralignError


def _filter_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("filter", help="select a subset of a DataComp pool (drop-in for baselines.py)",
                       description="Select a subset of a DataComp-format pool and save DataComp's subset file. "
                                   "Flags follow DataComp's baselines.py and the VAS reference.")
    p.add_argument("--list", action="store_true", help="list every method with a one-line description and exit")
    p.add_argument("--name", help="method: no_filter, basic_filter, text_based, image_based, "
                                  "image_based_intersect_clip_score, clip_score, laion2b, vas, vas_d, negcliploss "
                                  "(cs_new) (see --list)")
    p.add_argument("--recipe", help="a recipe TOML file, or a shipped preset name (see --list), instead of --name")
    p.add_argument("--seed", type=int, default=0, help="seed for randomised scores (negCLIPLoss batches)")
    p.add_argument("--metadata_dir", help="directory with {name}.parquet + {name}.npz shards")
    p.add_argument("--save_path", help="output .npy (sorted u8,u8 uids); a .manifest.json is written beside it")
    p.add_argument("--arch", choices=["l14", "b32"], help="which CLIP embeddings/score columns to use")
    p.add_argument("--fraction", type=float, help="CLIP stage: fraction of the pool to keep")
    p.add_argument("--threshold", type=float, help="CLIP stage: keep CLIP score >= threshold")
    p.add_argument("--fraction_vas", type=float, help="VAS stage: fraction of the POOL to keep (not of the CLIP stage)")
    p.add_argument("--threshold_vas", type=float, help="VAS stage: keep VAS >= threshold")
    p.add_argument("--target", help="target second-moment matrix, .npy or .pt (D×D)")
    p.add_argument("--target_variance_name", help="read the target from FILES_PATH/variance/variance_{name}.pt|.npy")
    p.add_argument("--files_path", help="the VAS reference's files directory (holds variance/)")
    p.add_argument("--num_iters", type=int, help="VAS-D iterations")
    p.add_argument("--vas_d_mode", choices=["exact", "lowrank"], default="exact",
                   help="exact (default, the reference algorithm) or lowrank: every round in the top-r "
                        "eigenspace of the candidates (much faster; agreement measured in the README)")
    p.add_argument("--vas_d_rank", type=int, default=128, help="rank r of --vas_d_mode lowrank")
    p.add_argument("--given_uids_path", help="restrict the pool to these uids first (a subset .npy)")
    p.add_argument("--save_scores", help="also write a parquet of uid + every score computed")
    p.add_argument("--num_workers", type=int, default=None, help="parallel shards (default: all cores)")
    p.add_argument("--num_gpus", type=int, default=None, help="accepted for compatibility; CPU runs ignore it")
    p.add_argument("--batch_size", type=int, default=None, help="negcliploss: batch size B (default 32768); "
                                                                 "vas_d/image_based: accepted (bounds memory only)")
    p.add_argument("--batch_size_vass", type=int, default=None, help="accepted for compatibility (bounds memory only)")
    p.add_argument("--higher_is_better_vas", type=int, default=1, help="accepted; only 1 (the reference ignores it)")
    p.add_argument("--cache_path", help="folder of DataComp assets (default ~/.cache/datacomp, as DataComp's download())")
    p.add_argument("--download", action="store_true", help="download missing DataComp assets (centroids, ImageNet "
                                                            "features, lid.176.bin); off by default")
    p.add_argument("--image_based_scale", choices=["small", "medium", "large", "xlarge"],
                   help="image_based*: which DataComp centroid file ({scale}_centroids.pt)")
    p.add_argument("--centroid_path", help="image_based*: your own centroids (.npy or .pt), e.g. from `varalign centroids`")
    p.add_argument("--fasttext_model", help="fastText language-ID model (e.g. DataComp's lid.176.bin) instead of the "
                                            "bundled lid.176.ftz")
    p.add_argument("--temperature", type=float, default=0.01, help="negcliploss: τ (default 0.01)")
    p.add_argument("--average_num", type=int, default=10, help="negcliploss: K random batchings averaged (default 10)")
    p.add_argument("--norm", default="inf", help="negcliploss → NormSim: p (a number, or inf; >= 100 means inf)")
    p.add_argument("--proxy_name", help="NormSim target: imagenet_1k (DataComp's in1k_clip_vit_l14_*.pt)")
    p.add_argument("--proxy_path", help="NormSim target: a folder (or file) of .npy/.pt target embeddings")
    p.add_argument("--device", default="cpu", help="cpu (numpy/BLAS, default) or a torch device such as cuda, "
                                                   "cuda:1 (VAS and VAS-D math on the GPU; needs torch)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: threads on this machine (default); ray: Ray tasks (pip install 'varalign[ray]')")
    p.add_argument("--ray_address", help="Ray cluster address (default: start a local Ray)")
    p.add_argument("--work_dir", help="per-shard results + completion markers, for resume "
                                      "(default: .{save_path stem}.varalign-work beside the output)")
    p.add_argument("--keep_work_dir", action="store_true", help="keep the work directory after success (and after "
                                                               "an error)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save_path/--save_scores file that "
                                                           "varalign did not write (refused by default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_filter)


def _run_filter(args: argparse.Namespace) -> int:
    from .filter import describe_methods, filter_pool  # noqa: PLC0415

    if args.list:
        methods = describe_methods()
        width = max(map(len, methods))
        for name, text in methods.items():
            print(f"{name:<{width}}  {text}")
        return 0
    for flag in ("metadata_dir", "save_path"):
        if getattr(args, flag) is None:
            raise VaralignError(f"--{flag} is required")
    if args.num_gpus and args.device == "cpu":
        _note(args, f"--num_gpus {args.num_gpus} ignored: this run uses the CPU (use --device cuda for the GPU)")
    if args.higher_is_better_vas != 1:
        raise VaralignError("--higher_is_better_vas 0 is not supported (the VAS reference never applies it)")
    result = filter_pool(
        args.metadata_dir, args.save_path, args.name, recipe=args.recipe, arch=args.arch, fraction=args.fraction,
        threshold=args.threshold, fraction_vas=args.fraction_vas, threshold_vas=args.threshold_vas,
        target=args.target, target_variance_name=args.target_variance_name, files_path=args.files_path,
        num_iters=args.num_iters, vas_d_mode=args.vas_d_mode, vas_d_rank=args.vas_d_rank,
        given_uids_path=args.given_uids_path, num_workers=args.num_workers,
        batch_size=args.batch_size, batch_size_vass=args.batch_size_vass, save_scores=args.save_scores,
        cache_path=args.cache_path, download=args.download, image_based_scale=args.image_based_scale,
        centroid_path=args.centroid_path, fasttext_model=args.fasttext_model, temperature=args.temperature,
        average_num=args.average_num, norm=args.norm, proxy_name=args.proxy_name, proxy_path=args.proxy_path,
        seed=args.seed, device=args.device, executor=args.executor, ray_address=args.ray_address,
        work_dir=args.work_dir, keep_work_dir=args.keep_work_dir, overwrite=args.overwrite, quiet=args.quiet)
    stages = ", ".join(f"{k} {v:,}" for k, v in result.counts.items())
    print(f"{args.name or args.recipe}: {stages} -> {result.save_path} ({result.timings['total']:.1f} s)")
    return 0


def _target_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("target", help="build a target second-moment matrix from embeddings",
                       description="Uncentered second moment (1/N) Σ f fᵀ of embeddings, accumulated in float64, "
                                   "saved float32 where `varalign filter --target_variance_name` finds it.")
    p.add_argument("inputs", nargs="+", help="a DataComp metadata dir, .npy/.pt arrays, or folders of them")
    p.add_argument("--arch", choices=["l14", "b32"], default="l14", help="npz key for a DataComp pool (l14 → l14_img)")
    p.add_argument("--key", help="npz key, or dict key inside a .pt (default: image_features)")
    p.add_argument("--save_path", help="output .npy (or .pt, needs torch)")
    p.add_argument("--files_path", help="save as FILES_PATH/variance/variance_{name}.npy")
    p.add_argument("--name", help="target name for --files_path (e.g. imagenet_1k)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise every row first")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output varalign did not write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_target)


def _run_target(args: argparse.Namespace) -> int:
    from .target import build_target, canonical_target_name  # noqa: PLC0415

    if args.save_path is None:
        if not (args.files_path and args.name):
            raise VaralignError("give --save_path, or --files_path and --name")
        args.save_path = os.path.join(args.files_path, "variance", f"variance_{canonical_target_name(args.name)}.npy")
    info = build_target(args.inputs, args.save_path, arch=args.arch, key=args.key, normalize=args.normalize,
                        quiet=args.quiet, overwrite=args.overwrite)
    print(f"target {info['dim']}×{info['dim']} from {info['rows']:,} rows -> {args.save_path}")
    return 0


def _centroids_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("centroids", help="k-means centroids for image_based, following DataComp's recipe",
                       description="faiss k-means over a pool's l14_img (caption filter first, then optional "
                                   "sampling), as DataComp's image_based_clustering.py. Needs faiss: "
                                   "pip install 'varalign[image]'. The sampled embeddings are held in RAM "
                                   "(rows × 768 × 4 bytes): use --sample_ratio to bound it.")
    p.add_argument("--metadata_dir", required=True, help="the pool (parquet + npz)")
    p.add_argument("--save_path", required=True, help="output .npy (float32 K×768), for --centroid_path")
    p.add_argument("--num_clusters", "-k", type=int, default=100_000, help="K (DataComp: 100,000)")
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample_ratio", type=float, default=-1.0,
                   help="fraction of caption-filtered rows to train on; <= 0: all (DataComp: -1 small/medium, "
                        "0.3 large, 0.03 xlarge)")
    p.add_argument("--max_points_per_centroid", type=int, default=10_000_000)
    p.add_argument("--no_caption_filter", action="store_true", help="train on every row")
    p.add_argument("--fasttext_model", help="fastText model for the caption filter (default: bundled lid.176.ftz)")
    p.add_argument("--gpu", action="store_true", help="faiss on the GPU(s) (default: GPU when faiss sees one)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output varalign did not write")
    p.set_defaults(func=_run_centroids)


def _run_centroids(args: argparse.Namespace) -> int:
    from .centroids import build_centroids  # noqa: PLC0415

    c = build_centroids(args.metadata_dir, k=args.num_clusters, niter=args.niter, seed=args.seed,
                        max_points_per_centroid=args.max_points_per_centroid, sample_ratio=args.sample_ratio,
                        caption_filter=not args.no_caption_filter, model_path=args.fasttext_model,
                        gpu=True if args.gpu else None, save_path=args.save_path, overwrite=args.overwrite)
    print(f"{len(c):,} centroids × {c.shape[1]} -> {args.save_path}")
    return 0


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the paper's methods on a real-image mini pool, print what each kept, "
                                    "write the subsets and an HTML report",
                       description="Builds (once, about 2 minutes on 2 cores) or reuses the real-image mini pool of "
                                   "`varalign minicomp build`, runs no filter, CLIP score, VAS and VAS-D ∩ CLIP "
                                   "score, negCLIPLoss (∩ NormSim) and DataComp's basic rules on it, and prints the "
                                   "share of each hidden noise kind each kept. Needs the [demo] extra; "
                                   "--synthetic needs only the core install.")
    p.add_argument("--out_dir", help="where the pool, subsets, scores and report go (default: varalign_demo, "
                                     "or varalign_demo_synthetic with --synthetic)")
    p.add_argument("--build_dir", help="the mini pool: a `varalign minicomp build` folder, reused when finished "
                                       "(default: OUT_DIR/minicomp)")
    p.add_argument("--size", type=int, help="pool samples when building (default: 20000)")
    p.add_argument("--teacher_samples", type=int, help="samples seen by the teacher CLIP when building "
                                                       "(default: 40000)")
    p.add_argument("--fashion_mnist_dir", help="folder of Fashion-MNIST idx files (default: Debian's "
                                               "/usr/share/datasets/fashion-mnist when installed)")
    p.add_argument("--train", action="store_true", help="also train a tiny CLIP on each subset and evaluate it "
                                                        "(about 30 s per method on 2 cores)")
    p.add_argument("--train_num_samples", type=int, default=12_800, help="samples seen per training run "
                                                                         "(default: %(default)s)")
    p.add_argument("--train_seeds", default="0", help="comma-separated training seeds (default: %(default)s)")
    p.add_argument("--synthetic", action="store_true", help="the older demo: a generated embeddings-only pool, "
                                                            "clip_score / vas / vas_d (core install only)")
    p.add_argument("--num_samples", type=int, help="--synthetic: pool samples (default: 50000)")
    p.add_argument("--num_shards", type=int, help="--synthetic: shards (default: 10)")
    p.add_argument("--num_iters", type=int, help="--synthetic: VAS-D iterations (default: 20)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo  # noqa: PLC0415

    synthetic_only = [f"--{k}" for k in ("num_samples", "num_shards", "num_iters") if getattr(args, k) is not None]
    real_only = [f"--{k}" for k in ("build_dir", "size", "teacher_samples", "fashion_mnist_dir")
                 if getattr(args, k) is not None] + (["--train"] if args.train else [])
    if args.synthetic:
        if real_only:
            raise VaralignError(f"{', '.join(real_only)} apply to the real-image demo, not --synthetic")
        demo.run_synthetic_demo(args.out_dir or "varalign_demo_synthetic", args.num_samples or 50_000,
                                args.num_shards or 10, args.num_iters or 20, args.quiet)
        return 0
    if synthetic_only:
        raise VaralignError(f"{', '.join(synthetic_only)} apply to --synthetic only")
    config = None
    if args.size is not None or args.teacher_samples is not None:
        from .minicomp.build import BuildConfig  # noqa: PLC0415

        d = BuildConfig()
        config = BuildConfig(size=args.size or d.size, teacher_samples=args.teacher_samples or d.teacher_samples,
                             fashion_mnist_dir=args.fashion_mnist_dir)
    try:
        seeds = [int(x) for x in args.train_seeds.split(",") if x.strip()]
    except ValueError:
        raise VaralignError(f"--train_seeds must be comma-separated integers, got {args.train_seeds!r}") from None
    demo.run_demo(args.out_dir or "varalign_demo", build_dir=args.build_dir, config=config,
                  fashion_mnist_dir=args.fashion_mnist_dir, train=args.train, train_seeds=seeds,
                  train_num_samples=args.train_num_samples, quiet=args.quiet)
    return 0


def _note(args: argparse.Namespace, text: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"varalign: note: {text}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="varalign", description="Select CLIP pretraining data: VAS, VAS-D, "
                                     "CLIP score on DataComp pools.")
    parser.add_argument("--version", action="version", version=f"varalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _filter_parser(sub)
    _target_parser(sub)
    _centroids_parser(sub)
    _demo_parser(sub)
    from .download.cli import register_download  # noqa: PLC0415
    from .experiment.cli import register  # noqa: PLC0415 - embed, reshard, train, evaluate, experiment
    from .minicomp.cli import register_minicomp  # noqa: PLC0415
    from .report_cli import register_report  # noqa: PLC0415

    register(sub)
    register_report(sub)
    register_minicomp(sub)
    register_download(sub)
    return parser


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C: temp files removed, work kept for resume."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with _interrupt_on_sigterm(), warnings.catch_warnings():
            # numpy's RuntimeWarnings (0/0 on an empty selection, ...) are handled where they matter;
            # the command line shows one-line messages only
            warnings.simplefilter("ignore", RuntimeWarning)
            return args.func(args)
    except VaralignError as exc:
        print(f"varalign: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an I/O failure not caught as a VaralignError: still one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"varalign: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("varalign: interrupted; no output was written (finished tasks are kept: run the same command "
              "again to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
