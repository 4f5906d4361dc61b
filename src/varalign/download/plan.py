"""What to download: the metadata parquets checked, the rows kept (a subset, or the retry candidates)
written as img2dataset's input, and how many shards, URLs and bytes that makes."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage
from ..errors import VaralignError
from ..uids import UID_DTYPE, hex_to_uids, isin_sorted, load_subset, sort_uids

# DataComp's metadata columns that img2dataset reads (the sizes only feed the estimate)
ALL_COLUMNS = ("uid", "url", "text", "original_width", "original_height", "face_bboxes", "sha256")
# a rule of thumb for photos at img2dataset's quality 95 (JPEG ~4 bits per pixel; PNG is lossless), erring
# high since the estimate guards the disk; plus the .txt, .json and tar headers of a sample
BYTES_PER_PIXEL = {"jpg": 0.5, "webp": 0.35, "png": 2.0}
BYTES_PER_SAMPLE = 2500
BATCH = 65536


def metadata_files(metadata_dir: Path | str) -> list[Path | str]:
    """The pool's parquet files in img2dataset's order (sorted paths; a folder URL: its objects' URLs)."""
    if not storage.isdir(metadata_dir):
        raise VaralignError("metadata directory not found", metadata_dir)
    if storage.is_url(metadata_dir):
        files = [storage.join(metadata_dir, n) for n in sorted(storage.listdir(metadata_dir, refresh=True))
                 if n.endswith(".parquet")]
    else:
        files = sorted(p for p in metadata_dir.iterdir() if p.name.endswith(".parquet") and p.is_file())
    if not files:
        raise VaralignError("no .parquet files in the metadata directory", metadata_dir)
    return files


def needed_columns(verify_hash: bool, blur: bool) -> list[str]:
    cols = ["uid", "url", "text"]
    return cols + (["face_bboxes"] if blur else []) + (["sha256"] if verify_hash else [])


def parquet_file(path: Path | str) -> pq.ParquetFile:
    """A metadata parquet, local or at a URL (read in ranged requests through pyarrow's filesystem layer)."""
    fs, where = storage.arrow_filesystem(path)
    return pq.ParquetFile(where, filesystem=fs)


def check_metadata(files: list[Path | str], need: list[str]) -> list[int]:
    """Row count of each parquet; a one-line error for an unreadable file or a missing column."""
    rows = []
    for path in files:
        try:
            meta = parquet_file(path)
        except (OSError, pa.ArrowException) as exc:
            raise VaralignError(f"not a readable parquet file ({_first_line(exc)})", path) from None
        missing = [c for c in need if c not in meta.schema_arrow.names]
        if missing:
            hint = {"sha256": " (or pass --no_verify_hash)", "face_bboxes": " (or pass --skip_bbox_blurring)"}
            extra = "".join(hint.get(c, "") for c in missing)
            raise VaralignError(f"missing column(s) {', '.join(missing)}: not DataComp metadata{extra}", path)
        rows.append(meta.metadata.num_rows)
    return rows


def shard_rows(rows_per_file: list[int], per_shard: int) -> list[int]:
    """Rows of each img2dataset shard: every input file is cut into shards of `per_shard` rows."""
    out = []
    for rows in rows_per_file:
        out += [min(per_shard, rows - k * per_shard) for k in range(math.ceil(rows / per_shard))]
    return out


@dataclass
class Plan:
    """One pass of img2dataset: its input, its shards and what it fetches."""

    input_dir: str
    shard_rows: list[int] = field(default_factory=list)
    urls: int = 0
    est_bytes: int = 0
    subset_uids: int = 0
    not_in_pool: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def read_subsets(paths: list[str]) -> np.ndarray:
    """The union of subset files as one sorted, duplicate-free uid array."""
    parts = [load_subset(storage.localize(p)) for p in paths]
    arr = sort_uids(np.concatenate(parts)) if parts else np.empty(0, dtype=UID_DTYPE)
    if len(arr) > 1:
        new = np.r_[True, (arr["f0"][1:] != arr["f0"][:-1]) | (arr["f1"][1:] != arr["f1"][:-1])]
        arr = arr[new]
    return arr


def uid_digest(uids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(uids, dtype=UID_DTYPE).tobytes()).hexdigest()


def pool_plan(metadata_dir: Path | str, files: list[Path | str], rows: list[int], per_shard: int, image: dict) -> Plan:
    """The whole pool, read by img2dataset straight from the metadata directory (as DataComp does)."""
    est = sum(_estimate_file(f, image) for f in files)
    return Plan(str(metadata_dir), shard_rows(rows, per_shard), sum(rows), est)


def write_selection(files: list[Path | str], keep: np.ndarray, out_dir: Path, per_shard: int, image: dict) -> Plan:
    """Write the rows of `files` whose uid is in sorted `keep` as img2dataset input parquets in `out_dir`
    (written beside it, renamed when complete), in files of 50 full shards so that no shard but the
    last is partial. Streams the metadata in batches."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # an earlier run's unfinished copy (ours: the work directory is varalign's)
    tmp.mkdir(parents=True)
    per_file = 50 * per_shard
    writer, in_file, part, counts, est = None, 0, 0, [], 0
    names = [set(parquet_file(f).schema_arrow.names) for f in files]
    cols = [c for c in ALL_COLUMNS if all(c in n for n in names)]
    for path in files:
        for batch in parquet_file(path).iter_batches(batch_size=BATCH, columns=cols):
            sel = batch.filter(pa.array(isin_sorted(hex_to_uids(batch.column("uid"), path), keep)))
            est += _estimate(sel, image)
            off = 0
            while off < sel.num_rows:
                if writer is None:
                    writer = pq.ParquetWriter(tmp / f"{part:05d}.parquet", sel.schema)
                take = min(per_file - in_file, sel.num_rows - off)
                try:
                    writer.write_batch(sel.slice(off, take))
                except (pa.ArrowException, ValueError) as exc:
                    raise VaralignError(f"its columns differ from the other metadata files ({_first_line(exc)})",
                                        path) from None
                off, in_file = off + take, in_file + take
                if in_file == per_file:
                    writer.close()
                    writer, part, in_file = None, part + 1, 0
                    counts.append(per_file)
    if writer is not None:
        writer.close()
        counts.append(in_file)
    found = sum(counts)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return Plan(str(out_dir), shard_rows(counts, per_shard), found, est, len(keep), len(keep) - found)


def _estimate_file(path: Path | str, image: dict) -> int:
    pf = parquet_file(path)
    cols = [c for c in ("original_width", "original_height") if c in pf.schema_arrow.names]
    if len(cols) < 2:
        return pf.metadata.num_rows * _sample_bytes(None, None, image)
    return sum(_estimate(b, image) for b in pf.iter_batches(batch_size=BATCH, columns=cols))


def _estimate(batch: pa.RecordBatch, image: dict) -> int:
    if batch.num_rows == 0:
        return 0
    names = batch.schema.names
    if "original_width" not in names or "original_height" not in names:
        return batch.num_rows * _sample_bytes(None, None, image)
    w = batch.column("original_width").to_numpy(zero_copy_only=False).astype(np.float64)
    h = batch.column("original_height").to_numpy(zero_copy_only=False).astype(np.float64)
    return int(_sample_bytes(np.nan_to_num(w), np.nan_to_num(h), image).sum())


def _sample_bytes(w: np.ndarray | None, h: np.ndarray | None, image: dict):  # noqa: ANN202 - int or array
    """Bytes one sample takes in a shard: the pixels img2dataset keeps after resizing, encoded."""
    size, mode = float(image["image_size"]), image["resize_mode"]
    bpp = BYTES_PER_PIXEL.get(image["encode_format"], 0.5)
    if w is None:
        return int(size * size * bpp + BYTES_PER_SAMPLE)
    w, h = np.maximum(w, 1.0), np.maximum(h, 1.0)
    if mode == "no":
        pixels = w * h
    elif mode in ("border", "center_crop"):
        pixels = np.full_like(w, size * size)
        if image["resize_only_if_bigger"]:
            pixels = np.minimum(pixels, w * h)
    else:
        side = np.maximum(w, h) if mode == "keep_ratio_largest" else np.minimum(w, h)
        scale = size / side
        if image["resize_only_if_bigger"]:
            scale = np.minimum(scale, 1.0)
        pixels = w * h * scale * scale
    return pixels * bpp + BYTES_PER_SAMPLE


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
