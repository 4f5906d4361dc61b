"""The `varalign` command: parses and validates flags, then calls the library. No logic here."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence

from .errors import VaralignError


def _filter_parser(sub: argparse._SubParsersAction) -> None:
    from .engine.options import FilterOptions  # noqa: PLC0415
    from .methods import METHODS  # noqa: PLC0415
    from .methods.base import flags_of  # noqa: PLC0415

    p = sub.add_parser("filter", help="select a subset of a DataComp pool (drop-in for baselines.py)",
                       description="Select a subset of a DataComp-format pool and save DataComp's subset file. "
                                   "Flags follow DataComp's baselines.py and the VAS reference; every method's "
                                   "options come from its parameters (varalign/methods/).")
    p.add_argument("--list", action="store_true", help="list every method with a one-line description and exit")
    p.add_argument("--name", help="method: no_filter, basic_filter, text_based, image_based, "
                                  "image_based_intersect_clip_score, clip_score, laion2b, vas, vas_d, negcliploss "
                                  "(cs_new) (see --list)")
    p.add_argument("--recipe", help="a recipe TOML file, or a shipped preset name (see --list), instead of --name")
    p.add_argument("--metadata_dir", help="directory with {name}.parquet + {name}.npz shards")
    p.add_argument("--save_path", help="output .npy (sorted u8,u8 uids); a .manifest.json is written beside it")
    # accepted so that the reference's scripts run unchanged
    p.add_argument("--num_gpus", type=int, default=None, help="accepted for compatibility; CPU runs ignore it")
    p.add_argument("--higher_is_better_vas", type=int, default=1, help="accepted; only 1 (the reference ignores it)")
    seen: dict[str, object] = {}
    for flag in [*flags_of(FilterOptions), *(f for m in METHODS.values() for f in flags_of(m.params))]:
        if flag.dest in seen:  # a parameter several methods share (arch, fasttext_model): one flag
            continue
        seen[flag.dest] = flag
        kwargs: dict = {"help": flag.help + ("" if flag.default in (None, False) or "default" in flag.help
                                              else f" (default: {flag.default})")}
        if flag.action:
            kwargs["action"] = flag.action
        else:
            kwargs |= {"type": flag.type or str, "choices": list(flag.choices) if flag.choices else None}
        p.add_argument(f"--{flag.dest}", default=None, **kwargs)
    p.set_defaults(func=_run_filter, _filter_flags=[*seen])


def _run_filter(args: argparse.Namespace) -> int:
    from .engine import describe_methods, filter_pool  # noqa: PLC0415

    if args.list:
        methods = describe_methods()
        width = max(map(len, methods))
        for name, text in methods.items():
            print(f"{name:<{width}}  {text}")
        return 0
    for flag in ("metadata_dir", "save_path"):
        if getattr(args, flag) is None:
            raise VaralignError(f"--{flag} is required")
    if args.num_gpus and (args.device or "cpu") == "cpu":
        _note(args, f"--num_gpus {args.num_gpus} ignored: this run uses the CPU (use --device cuda for the GPU)")
    if args.higher_is_better_vas != 1:
        raise VaralignError("--higher_is_better_vas 0 is not supported (the VAS reference never applies it)")
    options = {k: v for k in args._filter_flags if (v := getattr(args, k)) is not None and v is not False}
    result = filter_pool(args.metadata_dir, args.save_path, args.name, recipe=args.recipe, **options)
    stages = ", ".join(f"{k} {v:,}" for k, v in result.counts.items())
    took = "up to date: nothing redone" if result.up_to_date else f"{result.timings['total']:.1f} s"
    print(f"{args.name or args.recipe}: {stages} -> {result.save_path} ({took})")
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
    p.add_argument("--device", default="cpu", help="cpu (numpy/BLAS, default) or a torch device (cuda, cuda:1, "
                                                   "torch-cpu) for the products")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output varalign did not write")
    add_storage_flag(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_target)


# -- argparse `type=` checks for the subcommands' numeric options: a value out of range is one line naming the
# option ("argument --x: must be ..."), before any work

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return value


def share(text: str) -> float:
    """A probability or a share of a pool: a number in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated integers (`0,1,2`)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"must name at least one integer, got {text!r}")
    return values


def add_storage_flag(p: argparse.ArgumentParser) -> None:
    """`--storage_options JSON`: fsspec options for every URL the command reads or writes (set by `main`)."""
    p.add_argument("--storage_options", help="fsspec options for URLs (s3://, gs://, hf://) as JSON, e.g. "
                                             '\'{"client_kwargs": {"endpoint_url": "http://..."}}\'; '
                                             "credentials come from the environment as usual")


def _run_target(args: argparse.Namespace) -> int:
    from .target import build_target, canonical_target_name  # noqa: PLC0415

    if args.save_path is None:
        if not (args.files_path and args.name):
            raise VaralignError("give --save_path, or --files_path and --name")
        args.save_path = os.path.join(args.files_path, "variance", f"variance_{canonical_target_name(args.name)}.npy")
    info = build_target(args.inputs, args.save_path, arch=args.arch, key=args.key, normalize=args.normalize,
                        quiet=args.quiet, overwrite=args.overwrite, device=args.device)
    print(f"target {info['dim']}×{info['dim']} from {info['rows']:,} rows -> {args.save_path}")
    return 0


def _centroids_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("centroids", help="k-means centroids for image_based, following DataComp's recipe",
                       description="faiss k-means over a pool's l14_img (caption filter first, then optional "
                                   "sampling), as DataComp's image_based_clustering.py. Needs faiss: "
                                   "pip install 'varalign[image]' (or --device with torch). The sampled "
                                   "embeddings are held in RAM (rows × 768 × 4 bytes): use --sample_ratio to "
                                   "bound it.")
    p.add_argument("--metadata_dir", required=True, help="the pool (parquet + npz)")
    p.add_argument("--save_path", required=True, help="output .npy (float32 K×768), for --centroid_path")
    p.add_argument("--num_clusters", "-k", type=positive_int, default=100_000, help="K (DataComp: 100,000)")
    p.add_argument("--niter", type=positive_int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample_ratio", type=finite_float, default=-1.0,
                   help="fraction of caption-filtered rows to train on; <= 0: all (DataComp: -1 small/medium, "
                        "0.3 large, 0.03 xlarge)")
    p.add_argument("--max_points_per_centroid", type=positive_int, default=10_000_000)
    p.add_argument("--no_caption_filter", action="store_true", help="train on every row")
    p.add_argument("--fasttext_model", help="fastText model for the caption filter (default: bundled lid.176.ftz)")
    p.add_argument("--gpu", action="store_true", help="faiss on the GPU(s) (default: GPU when faiss sees one)")
    p.add_argument("--device", default="cpu", help="cpu (faiss, default) or a torch device: faiss's GPU k-means "
                                                   "when faiss sees a GPU and the device is cuda, else k-means "
                                                   "in torch on the device (cuda, cuda:1, torch-cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output varalign did not write")
    p.set_defaults(func=_run_centroids)


def _run_centroids(args: argparse.Namespace) -> int:
    from .centroids import build_centroids  # noqa: PLC0415

    c = build_centroids(args.metadata_dir, k=args.num_clusters, niter=args.niter, seed=args.seed,
                        max_points_per_centroid=args.max_points_per_centroid, sample_ratio=args.sample_ratio,
                        caption_filter=not args.no_caption_filter, model_path=args.fasttext_model,
                        gpu=True if args.gpu else None, save_path=args.save_path, overwrite=args.overwrite,
                        device=args.device)
    print(f"{len(c):,} centroids × {c.shape[1]} -> {args.save_path}")
    return 0


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the paper's methods on a real-image mini pool, print what each kept, "
                                    "write the subsets and an HTML report",
                       description="Builds (once, about 3 minutes on 2 cores) or reuses the real-image mini pool of "
                                   "`varalign minicomp build`, runs no filter, CLIP score, VAS and VAS-D ∩ CLIP "
                                   "score, negCLIPLoss (∩ NormSim) and DataComp's basic rules on it, and prints the "
                                   "share of each hidden noise kind each kept. Needs the [demo] extra; "
                                   "--synthetic needs only the core install.")
    p.add_argument("--out_dir", help="where the pool, subsets, scores and report go (default: varalign_demo, "
                                     "or varalign_demo_synthetic with --synthetic)")
    p.add_argument("--build_dir", help="the mini pool: a `varalign minicomp build` folder, reused when finished "
                                       "(default: OUT_DIR/minicomp)")
    p.add_argument("--size", type=positive_int, help="pool samples when building (default: 20000)")
    p.add_argument("--teacher_samples", type=positive_int, help="samples seen by the teacher CLIP when building "
                                                       "(default: 40000)")
    p.add_argument("--fashion_mnist_dir", help="folder of Fashion-MNIST idx files (default: Debian's "
                                               "/usr/share/datasets/fashion-mnist when installed)")
    p.add_argument("--train", action="store_true", help="also train a tiny CLIP on each subset and evaluate it "
                                                        "(about 30 s per method on 2 cores)")
    p.add_argument("--train_num_samples", type=positive_int, default=12_800, help="samples seen per training run "
                                                                         "(default: %(default)s)")
    p.add_argument("--train_seeds", default="0", help="comma-separated training seeds (default: %(default)s)")
    p.add_argument("--synthetic", action="store_true", help="the older demo: a generated embeddings-only pool, "
                                                            "clip_score / vas / vas_d (core install only)")
    p.add_argument("--num_samples", type=positive_int, help="--synthetic: pool samples (default: 50000)")
    p.add_argument("--num_shards", type=positive_int, help="--synthetic: shards (default: 10)")
    p.add_argument("--num_iters", type=positive_int, help="--synthetic: VAS-D iterations (default: 20)")
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


class _Parser(argparse.ArgumentParser):
    """argparse with a malformed command line reported in one line (exit code 2, argparse's), the usage left
    to `--help`; the subcommands' parsers are of this class too (`add_subparsers` takes the parent's)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__  # noqa: PLC0415

    parser = _Parser(prog="varalign", description="Select CLIP pretraining data: VAS, VAS-D, "
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
            if getattr(args, "storage_options", None) is not None:
                from . import storage  # noqa: PLC0415

                storage.configure(args.storage_options)
            return args.func(args)
    except VaralignError as exc:
        print(f"varalign: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # an I/O failure not caught as a VaralignError: still one line
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"varalign: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if getattr(args, "command", None) in _ALL_AT_ONCE:
            print("varalign: interrupted; no output was written (finished tasks are kept: run the same command "
                  "again to resume)", file=sys.stderr)
        else:  # shards, checkpoints or downloads appear one by one: what is there is not the whole result
            print("varalign: interrupted; the output is incomplete (what finished is kept: run the same command "
                  "again to resume and complete it)", file=sys.stderr)
        return 130


# commands whose outputs appear together, after the whole run, or not at all
_ALL_AT_ONCE = {"filter", "target", "centroids", "report"}


if __name__ == "__main__":
    sys.exit(main())
