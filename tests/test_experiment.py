"""The experiment loop: 38-task aggregation, resharder, and embed -> filter -> reshard -> train -> evaluate
end to end on a few hundred real images (sklearn digits), CPU only, no network."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from experiment_data import (
    fake_uid,
    make_classification_task,
    make_retrieval_task,
    make_subset,
    make_train_shards,
)

from varalign.cli import main as varalign_main
from varalign.errors import VaralignError
from varalign.experiment.cli import register
from varalign.experiment.embed import _load as _embed_load
from varalign.experiment.reshard import reshard
from varalign.experiment.tasks import AVERAGE, IMAGENET, RETRIEVAL, SHIFTS, TASKS, VTAB, aggregate

MNIST = "mnist"
FLICKR = "retrieval/flickr_1k_test_image_text_retrieval"


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="varalign")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("exp")
    make_train_shards(root / "shards", n=300, per_shard=100)
    make_classification_task(root / "eval" / MNIST)
    make_retrieval_task(root / "eval" / FLICKR)
    return root


# ---- aggregation ---------------------------------------------------------------------------------

def _all_metrics() -> dict[str, float]:
    m = {t.key: 0.5 for t in TASKS}
    m["imagenet1k"] = 0.8
    for key, v in zip(["imagenet_sketch", "imagenetv2", "imagenet-a", "imagenet-o", "imagenet-r", "objectnet"],
                      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], strict=True):
        m[key] = v
    m["vtab/cifar100"] = 0.9  # 12 VTAB tasks at 0.5 + 0.9
    m["sun397"] = 0.1  # SUN397 is in DataComp's VTAB group
    m["misc/winogavil"] = 0.2
    m["cifar10"] = 1.0
    return m


def test_aggregate_hand_computed() -> None:
    g = aggregate(_all_metrics())
    assert g[IMAGENET]["score"] == pytest.approx(0.8)
    assert g[SHIFTS]["score"] == pytest.approx(2.1 / 6)
    assert g[VTAB]["total"] == 13
    assert g[VTAB]["score"] == pytest.approx((11 * 0.5 + 0.9 + 0.1) / 13)
    assert g[RETRIEVAL]["score"] == pytest.approx((0.5 + 0.5 + 0.2) / 3)
    # 38 tasks: IN 0.8, shifts 2.1, VTAB 6.5, retrieval 1.2, cifar10 1.0, 14 others at 0.5
    assert g[AVERAGE]["score"] == pytest.approx((0.8 + 2.1 + 6.5 + 1.2 + 1.0 + 14 * 0.5) / 38)
    assert all(v["missing"] == [] for v in g.values())


def test_aggregate_missing_task_is_reported_not_averaged() -> None:
    m = _all_metrics()
    del m["vtab/pets"]
    m["objectnet"] = float("nan")
    g = aggregate(m)
    assert g[VTAB]["score"] is None and g[VTAB]["missing"] == ["vtab/pets"] and g[VTAB]["n"] == 12
    assert g[SHIFTS]["score"] is None and g[SHIFTS]["missing"] == ["objectnet"]
    assert g[AVERAGE]["score"] is None and set(g[AVERAGE]["missing"]) == {"vtab/pets", "objectnet"}
    assert g[IMAGENET]["score"] == pytest.approx(0.8)
    with pytest.raises(VaralignError, match="unknown task"):
        aggregate({"not_a_task": 1.0})


# ---- reshard -------------------------------------------------------------------------------------

def _tar_keys(path: Path) -> list[str]:
    with tarfile.open(path) as tf:
        return [n.rsplit(".", 1)[0] for n in tf.getnames() if n.endswith(".png")]


def test_reshard_repeats_not_found_and_layout(data: Path, tmp_path: Path) -> None:
    uids = [fake_uid(i) for i in range(300)]
    subset = uids[:40] + uids[150:155] * 3 + ["f" * 32, "e" * 32]
    make_subset(tmp_path / "s.npy", subset)
    r = reshard(data / "shards", tmp_path / "out", tmp_path / "s.npy", shard_size=16, num_workers=2, quiet=True)
    assert (r.input_samples, r.subset_unique, r.subset_size) == (300, 47, 57)
    assert (r.not_found, r.output_samples, r.output_shard_count) == (2, 55, 4)
    out = tmp_path / "out"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["output_shard_count"] == 4 and meta["not_found"] == 2 and meta["output_shard_format"] == "{:08d}.tar"
    keys = [k for i in range(4) for k in _tar_keys(out / f"{i:08d}.tar")]
    assert [json.loads((out / f"{i:08d}_stats.json").read_text())["successes"] for i in range(4)] == [16, 16, 16, 7]
    assert len(keys) == 55 and len(set(keys)) == 55
    assert {f"{uids[150]}-{j}" for j in range(3)} <= set(keys) and uids[0] in keys
    assert len(np.load(out / "sample_ids.npy")) == 57
    with tarfile.open(out / "00000000.tar") as tf:  # every member of a sample is copied
        assert sorted(n.split(".", 1)[1] for n in tf.getnames()[:3]) == ["json", "png", "txt"]
    # deterministic, whatever the number of workers
    r1 = reshard(data / "shards", tmp_path / "one", tmp_path / "s.npy", shard_size=16, num_workers=1, quiet=True)
    assert r1.output_samples == 55
    for i in range(4):
        assert (tmp_path / "one" / f"{i:08d}.tar").read_bytes() == (out / f"{i:08d}.tar").read_bytes()


def test_reshard_refuses_non_empty_output(data: Path, tmp_path: Path) -> None:
    make_subset(tmp_path / "s.npy", [fake_uid(1)])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000007.tar").write_bytes(b"stale")
    argv = ["reshard", "-i", str(data / "shards"), "-o", str(tmp_path / "out"), "-s", str(tmp_path / "s.npy"), "-q"]
    with pytest.raises(VaralignError, match="not empty"):
        run_cli(argv)
    with pytest.raises(VaralignError, match="holds no varalign reshard output"):  # not ours: never deleted
        run_cli([*argv, "--overwrite"])
    assert (tmp_path / "out" / "00000007.tar").read_bytes() == b"stale"
    (tmp_path / "out" / "00000007.tar").unlink()
    assert run_cli(argv) == 0
    (tmp_path / "out" / "notes.txt").write_text("the user's")
    with pytest.raises(VaralignError, match="holds a finished reshard"):
        run_cli(argv)
    # files named like shards that the earlier run (1 shard, in its meta.json) did not write are the user's, as is
    # a .reshard-work folder varalign did not create
    (tmp_path / "out" / "00000005.tar").write_bytes(b"mine")
    (tmp_path / "out" / ".reshard-work").mkdir()
    (tmp_path / "out" / ".reshard-work" / "keep.txt").write_text("mine")
    with pytest.raises(VaralignError, match=".reshard-work in the output directory was not created by varalign"):
        run_cli([*argv, "--overwrite"])
    (tmp_path / "out" / ".reshard-work" / "keep.txt").unlink()
    (tmp_path / "out" / ".reshard-work").rmdir()
    assert run_cli([*argv, "--overwrite"]) == 0  # replaces its own earlier output, nothing else
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00000000.tar", "00000000_stats.json", "00000005.tar", "meta.json", "notes.txt", "sample_ids.npy"]
    assert (tmp_path / "out" / "00000005.tar").read_bytes() == b"mine"
    # an unfinished run of an older varalign marked the folder before it counted its shards: which shard-named
    # files are its own is unknown, so none is removed and the run stops; its marker's count once there, it resumes
    from varalign.experiment.reshard import MARKER
    old = tmp_path / "old"
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"tool": "varalign reshard", "output_shard_format": "{:08d}.tar",
                                          "output_shard_stats_format": "{:08d}_stats.json"}))
    (old / "00000003_stats.json").write_text("{}")
    old_argv = ["reshard", "-i", str(data / "shards"), "-o", str(old), "-s", str(tmp_path / "s.npy"), "-q"]
    with pytest.raises(VaralignError, match=r"left 1 shard-named file\(s\) here \(first: 00000003_stats.json\)"):
        run_cli(old_argv)
    assert sorted(p.name for p in old.iterdir()) == [MARKER, "00000003_stats.json"]
    (old / "00000003_stats.json").rename(old / "notes-00000003.json")
    assert run_cli(old_argv) == 0
    assert sorted(p.name for p in old.iterdir()) == [
        "00000000.tar", "00000000_stats.json", "meta.json", "notes-00000003.json", "sample_ids.npy"]
    with pytest.raises(VaralignError, match="output directory is the input"):
        run_cli(["reshard", "-i", str(data / "shards"), "-o", str(data / "shards"), "-s", str(tmp_path / "s.npy")])
    with pytest.raises(VaralignError, match="subset file"):
        run_cli(["reshard", "-i", str(data / "shards"), "-o", str(tmp_path / "o2"), "-s", str(tmp_path / "nope.npy")])
    with pytest.raises(VaralignError, match="no .tar shards"):
        reshard(tmp_path, tmp_path / "o3", tmp_path / "s.npy", quiet=True)


def test_reshard_input_changed_between_its_passes(data: Path, tmp_path: Path, monkeypatch) -> None:
    """The write pass copies byte ranges found by the index pass: an input shard rewritten in between
    (same bytes, new modification time) or cut short is an error naming it, and no meta.json is written."""
    import importlib

    rs = importlib.import_module("varalign.experiment.reshard")  # the package's `reshard` is the function

    shards = tmp_path / "shards"
    shutil.copytree(data / "shards", shards)
    make_subset(tmp_path / "s.npy", [fake_uid(i) for i in range(0, 300, 3)])
    first = sorted(shards.glob("*.tar"))[0]
    real = rs._run_write
    for damage in ("touched", "truncated"):
        def write_after_damage(*args, damage=damage, **kwargs):
            data_ = first.read_bytes()
            if damage == "truncated":
                first.write_bytes(data_[: len(data_) // 2])
            else:
                os.utime(first, ns=(first.stat().st_atime_ns, first.stat().st_mtime_ns + 10**9))
            return real(*args, **kwargs)
        monkeypatch.setattr(rs, "_run_write", write_after_damage)
        out = tmp_path / f"out_{damage}"
        with pytest.raises(VaralignError) as err:
            reshard(shards, out, tmp_path / "s.npy", shard_size=16, num_workers=1, quiet=True)
        assert first.name in str(err.value) and ("changed" in str(err.value) or "short read" in str(err.value))
        assert not (out / "meta.json").exists()


def test_reshard_hashes_uid_when_json_has_none(tmp_path: Path) -> None:
    import hashlib

    make_train_shards(tmp_path / "shards", n=20, per_shard=10, with_uid=False)
    key = "000100012"  # sample 12 lives in shard 1
    make_subset(tmp_path / "s.npy", [hashlib.md5(f"00000001.tar/{key}".encode()).hexdigest()])
    r = reshard(tmp_path / "shards", tmp_path / "out", tmp_path / "s.npy", quiet=True)
    assert r.output_samples == 1 and r.not_found == 0


# ---- end to end (needs the `train` extra) --------------------------------------------------------

@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("open_clip_train")
    pytest.importorskip("clip_benchmark")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


TRAIN_FAST = ["--train_num_samples", "640", "--num_checkpoints", "2", "--batch_size", "32", "--warmup", "2"]


def test_embed_filter_reshard_train_evaluate(data: Path, tmp_path: Path, offline: None,
                                             capsys: pytest.CaptureFixture) -> None:
    import pyarrow.parquet as pq

    from varalign import filter_pool

    meta_dir = tmp_path / "pool"
    assert run_cli(["embed", str(data / "shards"), "--output_dir", str(meta_dir), "--model", "varalign-tiny",
                    "--random_init", "--arch", "b32", "--batch_size", "64", "--quiet"]) == 0
    table = pq.read_table(meta_dir / "00000001.parquet")
    npz = np.load(meta_dir / "00000001.npz")
    assert table.num_rows == 100 and npz["b32_img"].shape == (100, 64) and npz["b32_img"].dtype == np.float16
    assert table.column("uid").to_pylist()[0] == fake_uid(100)
    img, txt = npz["b32_img"].astype(np.float32), npz["b32_txt"].astype(np.float32)
    assert np.allclose(np.linalg.norm(img, axis=1), 1, atol=2e-3)
    score = table.column("clip_b32_similarity_score").to_numpy()
    assert np.array_equal(score, (img * txt).sum(1).astype(np.float16).astype(np.float32))
    # re-run: every shard reused; another model config is refused
    assert run_cli(["embed", str(data / "shards"), "--output_dir", str(meta_dir), "--model", "varalign-tiny",
                    "--random_init", "--arch", "b32", "--quiet"]) == 0
    with pytest.raises(VaralignError, match="another model"):
        run_cli(["embed", str(data / "shards"), "--output_dir", str(meta_dir), "--model", "varalign-tiny",
                 "--random_init", "--arch", "l14", "--quiet"])

    subset = tmp_path / "clip_score.npy"
    result = filter_pool(meta_dir, subset, "clip_score", arch="b32", fraction=0.5)
    kept = result.counts["selected"]
    assert 150 <= kept <= 160

    shards = tmp_path / "subset_shards"
    assert run_cli(["reshard", "-i", str(data / "shards"), "-o", str(shards), "-s", str(subset),
                    "--shard-size", "64", "-q"]) == 0
    assert json.loads((shards / "meta.json").read_text())["output_samples"] == kept

    out = tmp_path / "runs"
    assert run_cli(["train", "--scale", "tiny", "--data_dir", str(shards), "--output_dir", str(out),
                    "--exp_name", "cs", *TRAIN_FAST, "--quiet"]) == 0
    info = json.loads((out / "cs" / "info.json").read_text())
    assert info["scale"] == "tiny" and Path(info["checkpoint"]).name == "epoch_2.pt"
    assert Path(info["checkpoint"]).exists() and (out / "cs" / "checkpoints" / "epoch_latest.pt").exists()
    assert "--dataset-resampled" in info["open_clip_args"] and "{00000000..00000002}.tar" in " ".join(
        info["open_clip_args"])
    # reproducible: the same arguments give the same weights (open_clip_train's sample shuffle is seeded)
    assert run_cli(["train", "--scale", "tiny", "--data_dir", str(shards), "--output_dir", str(out),
                    "--exp_name", "cs_again", *TRAIN_FAST, "--quiet"]) == 0
    import torch

    first = torch.load(info["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    again = torch.load(out / "cs_again" / "checkpoints" / "epoch_2.pt", map_location="cpu",
                       weights_only=True)["state_dict"]
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    # resume: training again finds epoch_latest at the last epoch and finishes at once
    assert run_cli(["train", "--scale", "tiny", "--data_dir", str(shards), "--output_dir", str(out),
                    "--exp_name", "cs", *TRAIN_FAST, "--quiet"]) == 0
    # but not with another seed or other data: that would resume this model and label it with those
    before = sorted((p.relative_to(out), p.read_bytes()) for p in (out / "cs").rglob("*") if p.is_file())
    for flags, what in ((["--data_dir", str(shards), "--seed", "1"], "another seed"),
                        (["--data_dir", str(data / "shards")], "another data_dir")):
        with pytest.raises(VaralignError, match=f"cs: holds a training with {what} .*give another --exp_name"):
            run_cli(["train", "--scale", "tiny", *flags, "--output_dir", str(out), "--exp_name", "cs", *TRAIN_FAST,
                     "--quiet"])
    assert sorted((p.relative_to(out), p.read_bytes()) for p in (out / "cs").rglob("*") if p.is_file()) == before

    assert run_cli(["evaluate", "--train_output_dir", str(out / "cs"), "--data_dir", str(data / "eval"),
                    "--tasks", f"{MNIST},{FLICKR},vtab/cifar100,misc/winogavil", "--quiet"]) == 0
    lines = [json.loads(x) for x in (out / "cs" / "eval_results.jsonl").read_text().splitlines()]
    by_key = {x["key"]: x["metrics"] for x in lines}
    assert set(by_key) == {MNIST, FLICKR}
    assert 0 <= by_key[MNIST]["acc1"] <= by_key[MNIST]["acc5"] <= 1
    assert by_key[MNIST]["main_metric"] == by_key[MNIST]["acc1"]
    assert 0 <= by_key[FLICKR]["image_retrieval_recall@1"] <= by_key[FLICKR]["image_retrieval_recall@10"] <= 1
    assert by_key[FLICKR]["main_metric"] == pytest.approx(
        (by_key[FLICKR]["image_retrieval_recall@1"] + by_key[FLICKR]["text_retrieval_recall@1"]) / 2)
    summary = json.loads((out / "cs" / "eval_summary.json").read_text())
    assert set(summary["missing"]) == {"vtab/cifar100", "misc/winogavil"}
    assert summary["groups"][RETRIEVAL]["score"] is None and summary["groups"][RETRIEVAL]["n"] == 1
    table_md = (out / "cs" / "eval_results.md").read_text()
    assert "missing: no data" in table_md and "| MNIST (`mnist`) | acc1 |" in table_md
    # resumable: a second run evaluates nothing new
    run_cli(["evaluate", "--train_output_dir", str(out / "cs"), "--data_dir", str(data / "eval"),
             "--tasks", f"{MNIST},{FLICKR}", "--quiet"])
    assert len((out / "cs" / "eval_results.jsonl").read_text().splitlines()) == 2
    # another checkpoint into the same folder: its results are measured, not the first model's reused
    assert run_cli(["train", "--scale", "tiny", "--data_dir", str(shards), "--output_dir", str(out),
                    "--exp_name", "cs_seed1", "--seed", "1", *TRAIN_FAST, "--quiet"]) == 0
    epoch1 = out / "cs_seed1" / "checkpoints" / "epoch_2.pt"
    capsys.readouterr()
    assert varalign_main(["evaluate", "--use_model", f"varalign-tiny {epoch1}", "--output_dir", str(out / "cs"),
                          "--data_dir", str(data / "eval"), "--tasks", f"{MNIST},{FLICKR}", "--quiet"]) == 0
    lines = [json.loads(x) for x in (out / "cs" / "eval_results.jsonl").read_text().splitlines()]
    assert len(lines) == 4 and lines[0]["model_id"] != lines[2]["model_id"]
    assert lines[2]["model_id"]["checkpoint"].startswith("sha256:")
    summary = json.loads((out / "cs" / "eval_summary.json").read_text())
    assert summary["main_metrics"][MNIST] == {x["key"]: x for x in lines[2:]}[MNIST]["metrics"]["main_metric"]
    assert summary["info"]["checkpoint"] == str(epoch1)
    # a table edited since varalign wrote it is not replaced, though the summary beside it is varalign's
    (out / "cs" / "eval_results.md").write_text("my notes on this model\n")
    with pytest.raises(VaralignError, match="eval_results.md: exists and was not written by varalign"):
        run_cli(["evaluate", "--train_output_dir", str(out / "cs"), "--data_dir", str(data / "eval"),
                 "--tasks", f"{MNIST},{FLICKR}", "--quiet"])
    assert (out / "cs" / "eval_results.md").read_text() == "my notes on this model\n"
    (out / "cs" / "eval_results.md").unlink()

    # custom tasks: a folder of task folders (a DataComp key there stays DataComp's) and NAME=PATH, whose
    # kind is detected from its files or forced; reported beside DataComp's tasks, never in its groups
    tasks = tmp_path / "my_tasks"
    shutil.copytree(data / "eval" / MNIST, tasks / MNIST)
    shutil.copytree(data / "eval" / MNIST, tasks / "digits_again")
    shutil.copytree(data / "eval" / FLICKR, tmp_path / "captions")
    (tmp_path / "captions" / "dataset_type.txt").unlink()  # not declared: --task_kind forces retrieval
    argv = ["evaluate", "--train_output_dir", str(out / "cs"), "--output_dir", str(tmp_path / "ev"),
            "--tasks_dir", str(tasks), "--task", f"captions={tmp_path / 'captions'}",
            "--task_kind", "captions=retrieval", "--quiet"]
    capsys.readouterr()
    assert varalign_main(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "it/s" not in captured.err and "%|" not in captured.err  # --quiet silences clip_benchmark's bars
    summary = json.loads((tmp_path / "ev" / "eval_summary.json").read_text())
    m = summary["main_metrics"]
    assert set(m) == {MNIST, "digits_again", "captions"}
    assert m["digits_again"] == pytest.approx(by_key[MNIST]["acc1"]) == pytest.approx(m[MNIST])  # same data
    assert 0 <= m["captions"] <= 1
    assert summary["custom_tasks"]["captions"]["kind"] == "retrieval"
    assert summary["custom_tasks"]["digits_again"]["kind"] == "classification"
    assert summary["groups"][AVERAGE]["n"] == 1 and summary["missing"] == {}
    assert f"digits_again (custom classification): acc1 = {m['digits_again']:.4f}" in printed
    assert f"captions (custom retrieval): mean_recall@1 = {m['captions']:.4f}" in printed
    assert "| digits_again (custom classification:" in (tmp_path / "ev" / "eval_results.md").read_text()
    lines = [json.loads(x) for x in (tmp_path / "ev" / "eval_results.jsonl").read_text().splitlines()]
    assert {x["key"]: x.get("custom", False) for x in lines} == {MNIST: False, "digits_again": True,
                                                                 "captions": True}


def test_experiment_command(data: Path, tmp_path: Path, offline: None, monkeypatch: pytest.MonkeyPatch) -> None:
    uids = [fake_uid(i) for i in range(300)]
    make_subset(tmp_path / "half.npy", uids[:150])
    make_subset(tmp_path / "upsampled.npy", uids[:100] * 2)
    argv = ["experiment", "-i", str(data / "shards"), "-s", str(tmp_path / "half.npy"), str(tmp_path / "upsampled.npy"),
            "--output_dir", str(tmp_path / "exp"), "--scale", "tiny", "--eval_data_dir", str(data / "eval"),
            "--tasks", f"{MNIST},{FLICKR}", *TRAIN_FAST, "--quiet"]
    assert run_cli(argv) == 0
    rows = json.loads((tmp_path / "exp" / "comparison.json").read_text())
    assert [(r["subset"], r["samples"]) for r in rows] == [("half", 150), ("upsampled", 200)]
    assert all(0 <= r["main_metrics"][MNIST] <= 1 for r in rows)
    md = (tmp_path / "exp" / "comparison.md").read_text()
    assert "| half | 0 | 150 |" in md and "| upsampled | 0 | 200 |" in md
    info = json.loads((tmp_path / "exp" / "output" / "half_tiny_seed_0" / "info.json").read_text())
    assert run_cli(argv) == 0  # everything reused
    # the same folders spelled otherwise (relative, with ..): still everything reused, no training redone
    run = tmp_path / "exp" / "output" / "half_tiny_seed_0"
    kept = ("info.json", "out.log", "epoch_2.pt", "eval_results.jsonl")  # (evaluate's tables are rewritten)
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.name in kept}
    monkeypatch.chdir(tmp_path)
    respelled = [os.path.relpath(a, tmp_path) if a.startswith(str(tmp_path)) else a for a in argv]
    respelled[respelled.index("exp")] = "exp/../exp"
    assert run_cli(respelled) == 0
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.name in kept} == before and len(before) == 4
    # another subset under the same name: refused (its reshard is there), then with --overwrite resharded and
    # trained again from scratch (not the old model resumed, nor the old training reused)
    make_subset(tmp_path / "half.npy", uids[150:])
    with pytest.raises(VaralignError, match="holds a finished reshard"):
        run_cli(argv)
    assert run_cli([*argv, "--overwrite"]) == 0
    again = json.loads((tmp_path / "exp" / "output" / "half_tiny_seed_0" / "info.json").read_text())
    assert again["data"] != info["data"] and again["data_dir"] == info["data_dir"]
    assert "Start epoch 0" in (tmp_path / "exp" / "output" / "half_tiny_seed_0" / "out.log").read_text()
    assert "Loaded checkpoint" not in (tmp_path / "exp" / "output" / "half_tiny_seed_0" / "out.log").read_text()


def test_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(VaralignError, match="give --eval_data_dir .* and/or --task NAME=PATH / --tasks_dir DIR"):
        run_cli(["experiment", "-i", str(tmp_path), "-s", str(tmp_path / "s.npy"), "--output_dir",
                 str(tmp_path / "o"), "--scale", "tiny"])
    assert not (tmp_path / "o").exists()
    with pytest.raises(VaralignError, match="info.json"):
        run_cli(["evaluate", "--train_output_dir", str(tmp_path), "--data_dir", str(tmp_path)])
    with pytest.raises(VaralignError, match="training data directory not found"):
        run_cli(["train", "--scale", "tiny", "--data_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path)])
    with pytest.raises(VaralignError, match="unknown task"):
        run_cli(["evaluate", "--use_model", "ViT-B-32 x.pt", "--data_dir", str(tmp_path), "--tasks", "imagenet2k"])
    with pytest.raises(VaralignError, match="--pretrained"):
        run_cli(["embed", str(tmp_path), "--output_dir", str(tmp_path / "o"), "--model", "ViT-B-32"])


def test_embed_model_files_that_are_not_models_are_one_line(tmp_path: Path) -> None:
    """A model config that is not JSON, and a checkpoint that is not one (a .npy; a pickle that torch's
    weights-only loader refuses: its payload never runs), are one line each."""
    import pickle

    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(VaralignError, match="model config is not JSON"):
        _embed_load(None, None, str(tmp_path / "bad.json"), True, 0, "cpu")
    np.save(tmp_path / "good.npy", np.zeros(3))
    marker = tmp_path / "ran"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(_Evil(str(marker))))
    for ckpt, why in (("good.npy", "a numpy .npy array, not a model checkpoint"),
                      ("evil.pt", "not a weights-only checkpoint")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's pickle-protocol warning is not shown: the error says it
            with pytest.raises(VaralignError, match="cannot load open_clip model") as caught:
                _embed_load("varalign-tiny", str(tmp_path / ckpt), None, False, 0, "cpu")
        assert "\n" not in str(caught.value) and why in str(caught.value)
        assert "weights_only" not in str(caught.value)  # not torch's advice to load it unsafely
    assert not marker.exists()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path(self.marker).write_text, ("executed",))


def test_custom_task_missing_file_is_one_line(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    task = tmp_path / "shirts"
    shutil.copytree(data / "eval" / MNIST, task)
    (task / "zeroshot_classification_templates.txt").unlink()
    base = ["evaluate", "--use_model", "ViT-B-32 x.pt", "--output_dir", str(tmp_path / "ev")]
    assert varalign_main([*base, "--task", f"shirts={task}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(task) in err and "missing zeroshot_classification_templates.txt" in err
    assert varalign_main([*base, "--tasks_dir", str(tmp_path)]) == 1  # found there: the same check
    assert "missing zeroshot_classification_templates.txt" in capsys.readouterr().err
    (task / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    whole = (task / "test" / "0.tar").read_bytes()
    for bytes_, why in ((b"x\n", "not a readable tar"), (whole[: len(whole) // 2], "truncated tar")):
        (task / "test" / "0.tar").write_bytes(bytes_)  # before any model is loaded: one line naming the shard
        assert varalign_main([*base, "--task", f"shirts={task}"]) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and why in err and str(task / "test" / "0.tar") in err, err
    (task / "test" / "0.tar").unlink()
    assert varalign_main([*base, "--task", f"shirts={task}", "--task_kind", "shirts=retrieval"]) == 1
    assert "missing test/0.tar" in capsys.readouterr().err
    for bad, why in (([], "--data_dir"), (["--task", "shirts"], "NAME=PATH"), (["--task", f"mnist={task}"],
                     "DataComp"), (["--task", f"x={task}", "--task_kind", "x=multilabel"], "classification or")):
        assert varalign_main([*base, *bad]) == 1
        assert why in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize(("workers", "user", "expected"), [(1, None, "PASSIVE"), (0, None, None),
                                                          (1, "ACTIVE", "ACTIVE")])
def test_cpu_training_waits_passively(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int,
                                      user: str | None, expected: str | None) -> None:
    """On a CPU with data-loader workers, open_clip_train runs with OMP_WAIT_POLICY=PASSIVE (its OpenMP
    threads no longer spin against the workers); a value the user set is kept; no workers, nothing set."""
    import importlib
    import subprocess

    train_module = importlib.import_module("varalign.experiment.train")  # the package exports the function

    seen: dict = {}

    def fake_run(cmd: list[str], env: dict, **kwargs):  # records the child's environment, trains nothing
        seen.update(env)
        ckpt = tmp_path / "out" / "x" / "checkpoints"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "epoch_1.pt").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(train_module, "_gpu_count", lambda: 0)
    monkeypatch.setattr(train_module.subprocess, "run", fake_run)
    if user is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", user)
    make_train_shards(tmp_path / "shards", n=20, per_shard=10)
    result = train_module.train("tiny", tmp_path / "shards", tmp_path / "out", "x", workers=workers,
                               num_checkpoints=1, quiet=True)
    assert Path(result.checkpoint).name == "epoch_1.pt"
    assert seen.get("OMP_WAIT_POLICY") == expected


def test_reshard_index_piece_gives_the_same_members() -> None:
    """An index cut to a piece's rows (what a Ray write task receives) names the same members as the whole."""
    from varalign.experiment.reshard import _index_piece, _piece_members  # noqa: PLC0415

    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 30))
        copies = rng.integers(1, 4, n)
        per = rng.integers(1, 4, n)
        ptr = np.concatenate([[0], np.cumsum(per)])
        idx = {"uids": np.arange(n).astype("u8,u8"), "copies": copies, "ptr": ptr,
               "ext": np.array(["jpg", "txt", "json"] * int(ptr[-1]))[: ptr[-1]],
               "offset": rng.integers(0, 10**6, ptr[-1]), "size": rng.integers(1, 10**4, ptr[-1])}
        total = int(copies.sum())
        first = int(rng.integers(0, total))
        last = int(rng.integers(first + 1, total + 1))
        part, a, b = _index_piece(idx, np.concatenate([[0], np.cumsum(copies)]), first, last)
        assert _piece_members(part, a, b) == _piece_members(idx, first, last)


@pytest.mark.parametrize("case, message", [
    ("text", "not a readable tar shard"),
    ("missing", "training shard not found"),
    ("cut_at_member", "truncated tar shard: it does not end with tar's end-of-archive blocks"),
    ("cut_inside_member", "truncated tar shard"),
])
def test_train_refuses_a_bad_shard_before_training(data: Path, tmp_path: Path, case: str, message: str) -> None:
    """A shard that is not a tar with a sample is one line before open_clip starts (its loader would skip it
    with a warning a step, and with no good shard loop and log without end); the data folder is untouched."""
    from varalign.experiment.train import train_data_pattern

    folder = tmp_path / "d"
    folder.mkdir()
    shutil.copy(sorted((data / "shards").glob("*.tar"))[0], folder / "00000000.tar")
    if case == "text":
        (folder / "00000001.tar").write_text("x\n")
    elif case.startswith("cut"):  # a copy cut short: at the end of its 4th member's data, or inside it
        whole = (folder / "00000000.tar").read_bytes()
        with tarfile.open(folder / "00000000.tar") as tar:
            m = tar.getmembers()[3]
        end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        (folder / "00000001.tar").write_bytes(whole[: end if case == "cut_at_member" else m.offset_data + 10])
        if case == "cut_at_member":
            with tarfile.open(folder / "00000001.tar") as tar:  # what tarfile (so webdataset) sees: a 4-member tar
                assert len(tar.getmembers()) == 4
    else:  # a resharder's meta.json counting a shard that is not there
        (folder / "meta.json").write_text(json.dumps({"output_shard_count": 2, "output_samples": 10, "args": {}}))
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir())
    with pytest.raises(VaralignError, match=message) as caught:
        train_data_pattern(str(folder))
    assert "00000001.tar" in str(caught.value) and "\n" not in str(caught.value)
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir()) == before
    with pytest.raises(VaralignError, match=message):
        run_cli(["train", "--scale", "tiny", "--data_dir", str(folder), "--output_dir", str(tmp_path / "runs"),
                 "--exp_name", "m", "--quiet"])
    assert not (tmp_path / "runs" / "m").exists()


def test_evaluate_experiment_and_train_never_replace_a_users_files(data: Path, tmp_path: Path) -> None:
    """Files of the names evaluate, experiment and train write, which varalign did not write (the user's, or
    changed since), stop the command before any work, untouched; --overwrite replaces evaluate's and
    experiment's. What varalign wrote itself (its ledger, `owned.py`) is replaced on a re-run."""
    from varalign import owned

    out = tmp_path / "ev"
    out.mkdir()
    (out / "eval_results.md").write_text("my table\n")
    base = ["evaluate", "--use_model", "ViT-B-32 x.pt", "--output_dir", str(out), "--task", f"m={data / 'eval' / MNIST}"]
    with pytest.raises(VaralignError, match="eval_results.md: exists and was not written by varalign"):
        run_cli(base)  # before the model is loaded (x.pt does not exist: that would be the error otherwise)
    with pytest.raises(VaralignError, match="cannot load model"):
        run_cli([*base, "--overwrite"])  # allowed now: on to the model
    assert (out / "eval_results.md").read_text() == "my table\n"
    # the ledger: a file varalign wrote is replaceable until someone changes it
    (out / "eval_summary.json").write_text("{}\n")
    owned.record(out, ["eval_summary.json"])
    owned.check_replaceable(out, ["eval_summary.json"])
    (out / "eval_summary.json").write_text('{"edited": 1}\n')
    with pytest.raises(VaralignError, match="or was changed since"):
        owned.check_replaceable(out, ["eval_summary.json"])
    # files an older varalign wrote (no ledger) are known by their content: the evaluation goes on to the model
    (out / owned.LEDGER).unlink()
    (out / "eval_summary.json").write_text('{"main_metrics": {}, "groups": {}, "missing": {}}\n')
    with pytest.raises(VaralignError, match="cannot load model"):
        run_cli(base)
    # a file of the ledger's name that is not varalign's ledger is the user's: refused even with --overwrite
    for foreign in ('{"files": {}}\n', "my notes\n", '{"tool": "varalign", "files": []}\n'):
        (out / owned.LEDGER).write_text(foreign)
        for flags in ([], ["--overwrite"]):
            with pytest.raises(VaralignError, match=r"varalign-files\.json: exists and is not varalign's ledger"):
                run_cli([*base, *flags])
            assert (out / owned.LEDGER).read_text() == foreign
    (out / owned.LEDGER).unlink()
    (out / owned.LEDGER).symlink_to(out / "eval_results.md")
    with pytest.raises(VaralignError, match="is not varalign's ledger"):
        owned.record(out, ["eval_summary.json"])
    assert (out / owned.LEDGER).is_symlink() and (out / "eval_results.md").read_text() == "my table\n"
    (out / owned.LEDGER).unlink()

    make_subset(tmp_path / "s.npy", [fake_uid(1)])
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "comparison.md").write_text("mine\n")
    with pytest.raises(VaralignError, match="comparison.md: exists and was not written by varalign"):
        run_cli(["experiment", "-i", str(data / "shards"), "-s", str(tmp_path / "s.npy"), "--output_dir", str(exp),
                 "--scale", "tiny", "--eval_data_dir", str(data / "eval")])
    assert sorted(p.name for p in exp.iterdir()) == ["comparison.md"]

    (tmp_path / "runs" / "m").mkdir(parents=True)
    (tmp_path / "runs" / "m" / "info.json").write_text('{"mine": 1}\n')
    with pytest.raises(VaralignError, match="is not a varalign train info.json: not overwritten"):
        run_cli(["train", "--scale", "tiny", "--data_dir", str(data / "shards"), "--output_dir",
                 str(tmp_path / "runs"), "--exp_name", "m", "--quiet"])
    assert sorted(p.name for p in (tmp_path / "runs" / "m").iterdir()) == ["info.json"]
    (tmp_path / "runs" / "m" / "info.json").unlink()
    (tmp_path / "runs" / "m" / "params.txt").write_text("my parameters\n")  # a name open_clip_train writes
    with pytest.raises(VaralignError, match="m: exists, is not empty and holds no varalign training"):
        run_cli(["train", "--scale", "tiny", "--data_dir", str(data / "shards"), "--output_dir",
                 str(tmp_path / "runs"), "--exp_name", "m", "--quiet"])
    assert (tmp_path / "runs" / "m" / "params.txt").read_text() == "my parameters\n"
    # a write of info.json killed before its rename leaves only its temp: the folder is still new to train
    from varalign.experiment.train import _check_exp_dir

    (tmp_path / "runs" / "t").mkdir()
    (tmp_path / "runs" / "t" / ".info.json.varalign-abcd1234.tmp").write_text("{")
    assert _check_exp_dir(tmp_path / "runs" / "t", {}, "varalign-tiny") is False
    (tmp_path / "runs" / "t" / ".notes.varalign-abcd1234.tmp").write_text("mine")  # not info.json's temp
    with pytest.raises(VaralignError, match="holds no varalign training"):
        _check_exp_dir(tmp_path / "runs" / "t", {}, "varalign-tiny")
    # a training killed before its first checkpoint: its info.json says so, and evaluate says it is not finished
    (tmp_path / "runs" / "k").mkdir()
    (tmp_path / "runs" / "k" / "info.json").write_text(json.dumps(
        {"scale": "tiny", "checkpoint": None, "model": "varalign-tiny", "scale_config": {}, "open_clip_args": []}))
    with pytest.raises(VaralignError, match="info.json: training has not finished .*run the same train command"):
        run_cli(["evaluate", "--train_output_dir", str(tmp_path / "runs" / "k"), "--data_dir", str(data / "eval")])


def test_failed_training_names_its_cause_and_missing_eval_data_is_one_line(data: Path, tmp_path: Path) -> None:
    """A failed open_clip run's error line is its exception, not torch's last log line; an eval data folder that
    does not exist is one line before any work (not 38 tasks reported missing, after training)."""
    from varalign.experiment.train import _cause

    assert _cause(["Traceback (most recent call last):", '  File "x.py", line 1', "ValueError: Invalid lr: nan",
                   "I1206 12:00:00 torch/_dynamo/utils.py cache_misses: 0"]) == "ValueError: Invalid lr: nan"
    assert _cause(["torch.OutOfMemoryError: CUDA out of memory", "I1206 x"]).startswith("torch.OutOfMemoryError")
    assert _cause(["only a log line"]) == "only a log line" and _cause([]) == ""
    assert _cause(["[rank0]: RuntimeError: shapes differ", "torch.distributed.elastic.multiprocessing.errors."
                   "ChildFailedError:", "I1206 x"]) == "RuntimeError: shapes differ"  # torchrun's wrapper skipped
    with pytest.raises(VaralignError, match="eval data directory not found"):
        run_cli(["evaluate", "--use_model", "ViT-B-32 x.pt", "--data_dir", str(tmp_path / "nope"), "--output_dir",
                 str(tmp_path / "ev")])
    make_subset(tmp_path / "s.npy", [fake_uid(1)])
    with pytest.raises(VaralignError, match="eval data directory not found"):
        run_cli(["experiment", "-i", str(data / "shards"), "-s", str(tmp_path / "s.npy"), "--output_dir",
                 str(tmp_path / "exp"), "--scale", "tiny", "--eval_data_dir", str(tmp_path / "nope")])
    assert not (tmp_path / "exp").exists() and not (tmp_path / "ev").exists()


def test_a_tar_cut_at_a_member_boundary_is_reported(data: Path, tmp_path: Path) -> None:
    """A shard cut right after a member reads as a shorter whole tar (tarfile and webdataset stop there without a
    word): reshard names it among its failed shards (the samples before the cut are kept), embed refuses it."""
    shards = tmp_path / "in"
    shards.mkdir()
    first = sorted((data / "shards").glob("*.tar"))[0]
    with tarfile.open(first) as tar:
        members = tar.getmembers()
    cut = -(-(members[9].offset_data + members[9].size) // 512) * 512
    (shards / "00000000.tar").write_bytes(first.read_bytes()[:cut])
    make_subset(tmp_path / "s.npy", [fake_uid(i) for i in range(100)])
    r = reshard(shards, tmp_path / "out", tmp_path / "s.npy", quiet=True)
    assert len(r.failed_shards) == 1 and "truncated: no end-of-archive blocks" in r.failed_shards[0]
    assert 0 < r.output_samples < 100
    with pytest.raises(VaralignError, match="truncated tar: no end-of-archive blocks"):
        run_cli(["embed", str(shards), "--output_dir", str(tmp_path / "emb"), "--model", "varalign-tiny",
                 "--random_init", "--arch", "b32", "--device", "cpu", "--quiet"])


def test_train_leaves_out_empty_shards(data: Path, tmp_path: Path, capsys) -> None:
    """An empty tar (img2dataset's shard none of whose images came) is left out with a warning; only when every
    shard is empty is it an error."""
    from varalign.experiment.train import train_data_pattern

    folder = tmp_path / "d"
    folder.mkdir()
    for name in ("00000000.tar", "00000002.tar"):
        with tarfile.open(folder / name, "w"):
            pass
    with pytest.raises(VaralignError, match="every tar shard is empty"):
        train_data_pattern(str(folder))
    shutil.copy(sorted((data / "shards").glob("*.tar"))[0], folder / "00000001.tar")
    pattern, _ = train_data_pattern(str(folder))
    assert pattern == str(folder / "00000001.tar")
    assert "2 empty tar shard(s) left out" in capsys.readouterr().err
