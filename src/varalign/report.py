"""`varalign report`: one self-contained HTML page comparing selections over a pool.

Per selection: the manifest's summary (recipe, counts per stage, thresholds, time), a histogram of
every score in its `--save_scores` parquet with the threshold (or top-k cut) marked, and its highest-
and lowest-scored samples with captions and, where the pool has them, thumbnails. Across selections:
pairwise overlaps and, where the pool has hidden label columns (`synthetic_*`, `label_*`), what
share of each label every selection kept. Plots are inline SVG; nothing is fetched, no server needed.
Memory: one score column (+ its keep mask) or one pool row group at a time, plus the rows shown
and one or two uid subsets.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import storage
from ._version import __version__
from .atomic import atomic_path, check_output_path, manifest_mismatch, manifest_path, remove_stale_temps
from .errors import VaralignError
from .guard import check_paths, lock_outputs
from .pool import Shard, discover_shards
from .uids import hex_to_uids, isin_sorted, load_subset

LABEL_PREFIXES = ("synthetic_", "label_")
SHOW_COLUMNS = ("text", "url", "original_width", "original_height")
THUMB_PX = 128
MAX_RAW_THUMB = 128 * 1024  # without Pillow, larger images are left out rather than embedded full size
MAX_LABEL_VALUES = 12  # label values shown per table
MAX_DISTINCT = 1000  # a label column with more distinct values is not broken down (bounds memory)
BINS = 40


# -- inputs ----------------------------------------------------------------------------------------
@dataclass
class Hist:
    """A streamed histogram of one score column: all scored rows, and those the stage kept."""

    column: str
    stage: str
    edges: np.ndarray
    all: np.ndarray
    kept: np.ndarray | None
    scored: int
    cut: float | None  # smallest kept score
    threshold: float | None  # the manifest's threshold for the stage, if it had one


@dataclass
class Sample:
    """One row shown in a top/bottom table."""

    uid: str
    score: float
    selected: bool | None
    pool: dict[str, Any] = field(default_factory=dict)


@dataclass
class Selection:
    """One subset file with its manifest and scores parquet (either may be missing). A path given as a
    URL stays its text (`str`); `local` is the subset file read (a fetched copy of a URL)."""

    path: Path | str
    name: str
    size: int
    manifest: dict | None
    manifest_path: Path | str
    scores: Path | str | None
    notes: list[str] = field(default_factory=list)
    hists: list[Hist] = field(default_factory=list)
    top: list[Sample] = field(default_factory=list)
    bottom: list[Sample] = field(default_factory=list)
    top_column: str | None = None
    in_pool: int | None = None
    labels: dict[str, Counter] = field(default_factory=dict)
    local: Path | str | None = None

    @property
    def subset_file(self) -> Path | str:
        return self.local or self.path


def _read_manifest(path: Path | str) -> dict | None:
    if not storage.exists(path):
        return None
    try:
        data = json.loads(storage.read_bytes(path))
    except (OSError, ValueError) as exc:
        raise VaralignError(f"not a readable manifest ({' '.join(str(exc).split())[:120]})", path) from None
    if not isinstance(data, dict):
        raise VaralignError("manifest is not a JSON object", path)
    return data


def _find_scores(manifest: dict | None, manifest_path: Path | str, given: str | None,
                 notes: list[str]) -> Path | str | None:
    """The scores parquet: the one given, else the manifest's `output.scores` (as written, or beside it)."""
    if given is not None:
        if not storage.isfile(given):
            raise VaralignError("scores parquet not found", given)
        return storage.as_path(given)
    recorded = ((manifest or {}).get("output") or {}).get("scores")
    if not recorded:
        return None
    here = storage.parent(manifest_path)
    beside = [] if storage.is_url(recorded) else [storage.join(here, recorded)]
    for cand in (recorded, *beside, storage.join(here, storage.basename(recorded))):
        if storage.isfile(cand):
            return storage.as_path(cand)
    notes.append(f"the manifest names a scores parquet ({recorded}) that was not found")
    return None


def _unique_names(paths: list[Path | str]) -> list[str]:
    stems = [os.path.splitext(storage.basename(p))[0] for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{storage.basename(storage.parent(p))}/{s}" if stems.count(s) > 1 else s
            for p, s in zip(paths, stems, strict=True)]


def load_selections(selections: list, scores: list | None) -> list[Selection]:
    """Read each subset's size, manifest and scores location; fail on missing or corrupt inputs. A subset
    given as a URL is fetched once (like `--given_uids_path`); manifests and scores are read where they are."""
    paths = [storage.as_path(p) for p in selections]
    if not paths:
        raise VaralignError("give at least one selection (--selections)")
    if scores is not None and len(scores) != len(paths):
        raise VaralignError(f"--scores has {len(scores)} files for {len(paths)} selections (give one per selection)")
    out = []
    for i, (path, name) in enumerate(zip(paths, _unique_names(paths), strict=True)):
        if not storage.isfile(path):
            raise VaralignError("selection (subset .npy) not found", path)
        local = storage.localize(path)
        size = len(load_subset(local))
        mpath = manifest_path(path)
        manifest = _read_manifest(mpath)
        notes = [] if manifest else [f"no manifest ({storage.basename(mpath)}): counts per stage unknown"]
        why = manifest_mismatch(manifest, path) if manifest else None
        if why is not None:  # another output's manifest, or a subset changed since: its counts would mislead
            notes.append(f"the manifest ({storage.basename(mpath)}) does not describe this subset ({why}): "
                         "counts per stage unknown")
            manifest = None
        sc = _find_scores(manifest, mpath, str(scores[i]) if scores else None, notes)
        if sc is not None:
            _check_scores(sc)
        out.append(Selection(path, name, size, manifest, mpath, sc, notes, local=local))
    return out


def _parquet(path: Path | str) -> pq.ParquetFile:
    try:
        fs, where = storage.arrow_filesystem(path)  # a URL through fsspec: ranged reads of the row groups
        return pq.ParquetFile(where, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise VaralignError(f"not a readable parquet file ({' '.join(str(exc).split())[:160]})", path) from None


def _check_scores(path: Path) -> None:
    names = _parquet(path).schema_arrow.names
    if "uid" not in names:
        raise VaralignError("scores parquet has no 'uid' column (not written by --save_scores?)", path)


def _read_group(pf: pq.ParquetFile, i: int, columns: list[str], path: Path) -> pa.Table:
    try:
        return pf.read_row_group(i, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise VaralignError(f"cannot read row group {i} ({' '.join(str(exc).split())[:160]})", path) from None


def _floats(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A numeric column as float64, nulls as NaN."""
    return np.asarray(pc.fill_null(pc.cast(col, pa.float64()), math.nan).to_numpy(zero_copy_only=False))


def _bools(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(col, False).to_numpy(zero_copy_only=False), dtype=bool)


# -- scores: histograms and extremes, streamed by row group ------------------------------------------
def score_columns(schema: pa.Schema) -> list[tuple[str, str, str | None]]:
    """(score column, stage label, keep column) for every float score in a --save_scores parquet."""
    names = set(schema.names)
    out = []
    for f in schema:
        if not pa.types.is_floating(f.type) or f.name.endswith("_removed_at"):
            continue
        stage = f.name
        if f"kept_{stage}" not in names and stage.endswith("_score") and f"kept_{stage[:-6]}" in names:
            stage = stage[:-6]  # vas_d: column vas_d_score, keep column kept_vas_d
        out.append((f.name, stage, f"kept_{stage}" if f"kept_{stage}" in names else None))
    return out


def histogram(path: Path, column: str, stage: str, keep: str | None, threshold: float | None) -> Hist | None:
    """Two passes over the row groups: range and cut, then counts (all scored rows; kept rows)."""
    pf = _parquet(path)
    cols = [column] + ([keep] if keep else [])
    lo, hi, cut, scored = math.inf, -math.inf, math.inf, 0
    for g in range(pf.num_row_groups):
        t = _read_group(pf, g, cols, path)
        v = _floats(t.column(0))
        ok = np.isfinite(v)
        if ok.any():
            lo, hi, scored = min(lo, float(v[ok].min())), max(hi, float(v[ok].max())), scored + int(ok.sum())
            if keep:
                k = v[ok & _bools(t.column(1))]
                cut = min(cut, float(k.min())) if len(k) else cut
    if not scored:
        return None
    pad = 0.5 if lo == hi else 0.0
    edges = np.linspace(lo - pad, hi + pad, BINS + 1)
    counts, kept = np.zeros(BINS, np.int64), np.zeros(BINS, np.int64) if keep else None
    for g in range(pf.num_row_groups):
        t = _read_group(pf, g, cols, path)
        v = _floats(t.column(0))
        ok = np.isfinite(v)
        counts += np.histogram(v[ok], edges)[0]
        if kept is not None:
            kept += np.histogram(v[ok & _bools(t.column(1))], edges)[0]
    return Hist(column, stage, edges, counts, kept, scored, None if math.isinf(cut) else cut, threshold)


def extremes(path: Path, column: str, top: int) -> tuple[list[Sample], list[Sample]]:
    """The `top` highest- and lowest-scored rows of `column` (ties: earliest row first)."""
    pf = _parquet(path)
    names = pf.schema_arrow.names
    cols = ["uid", column] + (["selected"] if "selected" in names else [])
    best: dict[str, tuple] = {}
    offset = 0
    for g in range(pf.num_row_groups):
        t = _read_group(pf, g, cols, path)
        v = _floats(t.column(1))
        idx = np.flatnonzero(np.isfinite(v))
        for side, sign in (("high", -1.0), ("low", 1.0)):
            take = idx[np.lexsort((idx, sign * v[idx]))[:top]]
            sel = _bools(t.column(2).take(take)) if len(cols) > 2 else [None] * len(take)
            rows = [(float(v[i]), offset + int(i), t.column(0)[int(i)].as_py(), s) for i, s in zip(take, sel, strict=True)]
            merged = sorted(best.get(side, ()) + tuple(rows), key=lambda r, s=sign: (s * r[0], r[1]))
            best[side] = tuple(merged[:top])
        offset += t.num_rows
    make = lambda rows: [Sample(u, s, None if k is None else bool(k)) for s, _, u, k in rows]  # noqa: E731
    return make(best.get("high", ())), make(best.get("low", ()))


def analyse_scores(sel: Selection, top: int) -> None:
    """Fill `sel.hists` and its top/bottom samples from its scores parquet."""
    if sel.scores is None:
        sel.notes.append("no per-sample scores: run `varalign filter` with --save_scores for histograms and samples")
        return
    thresholds = (sel.manifest or {}).get("thresholds") or {}
    cols = score_columns(_parquet(sel.scores).schema_arrow)
    for column, stage, keep in cols:
        h = histogram(sel.scores, column, stage, keep, thresholds.get(stage))
        if h is not None:
            sel.hists.append(h)
    if cols and top:
        sel.top_column = cols[-1][0]
        sel.top, sel.bottom = extremes(sel.scores, sel.top_column, top)
    _check_selected(sel)


def _check_selected(sel: Selection) -> None:
    pf = _parquet(sel.scores)
    if "selected" not in pf.schema_arrow.names:
        return
    n = sum(int(pc.sum(_read_group(pf, g, ["selected"], sel.scores).column(0)).as_py() or 0)
            for g in range(pf.num_row_groups))
    if n != sel.size:
        sel.notes.append(f"the scores parquet marks {n:,} rows selected but the subset holds {sel.size:,} uids "
                         "(scores from another run?)")


# -- the pool: rows shown, hidden labels ------------------------------------------------------------
@dataclass
class Pool:
    """The pool's shards and which of the optional columns its parquets carry."""

    shards: list[Shard]
    rows: int
    show: list[str]
    labels: list[str]
    image: str | None  # "thumbnail" or "image_path"
    root: Path | str
    label_counts: dict[str, Counter] = field(default_factory=dict)
    skipped_labels: list[str] = field(default_factory=list)


def open_pool(metadata_dir: str | os.PathLike) -> Pool:
    shards = discover_shards(metadata_dir, need_npz=False)
    names = _parquet(shards[0].parquet).schema_arrow.names
    if "uid" not in names:
        raise VaralignError("parquet has no column 'uid'", shards[0].parquet)
    image = next((c for c in ("thumbnail", "image_path") if c in names), None)
    return Pool(shards, sum(s.num_rows for s in shards), [c for c in SHOW_COLUMNS if c in names],
                [c for c in names if c.startswith(LABEL_PREFIXES)], image, storage.as_path(metadata_dir))


def _pool_groups(pool: Pool, columns: list[str]):
    """(shard, row group index, table of `columns`) over the whole pool, one row group at a time."""
    for shard in pool.shards:
        pf = _parquet(shard.parquet)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise VaralignError(f"parquet has no column {missing[0]!r} (the first shard has it)", shard.parquet)
        for g in range(pf.num_row_groups):
            yield shard, g, _read_group(pf, g, columns, shard.parquet)


def lookup_rows(pool: Pool, uids: set[str]) -> dict[str, dict[str, Any]]:
    """Caption, url, size and thumbnail of the pool rows with these uids (reads only matching groups)."""
    found: dict[str, dict[str, Any]] = {}
    if not uids:
        return found
    wanted = pa.array(sorted(uids), type=pa.string())
    cols = pool.show + ([pool.image] if pool.image else [])
    for shard, g, t in _pool_groups(pool, ["uid"]):
        uid = pc.utf8_lower(pc.cast(t.column(0), pa.string()))
        hit = np.flatnonzero(_bools(pc.is_in(uid, value_set=wanted)))
        if not len(hit) or not cols:
            found.update({uid[int(i)].as_py(): {} for i in hit})
            continue
        rows = _read_group(_parquet(shard.parquet), g, cols, shard.parquet).take(pa.array(hit))
        for i, row in zip(hit, rows.to_pylist(), strict=True):
            if pool.image:
                row["thumbnail"] = _thumbnail(row.pop(pool.image), pool.image, pool.root)
            found[uid[int(i)].as_py()] = row
    return found


def count_labels(pool: Pool, sel: Selection | None) -> None:
    """Label value counts over the pool (`sel` None) or over one selection's rows in the pool."""
    if not pool.labels and sel is None:
        return
    members = load_subset(sel.subset_file) if sel is not None else None
    counts: dict[str, Counter] = {c: Counter() for c in pool.labels}
    inside = 0
    for shard, _, t in _pool_groups(pool, ["uid", *pool.labels]):
        mask = None if members is None else isin_sorted(hex_to_uids(t.column(0), shard.parquet), members)
        inside += int(mask.sum()) if mask is not None else 0
        for c in list(counts):
            col = t.column(c) if mask is None else t.column(c).filter(pa.array(mask))
            vc = pc.value_counts(col)
            counts[c].update({_label_text(v.as_py()): n.as_py() for v, n in zip(vc.field(0), vc.field(1), strict=True)})
            if len(counts[c]) > MAX_DISTINCT:  # an id-like column: no breakdown
                del counts[c]
    if sel is None:
        pool.skipped_labels = [c for c in pool.labels if c not in counts]
        pool.labels, pool.label_counts = [c for c in pool.labels if c in counts], counts
    else:
        sel.labels, sel.in_pool = counts, inside
        if inside != sel.size:
            sel.notes.append(f"{sel.size - inside:,} of its {sel.size:,} uids are not in this pool")


def _label_text(v: Any) -> str:
    return "(null)" if v is None else str(v)


def overlaps(selections: list[Selection]) -> dict[tuple[int, int], int]:
    """|A ∩ B| for every pair, holding two subsets in memory at a time."""
    out = {}
    for i, a in enumerate(selections):
        ua = load_subset(a.subset_file) if i + 1 < len(selections) else None
        for j in range(i + 1, len(selections)):
            out[(i, j)] = int(isin_sorted(ua, load_subset(selections[j].subset_file)).sum())
    return out


# -- thumbnails --------------------------------------------------------------------------------------
def _mime(data: bytes) -> str | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _thumbnail(value: Any, kind: str, root: Path | str) -> str | None:
    """A data: URI for a `thumbnail` (image bytes) or `image_path` (a file, relative to the pool) cell, or None."""
    if value is None:
        return None
    if kind == "image_path":
        path = value if os.path.isabs(value) or storage.is_url(value) else storage.join(root, value)
        try:
            data = storage.read_bytes(path)
        except (OSError, VaralignError):
            return None
    else:
        data = bytes(value)
    return _data_uri(data)


def _data_uri(data: bytes) -> str | None:
    small = _downscale(data)
    if small is not None:
        data = small
    mime = _mime(data)
    if mime is None or (small is None and len(data) > MAX_RAW_THUMB):
        return None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _downscale(data: bytes) -> bytes | None:
    """A PNG at most THUMB_PX on a side, with Pillow if installed; None without it (or if unreadable)."""
    try:
        from PIL import Image  # noqa: PLC0415
    except ImportError:
        return None
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.thumbnail((THUMB_PX, THUMB_PX))
            buf = io.BytesIO()
            im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB").save(buf, "PNG")
            return buf.getvalue()
    except Exception:  # noqa: BLE001 - any undecodable image: leave it out
        return None


# -- HTML ---------------------------------------------------------------------------------------------
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1200px;
color:#1e293b;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #cbd5e1}
h3{font-size:15px;margin:16px 0 6px}.meta{color:#64748b}
table{border-collapse:collapse;margin:6px 0 12px}td,th{border:1px solid #e2e8f0;padding:3px 8px;vertical-align:top}
th{background:#f1f5f9;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
.hists{display:flex;flex-wrap:wrap;gap:12px}.hists figure{margin:0}
.note{color:#b45309}.cap{max-width:420px;word-break:break-word}.url{font-size:12px;color:#475569;word-break:break-all}
img.thumb{max-width:96px;max-height:96px;display:block}.samples{display:flex;flex-wrap:wrap;gap:24px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return esc("" if v is None else v)
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    return f"{float(v):.4g}"


def _table(head: list[str], rows: list[list[Any]], cls: str = "") -> str:
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _cell(v: Any) -> str:
    if isinstance(v, Raw):
        return f"<td>{v.html}</td>"
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        return f'<td class="n">{_num(v)}</td>'
    return f"<td>{esc('' if v is None else v)}</td>"


@dataclass
class Raw:
    """Already-escaped HTML for a table cell."""

    html: str


def svg_histogram(h: Hist, w: int = 470, ht: int = 190) -> str:
    """An inline SVG bar chart: all scored rows (grey), kept rows (blue), the threshold or cut (red)."""
    left, right, top, bottom = 48, 24, 22, 34
    pw, ph = w - left - right, ht - top - bottom
    lo, hi = float(h.edges[0]), float(h.edges[-1])
    ymax = max(1, int(h.all.max()))
    x = lambda v: left + (v - lo) / (hi - lo) * pw  # noqa: E731
    y = lambda c: top + ph - c / ymax * ph  # noqa: E731
    parts = [f'<svg width="{w}" height="{ht}" role="img" '
             f'aria-label="histogram of {esc(h.column)}"><title>{esc(h.column)}</title>']
    for counts, color in ((h.all, "#cbd5e1"), (h.kept, "#2563eb")):
        for i, c in enumerate(counts if counts is not None else []):
            if c:
                x0, x1 = x(h.edges[i]), x(h.edges[i + 1])
                parts.append(f'<rect x="{x0:.1f}" y="{y(c):.1f}" width="{max(0.5, x1 - x0 - 0.5):.1f}" '
                             f'height="{top + ph - y(c):.1f}" fill="{color}"/>')
    parts.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#475569"/>')
    for v in np.linspace(lo, hi, 5):
        parts.append(f'<text x="{x(v):.1f}" y="{top + ph + 14}" font-size="10" text-anchor="middle">{v:.3g}</text>')
    parts.append(f'<text x="{left - 4}" y="{top + 8}" font-size="10" text-anchor="end">{ymax:,}</text>'
                 f'<text x="{left - 4}" y="{top + ph}" font-size="10" text-anchor="end">0</text>')
    mark, word = (h.threshold, "threshold") if h.threshold is not None else (h.cut, "cut")
    if mark is not None:
        xm = x(min(max(mark, lo), hi))
        anchor = "end" if xm > left + pw / 2 else "start"
        parts.append(f'<line x1="{xm:.1f}" y1="{top - 4}" x2="{xm:.1f}" y2="{top + ph}" stroke="#dc2626" '
                     f'stroke-width="2" stroke-dasharray="4 3"/><text x="{xm + (-4 if anchor == "end" else 4):.1f}" '
                     f'y="{top + 6}" font-size="11" fill="#dc2626" text-anchor="{anchor}">{word} {mark:.4g}</text>')
    kept = f", kept {int(h.kept.sum()):,}" if h.kept is not None else ""
    parts.append(f'<text x="{left}" y="{ht - 4}" font-size="11">{esc(h.column)}: {h.scored:,} scored{kept}</text>')
    return "".join(parts) + "</svg>"


def _pct(n: int, d: int) -> str:
    return f"{100 * n / d:.1f}%" if d else ""


def overview_html(sels: list[Selection], pool: Pool) -> str:
    rows = []
    for s in sels:
        m = s.manifest or {}
        t = (m.get("timings_s") or {}).get("total")
        rows.append([s.name, m.get("recipe", "(no manifest)"), s.size, _pct(s.size, pool.rows),
                     " → ".join(k for k in (m.get("counts") or {}) if k not in ("pool", "selected")),
                     "" if t is None else f"{t:.2f}", str(s.path)])
    return "<h2>Selections</h2>" + _table(["selection", "method / recipe", "selected", "% of pool", "stages",
                                           "time (s)", "file"], rows)


def overlap_html(sels: list[Selection], inter: dict[tuple[int, int], int]) -> str:
    if len(sels) < 2:
        return ""
    rows = []
    for (i, j), n in inter.items():
        a, b = sels[i].size, sels[j].size
        union = a + b - n
        rows.append([sels[i].name, sels[j].name, a, b, n, f"{n / union:.3f}" if union else "",
                     _pct(n, min(a, b))])
    return "<h2>Overlaps</h2>" + _table(["A", "B", "|A|", "|B|", "|A∩B|", "Jaccard", "|A∩B| / min"], rows,
                                        "overlaps")


def labels_html(sels: list[Selection], pool: Pool) -> str:
    skipped = "".join(f'<p class="note">{esc(c)}: more than {MAX_DISTINCT:,} distinct values, not broken down</p>'
                      for c in pool.skipped_labels)
    if not pool.labels:
        return skipped
    out = [skipped, '<h2>Hidden labels</h2><p class="meta">Share of each label value in the pool and in each selection '
           "(columns named <code>synthetic_*</code> / <code>label_*</code>; the methods never read them).</p>"]
    for col in pool.labels:
        total = pool.label_counts.get(col, Counter())
        values = [v for v, _ in total.most_common(MAX_LABEL_VALUES)]
        rows = [[v, _pct(total[v], pool.rows)] + [_pct(s.labels[col][v], s.in_pool or 0) for s in sels]
                for v in values]
        if len(total) > len(values):
            rows.append([f"({len(total) - len(values)} other values)", "", *["" for _ in sels]])
        out.append(f"<h3>{esc(col)}</h3>" + _table([col, "pool"] + [s.name for s in sels], rows, "labels"))
    return "".join(out)


def stages_html(sel: Selection, pool: Pool) -> str:
    m = sel.manifest or {}
    counts, info = m.get("counts") or {}, m.get("stages") or {}
    cuts = {h.stage: h for h in sel.hists}
    rows = []
    for label, n in counts.items():
        st = info.get(label) or {}
        h = cuts.get(label)
        thr = (m.get("thresholds") or {}).get(label)
        mark = f"threshold {thr:.4g}" if thr is not None else (f"cut {h.cut:.4g} (smallest kept)" if h and h.cut
                                                                 is not None else "")
        rule = st.get("select") if st.get("fraction") is not None else ("threshold" if st.get("threshold")
                                                                         is not None else "")
        rows.append([label, n, _pct(n, counts.get("pool", pool.rows)), st.get("fraction"), rule or "", mark])
    if not rows:
        rows = [["selected", sel.size, _pct(sel.size, pool.rows), None, "", ""]]
    return _table(["stage", "kept", "% of pool", "fraction", "rule", "threshold / cut"], rows, "stages")


def options_html(m: dict) -> str:
    opts = {k: v for k, v in (m.get("options") or {}).items() if v not in (None, False) and k != "quiet"}
    timings = m.get("timings_s") or {}
    parts = [f"<b>{esc(k)}</b>={esc(v)}" for k, v in opts.items()]
    tline = ", ".join(f"{esc(k)} {v:.2f} s" for k, v in timings.items())
    made = esc(m.get("created", ""))
    return (f'<p class="meta">options: {" · ".join(parts) or "—"}<br>time: {tline or "—"}'
            f"<br>created {made} with varalign {esc(m.get('varalign_version', '?'))}</p>")


def samples_html(sel: Selection, rows: dict[str, dict], with_thumbs: bool) -> str:
    if not sel.top_column:
        return ""
    out = []
    for word, samples in (("Highest", sel.top), ("Lowest", sel.bottom)):
        body = []
        for rank, s in enumerate(samples, 1):
            r = rows.get(s.uid)
            row: list[Any] = [rank, s.score, "yes" if s.selected else ("no" if s.selected is not None else "")]
            if with_thumbs:
                src = (r or {}).get("thumbnail")
                row.append(Raw(f'<img class="thumb" alt="" src="{esc(src)}">' if src else ""))
            row.append(Raw(_caption_html(s.uid, r)))
            body.append(row)
        head = ["#", sel.top_column, "selected"] + (["image"] if with_thumbs else []) + ["caption / url / size"]
        out.append(f"<div><h3>{word} {esc(sel.top_column)}</h3>{_table(head, body, 'sample-table')}</div>")
    return '<div class="samples">' + "".join(out) + "</div>"


def _caption_html(uid: str, row: dict | None) -> str:
    if row is None:
        return f'<span class="note">uid {esc(uid)} not in this pool</span>'
    size = ""
    if row.get("original_width") is not None and row.get("original_height") is not None:
        size = f" · {row['original_width']}×{row['original_height']}"
    url = f'<div class="url">{esc(row["url"])}{esc(size)}</div>' if row.get("url") is not None else ""
    return f'<div class="cap">{esc(row.get("text", ""))}</div>{url}<div class="url">uid {esc(uid)}</div>'


def selection_html(sel: Selection, pool: Pool, rows: dict[str, dict]) -> str:
    m = sel.manifest or {}
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in sel.notes)
    hists = "".join(f"<figure>{svg_histogram(h)}</figure>" for h in sel.hists)
    recipe = f" — {esc(m['recipe'])}" if m.get("recipe") else ""
    src = (m.get("inputs") or {}).get("rows")
    mismatch = (f'<p class="note">the manifest was made on a pool of {src:,} rows; this pool has '
                f"{pool.rows:,}</p>") if isinstance(src, int) and src != pool.rows else ""
    return (f'<section id="sel-{esc(sel.name)}"><h2>{esc(sel.name)}{recipe}</h2>{notes}{mismatch}'
            f"{stages_html(sel, pool)}{options_html(m) if m else ''}"
            f'{"<h3>Score histograms</h3><div class=hists>" + hists + "</div>" if hists else ""}'
            f"{samples_html(sel, rows, pool.image is not None)}</section>")


def render(sels: list[Selection], pool: Pool, inter: dict, rows: dict[str, dict], title: str) -> str:
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">{GENERATOR}{SEAL.format(_UNSEALED)}'
            f"<style>{CSS}</style></head><body>")
    intro = (f"<h1>{esc(title)}</h1><p class=\"meta\">pool {esc(pool.root)}: {pool.rows:,} samples in "
             f"{len(pool.shards)} shards · generated {esc(time.strftime('%Y-%m-%d %H:%M:%S'))} by varalign "
             f"{esc(__version__)}. Histograms: grey = rows the stage scored, blue = rows it kept, red = the "
             "threshold, or for a top-k stage the cut (smallest kept score).</p>")
    body = [overview_html(sels, pool), overlap_html(sels, inter), labels_html(sels, pool)]
    body += [selection_html(s, pool, rows) for s in sels]
    return head + intro + "".join(body) + "</body></html>\n"


# -- entry points -----------------------------------------------------------------------------------
GENERATOR = '<meta name="generator" content="varalign report">'
# the page's SHA-256 (taken with this field zeroed): a page changed since varalign wrote it is not replaced
SEAL = '<meta name="varalign-sha256" content="{}">'
_UNSEALED = "0" * 64
_SEAL_RE = re.compile(rb'<meta name="varalign-sha256" content="([0-9a-f]{64})">')


def seal(page: str) -> str:
    """`page` (rendered with the zeroed seal) with its SHA-256 filled in."""
    data = page.encode("utf-8")
    return data.replace(SEAL.format(_UNSEALED).encode(),
                        SEAL.format(hashlib.sha256(data).hexdigest()).encode(), 1).decode("utf-8")


def _report_state(path: Path | str) -> str:
    """"ours" (a varalign report as written), "changed" (one edited since), or "other" (not a report)."""
    try:
        head = storage.read_bytes(path, 1 << 16)  # a large file that is not a report is not read whole
    except (OSError, VaralignError):
        return "other"
    if GENERATOR.encode() in head:
        found = _SEAL_RE.search(head)
        if found is None:  # an earlier version's report, written before the seal
            return "ours"
        try:
            data = storage.read_bytes(path)
        except (OSError, VaralignError):
            return "other"
        zeroed = data[: found.start(1)] + _UNSEALED.encode() + data[found.end(1):]
        return "ours" if hashlib.sha256(zeroed).hexdigest() == found.group(1).decode() else "changed"
    # reports of earlier versions carry no generator tag, but their default titles (the report's, the demos')
    # name varalign: those exactly, not any page whose title starts with the word
    return "ours" if any(t in head for t in (b"<title>varalign report: ", b"<title>varalign demo")) else "other"


def check_report_output(output: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse an existing `output` that is not a varalign report, or one changed since varalign wrote it
    (unless `overwrite`): one line naming it."""
    if not storage.exists(output) or overwrite:
        return
    state = _report_state(output)
    if state != "ours":
        what = "is not a varalign report" if state == "other" else "is a varalign report changed since it was written"
        raise VaralignError(f"exists and {what}: not overwritten; remove it, choose another --output, or pass "
                            "--overwrite", output)


def build_report(metadata_dir: str | os.PathLike, selections: list, output: str | os.PathLike,
                 scores: list | None = None, top: int = 12, title: str | None = None,
                 overwrite: bool = False) -> Path | str:
    """Write the HTML report for `selections` (subset .npy files) over the pool in `metadata_dir`.

    Any input, and the output, may be a URL (the page is written locally, then uploaded in one put).
    An existing `output` that is not a varalign report is not replaced unless `overwrite`."""
    if top < 0:
        raise VaralignError(f"--top must be >= 0, got {top}")
    output = storage.as_path(output)
    check_output_path(output)
    check_paths({"--metadata_dir": str(metadata_dir), "--selections": [str(s) for s in selections],
                 "--scores": [str(s) for s in scores or []],
                 "a manifest": [str(manifest_path(s)) for s in selections]}, {"--output": output})
    with lock_outputs([output]):
        if not storage.is_url(output):
            remove_stale_temps(output)
        check_report_output(output, overwrite)
        return _build_report(metadata_dir, selections, output, scores, top, title)


def _build_report(metadata_dir: str | os.PathLike, selections: list, output: Path | str, scores: list | None,
                  top: int, title: str | None) -> Path | str:
    pool = open_pool(metadata_dir)
    sels = load_selections(list(selections), list(scores) if scores is not None else None)
    count_labels(pool, None)
    for sel in sels:
        analyse_scores(sel, top)
        count_labels(pool, sel)
    wanted = {s.uid for sel in sels for s in sel.top + sel.bottom}
    rows = lookup_rows(pool, wanted)
    page = seal(render(sels, pool, overlaps(sels), rows,
                       title or f"varalign report: {', '.join(s.name for s in sels)}"))
    with atomic_path(output, ".html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    return output
