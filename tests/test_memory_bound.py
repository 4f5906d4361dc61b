"""Peak memory does not grow with the pool: a run over 12M rows fits in what a run over 1M rows left
allocated plus 32 MiB, under a hard limit (`RLIMIT_DATA`) set in a subprocess.

A structure of even 8 bytes per row (e.g. every shard's row numbers made up front, as the engine did
before issue 17: 96 MB here) does not fit, and the run dies with MemoryError. The first run (1M rows,
16 shards, more than a window of them) warms every buffer a run keeps: the arrays of one window of
shards, the uid merge's budget, thread stacks, allocator arenas; whatever the second run needs on top
of that is what grows with the pool. No timing is measured.

Calibration (2 AMD EPYC cores, 24 GiB): the run over 12M rows needed < 16 MiB over the warm state;
the engine before issue 17 needed more than 48 MiB at 8M rows. The limit counts private writable
memory (heap, anonymous maps, thread stacks), not the pool's files read nor the output file mapped
read-only; glibc is held to 2 malloc arenas and pyarrow to the system allocator, so that a new arena
or a reserved mimalloc segment (virtual memory reserved, not used) cannot fail a run that fits.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import varalign
from varalign.uids import uids_to_hex

ROWS_PER_SHARD = 62_500
WARM_SHARDS, BIG_SHARDS = 16, 192  # 1M and 12M rows
MARGIN = 32 << 20

CHILD = textwrap.dedent('''
    import json, resource, sys
    from dataclasses import dataclass
    from pathlib import Path

    import numpy as np

    import varalign.engine.job as job
    from varalign import filter_pool
    from varalign.methods.base import Method, Score, register


    @dataclass
    class NoParams:
        pass


    def row_score(shard, rows):  # a cheap number per row: the engine's work is what is measured
        return ((rows.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1000003)).astype(np.float32)


    register(Method("row_hash", "a number per row, from its row number", NoParams, lambda p, run: Score(fn=row_score)))


    def vm_data():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024


    recipe, warm, big, out, margin = sys.argv[1:6]
    filter_pool(warm, f"{out}/warm.npy", recipe=recipe, quiet=True, num_workers=2)
    # the subset file is returned memory-mapped copy-on-write: 16 B of private mapping per selected row
    # that no one touches here; read-only it is not counted by RLIMIT_DATA
    job.open_subset = lambda p: np.load(p, mmap_mode="r", allow_pickle=False)
    base = vm_data()
    resource.setrlimit(resource.RLIMIT_DATA, (base + int(margin), resource.RLIM_INFINITY))
    try:
        res = filter_pool(big, f"{out}/big.npy", recipe=recipe, quiet=True, num_workers=2)
    except MemoryError:
        print(json.dumps({"ok": False}))
        sys.exit(3)
    print(json.dumps({"ok": True, "selected": res.counts["selected"], "pool": res.counts["pool"]}))
''')


def _uid_pool(root: Path, shards: int, seed: int) -> Path:
    """Parquet-only shards of random uids (all a recipe without a parquet score column needs)."""
    root.mkdir()
    for i in range(shards):
        words = np.random.default_rng([seed, i]).integers(0, 2**64 - 1, size=(ROWS_PER_SHARD, 2), dtype=np.uint64)
        uids = np.empty(ROWS_PER_SHARD, dtype="u8,u8")
        uids["f0"], uids["f1"] = words[:, 0], words[:, 1]
        pq.write_table(pa.table({"uid": uids_to_hex(uids)}), root / f"{i:06d}.parquet")
    return root


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc/self/status: Linux")
def test_a_pool_twelve_times_larger_fits_in_a_fixed_margin(tmp_path: Path) -> None:
    warm = _uid_pool(tmp_path / "warm", WARM_SHARDS, 1)
    big = _uid_pool(tmp_path / "big", BIG_SHARDS, 2)
    recipe = tmp_path / "rowhash.toml"
    recipe.write_text('name = "rowhash"\n[[stages]]\nscore = "row_hash"\nfraction = 0.5\n')
    out = tmp_path / "out"
    out.mkdir()
    proc, result = _run_child(tmp_path, CHILD, [recipe, warm, big, out, MARGIN], ARROW_DEFAULT_MEMORY_POOL="system")
    assert proc.returncode == 0 and result["ok"], (
        f"the run over {BIG_SHARDS * ROWS_PER_SHARD:,} rows did not fit in {MARGIN >> 20} MiB over the state a "
        f"{WARM_SHARDS * ROWS_PER_SHARD:,}-row run left: something grows with the pool\n{proc.stderr[-3000:]}")
    assert result["pool"] == BIG_SHARDS * ROWS_PER_SHARD and result["selected"] == result["pool"] // 2


ROUNDS_CHILD = textwrap.dedent('''
    import json, resource, sys
    from pathlib import Path

    import numpy as np

    from varalign.scores.vas_d import CandidateStore, write_rows, vas_d_iterate

    DIM, BLOCK = 4, 1 << 16


    def vm_data():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024


    def store(path, rows, seed):
        st = CandidateStore.create(path, rows, DIM, np.dtype(np.float16))
        gram = np.zeros((DIM, DIM))
        for a in range(0, rows, BLOCK):  # written block by block: the test's own memory stays flat too
            f = np.random.default_rng([seed, a]).standard_normal((min(BLOCK, rows - a), DIM)).astype(np.float16)
            write_rows(path, a, f)
            f32 = f.astype(np.float32)
            gram += f32.T.astype(np.float64) @ f32
        return st, gram


    def rounds(st, gram, state_dir):
        Path(state_dir).mkdir()
        target = (gram / st.rows).astype(np.float32)
        res = vas_d_iterate(st, gram, target, st.rows // 2, 3, num_workers=2, state_dir=state_dir,
                            state_rows=1 << 18)
        kept = 0
        for a in range(0, st.rows, BLOCK):
            kept += int(res.part(a, min(a + BLOCK, st.rows))[0].sum())
        return kept


    out, warm_rows, big_rows, margin = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    warm, warm_gram = store(f"{out}/warm.bin", warm_rows, 1)
    rounds(warm, warm_gram, f"{out}/warm_rounds")
    big, big_gram = store(f"{out}/big.bin", big_rows, 2)
    base = vm_data()
    resource.setrlimit(resource.RLIMIT_DATA, (base + margin, resource.RLIM_INFINITY))
    try:
        kept = rounds(big, big_gram, f"{out}/big_rounds")
    except MemoryError:
        print(json.dumps({"ok": False}))
        sys.exit(3)
    print(json.dumps({"ok": True, "kept": kept}))
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA and /proc/self/status: Linux")
def test_vas_d_rounds_over_twelve_million_candidates_fit_in_a_fixed_margin(tmp_path: Path) -> None:
    """VAS-D's greedy rounds keep no per-candidate array in memory (their state is two flat files, read a
    block at a time; 256k here): 12M candidates' rounds fit in 32 MiB over what 2M candidates' rounds left
    allocated. glibc's mmap threshold is pinned (MALLOC_MMAP_THRESHOLD_) because its dynamic threshold
    otherwise lets a freed block's size decide whether the next one counts in VmData. The rounds before
    (alive, removal round and last score in RAM, 9 B per candidate, and ~20 B per live candidate during a
    round) needed ~100 MB more here and fail."""
    warm, big = 2_000_000, 12_000_000
    proc, result = _run_child(tmp_path, ROUNDS_CHILD, [tmp_path, warm, big, MARGIN], MALLOC_MMAP_THRESHOLD_="131072")
    assert proc.returncode == 0 and result["ok"], (
        f"VAS-D's rounds over {big:,} candidates did not fit in {MARGIN >> 20} MiB over the state {warm:,} "
        f"candidates' rounds left: something grows with the candidates\n{proc.stderr[-3000:]}")
    assert result["kept"] == big // 2


def _run_child(tmp_path: Path, code: str, args: list, **env: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `code` in a fresh Python with varalign importable and glibc held to two arenas (plus `env`):
    the process and the JSON of its last stdout line ({"ok": False} when there is none)."""
    child = tmp_path / "child.py"
    child.write_text(code)
    src = str(Path(varalign.__file__).resolve().parents[1])
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
                MALLOC_ARENA_MAX="2", **env)
    proc = subprocess.run([sys.executable, str(child), *map(str, args)], capture_output=True, text=True, env=full)
    lines = proc.stdout.strip().splitlines()
    return proc, json.loads(lines[-1]) if lines else {"ok": False}
