"""What happened to each URL: img2dataset's per-shard `status`/`error_message` sorted into outcomes,
counted per shard and over unique uids, plus the uids worth fetching again."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .. import storage
from ..uids import UID_DTYPE, hex_to_uids, isin_sorted, sort_uids, uid_order

OUTCOMES = ("success", "http_4xx", "http_5xx", "timeout", "connection_error", "not_an_image", "hash_mismatch",
            "failed_resize", "disallowed", "other")
LABELS = {"success": "success", "http_4xx": "HTTP 4xx", "http_5xx": "HTTP 5xx", "timeout": "timeout",
          "connection_error": "connection error", "not_an_image": "not an image", "hash_mismatch": "hash mismatch",
          "failed_resize": "too small / failed resize", "disallowed": "disallowed (X-Robots-Tag)", "other": "other"}
# worth asking again later: the server or the network failed, not the image
RETRYABLE = frozenset({"http_5xx", "timeout", "connection_error"})
CODE = {name: i for i, name in enumerate(OUTCOMES)}
_RETRYABLE_CODES = np.array([CODE[n] for n in sorted(RETRYABLE)], dtype=np.int8)
_HTTP = re.compile(r"HTTP Error (\d{3})")
_CONNECTION = ("urlopen error", "connection", "remote end closed", "reset by peer", "name or service",
               "eof occurred", "incompleteread", "ssl", "refused", "unreachable", "broken pipe")


def classify(status: str | None, message: str | None) -> str:
    """One outcome for img2dataset's (status, error_message) of a sample."""
    if status == "success":
        return "success"
    text = (message or "").lower()
    if status == "failed_to_resize":
        return "not_an_image" if "decoding error" in text else "failed_resize"
    if text == "hash mismatch":
        return "hash_mismatch"
    http = _HTTP.search(message or "")
    if http:
        return "http_5xx" if http.group(1).startswith("5") else "http_4xx" if http.group(1).startswith("4") else "other"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if "x-robots-tag" in text:
        return "disallowed"
    if "certificate" in text:  # an SSL error that will not pass on its own
        return "other"
    if any(word in text for word in _CONNECTION):
        return "connection_error"
    return "other"


def shard_name(shard: int) -> str:
    return f"{shard:08d}"


def finished_shards(shards_dir: Path | str) -> list[int]:
    """Ids of the shards img2dataset finished (it writes `{id}_stats.json` last); a folder URL is listed
    afresh each time (img2dataset is writing into it)."""
    ids = []
    for name in storage.listdir(shards_dir, refresh=True):
        head = name.split("_")[0]
        if name.endswith("_stats.json") and head.isdigit():
            ids.append(int(head))
    return sorted(ids)


def read_shard(shards_dir: Path | str, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """(uids, outcome codes) of one finished shard, from its `{id}.parquet`."""
    path = storage.join(shards_dir, f"{shard_name(shard)}.parquet")
    fs, where = storage.arrow_filesystem(path)
    table = pq.read_table(where, columns=["uid", "status", "error_message"], filesystem=fs)
    codes = np.array([CODE[classify(s, m)] for s, m in zip(table["status"].to_pylist(),
                                                          table["error_message"].to_pylist(), strict=True)],
                     dtype=np.int8)
    return hex_to_uids(table["uid"], path), codes


@dataclass
class Summary:
    """Outcomes over unique uids (`final`), per shard (`shards`), and what is left to retry."""

    final: Counter = field(default_factory=Counter)
    shards: list[dict] = field(default_factory=list)
    retryable: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=UID_DTYPE))
    incomplete: list[int] = field(default_factory=list)

    @property
    def urls(self) -> int:
        return sum(self.final.values())

    def to_json(self) -> dict:
        urls = self.urls
        return {"urls": urls, "outcomes": {k: self.final.get(k, 0) for k in OUTCOMES},
                "success_rate": round(self.final.get("success", 0) / urls, 6) if urls else None,
                "retryable_left": len(self.retryable), "incomplete_shards": [shard_name(s) for s in self.incomplete],
                "shards": self.shards}


def summarize(shards_dir: Path | str, main_shards: int) -> Summary:
    """Scan the finished shards. Shards `>= main_shards` come from retry passes: a uid's final outcome
    is success if any attempt succeeded, else its latest attempt. Memory: one shard plus the retried uids."""
    done = finished_shards(shards_dir) if storage.isdir(shards_dir) else []
    out = Summary(incomplete=sorted(set(range(main_shards)) - set(done)))
    retried, retried_final = _retry_outcomes(shards_dir, [s for s in done if s >= main_shards], out)
    left, main_rows = [], []
    for shard in (s for s in done if s < main_shards):
        uids, codes = read_shard(shards_dir, shard)
        main_rows.append(_shard_row(shard, "main", codes))
        again = isin_sorted(uids, retried)
        out.final.update(OUTCOMES[c] for c in codes[~again])
        left.append(uids[~again & np.isin(codes, _RETRYABLE_CODES)])
    out.final.update(OUTCOMES[c] for c in retried_final)
    left.append(retried[np.isin(retried_final, _RETRYABLE_CODES)])
    out.retryable = sort_uids(np.concatenate(left)) if left else out.retryable
    out.shards = main_rows + out.shards
    return out


def _retry_outcomes(shards_dir: Path | str, shards: list[int], out: Summary) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique uids seen in retry shards and their final outcome codes."""
    if not shards:
        return np.empty(0, dtype=UID_DTYPE), np.empty(0, dtype=np.int8)
    parts = []
    for shard in shards:
        uids, codes = read_shard(shards_dir, shard)
        out.shards.append(_shard_row(shard, "retry", codes))
        parts.append((uids, codes, np.full(len(uids), shard, dtype=np.int64)))
    uids = np.concatenate([p[0] for p in parts])
    codes = np.concatenate([p[1] for p in parts])
    order = uid_order(uids, np.concatenate([p[2] for p in parts]))  # by uid, then by attempt
    uids, codes = uids[order], codes[order]
    last = np.ones(len(uids), dtype=bool)
    last[:-1] = (uids["f0"][1:] != uids["f0"][:-1]) | (uids["f1"][1:] != uids["f1"][:-1])
    group = np.cumsum(np.r_[True, last[:-1]]) - 1
    ok = np.zeros(int(last.sum()), dtype=bool)
    np.logical_or.at(ok, group, codes == CODE["success"])
    final = np.where(ok, CODE["success"], codes[last]).astype(np.int8)
    return uids[last], final


def _shard_row(shard: int, kind: str, codes: np.ndarray) -> dict:
    counts = np.bincount(codes, minlength=len(OUTCOMES))
    row = {"shard": shard_name(shard), "pass": kind, "urls": int(len(codes))}
    row.update({name: int(counts[i]) for i, name in enumerate(OUTCOMES)})
    row["success_rate"] = round(row["success"] / len(codes), 6) if len(codes) else None
    return row


def format_table(summary: Summary, max_shard_rows: int = 40) -> str:
    """The report as text: outcomes over unique URLs, then one line per shard (the worst ones if many)."""
    urls = summary.urls
    lines = [f"{'outcome':<28}{'URLs':>12}{'share':>9}", "-" * 49]
    for name in OUTCOMES:
        n = summary.final.get(name, 0)
        if n or name == "success":
            lines.append(f"{LABELS[name]:<28}{n:>12,}{_pct(n, urls):>9}")
    lines += ["-" * 49, f"{'total':<28}{urls:>12,}", ""]
    shown = [n for n in OUTCOMES if n != "success" and any(r[n] for r in summary.shards)]
    rows = summary.shards
    if len(rows) > max_shard_rows:
        rows = sorted(rows, key=lambda r: (r["success_rate"] if r["success_rate"] is not None else 1.0))
        rows = rows[:max_shard_rows]
        lines.append(f"{len(rows)} shards with the lowest success rate of {len(summary.shards)} "
                     "(every shard is in download_report.json)")
    head = f"{'shard':<10}{'pass':<7}{'URLs':>8}{'success':>9}" + "".join(f"{_short(n):>10}" for n in shown)
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['shard']:<10}{r['pass']:<7}{r['urls']:>8,}{_pct(r['success'], r['urls']):>9}"
                     + "".join(f"{r[n]:>10,}" for n in shown))
    if summary.incomplete:
        lines.append(f"{len(summary.incomplete)} shard(s) not finished: run the same command again to resume")
    return "\n".join(lines)


def _short(name: str) -> str:
    return {"connection_error": "conn err", "not_an_image": "not image", "hash_mismatch": "hash bad",
            "failed_resize": "resize", "disallowed": "robots"}.get(name, LABELS[name])


def _pct(n: int, total: int) -> str:
    return f"{100.0 * n / total:.1f}%" if total else "-"


def shard_stats(shards_dir: Path | str, shard: int) -> dict:
    """img2dataset's `{id}_stats.json` of a finished shard."""
    return json.loads(storage.read_bytes(storage.join(shards_dir, f"{shard_name(shard)}_stats.json")))
