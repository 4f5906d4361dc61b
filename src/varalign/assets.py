"""DataComp's downloadable baseline assets: where DataComp caches them, checksums, safe loading.

DataComp's `baselines/utils.py::download(name, root)` caches every asset as `{root}/{name}.pt`
(root `~/.cache/datacomp`; `{scale}_centroids` is therefore `small_centroids.pt`, although its
URL ends in `small_centroids_l14.pt`), except fastText's `lid.176.bin`, which `apply_filter.py`
caches under `~/.cache/fasttext`. `find_asset` looks there (or in `cache_path`), accepting the
URL's file name too. A checksum that differs from DataComp's is a warning, not an error.

`.pt` files are never fully unpickled: they are read by `ptfile.load_pt` (a restricted
unpickler for numpy arrays such as DataComp's centroids; `torch.load(weights_only=True)` with a
numpy allowlist for tensors such as the ImageNet-1k features).
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import os
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import VaralignError
from .npz import load_npy
from .ptfile import load_pt

SCALES = ("small", "medium", "large", "xlarge")
DATACOMP_CACHE = "~/.cache/datacomp"
FASTTEXT_CACHE = "~/.cache/fasttext"
_BASE = "https://github.com/sagadre/datacomp_baseline_assets/releases/download/v0.1.0-alpha/"


@dataclass(frozen=True)
class Asset:
    """One DataComp asset: its `download()` key, cached file name, URL and sha256."""

    name: str
    filename: str
    url: str
    sha256: str
    default_dir: str = DATACOMP_CACHE

    @property
    def url_filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# Facts (URLs, sha256) from mlfoundations/datacomp baselines/utils.py `download`.
_SHA = {
    "imagenet21k_wordnet_ids": "66362bdedf36d933382edca5493fc562dcc17128ce36403c9e730a75f48cb2f2",
    "in1k_clip_vit_l14_0": "304990fd492f40ba90072b80af78d6e8edcab9d042476ef513e03441cf53743b",
    "in1k_clip_vit_l14_1": "72f008e6aa3bfb54174fa322963215337f843fc90fd642a9dccc815dd9e7ee76",
    "in1k_clip_vit_l14_2": "83c3cc6503b8a50a22cac7023ca6cd61b130ab9725db2a7519f1bec5cabf5493",
    "in1k_clip_vit_l14_3": "83faa289f847799ddcd438e5b74df1cb5973c345674896d10ba31ea48bc63804",
    "in1k_clip_vit_l14_4": "067a45f4a140a93371876510a2fd9198a89ac1d194ae4063a51b45a6da69cadf",
    "small_centroids": "23c66a05e49ad77283c1e2b33355c7eb088ac332a944c97ff85d5dfd48a5b251",
    "medium_centroids": "028b1721b1d0f139c565b6b0ac99f8a1756f4bae89c36b0ec6d1c6ea9b6f112d",
    "large_centroids": "04eeab1069d3540c246cf7ce69323147351a474017fc472e4c50a018ca32240b",
    "xlarge_centroids": "3f62e5f8ae3a715ce84e422846fcfce1536d184455ea234790c4a6465c4c6726",
}
_URL_NAME = {"imagenet21k_wordnet_ids": "imagenet21k_wordnet_ids.txt"} | {
    f"{s}_centroids": f"{s}_centroids_l14.pt" for s in SCALES}

ASSETS: dict[str, Asset] = {
    name: Asset(name, f"{name}.pt", _BASE + _URL_NAME.get(name, f"{name}.pt"), sha) for name, sha in _SHA.items()
}
ASSETS["fasttext"] = Asset(
    "fasttext", "lid.176.bin", "https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin",
    "7e69ec5451bc261cc7844e49e4792a85d7f09c06789ec800fc4a44aec362764e", FASTTEXT_CACHE)
IN1K_FEATURES = tuple(f"in1k_clip_vit_l14_{i}" for i in range(5))


def resolve_asset(name: str) -> Asset:
    """The asset for a `download()` key (`small_centroids`), cached name or URL file name."""
    if name in ASSETS:
        return ASSETS[name]
    for asset in ASSETS.values():
        if name in (asset.filename, asset.url_filename):
            return asset
    raise VaralignError(f"unknown DataComp asset {name!r} (known: {', '.join(ASSETS)})")


def candidate_paths(asset: Asset, cache_path: str | os.PathLike | None = None) -> list[Path]:
    """Where to look, in order: DataComp's cached name, then the URL's file name."""
    folder = Path(cache_path if cache_path is not None else asset.default_dir).expanduser()
    names = dict.fromkeys((asset.filename, asset.url_filename))
    return [folder / n for n in names]


def find_asset(name: str, cache_path: str | os.PathLike | None = None, download: bool = False) -> Path:
    """Path of a DataComp asset in its cache folder; `download=True` fetches a missing one."""
    asset = resolve_asset(name)
    paths = candidate_paths(asset, cache_path)
    for path in paths:
        if path.is_file():
            check_sha256(path, asset.sha256)
            return path
        if path.exists():
            raise VaralignError("exists but is not a regular file", path)
    if download:
        return download_asset(asset, paths[0])
    looked = ", ".join(map(str, paths))
    raise VaralignError(
        f"DataComp asset {asset.name!r} not found (looked for {looked}); download {asset.url} to {paths[0]}, "
        "pass its folder with --cache_path, or add --download to fetch it")


def check_sha256(path: str | os.PathLike, expected: str) -> bool:
    """True if the file's sha256 is `expected`; otherwise warn (the file is still used)."""
    digest = file_sha256(path)
    if digest != expected:
        warnings.warn(f"{path}: sha256 {digest} differs from DataComp's {expected}", stacklevel=2)
        return False
    return True


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, cached per (path, size, mtime): large assets are hashed once per process."""
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def download_asset(asset: Asset, dest: Path) -> Path:
    """Fetch `asset.url` to a temp file beside `dest`, rename it into place, check sha256."""
    try:
        with atomic_path(dest) as tmp, urllib.request.urlopen(asset.url, timeout=60) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                out.write(chunk)
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        raise VaralignError(f"cannot download {asset.url} ({exc})", dest) from None
    check_sha256(dest, asset.sha256)
    return dest


def load_centroids(path: str | os.PathLike) -> np.ndarray:
    """Centroids `(K, D)` float32 from DataComp's `.pt` or our `.npy`; checked finite."""
    path = Path(path)
    if not path.is_file():
        raise VaralignError("centroid file not found", path)
    if path.suffix == ".npy":
        try:
            arr = load_npy(path)
        except (ValueError, OSError, EOFError) as exc:
            raise VaralignError(f"not a plain numeric .npy ({exc})", path) from None
    else:
        arr = load_pt(path)
    if arr.ndim != 2 or arr.dtype.kind != "f" or not len(arr):
        raise VaralignError(f"centroids must be a non-empty 2-d float array, found {arr.dtype} {arr.shape}", path)
    if not np.isfinite(arr).all():
        raise VaralignError("centroids hold NaN/inf", path)
    return np.ascontiguousarray(arr, dtype=np.float32)


def iter_in1k_features(cache_path: str | os.PathLike | None = None, download: bool = False) -> Iterator[np.ndarray]:
    """DataComp's ImageNet-1k train L/14 image features, one float32 array per file (5 files)."""
    paths = [find_asset(name, cache_path, download) for name in IN1K_FEATURES]  # fail before any work
    for path in paths:
        feats = load_pt(path, key="image_features")
        if feats.ndim != 2 or feats.dtype.kind != "f":
            raise VaralignError(f"image_features must be a 2-d float array, found {feats.shape}", path)
        yield np.ascontiguousarray(feats, dtype=np.float32)
