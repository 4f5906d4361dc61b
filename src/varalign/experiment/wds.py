"""Minimal webdataset tar reading/writing on the standard library (no decoding, no network)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VaralignError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    """One webdataset sample: its key and its members (extension -> TarInfo)."""

    key: str
    members: dict[str, tarfile.TarInfo] = field(default_factory=dict)

    def image_ext(self) -> str | None:
        return next((e for e in IMAGE_EXTS if e in self.members), None)


def split_name(name: str) -> tuple[str, str]:
    """webdataset's rule: key = path up to the first dot of the base name, extension = the rest."""
    directory, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(directory, stem) if directory else stem), ext.lower() if dot else ""


def iter_samples(tf: tarfile.TarFile) -> Iterator[Sample]:
    """Group consecutive tar members by key, as webdataset does; `__*__` and non-files skipped."""
    current: Sample | None = None
    for info in tf:
        if not info.isfile():
            continue
        key, ext = split_name(info.name)
        if not ext or os.path.basename(key).startswith("__"):
            continue
        if current is None or key != current.key:
            if current is not None:
                yield current
            current = Sample(key)
        current.members[ext] = info
    if current is not None:
        yield current


def open_tar(path: str | os.PathLike) -> tarfile.TarFile:
    """Open an uncompressed tar for seeking; one-line error naming the file. A URL is streamed in large
    ranged requests, the next one in flight (reading its members in order fetches each block once)."""
    from .. import storage  # noqa: PLC0415

    if storage.is_url(path):
        fh = storage.open_read(path)
        try:
            tf = tarfile.open(fileobj=fh, mode="r:")
        except (OSError, tarfile.TarError) as exc:
            fh.close()
            raise VaralignError(f"not a readable (uncompressed) tar shard ({exc})", path) from None
        tf._extfileobj = False  # the tar owns the remote file: closed with it
        return tf
    try:
        return tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as exc:
        raise VaralignError(f"not a readable (uncompressed) tar shard ({exc})", path) from None


def ends_whole(tf: tarfile.TarFile) -> bool:
    """After reading every member: whether the tar ends with its two end-of-archive blocks after the last one.
    A tar cut at a member boundary otherwise reads as a shorter whole one (tarfile, and webdataset, stop there
    without a word). Checked where the tar is a local file (a URL's tar is read through once, not seeked)."""
    if not tf.members or getattr(tf.fileobj, "name", None) is None or not hasattr(tf.fileobj, "seek"):
        return True
    last = tf.members[-1]
    end = -(-(last.offset_data + last.size) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    tf.fileobj.seek(end)
    return tf.fileobj.read(2 * tarfile.BLOCKSIZE) == bytes(2 * tarfile.BLOCKSIZE)


def read_member(tf: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    fh = tf.extractfile(info)
    if fh is None:
        raise VaralignError(f"member {info.name!r} is not a regular file", tf.name)
    return fh.read()


def read_json(data: bytes | None) -> dict:
    """A sample's `.json` member as a dict ({} when absent or not an object)."""
    if not data:
        return {}
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


def sample_uid(key: str, shard_name: str, meta: dict) -> str:
    """The sample's uid: `meta["uid"]` (img2dataset writes it), else md5 of `"{shard_name}/{key}"`.

    `shard_name` is the tar's file name (e.g. `00000000.tar`), so the fallback is stable across runs
    and the same in `embed` and `reshard`.
    """
    uid = meta.get("uid")
    if isinstance(uid, str) and uid:
        return uid.lower()
    return hashlib.md5(f"{shard_name}/{key}".encode()).hexdigest()


def add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Append one member with fixed metadata (reproducible tars)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data))


def list_tars(path: str | os.PathLike) -> list[Path]:
    """`*.tar` in a directory (sorted), or the file itself."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise VaralignError("input not found", p)
    return sorted(x for x in p.iterdir() if x.name.endswith(".tar") and not x.name.startswith("."))
