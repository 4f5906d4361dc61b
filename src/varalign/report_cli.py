"""`varalign report` on the command line (the page itself is built by `report.build_report`)."""

from __future__ import annotations

import argparse

from .report import build_report


def register_report(subparsers: argparse._SubParsersAction) -> None:
    """Add `varalign report` to the CLI."""
    from .cli import add_storage_flag  # noqa: PLC0415
    p = subparsers.add_parser("report", help="a static HTML report comparing selections over a pool",
                              description="One self-contained HTML file (inline CSS and SVG, no server): per "
                                          "selection its counts per stage, score histograms with thresholds, the "
                                          "highest- and lowest-scored samples; overlaps between selections.")
    p.add_argument("--metadata_dir", required=True, help="the pool (directory of {name}.parquet shards, or a URL)")
    p.add_argument("--selections", nargs="+", required=True, help="subset .npy files (manifests are read beside them)")
    p.add_argument("--output", required=True, help="output .html (a URL: uploaded in one put when finished)")
    p.add_argument("--scores", nargs="+", help="one --save_scores parquet per selection (default: the manifest's)")
    p.add_argument("--top", type=int, default=12, help="highest/lowest-scored samples shown per selection")
    p.add_argument("--title", help="page title")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output that is not a varalign report")
    add_storage_flag(p)
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> int:
    out = build_report(args.metadata_dir, args.selections, args.output, args.scores, args.top, args.title,
                       overwrite=args.overwrite)
    print(f"report -> {out}")
    return 0
