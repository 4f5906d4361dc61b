"""`varalign download`'s flags: DataComp's download_upstream.py (same names and defaults) plus varalign's."""

from __future__ import annotations

import argparse
import sys


def register_download(sub: argparse._SubParsersAction) -> None:
    from ..cli import add_storage_flag  # noqa: PLC0415
    from .hub import SCALES  # noqa: PLC0415
    from .run import ENCODE_FORMATS, OUTPUT_FORMATS, RESIZE_MODES  # noqa: PLC0415

    p = sub.add_parser("download", help="download a DataComp pool's metadata and images, or only a subset's images "
                                        "(drop-in for download_upstream.py)",
                       description="Download DataComp metadata from the Hugging Face Hub, then the images with "
                                   "img2dataset (DataComp's settings), each checked against the metadata's sha256. "
                                   "Resumable: run the same command again after an interruption.")
    p.add_argument("--scale", choices=SCALES, default="small", help="which pool (default small)")
    p.add_argument("--data_dir", required=True, help="where metadata/, shards/ and download_report.json go (a "
                                                     "folder URL: img2dataset writes the shards there)")
    p.add_argument("--metadata_dir", help="metadata folder or URL (default DATA_DIR/metadata); an existing one is "
                                          "used as is")
    p.add_argument("--download_npz", action="store_true", help="also download the .npz embeddings")
    p.add_argument("--skip_shards", action="store_true", help="only the metadata (then filter, then --subset)")
    p.add_argument("--overwrite_metadata", action="store_true", help="download the metadata again")
    p.add_argument("--skip_bbox_blurring", action="store_true", help="do not blur the faces listed in face_bboxes")
    p.add_argument("--processes_count", type=int, default=16, help="img2dataset processes (default 16)")
    p.add_argument("--thread_count", type=int, default=128, help="download threads per process (default 128)")
    p.add_argument("--image_size", type=int, default=512, help="resize target in pixels (default 512)")
    p.add_argument("--resize_mode", choices=RESIZE_MODES, default="keep_ratio_largest")
    p.add_argument("--no_resize_only_if_bigger", action="store_true", help="also upscale smaller images")
    p.add_argument("--encode_format", choices=ENCODE_FORMATS, default="jpg")
    p.add_argument("--output_format", choices=OUTPUT_FORMATS, default="webdataset")
    p.add_argument("--retries", type=int, default=2, help="attempts per URL after the first, within a pass (default 2)")
    p.add_argument("--enable_wandb", action="store_true", help="img2dataset logs to Weights & Biases (online)")
    p.add_argument("--wandb_project", default="datacomp")
    p.add_argument("--subset", nargs="+", metavar="FILE", default=[],
                   help="download only these uids: subset .npy files from `varalign filter` (several: their union)")
    p.add_argument("--no_verify_hash", action="store_true",
                   help="keep images whose bytes differ from the metadata's sha256 (checked by default)")
    p.add_argument("--retry_failed", action="store_true",
                   help="then fetch again the URLs that failed with a timeout, HTTP 5xx or connection error")
    p.add_argument("--force", action="store_true", help="go on when the disk looks too small for the estimate")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per request (img2dataset's default 10)")
    p.add_argument("--number_sample_per_shard", type=int, default=10000,
                   help="samples per shard (DataComp: 10000); fixed once a download started")
    p.add_argument("--quiet", action="store_true", help="no progress bar, notes or table")
    add_storage_flag(p)
    p.set_defaults(func=_run_download)


def _run_download(args: argparse.Namespace) -> int:
    from .run import DownloadOptions, download  # noqa: PLC0415

    opts = DownloadOptions(
        data_dir=args.data_dir, scale=args.scale, metadata_dir=args.metadata_dir, download_npz=args.download_npz,
        skip_shards=args.skip_shards, overwrite_metadata=args.overwrite_metadata,
        skip_bbox_blurring=args.skip_bbox_blurring, processes_count=args.processes_count,
        thread_count=args.thread_count, image_size=args.image_size, resize_mode=args.resize_mode,
        resize_only_if_bigger=not args.no_resize_only_if_bigger, encode_format=args.encode_format,
        output_format=args.output_format, retries=args.retries, enable_wandb=args.enable_wandb,
        wandb_project=args.wandb_project, subset=args.subset, verify_hash=not args.no_verify_hash,
        retry_failed=args.retry_failed, force=args.force, timeout=args.timeout,
        number_sample_per_shard=args.number_sample_per_shard, quiet=args.quiet)
    try:
        download(opts)
    except KeyboardInterrupt:
        print("varalign: interrupted; finished shards are kept: run the same command again to resume",
              file=sys.stderr)
        return 130
    return 0
