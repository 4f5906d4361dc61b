"""The options of `varalign filter` that are not a method's: how the stages cut, what the run reads and
writes, and where it runs. With every method's parameters (`methods/`) they make the command's flags
and `filter_pool`'s keywords; each is written once, here or in its method's dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import VaralignError
from ..methods import METHODS
from ..methods.base import check_value, fields_of, flag_name, param


@dataclass
class FilterOptions:
    name: str | None = param(None, flag=None, help="method (see --list)")
    recipe: str | None = param(None, flag=None, help="a recipe TOML file, or a shipped preset name")
    fraction: float | None = param(None, type=float, finite=True, help="CLIP stage: fraction of the pool to keep")
    threshold: float | None = param(None, type=float, finite=True, help="CLIP stage: keep CLIP score >= threshold")
    fraction_vas: float | None = param(None, type=float, finite=True,
                                       help="VAS stage: fraction of the POOL to keep (not of the CLIP stage)")
    threshold_vas: float | None = param(None, type=float, finite=True, help="VAS stage: keep VAS >= threshold")
    files_path: str | None = param(None, help="the VAS reference's files directory (holds variance/)")
    cache_path: str | None = param(None, help="folder of DataComp assets (default ~/.cache/datacomp, as DataComp's "
                                              "download())")
    download: bool = param(False, type=bool, help="download missing DataComp assets (centroids, ImageNet features, "
                                                  "lid.176.bin); off by default")
    given_uids_path: str | None = param(None, path=True, help="restrict the pool to these uids first (a subset .npy)")
    save_scores: str | None = param(None, help="also write a parquet of uid + every score computed")
    seed: int = param(0, type=int, low=0, help="seed for randomised scores (negCLIPLoss batches)")
    device: str = param("cpu", type=str, help="cpu (numpy/BLAS, default) or a torch device such as cuda, cuda:1 "
                                              "(every embedding score's math on the GPU: the README's GPU section lists "
                                              "them; needs torch)")
    num_workers: int | None = param(None, type=int, low=1, help="parallel shards (default: all cores)")
    batch_size_vass: int | None = param(None, type=int, low=1, help="accepted for compatibility (bounds memory only)")
    storage_options: str | None = param(None, help="fsspec options for URLs (s3://, gs://, hf://) as JSON, e.g. "
                                                    '\'{"client_kwargs": {"endpoint_url": "http://..."}}\'; '
                                                    "credentials come from the environment as usual")
    executor: str = param("local", type=str, choices=("local", "ray"),
                          help="local: threads on this machine (default); ray: Ray tasks (pip install 'varalign[ray]')")
    ray_address: str | None = param(None, help="Ray cluster address (default: start a local Ray)")
    work_dir: str | None = param(None, help="per-shard results + completion markers, for resume "
                                            "(default: .{save_path stem}.varalign-work beside the output)")
    keep_work_dir: bool = param(False, type=bool, help="keep the work directory after success (and after an error)")
    overwrite: bool = param(False, type=bool, help="replace an existing --save_path/--save_scores file that "
                                                   "varalign did not write (refused by default)")
    quiet: bool = param(False, type=bool, help="no progress bars")


def all_fields() -> dict[str, dict]:
    """Every option by its flag/keyword name → its field metadata (run options, then methods')."""
    out: dict[str, dict] = {}
    for cls in (FilterOptions, *(m.params for m in METHODS.values())):
        for f, meta in fields_of(cls):
            key = f.name if cls is FilterOptions else flag_name(f, meta)
            if key is not None:
                out.setdefault(key, meta)
    return out


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Unknown keywords refused; every given value checked against its field (range, finite, choices)."""
    known = all_fields()
    for key, value in options.items():
        if key not in known:
            raise VaralignError(f"unknown option {key!r} (see `varalign filter --help`)")
        check_value(key, value, known[key])
    return options


def run_option(options: dict[str, Any], key: str) -> Any:
    """A run option's value, or its default."""
    field = FilterOptions.__dataclass_fields__[key]
    return options.get(key) if options.get(key) is not None else field.default
