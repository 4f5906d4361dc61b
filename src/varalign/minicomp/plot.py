"""A dependency-free SVG bar plot of `minicomp run` results: one panel per task, mean ± std per method."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from ..atomic import atomic_path

_W, _ROW, _PAD, _LABEL = 300, 18, 12, 170


def results_svg(results: dict) -> str:
    """The plot of a `results.json` dict (methods × tasks, error bars = std over seeds)."""
    methods = list(results["methods"])
    tasks = sorted({t for r in results["methods"].values() for t in r["metrics"]})
    height = _PAD * 3 + len(methods) * _ROW
    width = _LABEL + len(tasks) * (_W + _PAD) + _PAD
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    for j, name in enumerate(methods):
        y = _PAD * 2 + j * _ROW
        out.append(f'<text x="{_LABEL - 6}" y="{y + 12}" text-anchor="end">{html.escape(name)}</text>')
    for k, task in enumerate(tasks):
        x0 = _LABEL + k * (_W + _PAD)
        top = max(r["metrics"].get(task, {}).get("mean", 0) + r["metrics"].get(task, {}).get("std", 0)
                  for r in results["methods"].values()) or 1.0
        out.append(f'<text x="{x0}" y="{_PAD + 4}" font-weight="bold">{html.escape(task)}</text>')
        for j, r in enumerate(results["methods"].values()):
            m = r["metrics"].get(task)
            if m is None:
                continue
            y = _PAD * 2 + j * _ROW
            w, e = 0.8 * _W * m["mean"] / top, 0.8 * _W * m["std"] / top  # room for the value label
            out.append(f'<rect x="{x0}" y="{y + 2}" width="{w:.1f}" height="{_ROW - 5}" fill="#3b6fd8"/>')
            out.append(f'<line x1="{x0 + w - e:.1f}" x2="{x0 + w + e:.1f}" y1="{y + 8}" y2="{y + 8}" stroke="black"/>')
            out.append(f'<text x="{x0 + w + e + 4:.1f}" y="{y + 12}">{m["mean"]:.3f}</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_plot(results_json: str | os.PathLike, out_svg: str | os.PathLike) -> Path:
    """Write `results_svg` of a results.json file, atomically."""
    svg = results_svg(json.loads(Path(results_json).read_text()))
    with atomic_path(out_svg, ".svg") as tmp:
        tmp.write_text(svg)
    return Path(out_svg)
