"""The pool's metadata from the Hugging Face Hub, as DataComp's download_upstream.py fetches it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tqdm import tqdm

from .. import storage
from ..atomic import atomic_path, save_json
from ..errors import VaralignError

SCALES = ("small", "medium", "large", "xlarge", "datacomp_1b")
DONE = ".varalign_metadata.json"  # written once every file is in place
STARTED = ".varalign_metadata.partial"  # present while a download is unfinished (resume it)


def repo_id(scale: str) -> str:
    return "mlfoundations/datacomp_1b" if scale == "datacomp_1b" else f"mlfoundations/datacomp_{scale}"


def fetch_metadata(scale: str, metadata_dir: Path, cache_dir: Path, *, download_npz: bool, overwrite: bool,
                   quiet: bool) -> str:
    """Download `*.parquet` (and `*.npz`) of `mlfoundations/datacomp_{scale}` into `metadata_dir`.

    As DataComp: an existing metadata directory is used as it is (`overwrite` fetches again). Unlike
    DataComp, a download that was interrupted is resumed rather than taken for complete, and
    `overwrite` re-downloads the Hub's files over the old ones instead of deleting the directory.
    Returns what happened: "present" or "downloaded". A folder URL: see `_fetch_to_url`.
    """
    if storage.is_url(metadata_dir):
        return _fetch_to_url(scale, str(metadata_dir), cache_dir, download_npz=download_npz, overwrite=overwrite,
                             quiet=quiet)
    started = metadata_dir / STARTED
    has_parquet = metadata_dir.is_dir() and any(p.suffix == ".parquet" for p in metadata_dir.iterdir())
    if has_parquet and not overwrite and not started.exists():
        if download_npz and not any(p.suffix == ".npz" for p in metadata_dir.iterdir()):
            _snapshot(scale, metadata_dir, cache_dir, ["npz"], overwrite=False, quiet=quiet)
            return "downloaded"
        return "present"
    metadata_dir.mkdir(parents=True, exist_ok=True)
    started.write_text("")
    kinds = ["parquet"] + (["npz"] if download_npz else [])
    files = _snapshot(scale, metadata_dir, cache_dir, kinds, overwrite=overwrite, quiet=quiet)
    save_json(metadata_dir / DONE, {"repo": repo_id(scale), "files": files})
    started.unlink()
    shutil.rmtree(cache_dir, ignore_errors=True)  # snapshot_download's cache: created by us, as DataComp's hf/
    return "downloaded"


def _snapshot(scale: str, metadata_dir: Path, cache_dir: Path, kinds: list[str], overwrite: bool,
              quiet: bool) -> list[str]:
    from huggingface_hub import HfApi, snapshot_download  # noqa: PLC0415 - the [download] extra

    repo = repo_id(scale)
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now, not when huggingface_hub was imported
    names: list[str] = []
    try:
        # listed first: snapshot_download falls back to whatever local_dir holds when the Hub cannot be reached
        listed = HfApi(endpoint=endpoint).list_repo_files(repo, repo_type="dataset")
        for kind in kinds:
            # xlarge keeps its files in part_* folders; DataComp asks for */*.{kind} and moves them up
            pattern = f"*/*.{kind}" if scale == "xlarge" else f"*.{kind}"
            snapshot_download(repo, repo_type="dataset", allow_patterns=pattern, local_dir=str(metadata_dir),
                              cache_dir=str(cache_dir), force_download=overwrite, endpoint=endpoint,
                              tqdm_class=_Quiet if quiet else None)
            if scale == "xlarge":
                _flatten(metadata_dir, kind)
            want = sorted(Path(f).name for f in listed if f.endswith(f".{kind}") and ("/" in f) == (scale == "xlarge"))
            missing = [n for n in want if not (metadata_dir / n).is_file()]
            if not want or missing:
                raise RuntimeError(f"no *.{kind} files in the repo" if not want else f"{missing[0]} did not arrive")
            names += want
    except Exception as exc:  # noqa: BLE001 - network, HTTP and Hub errors: all end the same way
        where = f"{endpoint or 'https://huggingface.co'}/datasets/{repo}"
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VaralignError(f"cannot download the metadata from {where} ({type(exc).__name__}: {text}); "
                            "run the same command again to resume", metadata_dir) from None
    return names


def _fetch_to_url(scale: str, url: str, cache_dir: Path, *, download_npz: bool, overwrite: bool,
                  quiet: bool) -> str:
    """`fetch_metadata` into a folder URL, with the same markers as objects: each file is downloaded into
    `cache_dir`, uploaded in one put and removed here, so the local disk holds one file at a time; an
    interrupted download resumes from the objects already there (a put is whole or absent)."""
    names = set(storage.listdir(url, refresh=True)) if storage.isdir(url) else set()
    has = {kind: any(n.endswith(f".{kind}") for n in names) for kind in ("parquet", "npz")}
    if has["parquet"] and not overwrite and STARTED not in names:
        if download_npz and not has["npz"]:
            _upload_each(scale, url, cache_dir, ["npz"], set(), overwrite=False, quiet=quiet)
            return "downloaded"
        return "present"
    with atomic_path(storage.join(url, STARTED)):  # an empty object
        pass
    kinds = ["parquet"] + (["npz"] if download_npz else [])
    files = _upload_each(scale, url, cache_dir, kinds, set() if overwrite else names, overwrite=overwrite, quiet=quiet)
    save_json(storage.join(url, DONE), {"repo": repo_id(scale), "files": files})
    storage.remove(storage.join(url, STARTED))
    shutil.rmtree(cache_dir, ignore_errors=True)
    return "downloaded"


def _upload_each(scale: str, url: str, cache_dir: Path, kinds: list[str], there: set[str], overwrite: bool,
                 quiet: bool) -> list[str]:
    """Download each `*.{kind}` of the repo not in `there` and upload it to `url`; the names of all of them."""
    from huggingface_hub import HfApi, hf_hub_download  # noqa: PLC0415 - the [download] extra

    repo = repo_id(scale)
    endpoint = os.environ.get("HF_ENDPOINT") or None
    names: list[str] = []
    try:
        listed = HfApi(endpoint=endpoint).list_repo_files(repo, repo_type="dataset")
        for kind in kinds:
            want = sorted(f for f in listed if f.endswith(f".{kind}") and ("/" in f) == (scale == "xlarge"))
            if not want:
                raise RuntimeError(f"no *.{kind} files in the repo")
            for f in tqdm(want, desc=f"metadata *.{kind}", unit="file", disable=quiet):
                name = Path(f).name  # xlarge's part_* folders flattened, as DataComp does
                if name not in there:
                    got = hf_hub_download(repo, f, repo_type="dataset", local_dir=str(cache_dir / "files"),
                                          cache_dir=str(cache_dir), force_download=overwrite, endpoint=endpoint)
                    storage.put_file(got, storage.join(url, name))
                    os.unlink(got)
                names.append(name)
    except VaralignError:
        raise
    except Exception as exc:  # noqa: BLE001 - network, HTTP and Hub errors: all end the same way
        where = f"{endpoint or 'https://huggingface.co'}/datasets/{repo}"
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise VaralignError(f"cannot download the metadata from {where} ({type(exc).__name__}: {text}); "
                            "run the same command again to resume", url) from None
    return names


def _flatten(metadata_dir: Path, kind: str) -> None:
    """Move `part_*/x.{kind}` up into `metadata_dir` (DataComp's xlarge layout) and drop emptied folders."""
    for sub in sorted(p for p in metadata_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(sub.glob(f"*.{kind}")):
            os.replace(f, metadata_dir / f.name)
        if not any(sub.iterdir()):
            sub.rmdir()


class _Quiet(tqdm):
    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)
