import json
import sys

import numpy as np
import pytest
import torch
from reference_impl import load_pool

from varalign.cli import main
from varalign.errors import VaralignError
from varalign.target import SecondMoment, build_target, load_target, target_path_for


def _unit(rng, n, d):
    f = rng.standard_normal((n, d))
    return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)


def test_second_moment_streaming_equals_one_shot() -> None:
    f = _unit(np.random.default_rng(0), 20_000, 64)
    acc = SecondMoment()
    for part in np.array_split(f, 7):
        acc.add(part)
    np.testing.assert_allclose(acc.result(), f.astype(np.float64).T @ f / len(f), rtol=1e-5, atol=1e-8)


def test_build_from_npy_pt_and_folder(tmp_path) -> None:
    rng = np.random.default_rng(1)
    a, b = _unit(rng, 300, 32), _unit(rng, 200, 32)
    np.save(tmp_path / "a.npy", a)
    torch.save({"image_features": torch.from_numpy(b).half()}, tmp_path / "b.pt")  # DataComp in1k layout
    info = build_target([tmp_path / "a.npy", tmp_path / "b.pt"], tmp_path / "out" / "t.npy", quiet=True)
    both = np.concatenate([a, b.astype(np.float16).astype(np.float32)]).astype(np.float64)
    got = np.load(tmp_path / "out" / "t.npy")
    np.testing.assert_allclose(got, both.T @ both / 500, rtol=1e-5, atol=1e-7)
    assert info["rows"] == 500 and info["dim"] == 32
    assert json.loads((tmp_path / "out" / "t.manifest.json").read_text())["rows"] == 500
    folder = tmp_path / "feats"
    folder.mkdir()
    np.save(folder / "x.npy", a)
    build_target([folder], tmp_path / "f.pt", quiet=True)
    loaded = load_target(tmp_path / "f.pt", dim=32)
    np.testing.assert_allclose(loaded, a.astype(np.float64).T @ a / 300, rtol=1e-5, atol=1e-7)


def test_one_pt_reader_for_targets_and_datacomp_files(tmp_path, monkeypatch) -> None:
    """Targets go through the same `.pt` reader as DataComp's assets: a numpy array saved by torch
    (DataComp's centroid layout) is read without torch; a bfloat16 tensor comes back as float32."""
    f = _unit(np.random.default_rng(2), 100, 16).astype(np.float64)
    want = (f.T @ f / 100).astype(np.float32)
    torch.save(want, tmp_path / "np.pt", pickle_protocol=4)
    torch.save(torch.from_numpy(want).bfloat16(), tmp_path / "bf16.pt")
    monkeypatch.setitem(sys.modules, "torch", None)
    np.testing.assert_array_equal(load_target(tmp_path / "np.pt", dim=16), want)
    with pytest.raises(VaralignError, match="needs torch"):
        load_target(tmp_path / "bf16.pt")
    monkeypatch.undo()
    got = load_target(tmp_path / "bf16.pt", dim=16)
    np.testing.assert_array_equal(got, torch.from_numpy(want).bfloat16().float().numpy())


def test_build_from_pool_and_found_by_name(synth_pool, tmp_path, capsys) -> None:
    files = tmp_path / "files"
    assert main(["target", str(synth_pool / "pool"), "--arch", "l14", "--files_path", str(files),
                 "--name", "pool", "--quiet"]) == 0
    assert "3,000 rows" in capsys.readouterr().out
    path = target_path_for(files, "pool")
    _, _, feats = load_pool(synth_pool / "pool")
    f = feats.astype(np.float64)
    np.testing.assert_allclose(load_target(path, 768), f.T @ f / len(f), rtol=1e-5, atol=1e-7)


def test_normalize_flag(tmp_path) -> None:
    f = _unit(np.random.default_rng(2), 50, 8) * 3.0
    np.save(tmp_path / "f.npy", f)
    build_target([tmp_path / "f.npy"], tmp_path / "t.npy", normalize=True, quiet=True)
    assert np.trace(np.load(tmp_path / "t.npy")) == pytest.approx(1.0, rel=1e-5)


def test_target_aliases(tmp_path) -> None:
    (tmp_path / "variance").mkdir()
    np.save(tmp_path / "variance" / "variance_imagenet_1k.npy", np.eye(4, dtype=np.float32))
    assert target_path_for(tmp_path, "imagenet-1k").name == "variance_imagenet_1k.npy"
    with pytest.raises(VaralignError, match="variance_other"):
        target_path_for(tmp_path, "other")
