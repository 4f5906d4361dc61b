import numpy as np
import pyarrow.parquet as pq

from varalign.cli import main
from varalign.uids import UID_DTYPE


def test_demo_runs_and_reuses_pool(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out_dir", str(out), "--num_samples", "2000", "--num_shards", "2", "--num_iters", "3",
            "--quiet"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "SYNTHETIC" in first
    for name, selected in (("clip_score", None), ("vas", 600), ("vas_d", 600)):
        uids = np.load(out / "uids" / f"{name}.npy")
        assert uids.dtype == UID_DTYPE
        if selected:
            assert len(uids) == selected
        assert f"{out / 'uids' / name}.npy" in first
        assert (out / "uids" / f"{name}.manifest.json").exists()
        assert pq.read_table(out / "scores" / f"{name}.parquet").num_rows == 2000
    html = (out / "report.html").read_text()
    assert "report (open in a browser)" in first and "vas_d" in html and "synthetic_caption_kind" in html
    assert main(args) == 0
    assert "generating" not in capsys.readouterr().out  # the pool is reused
