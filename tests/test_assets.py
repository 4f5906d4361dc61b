"""Tests of varalign.assets (DataComp asset lookup, checksum warnings) and varalign.ptfile (safe `.pt` loading); no network."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from varalign import assets, ptfile
from varalign.errors import VaralignError

try:
    import torch
except ImportError:  # pragma: no cover - torch is a test dependency
    torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")

CALLED: list[str] = []


def _side_effect(msg: str) -> str:
    CALLED.append(msg)
    return msg


class _Evil:
    """Unpickling this calls `_side_effect`: a loader that allows it would run arbitrary code."""

    def __reduce__(self):
        return (_side_effect, ("ran",))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- lookup


def test_missing_asset_error_names_file_folder_and_url(tmp_path: Path) -> None:
    with pytest.raises(VaralignError) as err:
        assets.find_asset("small_centroids", cache_path=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "small_centroids.pt") in msg and str(tmp_path / "small_centroids_l14.pt") in msg
    assert "https://github.com/sagadre/datacomp_baseline_assets/releases/download/v0.1.0-alpha/small_centroids_l14.pt" in msg


def test_default_cache_dirs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(VaralignError, match=r"\.cache/datacomp/in1k_clip_vit_l14_3\.pt"):
        assets.find_asset("in1k_clip_vit_l14_3")
    with pytest.raises(VaralignError, match=r"\.cache/fasttext/lid\.176\.bin.*dl\.fbaipublicfiles\.com"):
        assets.find_asset("lid.176.bin")


def test_resolve_names() -> None:
    assert assets.resolve_asset("small_centroids_l14.pt") is assets.ASSETS["small_centroids"]
    assert assets.resolve_asset("xlarge_centroids.pt").name == "xlarge_centroids"
    assert assets.resolve_asset("fasttext").filename == "lid.176.bin"
    with pytest.raises(VaralignError, match="unknown DataComp asset"):
        assets.resolve_asset("huge_centroids")


def test_found_asset_with_wrong_sha_warns(tmp_path: Path) -> None:
    path = tmp_path / "medium_centroids_l14.pt"  # the URL's file name is accepted too
    path.write_bytes(b"not the real file")
    with pytest.warns(UserWarning, match="differs from DataComp"):
        assert assets.find_asset("medium_centroids", cache_path=tmp_path) == path
    (tmp_path / "medium_centroids.pt").mkdir()  # DataComp's cached name wins, and must be a file
    with pytest.raises(VaralignError, match="not a regular file"):
        assets.find_asset("medium_centroids", cache_path=tmp_path)


def test_matching_sha_is_silent(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert assets.check_sha256(path, _sha(path))


def test_shipped_imagenet21k_ids_match_datacomp_sha() -> None:
    shipped = Path(assets.__file__).parent / "assets" / "imagenet21k_wordnet_ids.txt"
    assert _sha(shipped) == assets.ASSETS["imagenet21k_wordnet_ids"].sha256


def test_download_from_local_url(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    fake = dataclasses.replace(assets.ASSETS["fasttext"], url=src.as_uri(), sha256=_sha(src))
    monkeypatch.setitem(assets.ASSETS, "fasttext", fake)
    got = assets.find_asset("fasttext", cache_path=tmp_path / "cache", download=True)
    assert got == tmp_path / "cache" / "lid.176.bin" and got.read_bytes() == b"payload"
    assert [p.name for p in got.parent.iterdir()] == ["lid.176.bin"]  # no temp file left
    missing = dataclasses.replace(fake, url=(tmp_path / "nope").as_uri())
    monkeypatch.setitem(assets.ASSETS, "fasttext", missing)
    with pytest.raises(VaralignError, match="cannot download"):
        assets.find_asset("fasttext", cache_path=tmp_path / "cache2", download=True)


# --------------------------------------------------------------------------- .pt loading


@needs_torch
@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_array_in_pt_roundtrip(tmp_path: Path, protocol: int) -> None:
    arr = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    path = tmp_path / "c.pt"
    torch.save(arr, path, pickle_protocol=protocol)  # DataComp's clustering script uses protocol 4
    np.testing.assert_array_equal(assets.load_centroids(path), arr)
    legacy = tmp_path / "legacy.pt"
    torch.save(arr, legacy, pickle_protocol=2, _use_new_zipfile_serialization=False)
    np.testing.assert_array_equal(assets.load_centroids(legacy), arr)  # via torch + safe_globals


@needs_torch
def test_torch_weights_only_needs_the_numpy_allowlist(tmp_path: Path) -> None:
    arr = np.arange(6, dtype=np.float64).reshape(2, 3)
    path = tmp_path / "c.pt"
    torch.save(arr, path, pickle_protocol=2)
    with pytest.raises(Exception, match="(?i)weights"):
        torch.load(path, weights_only=True)
    np.testing.assert_array_equal(ptfile._load_with_torch(path), arr)


@needs_torch
def test_numpy_1x_global_name_is_accepted(tmp_path: Path) -> None:
    arr = np.arange(4, dtype=np.float32)
    raw = pickle.dumps(arr, protocol=2)
    assert b"numpy._core.multiarray\n_reconstruct" in raw
    old = raw.replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct")
    np.testing.assert_array_equal(ptfile._NumpyUnpickler(io.BytesIO(old)).load(), arr)
    with pytest.raises(pickle.UnpicklingError, match="latin1"):
        ptfile._latin1_encode("x", "rot13")
    legacy = tmp_path / "legacy.pt"
    torch.save(arr, legacy, pickle_protocol=2, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    legacy.write_bytes(data.replace(b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct"))
    np.testing.assert_array_equal(ptfile._load_with_torch(legacy), arr)


@needs_torch
@pytest.mark.parametrize("protocol,zipped", [(2, True), (4, True), (2, False)])
def test_arbitrary_object_is_refused(tmp_path: Path, protocol: int, zipped: bool) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"image_features": _Evil()}, path, pickle_protocol=protocol, _use_new_zipfile_serialization=zipped)
    CALLED.clear()
    with pytest.raises(VaralignError, match="cannot load .pt safely"):
        assets.load_pt(path, key="image_features")
    with pytest.raises(VaralignError, match="cannot load .pt safely"):
        assets.load_centroids(path)
    assert CALLED == []


@needs_torch
def test_tensor_dict_and_in1k_iterator(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal((3 + i, 4)).astype(np.float16) for i in range(5)]
    for i, part in enumerate(parts):
        torch.save({"image_features": torch.from_numpy(part)}, tmp_path / f"in1k_clip_vit_l14_{i}.pt")
    with pytest.warns(UserWarning, match="differs from DataComp"):
        got = list(assets.iter_in1k_features(cache_path=tmp_path))
    for g, p in zip(got, parts, strict=True):
        assert g.dtype == np.float32
        np.testing.assert_array_equal(g, p.astype(np.float32))
    with pytest.raises(VaralignError, match="without key 'features'"):
        assets.load_pt(tmp_path / "in1k_clip_vit_l14_0.pt", key="features")
    (tmp_path / "in1k_clip_vit_l14_4.pt").unlink()
    with warnings.catch_warnings(), pytest.raises(VaralignError, match="in1k_clip_vit_l14_4"):
        warnings.simplefilter("ignore")
        next(assets.iter_in1k_features(cache_path=tmp_path))


@needs_torch
def test_load_centroids_npy_and_bad_content(tmp_path: Path) -> None:
    arr = np.ones((3, 2), dtype=np.float32)
    np.save(tmp_path / "c.npy", arr)
    np.testing.assert_array_equal(assets.load_centroids(tmp_path / "c.npy"), arr)
    np.save(tmp_path / "bad.npy", np.array([[np.nan, 1.0]]))
    with pytest.raises(VaralignError, match="NaN"):
        assets.load_centroids(tmp_path / "bad.npy")
    torch.save(np.arange(3), tmp_path / "v.pt")
    with pytest.raises(VaralignError, match="2-d float"):
        assets.load_centroids(tmp_path / "v.pt")
    with pytest.raises(VaralignError, match="not found"):
        assets.load_centroids(tmp_path / "none.pt")


@needs_torch
def test_ordered_dict_of_tensors_goes_to_torch(tmp_path: Path) -> None:
    from collections import OrderedDict

    feats = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    torch.save(OrderedDict(image_features=feats), tmp_path / "od.pt")
    np.testing.assert_array_equal(assets.load_pt(tmp_path / "od.pt", key="image_features"), feats.numpy())
    torch.save({"image_features": feats}, tmp_path / "p4.pt", pickle_protocol=4)  # torch's reader: protocol <= 2
    with pytest.raises(VaralignError, match="Unsupported operand"):
        assets.load_pt(tmp_path / "p4.pt", key="image_features")
