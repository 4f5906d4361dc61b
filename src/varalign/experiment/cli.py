"""Subcommands `embed`, `reshard`, `train`, `evaluate`, `experiment`; wired in by `register(subparsers)`.

Flags follow DataComp's resharder.py, train.py and evaluate.py where they overlap. No logic here.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import add_storage_flag, nonneg_int, positive_float, positive_int
from ..errors import VaralignError


def register(sub: argparse._SubParsersAction) -> None:
    """Add the experiment subcommands to the `varalign` parser's subparsers."""
    _embed_parser(sub)
    _reshard_parser(sub)
    _train_parser(sub)
    _evaluate_parser(sub)
    _experiment_parser(sub)


def _tasks(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def _pairs(values: list[str] | None, flag: str, what: str) -> dict[str, str]:
    """["a=x", "b=y"] -> {"a": "x", "b": "y"}; a malformed or repeated NAME is one error."""
    out: dict[str, str] = {}
    for v in values or []:
        name, sep, rest = v.partition("=")
        name = name.strip()
        if not sep or not name or not rest:
            raise VaralignError(f"{flag} wants NAME={what}, got {v!r}")
        if name in out:
            raise VaralignError(f"{flag} names {name!r} twice")
        out[name] = rest
    return out


def _add_custom_task_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", action="append", metavar="NAME=PATH",
                   help="a custom task: a folder in clip_benchmark's wds layout (test/nshards.txt, test/N.tar, "
                        "and classnames.txt + zeroshot_classification_templates.txt, or dataset_type.txt = "
                        "retrieval); repeatable")
    p.add_argument("--tasks_dir", help="evaluate every task folder in DIR (named by folder; a DataComp key such "
                                       "as mnist stays that DataComp task)")
    p.add_argument("--task_kind", action="append", metavar="NAME=KIND",
                   help="force a custom task's kind: classification or retrieval (default: detected); repeatable")


def _custom_task_args(args: argparse.Namespace) -> dict:
    return {"custom_tasks": _pairs(args.task, "--task", "PATH") or None, "tasks_dir": args.tasks_dir,
            "task_kinds": _pairs(args.task_kind, "--task_kind", "KIND") or None}


# ---- embed ---------------------------------------------------------------------------------------

def _embed_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="compute CLIP embeddings + scores of your data as a DataComp pool",
                       description="Embed images and captions of webdataset shards (or folders of image + .txt "
                                   "pairs) with an open_clip model; writes {shard}.parquet + {shard}.npz per shard.")
    p.add_argument("inputs", nargs="+", help="shard .tar files, directories of shards, or folders of image/caption "
                                             "pairs (shards and their folders may be URLs)")
    p.add_argument("--output_dir", "--metadata_dir", dest="output_dir", required=True,
                   help="where the pool goes (a folder URL: each file uploaded in one put when written)")
    p.add_argument("--model", help="open_clip model name (e.g. ViT-L-14)")
    p.add_argument("--pretrained", help="pretrained tag (needs the internet) or a local checkpoint path")
    p.add_argument("--model_config", help="local open_clip model config JSON (its file stem is the model name)")
    p.add_argument("--arch", choices=["l14", "b32"], default="l14", help="names the npz keys and score column")
    p.add_argument("--batch_size", type=positive_int, default=256)
    p.add_argument("--device", help="cpu or cuda[:i] (default: cuda when present)")
    p.add_argument("--num_workers", type=nonneg_int, default=2, help="image decoding threads")
    p.add_argument("--shard_size", type=positive_int, default=10_000, help="samples per shard for folder inputs")
    p.add_argument("--random_init", action="store_true", help="allow untrained weights (testing only)")
    p.add_argument("--seed", type=int, default=0, help="torch seed (for --random_init)")
    p.add_argument("--overwrite", action="store_true", help="redo shards embedded with another config")
    _add_executor_flags(p, "local: one shard after another, the model on every core; ray: a Ray task per shard")
    add_storage_flag(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_embed)


def _add_executor_flags(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help=f"where the per-shard tasks run ({what}; default: %(default)s)")
    p.add_argument("--ray_address", default=None, help="Ray cluster address for --executor ray (default: start a "
                                                       "local one); every node must see local files at the same "
                                                       "paths (URLs need no shared filesystem)")


def _run_embed(args: argparse.Namespace) -> int:
    from .embed import embed

    r = embed(args.inputs, args.output_dir, model=args.model, pretrained=args.pretrained,
              model_config=args.model_config, arch=args.arch, batch_size=args.batch_size, device=args.device,
              num_workers=args.num_workers, shard_size=args.shard_size, random_init=args.random_init,
              seed=args.seed, overwrite=args.overwrite, quiet=args.quiet, executor=args.executor,
              ray_address=args.ray_address)
    print(f"embed: {len(r.shards)} shards ({r.reused} reused), {r.rows:,} rows, {r.skipped:,} samples skipped "
          f"-> {r.output_dir} ({r.seconds:.1f} s)")
    return 0


# ---- reshard -------------------------------------------------------------------------------------

def _reshard_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reshard", help="write the samples of a subset file as new webdataset shards (DataComp resharder)",
                       description="DataComp-compatible resharder: input shards + subset file -> output shards "
                                   "with _stats.json, meta.json and sample_ids.npy.")
    p.add_argument("-i", "--input-dir", required=True, help="directory of input {:08d}.tar shards (or a URL)")
    p.add_argument("-o", "--output-dir", required=True,
                   help="output directory (new or empty; an unfinished reshard there resumes, a finished one needs "
                        "--overwrite; a URL: shards appear under their names together)")
    p.add_argument("-s", "--subset-file", required=True, help="sorted u8,u8 uid .npy (repeated uids are repeated; "
                                                              "or a URL)")
    p.add_argument("-n", "--num-shards", type=positive_int, help="read shards first..first+n-1 (default: every *.tar)")
    p.add_argument("--first-shard", type=nonneg_int, default=0)
    p.add_argument("-j", "--num-workers", type=positive_int, default=None, help="processes (default: all cores)")
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="samples per output shard")
    p.add_argument("--shard-format", default="{:08d}.tar")
    p.add_argument("--output-shard-format", default="{:08d}.tar")
    p.add_argument("--shard-stats-format", default="{:08d}_stats.json", help="accepted (input stats are not needed)")
    p.add_argument("--output-shard-stats-format", default="{:08d}_stats.json")
    p.add_argument("--overwrite", action="store_true", help="replace earlier reshard outputs in --output-dir")
    p.add_argument("--dry-run", action="store_true", help="count only, write nothing")
    _add_executor_flags(p, "local: -j processes; ray: a Ray task per input and per output shard")
    add_storage_flag(p)
    p.add_argument("-v", "--verbose", action="store_true", help="accepted")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_run_reshard)


def _run_reshard(args: argparse.Namespace) -> int:
    from .reshard import reshard

    r = reshard(args.input_dir, args.output_dir, args.subset_file, num_shards=args.num_shards,
                first_shard=args.first_shard, num_workers=args.num_workers, shard_size=args.shard_size,
                shard_format=args.shard_format, output_shard_format=args.output_shard_format,
                output_shard_stats_format=args.output_shard_stats_format, overwrite=args.overwrite,
                dry_run=args.dry_run, quiet=args.quiet, executor=args.executor, ray_address=args.ray_address)
    print(f"reshard: {r.input_samples:,} input samples in {r.input_shard_count} shards; subset {r.subset_unique:,} "
          f"uids ({r.subset_size:,} with repeats), {r.not_found:,} not found; "
          f"{'would write' if args.dry_run else 'wrote'} {r.output_samples:,} samples "
          f"in {r.output_shard_count} shards{' (dry run: nothing written)' if args.dry_run else ''} ({r.seconds:.1f} s)")
    return 0


# ---- train ---------------------------------------------------------------------------------------

def _add_train_overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch_size", type=positive_int, help="override the scale's global batch size")
    p.add_argument("--lr", type=positive_float, help="override the scale's learning rate")
    p.add_argument("--train_num_samples", type=positive_int, help="override the scale's samples seen")
    p.add_argument("--warmup", type=nonneg_int, help="override the scale's warmup steps")
    p.add_argument("--workers", type=nonneg_int, default=None, help="data loader workers (default 4 with a GPU, else 1)")
    p.add_argument("--precision", default=None, help="amp (default with a GPU), fp32 (default on CPU), amp_bf16, ...")
    p.add_argument("--num_checkpoints", type=positive_int, default=5)


def _train_parser(sub: argparse._SubParsersAction) -> None:
    from .train import SCALE_CONFIGS

    p = sub.add_parser("train", help="train CLIP with open_clip at a DataComp scale (DataComp train.py)",
                       description="open_clip_train with DataComp's scale configs (plus `tiny`, CPU-sized); "
                                   "resumable; writes checkpoints and info.json for `varalign evaluate`.")
    p.add_argument("--scale", required=True, choices=list(SCALE_CONFIGS))
    p.add_argument("--data_dir", required=True, help="shard directory (resharder output), or a::b for several")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--exp_name", help="default: {data dir name}_{scale}_seed_{seed}")
    p.add_argument("--data_weights", help="upsampling factors for a::b data (open_clip --train-data-upsampling-factors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accum_freq", type=positive_int, default=1)
    p.add_argument("--log_every_n_steps", type=positive_int, default=100)
    p.add_argument("--resume", default="latest", help="latest (default), a checkpoint path, or none")
    p.add_argument("--imagenet_val", help="ImageNet val folder for open_clip's in-training zero-shot")
    p.add_argument("--grad_clip_norm", type=positive_float)
    p.add_argument("--save_frequency", type=nonneg_int, default=0)
    p.add_argument("--report_to_wandb", action="store_true")
    p.add_argument("--wandb_project_name", default="datanet")
    p.add_argument("--nproc_per_node", type=positive_int, help="processes (default: one per GPU, else 1); >1 uses torchrun")
    _add_train_overrides(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from .train import train

    r = train(args.scale, args.data_dir, args.output_dir, args.exp_name, num_checkpoints=args.num_checkpoints,
              workers=args.workers, precision=args.precision, seed=args.seed, accum_freq=args.accum_freq,
              resume=None if args.resume == "none" else args.resume, nproc_per_node=args.nproc_per_node,
              log_every_n_steps=args.log_every_n_steps, save_frequency=args.save_frequency,
              grad_clip_norm=args.grad_clip_norm, data_weights=args.data_weights,
              report_to_wandb=args.report_to_wandb, wandb_project_name=args.wandb_project_name,
              imagenet_val=args.imagenet_val, batch_size=args.batch_size, learning_rate=args.lr,
              train_num_samples=args.train_num_samples, warmup=args.warmup, quiet=args.quiet)
    print(f"train: {r.checkpoint} ({r.seconds:.1f} s); info: {r.info_path}")
    return 0


# ---- evaluate ------------------------------------------------------------------------------------

def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="zero-shot evaluation on DataComp's 38 tasks and your own (clip_benchmark)",
                       description="Zero-shot classification and retrieval on local webdataset copies of "
                                   "DataComp's tasks (DataComp's aggregation; missing tasks are reported) and of "
                                   "custom tasks (--task NAME=PATH, --tasks_dir DIR).")
    p.add_argument("--train_output_dir", help="a `varalign train` experiment directory (reads info.json)")
    p.add_argument("--data_dir", help="local DataComp eval data: {task}/ or wds_{task}_test/ per task "
                                      "(needed unless only custom tasks are evaluated)")
    p.add_argument("--output_dir", help="default: --train_output_dir")
    p.add_argument("--batch_size", type=positive_int, default=64)
    p.add_argument("--tasks", help="comma-separated DataComp task keys (default: all 38 when --data_dir is given)")
    _add_custom_task_flags(p)
    p.add_argument("--use_model", help='"ARCH CHECKPOINT": evaluate this open_clip model instead of info.json')
    p.add_argument("--num_workers", type=nonneg_int, default=0)
    p.add_argument("--device")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an eval_summary.json / eval_results.md that varalign did not write")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate
    from .tasks import GROUPS, TASK_BY_KEY, format_score

    use_model = None
    if args.use_model:
        parts = args.use_model.split()
        if len(parts) != 2:
            raise VaralignError('--use_model wants "ARCH CHECKPOINT"')
        use_model = (parts[0], parts[1])
    custom = _custom_task_args(args)
    if args.data_dir is None and not (custom["custom_tasks"] or custom["tasks_dir"]):
        raise VaralignError("give --data_dir (DataComp's tasks) and/or --task NAME=PATH / --tasks_dir DIR (your own)")
    r = evaluate(args.train_output_dir, args.data_dir, output_dir=args.output_dir, batch_size=args.batch_size,
                 tasks=_tasks(args.tasks), num_workers=args.num_workers, device=args.device, use_model=use_model,
                 quiet=args.quiet, overwrite=args.overwrite, **custom)
    for g in GROUPS:
        print(f"{g}: {format_score(r.groups[g])}")
    for key, value in r.main_metrics.items():
        if key in TASK_BY_KEY:
            print(f"{key}: {TASK_BY_KEY[key].main_metric} = {value:.4f}")
    for name, c in r.custom.items():
        print(f"{name} (custom {c['kind']}): {c['main_metric']} = {r.main_metrics[name]:.4f}")
    if r.missing:
        print(f"missing {len(r.missing)} task(s): {', '.join(r.missing)}")
    print(f"results: {r.output_dir}/eval_results.jsonl, eval_results.md ({r.seconds:.1f} s)")
    return 0


# ---- experiment ----------------------------------------------------------------------------------

def _experiment_parser(sub: argparse._SubParsersAction) -> None:
    from .train import SCALE_CONFIGS

    p = sub.add_parser("experiment", help="run_exp.sh: reshard, train, evaluate each subset; one comparison table",
                       description="For each subset file: reshard the input shards, train at --scale, evaluate; "
                                   "then write comparison.md. Re-running resumes.")
    p.add_argument("-i", "--input-dir", required=True, help="the pool's downloaded shards")
    p.add_argument("-s", "--subset-file", nargs="+", required=True,
                   help="subset .npy files (a name `no_filter` trains on the input shards directly)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--scale", required=True, choices=list(SCALE_CONFIGS))
    p.add_argument("--eval_data_dir", help="DataComp's evaluation tasks (clip_benchmark wds layout); optional "
                                           "with --task/--tasks_dir (your own tasks only)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--tasks", help="comma-separated DataComp task keys (default: all 38)")
    _add_custom_task_flags(p)
    p.add_argument("-j", "--num-workers", type=positive_int, default=None, help="reshard processes")
    p.add_argument("--overwrite", action="store_true", help="reshard over earlier outputs")
    _add_train_overrides(p)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_run_experiment)


def _run_experiment(args: argparse.Namespace) -> int:
    from .experiment import run_experiment

    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise VaralignError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    custom = _custom_task_args(args)
    if args.eval_data_dir is None and not (custom["custom_tasks"] or custom["tasks_dir"]):
        raise VaralignError("give --eval_data_dir (DataComp's tasks) and/or --task NAME=PATH / --tasks_dir DIR "
                            "(your own)")
    options = {"batch_size": args.batch_size, "learning_rate": args.lr, "train_num_samples": args.train_num_samples,
               "warmup": args.warmup, "workers": args.workers, "precision": args.precision,
               "num_checkpoints": args.num_checkpoints}
    run_experiment(args.input_dir, args.subset_file, args.output_dir, scale=args.scale,
                   eval_data_dir=args.eval_data_dir, seeds=seeds, tasks=_tasks(args.tasks),
                   num_workers=args.num_workers, overwrite=args.overwrite, train_options=options, quiet=args.quiet,
                   **custom)
    print((Path(args.output_dir) / "comparison.md").read_text(), end="")
    return 0
