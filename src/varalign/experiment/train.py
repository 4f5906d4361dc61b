"""CLIP training with open_clip_train and DataComp's scale configs (DataComp train.py, scale_configs.py).

`train()` builds the argument list DataComp's train.py passes to OpenCLIP, runs
`python -m varalign.experiment.openclip_entry` (or `torchrun` for several GPUs) and writes
`{output_dir}/{exp_name}/info.json` ({scale, checkpoint, scale_config, data_dir, model, ...}), which
`evaluate` reads. DataComp writes `info.pkl`; varalign writes JSON only and never unpickles.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..atomic import save_json, temp_pattern
from ..errors import VaralignError

TINY_MODEL = "varalign-tiny"
# a 2-layer ViT on 32×32 images and a 2-layer text transformer, 64-d embeddings: trains on a CPU
TINY_MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
CUSTOM_MODELS = {TINY_MODEL: TINY_MODEL_CONFIG}

# DataComp scale_configs.py (REFERENCE §6.2, DCP Table 14) plus `tiny`
SCALE_CONFIGS: dict[str, dict] = {
    "tiny": {"model": TINY_MODEL, "batch_size": 64, "learning_rate": 1e-3, "train_num_samples": 12_800,
             "warmup": 20},
    "debug": {"model": "ViT-B-32", "batch_size": 1024, "learning_rate": 1e-4, "train_num_samples": 128_000,
              "warmup": 500},
    "small": {"model": "ViT-B-32", "batch_size": 4096, "learning_rate": 5e-4, "train_num_samples": 12_800_000,
              "warmup": 500},
    "medium": {"model": "ViT-B-32", "batch_size": 4096, "learning_rate": 5e-4, "train_num_samples": 128_000_000,
               "warmup": 500},
    "large": {"model": "ViT-B-16", "batch_size": 8192, "learning_rate": 5e-4, "train_num_samples": 1_280_000_000,
              "warmup": 500},
    "xlarge": {"model": "ViT-L-14", "batch_size": 90112, "learning_rate": 1e-3,
               "train_num_samples": 12_800_000_000, "warmup": 10_000, "beta2": 0.95},
}


# open_clip_train's progress line: "Train Epoch: 0 [ 1280/40064 (3%)] Data (t): ..." (epoch counts from 0)
_PROGRESS_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) ")


def run_with_progress(cmd: list[str], env: dict, *, total: int, epochs: int, desc: str,
                      log_path: Path | None = None, quiet: bool = False) -> tuple[int, list[str]]:
    """Run open_clip_train (`cmd`) with its output captured (into `log_path` when given) and show, unless
    `quiet`, a tqdm bar on stderr of the samples seen and the epoch, with an estimate, read from its
    `Train Epoch` log lines (one per `--log-every-n-steps` steps). Returns the exit code and its last lines."""
    from tqdm import tqdm

    tail: deque[str] = deque(maxlen=20)
    started = False
    with (open(log_path, "w") if log_path is not None else contextlib.nullcontext()) as log, \
            tqdm(total=total, desc=desc, unit="sample", disable=quiet, postfix=f"epoch 1/{epochs}",
                 file=sys.stderr, mininterval=0, miniters=1) as bar:  # the log lines are rare: show each one
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        for line in proc.stdout:
            if log is not None:
                log.write(line)
            if line.strip():
                tail.append(line.rstrip())
            m = _PROGRESS_LINE.search(line)
            if m:
                epoch, seen, per_epoch = (int(x) for x in m.groups())
                epochs = max(epochs, epoch + 1)
                done = epoch * per_epoch + min(seen, per_epoch)
                bar.total = epochs * per_epoch  # open_clip rounds the samples per epoch up to whole batches
                bar.set_postfix_str(f"epoch {epoch + 1}/{epochs}", refresh=False)
                if started:
                    bar.update(max(0, done - bar.n))
                else:  # the first line comes after the start-up (imports, data loader): the rate starts here
                    started = True
                    bar.initial = bar.n = bar.last_print_n = done
                    bar.last_print_t = time.time()
                    bar.refresh()
        returncode = proc.wait()
    return returncode, list(tail)


@dataclass
class TrainResult:
    """Where training wrote its checkpoint and info file."""

    exp_dir: str
    checkpoint: str
    info_path: str
    seconds: float


def scale_config(scale: str, **overrides: object) -> dict:
    """The scale's config with non-None overrides (batch_size, learning_rate, train_num_samples, warmup)."""
    if scale not in SCALE_CONFIGS:
        raise VaralignError(f"unknown --scale {scale!r} (one of {', '.join(SCALE_CONFIGS)})")
    cfg = dict(SCALE_CONFIGS[scale])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return cfg


def train_data_pattern(data_dir: str) -> tuple[str, int]:
    """OpenCLIP `--train-data` for one or more (`::`-joined) shard directories, and their sample count.

    A directory with a resharder `meta.json` gives `{dir}/{00000000..N-1}.tar` in its output format;
    otherwise its `*.tar` files are listed (brace range when contiguous `{:08d}.tar`).
    """
    patterns, total = [], 0
    for part in data_dir.split("::"):
        root = Path(part)
        if not root.is_dir():
            raise VaralignError("training data directory not found", root)
        meta_path = root / "meta.json"
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
                count, fmt = int(meta["output_shard_count"]), meta.get("output_shard_format", "{:08d}.tar")
                total += int(meta.get("output_samples", 0))
            except (ValueError, KeyError, TypeError) as exc:
                raise VaralignError(f"not a resharder meta.json ({exc})", meta_path) from None
            if count == 0:
                raise VaralignError("resharded subset is empty (0 shards)", meta_path)
            names = [fmt.format(i) for i in range(count)]
        else:
            names = sorted(p.name for p in root.iterdir() if p.name.endswith(".tar") and not p.name.startswith("."))
            if not names:
                raise VaralignError("no .tar shards in training data directory", root)
            for n in names:
                stats = root / n.replace(".tar", "_stats.json")
                if stats.exists():
                    try:
                        total += int(json.loads(stats.read_text()).get("successes", 0))
                    except ValueError:
                        pass
        with ThreadPoolExecutor(16) as pool:  # one open per shard: many at a time on a network filesystem
            full = list(pool.map(lambda n, r=root: _check_shard(r / n), names))
        empty = [n for n, ok in zip(names, full, strict=True) if not ok]
        if len(empty) == len(names):
            raise VaralignError("every tar shard is empty (no sample)", root)
        if empty:  # img2dataset writes a shard none of whose images came as an empty tar; open_clip skips it
            print(f"varalign: warning: {len(empty)} empty tar shard(s) left out ({root / empty[0]}, ...)",
                  file=sys.stderr)
            names = [n for n, ok in zip(names, full, strict=True) if ok]
        if names == [f"{i:08d}.tar" for i in range(len(names))]:
            patterns.append(str(root / f"{{00000000..{len(names) - 1:08d}}}.tar"))
        else:
            patterns.extend(str(root / n) for n in names)
    return "::".join(patterns), total


def data_fingerprint(data_dir: str) -> str:
    """What identifies the training data of `data_dir` (`::`-joined parts) for resuming: a resharded subset's
    `sample_ids.npy` (SHA-256, streamed) and its shard count and format, else the names and sizes of its `.tar`
    shards. Not paths, times or the resharder's arguments: the same data reached or resharded again is the same."""
    import hashlib  # noqa: PLC0415

    from ..atomic import cached_sha256  # noqa: PLC0415

    h = hashlib.sha256()
    for part in data_dir.split("::"):
        root = Path(part)
        meta = None
        if (root / "meta.json").is_file():
            try:
                meta = json.loads((root / "meta.json").read_text())
            except (OSError, ValueError, UnicodeDecodeError):
                meta = None
        if isinstance(meta, dict) and (root / "sample_ids.npy").is_file():
            fields = {k: meta.get(k) for k in ("output_shard_count", "output_shard_format", "output_samples")}
            h.update(json.dumps(fields, sort_keys=True).encode() + cached_sha256(root / "sample_ids.npy").encode())
        else:
            for p in sorted(root.glob("*.tar")):
                h.update(f"{p.name}:{p.stat().st_size};".encode())
        h.update(b"::")
    return h.hexdigest()


def same_data_dir(data_dir: str) -> str:
    """`data_dir` with each `::` part resolved (`./data`, `data/` and `/abs/data` are one folder)."""
    return "::".join(os.path.realpath(p) for p in data_dir.split("::"))


def _check_shard(path: Path) -> bool:
    """Whether a shard holds a sample (False: an empty tar); a shard that is missing or not a tar is one line
    before training: open_clip's loader skips a bad shard with a warning a step, and with no good one it
    would loop (and log) without end."""
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
            if first is None:
                return False
            # A whole tar ends with two zero blocks (tarfile, GNU tar and webdataset write them). One cut short,
            # at a member boundary or inside one, ends with member data instead, and tarfile and webdataset read
            # it as a shorter whole tar without a word: the tail, one read, tells (every header would cost a
            # seek per member). A cut whose last 1,024 bytes happen to be zeros is not seen.
            tar.fileobj.seek(-2 * tarfile.BLOCKSIZE, os.SEEK_END)
            if tar.fileobj.read(2 * tarfile.BLOCKSIZE) != bytes(2 * tarfile.BLOCKSIZE):
                raise VaralignError("truncated tar shard: it does not end with tar's end-of-archive blocks (a copy "
                                    "or download cut short?); restore it or remove it from the folder", path)
    except FileNotFoundError:
        raise VaralignError("training shard not found", path) from None
    except (tarfile.TarError, OSError) as exc:
        raise VaralignError(f"not a readable tar shard ({exc})", path) from None
    return True


def build_args(scale: str, data_dir: str, output_dir: str, exp_name: str, *, cfg: dict, world_size: int = 1,
               accum_freq: int = 1, num_checkpoints: int = 5, workers: int = 4, precision: str = "amp",
               seed: int = 0, resume: str | None = "latest", log_every_n_steps: int = 100,
               save_frequency: int = 0, grad_clip_norm: float | None = None, data_weights: str | None = None,
               report_to_wandb: bool = False, wandb_project_name: str = "datanet",
               imagenet_val: str | None = None, grad_checkpointing: bool = True) -> list[str]:
    """OpenCLIP arguments as DataComp's train.py builds them."""
    per_gpu = cfg["batch_size"] // (world_size * accum_freq)
    if per_gpu < 1:
        raise VaralignError(f"global batch {cfg['batch_size']} is smaller than {world_size} GPUs × accum {accum_freq}")
    pattern, _ = train_data_pattern(data_dir)
    args = [
        "--save-frequency", str(save_frequency),
        "--ddp-static-graph", "--local-loss", "--gather-with-grad",
        "--train-data", pattern,
        "--train-num-samples", str(int(cfg["train_num_samples"]) // num_checkpoints),
        "--warmup", str(cfg["warmup"]),
        "--dataset-type", "webdataset",
        "--precision", precision,
        "--workers", str(workers),
        "--model", cfg["model"],
        "--batch-size", str(per_gpu),
        "--epochs", str(num_checkpoints),
        "--lr", str(cfg["learning_rate"]),
        "--logs", output_dir,
        "--name", exp_name,
        "--seed", str(seed),
        "--accum-freq", str(accum_freq),
        "--log-every-n-steps", str(log_every_n_steps),
        "--save-most-recent",
        "--dataset-resampled",
    ]
    if grad_checkpointing:
        args.append("--grad-checkpointing")
    if resume:
        args += ["--resume", resume]
    if "beta2" in cfg:
        args += ["--beta2", str(cfg["beta2"])]
    if data_weights:
        args += ["--train-data-upsampling-factors", data_weights]
    if grad_clip_norm is not None:
        args += ["--grad-clip-norm", str(grad_clip_norm)]
    if imagenet_val:
        args += ["--imagenet-val", imagenet_val]
    if report_to_wandb:
        args += ["--report-to", "wandb", "--wandb-project-name", wandb_project_name]
    return args


def train(scale: str, data_dir: str | os.PathLike, output_dir: str | os.PathLike, exp_name: str | None = None, *,
          num_checkpoints: int = 5, workers: int | None = None, precision: str | None = None, seed: int = 0,
          accum_freq: int = 1, resume: str | None = "latest", nproc_per_node: int | None = None,
          log_every_n_steps: int = 100, save_frequency: int = 0, grad_clip_norm: float | None = None,
          data_weights: str | None = None, report_to_wandb: bool = False, wandb_project_name: str = "datanet",
          imagenet_val: str | None = None, batch_size: int | None = None, learning_rate: float | None = None,
          train_num_samples: int | None = None, warmup: int | None = None, quiet: bool = False,
          progress: bool = False, model: str | None = None, model_config: str | os.PathLike | None = None,
          progress_desc: str | None = None, log_path: str | os.PathLike | None = None,
          restart: bool = False) -> TrainResult:
    """Train a CLIP model on the shards in `data_dir` at a DataComp scale; resumes from `epoch_latest.pt`.

    Defaults follow DataComp (amp, 4 workers, 5 checkpoints); without a GPU precision is fp32.
    `batch_size`, `learning_rate`, `train_num_samples` (samples seen) and `warmup` override the scale.
    `progress`: instead of open_clip_train's log lines (still in `out.log`), a bar of the samples seen and
    the epoch on stderr (none when `quiet`), named `progress_desc` (default `train {exp_name}`), with
    open_clip_train's output also kept in `log_path` when given.
    `model` overrides the scale's model; `model_config`, a local open_clip model JSON registered for it
    (its file stem is the model name: e.g. minicomp's teacher).
    A folder holding a varalign training with other data, seed or settings is refused (resuming it would mix
    them) unless `restart`: then that training's own files are removed first (the experiment loop's retrain).
    """
    start = time.time()
    cfg = scale_config(scale, batch_size=batch_size, learning_rate=learning_rate,
                       train_num_samples=train_num_samples, warmup=warmup, model=model)
    data_dir, output_dir = str(data_dir), str(output_dir)
    if exp_name is None:
        exp_name = f"{Path(data_dir.split('::')[0]).name}_{scale}_seed_{seed}"
    if not re.fullmatch(r"[\w.\-]+", exp_name):
        raise VaralignError(f"--exp_name must be a plain name (letters, digits, _ . -), got {exp_name!r}")
    if num_checkpoints < 1:
        raise VaralignError("--num_checkpoints must be >= 1")
    gpus = _gpu_count()
    nproc = nproc_per_node or max(1, gpus)
    precision = precision or ("amp" if gpus else "fp32")
    workers = workers if workers is not None else (4 if gpus else 1)
    args = build_args(scale, data_dir, output_dir, exp_name, cfg=cfg, world_size=nproc, accum_freq=accum_freq,
                      num_checkpoints=num_checkpoints, workers=workers, precision=precision, seed=seed,
                      resume=resume, log_every_n_steps=log_every_n_steps, save_frequency=save_frequency,
                      grad_clip_norm=grad_clip_norm, data_weights=data_weights, report_to_wandb=report_to_wandb,
                      wandb_project_name=wandb_project_name, imagenet_val=imagenet_val,
                      grad_checkpointing=scale != "tiny")
    exp_dir = Path(output_dir) / exp_name
    model_json = json.loads(Path(model_config).read_text()) if model_config is not None \
        else CUSTOM_MODELS.get(cfg["model"])
    identity = {"data_dir": same_data_dir(data_dir), "data": data_fingerprint(data_dir), "seed": seed, "scale_config": cfg,
                "model_config": model_json, "num_checkpoints": num_checkpoints, "data_weights": data_weights,
                "grad_clip_norm": grad_clip_norm}
    finished = _check_exp_dir(exp_dir, identity, cfg["model"], restart=restart)
    exp_dir.mkdir(parents=True, exist_ok=True)
    # written before training, so a killed run's folder is known as this training (resumed only with the
    # same settings) and `evaluate` says it has not finished; a finished one keeps its info.json until replaced
    if not finished:
        save_json(exp_dir / "info.json", {"scale": scale, "checkpoint": None, "model": cfg["model"],
                                          "exp_name": exp_name, "precision": precision, "open_clip_args": args,
                                          **identity})
    env = dict(os.environ)
    if not gpus and workers > 0:
        # on a CPU the data-loader workers share the cores with torch's OpenMP threads, which by default spin
        # while they wait: waiting passively trains ~20% faster on 2 cores, with bit-identical weights
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if model_config is not None:  # the caller's model JSON, registered as it is
        env["VARALIGN_MODEL_CONFIG"] = str(model_config)
    elif model_json is not None:
        cfg_path = exp_dir / f"{cfg['model']}.json"
        save_json(cfg_path, model_json)
        env["VARALIGN_MODEL_CONFIG"] = str(cfg_path)
    entry = ["-m", "varalign.experiment.openclip_entry"]
    cmd = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"] if nproc > 1
           else [sys.executable]) + entry + args
    if not quiet and not progress:
        print(f"train: {cfg['model']} on {data_dir}, {cfg['train_num_samples']:,} samples seen, "
              f"batch {cfg['batch_size']} -> {exp_dir}", file=sys.stderr)
    if progress:
        returncode, tail = run_with_progress(cmd, env, total=int(cfg["train_num_samples"]), epochs=num_checkpoints,
                                             desc=progress_desc or f"train {exp_name}",
                                             log_path=Path(log_path) if log_path is not None else None, quiet=quiet)
    else:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL if quiet else None,
                              stderr=subprocess.PIPE if quiet else None, text=True)
        returncode = proc.returncode
        tail = (proc.stderr or "").strip().splitlines()[-40:] if quiet else []
    if returncode != 0:
        cause = _cause(tail)
        raise VaralignError(f"open_clip_train failed with exit code {returncode}"
                            + (f": {cause[:300]}" if cause else "") + f" (log: {exp_dir / 'out.log'})", exp_dir)
    checkpoint = exp_dir / "checkpoints" / f"epoch_{num_checkpoints}.pt"
    if not checkpoint.exists():
        checkpoint = exp_dir / "checkpoints" / "epoch_latest.pt"
    if not checkpoint.exists():
        raise VaralignError("training finished without a checkpoint", exp_dir / "checkpoints")
    info = {"scale": scale, "checkpoint": str(checkpoint), "model": cfg["model"], "exp_name": exp_name,
            "precision": precision, "open_clip_args": args, **identity, "seconds": round(time.time() - start, 1)}
    save_json(exp_dir / "info.json", info)
    return TrainResult(str(exp_dir), str(checkpoint), str(exp_dir / "info.json"), info["seconds"])


_ERROR_LINE = re.compile(r"^[\w.]*(Error|Exception|Interrupt)\b|^error:|\berror: ", re.IGNORECASE)


def _cause(lines: list[str]) -> str:
    """The line of a failed run's last output that says why: the last exception or error line (a traceback's
    last line), else the last line (torch's and open_clip's own log lines come after the error)."""
    for line in reversed(lines):
        text = re.sub(r"^\[rank\d+\]:\s*", "", line.strip())  # torchrun prefixes its workers' lines
        if _ERROR_LINE.search(text) and "ChildFailedError" not in text:  # torchrun's own, not the cause
            return text
    return lines[-1].strip() if lines else ""


# what open_clip_train writes in a run's folder (`--logs`/`--name`) besides varalign's info.json and model JSON
_OPENCLIP_NAMES = {"checkpoints", "out.log", "params.txt", "tensorboard", "wandb"}


def _check_exp_dir(exp_dir: Path, identity: dict, model: str, restart: bool = False) -> bool:
    """Train into `exp_dir` only if it is new or empty, or holds a varalign training of the same data, seed and
    settings (then open_clip_train resumes it): another training's checkpoints would otherwise be resumed and
    relabelled with this run's data, and a user's files (params.txt, ...) replaced."""
    path = exp_dir / "info.json"
    if path.exists() or path.is_symlink():
        try:
            info = None if path.is_symlink() else json.loads(path.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            info = None
        if not (isinstance(info, dict) and {"scale", "checkpoint", "scale_config", "open_clip_args"} <= set(info)):
            raise VaralignError("exists and is not a varalign train info.json: not overwritten; give another "
                                "--exp_name or --output_dir", path)
        for key, value in identity.items():
            old = same_data_dir(info[key]) if key == "data_dir" and isinstance(info.get(key), str) else info.get(key)
            if key in info and old != value:  # an older info.json lacks some keys: those are not compared
                if restart:
                    _remove_run(exp_dir, info)
                    return False
                raise VaralignError(f"holds a training with another {key} ({_short(info[key])}, not "
                                    f"{_short(value)}): not resumed or replaced; give another --exp_name", exp_dir)
        return info.get("checkpoint") is not None
    if exp_dir.is_dir():
        temps = temp_pattern(path)  # a write of info.json killed before its rename
        names = {p.name for p in exp_dir.iterdir() if not temps.match(p.name)}
        # a run of an older varalign killed before its info.json: open_clip_train's files alone
        if names and not ({"checkpoints", "out.log"} <= names and names <= _OPENCLIP_NAMES | {f"{model}.json"}):
            raise VaralignError("exists, is not empty and holds no varalign training (info.json): not touched; "
                                "give another --exp_name or --output_dir", exp_dir)
    return False


def _remove_run(exp_dir: Path, info: dict) -> None:
    """Remove the files of varalign's training in `exp_dir` (info.json, the model JSON train writes for its own
    models, open_clip_train's checkpoints and logs) and the evaluation results of that model, nothing else."""
    import shutil  # noqa: PLC0415

    from ..owned import unchanged_since_written  # noqa: PLC0415

    model_json = [f"{info['model']}.json"] if info.get("model") in CUSTOM_MODELS else []
    # the tables evaluate keeps in its ledger only as varalign wrote them (one edited since is the user's)
    tables = [n for n in ("eval_summary.json", "eval_results.md") if unchanged_since_written(exp_dir, n)]
    for name in (*_OPENCLIP_NAMES, *model_json, "eval_results.jsonl", "minicomp_eval.json", *tables, "info.json"):
        p = exp_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def read_info(train_output_dir: str | os.PathLike) -> dict:
    """`info.json` of a training run (never `info.pkl`)."""
    path = Path(train_output_dir) / "info.json"
    if not path.exists():
        hint = " (DataComp's info.pkl is not read: re-run `varalign train`, or use --use_model)" \
            if (Path(train_output_dir) / "info.pkl").exists() else ""
        raise VaralignError(f"no info.json{hint}", Path(train_output_dir))
    try:
        info = json.loads(path.read_text())
        info["checkpoint"], info["model"]  # noqa: B018
    except (ValueError, KeyError, TypeError) as exc:
        raise VaralignError(f"not a varalign info.json ({exc})", path) from None
    if info["checkpoint"] is None:
        raise VaralignError("training has not finished (no checkpoint yet): run the same train command again to "
                            "resume it", path)
    return info


def _gpu_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
