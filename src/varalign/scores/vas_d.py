"""VAS-D: VAS whose target is the selected data itself, refined by greedy backward elimination.

Reference semantics (ypwang61/VAS `load_uids_with_vas_d_filter`): the first target is the
second moment of the WHOLE pool (before the CLIP stage); every iteration scores the surviving
candidates against the current target, keeps the top `alive - chunk` (the last iteration keeps
exactly `target`), and recomputes the target over the survivors. We update the target by
subtracting the removed rows' outer products (float64) instead of recomputing it, and we
never ask for fewer than `target` rows (the reference crashes when `(num_iters-1)·chunk`
overshoots).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ..backend import ResidentRows, gram64_on, on_device, projector, quadratic_rows_on
from ..pool import Shard, embedding_member, iter_row_blocks
from ..select import top_k_parts

BLOCK_ROWS = 16384


class CandidateStore:
    """The candidates' embeddings (as stored: float16 for DataComp) in a flat file or in memory."""

    def __init__(self, rows: int, dim: int, dtype: np.dtype, path: str | None = None,
                 array: np.ndarray | None = None) -> None:
        self.rows, self.dim, self.dtype, self.path, self.array = rows, dim, np.dtype(dtype), path, array

    @classmethod
    def from_array(cls, array: np.ndarray) -> CandidateStore:
        return cls(len(array), array.shape[1], array.dtype, array=array)

    @classmethod
    def create(cls, path: str, rows: int, dim: int, dtype: np.dtype) -> CandidateStore:
        """A zero-filled store file; an existing one of the right size is kept (a resumed run)."""
        size = rows * dim * np.dtype(dtype).itemsize
        if not (os.path.exists(path) and os.path.getsize(path) == size):
            with open(path, "wb") as fh:
                fh.truncate(size)
        return cls(rows, dim, dtype, path=path)

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.array is not None:
            return np.asarray(self.array[start:stop])
        itemsize = self.dim * self.dtype.itemsize
        arr = np.fromfile(self.path, dtype=self.dtype, count=(stop - start) * self.dim, offset=start * itemsize)
        return arr.reshape(-1, self.dim)

    def gather(self, index: np.ndarray) -> np.ndarray:
        """Rows at sorted `index`, read run by run with pread (a memory map would count every page
        it touches in the process's RSS)."""
        if self.array is not None:
            return np.asarray(self.array[index])
        out = np.empty((len(index), self.dim), dtype=self.dtype)
        if not len(index):
            return out
        row_bytes = self.dim * self.dtype.itemsize
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(index)]])
        flat = out.reshape(-1).view(np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for a, b in zip(starts.tolist(), ends.tolist(), strict=True):
                size = (b - a) * row_bytes
                data = os.pread(fd, size, int(index[a]) * row_bytes)
                if len(data) != size:
                    raise OSError(f"short read from {self.path}")
                flat[a * row_bytes : b * row_bytes] = np.frombuffer(data, dtype=np.uint8)
        finally:
            os.close(fd)
        return out


def write_rows(path: str, row_offset: int, rows: np.ndarray) -> None:
    """Write rows into a CandidateStore file at a row offset (each worker owns its slice)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, np.ascontiguousarray(rows).tobytes(), row_offset * rows.shape[1] * rows.dtype.itemsize)
    finally:
        os.close(fd)


def collect_shard(shard: Shard, key: str, dim: int, pool_rows: np.ndarray | None, cand_rows: np.ndarray,
                  store_path: str | None, store_offset: int,
                  device: str = "cpu") -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One pass over a shard's embeddings: Gram of the pool rows and of the candidate rows
    (float64), and the candidate rows: written into the store at `store_offset`, or returned
    (third item) when `store_path` is None (a Ray worker on another node). On a torch `device`
    the Grams are computed there."""
    member = embedding_member(shard, key, dim)
    g_rest = np.zeros((dim, dim), dtype=np.float64)  # pool rows that are not candidates
    g_cand = np.zeros((dim, dim), dtype=np.float64)
    written = 0
    kept: list[np.ndarray] = []
    for start, block, _span, local in iter_row_blocks(member, cand_rows, BLOCK_ROWS, reuse=True):  # rows copied out
        in_pool = np.ones(len(block), dtype=bool)
        if pool_rows is not None:
            in_pool[:] = False
            lo, hi = np.searchsorted(pool_rows, [start, start + len(block)])
            in_pool[pool_rows[lo:hi] - start] = True
        in_pool[local] = False
        g_rest += gram64_on(block[in_pool], device)  # each row enters one Gram only: ~30% less work
        if len(local):
            picked = block[local]
            g_cand += gram64_on(picked, device)
            if store_path is not None:
                write_rows(store_path, store_offset + written, picked)
            else:
                kept.append(picked)
            written += len(picked)
    rows = None if store_path is not None else (np.concatenate(kept) if kept else np.empty((0, dim), member.dtype))
    return g_rest + g_cand, g_cand, rows


STATE_ROWS = 1 << 20  # candidates whose round state is in memory at a time (~25 MB whatever the pool)
REMOVED, LAST = "removed_at.i32", "last.f32"
# state blocks scored in one mapper call at most (16 × 2^20 candidates: ~84 MB of alive masks and scores): what
# keeps a Ray cluster of up to ~1,000 workers busy through a round (4 tasks a worker up to 256 workers)
MAX_GROUP = 16
STATE_FORMAT = 2  # checkpoints of the flat-file rounds (1: every candidate's state inside the checkpoint)
# candidates resident on a device keep their round state there too: it is written to the state files (and a
# checkpoint taken) after the first round that ends this many seconds after the last write, and after the last
# round. At DataComp-medium's 57.6M candidates a write is ~460 MB, well under a second; a killed run redoes
# about this much of its rounds (plus one round and the write it was in).
FLUSH_S = 30.0


class VasDResult:
    """The rounds' result, one record per candidate in two flat files (`state_dir`): `removed_at` (int32,
    the round that removed the candidate; `num_iters` if it survived) and `last` (float32, its VAS-D score
    at its last scoring). `part(start, stop)` reads a range; the whole-array properties are for small
    pools and tests."""

    def __init__(self, state_dir: str, rows: int, num_iters: int, chunk: int, keepalive: Any = None) -> None:
        self.state_dir, self.rows, self.num_iters, self.chunk = state_dir, rows, num_iters, chunk
        self._keepalive = keepalive  # a TemporaryDirectory when the caller gave no state_dir
        # how this process ran the rounds (a resumed run: only the rounds it ran): seconds copying the candidates
        # to the device, seconds of the rounds, rounds run, candidates scored over them, candidates on the device
        self.timing: dict[str, Any] = {"load_s": 0.0, "rounds_s": 0.0, "rounds_run": 0, "candidate_rounds": 0,
                                       "resident": False}

    def part(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(keep, removed_at, last_score) of candidates `[start, stop)`."""
        removed = _read(self.state_dir, REMOVED, np.int32, start, stop)
        return removed >= self.num_iters, removed, _read(self.state_dir, LAST, np.float32, start, stop)

    @property
    def keep(self) -> np.ndarray:
        return self.part(0, self.rows)[0]

    @property
    def removed_at(self) -> np.ndarray:
        return self.part(0, self.rows)[1]

    @property
    def last_score(self) -> np.ndarray:
        return self.part(0, self.rows)[2]


def _read(state_dir: str, name: str, dtype: Any, start: int, stop: int) -> np.ndarray:
    dtype = np.dtype(dtype)
    return np.fromfile(os.path.join(state_dir, name), dtype=dtype, count=max(stop - start, 0),
                       offset=start * dtype.itemsize)


def _write(state_dir: str, name: str, start: int, values: np.ndarray) -> None:
    fd = os.open(os.path.join(state_dir, name), os.O_WRONLY)
    try:
        data, pos = memoryview(np.ascontiguousarray(values).view(np.uint8)), start * values.dtype.itemsize
        while len(data):
            n = os.pwrite(fd, data, pos)
            data, pos = data[n:], pos + n
    finally:
        os.close(fd)


def _state_files_ok(state_dir: str, rows: int) -> bool:
    return all(os.path.isfile(os.path.join(state_dir, n)) and os.path.getsize(os.path.join(state_dir, n)) == rows * 4
               for n in (REMOVED, LAST))


def _resumable(state: dict, state_dir: str, rows: int, state_rows: int) -> bool:
    """Whether a checkpoint and the state files agree: this format's checkpoint, both files whole, and as
    many candidates alive in its round as it says (a round cut short only writes that round into
    `removed_at`, so it still agrees; a checkpoint next to files of another run, or files that lost a
    round's writes, does not)."""
    if int(state.get("state_format", -1)) != STATE_FORMAT or not _state_files_ok(state_dir, rows):
        return False
    it = int(state["it"])
    alive = sum(int(np.count_nonzero(_read(state_dir, REMOVED, np.int32, a, min(a + state_rows, rows)) >= it))
                for a in range(0, rows, state_rows))
    return alive == int(state["n_alive"])


def _rewind(state_dir: str, rows: int, it: int, num_iters: int, state_rows: int) -> None:
    """Undo, in the state files, the removals of rounds `it` and later (a killed run's rounds after its checkpoint):
    those candidates are alive again in round `it`. Rerun on another device (or the CPU) a round may score a
    candidate a float tie apart and keep one the killed run removed; rewound, the files still agree with the
    checkpoint's alive count whatever the rerun decides."""
    for a in range(0, rows, state_rows):
        b = min(a + state_rows, rows)
        removed_at = _read(state_dir, REMOVED, np.int32, a, b)
        later = (removed_at >= it) & (removed_at < num_iters)
        if later.any():
            removed_at[later] = num_iters
            _write(state_dir, REMOVED, a, removed_at)


def _init_state_files(state_dir: str, rows: int, num_iters: int, state_rows: int) -> None:
    for name, dtype, fill in ((REMOVED, np.int32, num_iters), (LAST, np.float32, np.nan)):
        with open(os.path.join(state_dir, name), "wb") as fh:
            for a in range(0, rows, state_rows):
                fh.write(np.full(min(state_rows, rows - a), fill, dtype=dtype).view(np.uint8))


def vas_d_iterate(store: CandidateStore, gram_candidates: np.ndarray, first_target: np.ndarray,
                  target_count: int, num_iters: int, num_workers: int = 1, quiet: bool = True,
                  block_rows: int = BLOCK_ROWS, state: dict[str, np.ndarray] | None = None,
                  checkpoint: Callable[[dict[str, np.ndarray]], None] | None = None,
                  device: str = "cpu", resident: bool | None = None, mapper: Mapper | None = None,
                  state_dir: str | None = None, state_rows: int = STATE_ROWS, flush_s: float = FLUSH_S,
                  on_round: Callable[[int], None] | None = None) -> VasDResult:
    """Greedy backward elimination from `store.rows` candidates down to `target_count`.

    Memory does not grow with the candidates: their per-candidate state (the round that removed each one,
    its last score) lives in two flat files in `state_dir` (a temporary folder if None), read and written
    `state_rows` candidates at a time, and each round's top-k is found by histogram passes over those files
    (`select.top_k_parts`, ties to the earliest candidates like `top_k_mask`). In memory: the target and
    the Gram of the kept rows (D×D) and one block of state.

    `checkpoint(state)` is called after every round with the small state (`it`, `target`, `gram_keep`,
    `n_alive`); passing it back with the same `state_dir` resumes after that round with identical results.
    A round reads a candidate as alive when `removed_at >= it` and only writes `it` into `removed_at`; a resumed
    run first resets the removals of the rounds after its checkpoint (a round cut short, or rounds written
    after an earlier checkpoint), so it resumes from the files whatever they hold of those rounds.
    On a torch `device`, `resident` copies the candidates (as stored, float16) to the device once
    and runs every round there; None (default) does so on an accelerator when they fit beside the
    rounds' working set (`backend.ResidentRows.fits`), and streams them from the store every round otherwise.
    Resident candidates keep their round state on the device as well (scores, top-k and removals never
    leave it; only the D×D target and Gram cross per round): the state files are then written, and
    `checkpoint` called, after the first round that ends `flush_s` seconds after the last write, and after
    the last round.
    `mapper(fn, tasks)`: runs a round's block tasks (the engine's executor); default: `num_workers` threads.
    `on_round(it)`: called after every round (progress, timing).
    """
    m = store.rows
    if target_count > m:
        raise ValueError(f"VAS-D target {target_count} exceeds the {m} candidates")
    chunk = math.ceil((m - target_count) / num_iters) if num_iters > 0 else 0
    keepalive = None
    if state_dir is None:
        keepalive = tempfile.TemporaryDirectory(prefix="varalign-vas-d-")
        state_dir = keepalive.name
    state_rows = max(block_rows, state_rows // block_rows * block_rows)  # whole blocks per state block
    if state is not None and not _resumable(state, state_dir, m, state_rows):
        state = None  # an earlier version's checkpoint, files gone, or files that do not match it: start over
    if state is not None:
        _rewind(state_dir, m, int(state["it"]), num_iters, state_rows)
    if state is None:
        _init_state_files(state_dir, m, num_iters, state_rows)
        state = {"it": np.int64(0), "target": np.asarray(first_target, dtype=np.float32),
                 "gram_keep": np.array(gram_candidates, dtype=np.float64), "n_alive": np.int64(m),
                 "state_format": np.int64(STATE_FORMAT)}
    start = int(state["it"])
    limits = threadpool_limits(limits=1)  # results must not depend on BLAS's thread count
    result = VasDResult(state_dir, m, num_iters, chunk, keepalive)
    try:
        t0 = time.perf_counter()
        with on_device(device) if device != "cpu" else contextlib.nullcontext():  # out of memory: one line
            rows = ResidentRows.load(store.read, store.rows, store.dim, store.dtype, device, block_rows,
                                     resident, index_rows=state_rows) if start < num_iters else None
            t1 = time.perf_counter()
            rounds = _Rounds(store, state_dir, state_rows, block_rows, device, rows,
                             mapper or thread_mapper(num_workers), on_round)
            if rows is not None:
                scored = rounds.run_resident(state, start, num_iters, chunk, target_count, quiet, checkpoint,
                                             flush_s)
            else:
                scored = rounds.run(state, start, num_iters, chunk, target_count, quiet, checkpoint)
        result.timing = {"load_s": t1 - t0, "rounds_s": time.perf_counter() - t1,
                         "rounds_run": max(0, num_iters - start),
                         "candidate_rounds": scored, "resident": rows is not None}
    finally:
        limits.restore_original_limits()
    return result


@dataclass
class _Rounds:
    store: CandidateStore
    state_dir: str
    state_rows: int
    block_rows: int
    device: str
    on_device: ResidentRows | None
    mapper: Mapper
    on_round: Callable[[int], None] | None = None

    def spans(self) -> Iterator[tuple[int, int]]:
        for a in range(0, self.store.rows, self.state_rows):
            yield a, min(a + self.state_rows, self.store.rows)

    def score_groups(self) -> Iterator[list[tuple[int, int]]]:
        """Consecutive state blocks scored in one call of the mapper: enough block tasks for ~4 per worker
        (a large Ray cluster is kept busy, not 64 tasks at a time), at most MAX_GROUP state blocks (~5 B
        a candidate in memory meanwhile: its alive flag and its new score; the last scores are read and
        written one block at a time)."""
        per_block = self.state_rows // self.block_rows
        workers = max(1, int(getattr(self.mapper, "workers", 1)))
        size = min(MAX_GROUP, max(1, -(-4 * workers // per_block)))
        spans = list(self.spans())
        for g in range(0, len(spans), size):
            yield spans[g : g + size]

    def alive(self, a: int, b: int, it: int) -> np.ndarray:
        return _read(self.state_dir, REMOVED, np.int32, a, b) >= it

    def run(self, state: dict, start: int, num_iters: int, chunk: int, target_count: int, quiet: bool,
            checkpoint) -> int:
        """Rounds `start`..`num_iters - 1`; returns the candidates scored over them (Σ alive per round)."""
        target, gram_keep, n_alive = state["target"], state["gram_keep"], int(state["n_alive"])
        scored = 0
        for it in tqdm(range(start, num_iters), desc="vas_d iterations", disable=quiet, leave=False,
                       initial=start, total=num_iters):
            scored += n_alive
            for group in self.score_groups():  # score every alive candidate against the current target
                alive = [self.alive(a, b, it) for a, b in group]
                scores = _score_alive(self.store, np.concatenate(alive), target, self.mapper, self.block_rows,
                                      self.device, offset=group[0][0])
                cuts = np.cumsum([int(np.count_nonzero(x)) for x in alive])[:-1]
                for (a, b), mask, part in zip(group, alive, np.split(scores, cuts), strict=True):
                    last = _read(self.state_dir, LAST, np.float32, a, b)
                    last[mask] = part
                    _write(self.state_dir, LAST, a, last)
            k = target_count if it == num_iters - 1 else max(target_count, n_alive - chunk)
            keeps = top_k_parts(functools.partial(self.alive_scores, it), k)
            removed_any = False
            pending = np.empty(0, dtype=np.int64)  # removed rows whose Gram is not subtracted yet
            for (a, b), keep in zip(self.spans(), keeps, strict=True):
                removed_at = _read(self.state_dir, REMOVED, np.int32, a, b)
                removed = np.flatnonzero(removed_at >= it)[~keep]
                if not len(removed):
                    continue
                removed_any = True
                removed_at[removed] = it
                _write(self.state_dir, REMOVED, a, removed_at)
                if it < num_iters - 1:
                    pending = self.subtract(gram_keep, np.concatenate([pending, a + removed]), final=False)
            if it < num_iters - 1:
                self.subtract(gram_keep, pending, final=True)
            n_alive = k
            if it < num_iters - 1 and removed_any:
                target = (gram_keep / n_alive).astype(np.float32)
            state |= {"it": np.int64(it + 1), "target": target, "gram_keep": gram_keep, "n_alive": np.int64(n_alive)}
            if checkpoint is not None:
                checkpoint(state)
            if self.on_round is not None:
                self.on_round(it)
        return scored

    def run_resident(self, state: dict, start: int, num_iters: int, chunk: int, target_count: int, quiet: bool,
                     checkpoint, flush_s: float) -> int:
        """`run` with the candidates and their round state on the device (`on_device`): the same rounds, the
        removed rows' Grams subtracted in the same blocks and order as `run` streaming the candidates to that
        device (so the targets do not depend on residency or `state_rows`; the scores are taken in other groups
        of rows, which may move one by a float rounding), so the same subset up to float ties. The state is
        read from the files once, and written back (then `checkpoint`) after the first round that ends
        `flush_s` seconds after the last write, and after the last round. The top-k is `top_k_parts`'s: the
        k-th largest alive score, every alive candidate above it, and the earliest of those equal to it."""
        rows, torch = self.on_device, self.on_device.torch
        dev = rows.dev
        removed_at = torch.empty(self.store.rows, dtype=torch.int32, device=dev)
        last = torch.empty(self.store.rows, dtype=torch.float32, device=dev)
        for a, b in self.spans():  # one state block of host memory at a time
            removed_at[a:b] = torch.from_numpy(_read(self.state_dir, REMOVED, np.int32, a, b)).to(dev)
            last[a:b] = torch.from_numpy(_read(self.state_dir, LAST, np.float32, a, b)).to(dev)
        target, gram_keep, n_alive = state["target"], state["gram_keep"], int(state["n_alive"])
        gram_dev = torch.from_numpy(np.ascontiguousarray(gram_keep, dtype=np.float64)).to(dev)
        scored, flushed = 0, time.perf_counter()
        for it in tqdm(range(start, num_iters), desc="vas_d iterations", disable=quiet, leave=False,
                       initial=start, total=num_iters):
            scored += n_alive
            s = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)).to(dev)
            for a, b in self.spans():  # as `run`: state block by state block, in steps of 4 store blocks
                index = torch.nonzero(removed_at[a:b] >= it).squeeze(1).add_(a)
                last[index] = rows.score(index, s)
            k = target_count if it == num_iters - 1 else max(target_count, n_alive - chunk)
            alive = removed_at >= it
            gone = _device_top_k(torch, last, alive, n_alive, k).logical_not_().logical_and_(alive)
            del alive
            removed_at.masked_fill_(gone, it)
            if it < num_iters - 1:  # as `subtract`: blocks of `block_rows` removed rows, the last one may be short
                pending = torch.empty(0, dtype=torch.int64, device=dev)
                for a, b in self.spans():
                    pending = torch.cat([pending, torch.nonzero(gone[a:b]).squeeze(1).add_(a)])
                    whole = len(pending) // self.block_rows * self.block_rows
                    for r in range(0, whole, self.block_rows):
                        gram_dev -= rows.gram64(pending[r : r + self.block_rows])
                    pending = pending[whole:]
                if len(pending):
                    gram_dev -= rows.gram64(pending)
            del gone
            removed_any, n_alive = k < n_alive, k
            if it < num_iters - 1 and removed_any:
                gram_keep = gram_dev.cpu().numpy()
                target = (gram_keep / n_alive).astype(np.float32)
            state |= {"it": np.int64(it + 1), "target": target, "gram_keep": gram_keep, "n_alive": np.int64(n_alive)}
            if it == num_iters - 1 or time.perf_counter() - flushed >= flush_s:
                self.flush(removed_at, last)
                if checkpoint is not None:
                    checkpoint(state)
                flushed = time.perf_counter()
            if self.on_round is not None:
                self.on_round(it)
        return scored

    def flush(self, removed_at: Any, last: Any) -> None:
        """The device's round state into the state files, one state block at a time."""
        for a, b in self.spans():
            _write(self.state_dir, REMOVED, a, removed_at[a:b].cpu().numpy())
            _write(self.state_dir, LAST, a, last[a:b].cpu().numpy())

    def alive_scores(self, it: int) -> Iterator[np.ndarray]:
        """The last scores of the candidates alive in round `it`, state block by state block."""
        for a, b in self.spans():
            yield _read(self.state_dir, LAST, np.float32, a, b)[self.alive(a, b, it)]

    def subtract(self, gram_keep: np.ndarray, rows: np.ndarray, final: bool) -> np.ndarray:
        """Subtract the Gram of `rows` (ascending) from `gram_keep` in place, a block of `block_rows` rows at
        a time, in the order the rounds held in memory did (consecutive blocks of the round's removed rows,
        so the float64 sums, and the subset, do not depend on `state_rows`); returns the rows of an
        incomplete last block, left for the next call unless `final`."""
        whole = len(rows) if final else len(rows) // self.block_rows * self.block_rows
        for s in range(0, whole, self.block_rows):
            gram_keep -= gram64_on(self.store.gather(rows[s : min(s + self.block_rows, whole)]), self.device)
        return rows[whole:]


def _device_top_k(torch, values: Any, alive: Any, n_alive: int, k: int, tie_rows: int = STATE_ROWS) -> Any:
    """`select.top_k_mask` of the alive `values` on the device, as a flag per candidate: the k-th largest alive
    value, the alive candidates above it, and the earliest alive candidates equal to it up to k. The k-th value
    comes from `torch.topk` of the smaller side (the k largest, or the n - k + 1 smallest) over all candidates
    with the others set to -inf (or +inf), where they rank last: 4 B a candidate, no index of the alive ones."""
    if k >= n_alive:
        return alive.clone()
    if k <= 0:
        return torch.zeros_like(alive)
    largest = k <= n_alive - k + 1
    masked = torch.where(alive, values, -math.inf if largest else math.inf)
    side = torch.topk(masked, k if largest else n_alive - k + 1, largest=largest, sorted=False).values
    kth = side.min() if largest else side.max()
    del masked, side
    keep = (values > kth).logical_and_(alive)
    need = k - int(keep.sum())
    for a in range(0, len(values), tie_rows):  # the earliest ties, a block at a time (ties may be most rows)
        if need <= 0:
            break
        ties = torch.nonzero((values[a : a + tie_rows] == kth).logical_and_(alive[a : a + tie_rows])).squeeze(1)
        ties = ties[:need].add_(a)
        keep[ties] = True
        need -= len(ties)
    return keep


Mapper = Callable[[Callable[..., Any], list[tuple]], list[Any]]


def thread_mapper(num_workers: int) -> Mapper:
    """`fn(*task)` for every task on `num_workers` threads (in order), the default `mapper`."""
    def run(fn: Callable[..., Any], tasks: list[tuple]) -> list[Any]:
        if num_workers <= 1 or len(tasks) <= 1:
            return [fn(*t) for t in tasks]
        with ThreadPoolExecutor(num_workers) as pool:
            return list(pool.map(lambda t: fn(*t), tasks))
    run.workers = num_workers  # type: ignore[attr-defined]
    return run


def score_block(store: CandidateStore, start: int, stop: int, alive: np.ndarray, target: np.ndarray,
                device: str = "cpu") -> np.ndarray:
    """VAS of the alive rows of one block of the store (a round's task)."""
    if not alive.any():
        return np.empty(0, dtype=np.float32)
    return quadratic_rows_on(store.read(start, stop)[alive], target, device)


def score_rows(block: np.ndarray, alive: np.ndarray, target: np.ndarray) -> np.ndarray:
    """VAS of the alive rows of a block held in memory (a round's task on a node without the store)."""
    if not alive.any():
        return np.empty(0, dtype=np.float32)
    return quadratic_rows_on(block[alive], target, "cpu")


def _score_alive(store: CandidateStore, alive: np.ndarray, target: np.ndarray, mapper: Mapper,
                 block_rows: int, device: str = "cpu", offset: int = 0) -> np.ndarray:
    """Scores of the alive candidates among `offset : offset + len(alive)` (`offset` a multiple of
    `block_rows`), block by block."""
    stop = offset + len(alive)
    starts = range(offset, stop, block_rows)
    if device != "cpu" or store.path is None:  # one device, or rows in this process's memory: here
        parts = [score_block(store, s, min(s + block_rows, stop), alive[s - offset : s - offset + block_rows], target,
                             device) for s in starts]
    elif getattr(mapper, "put", None) is not None:  # workers without the driver's files: blocks by reference
        refs = _block_refs(store, block_rows, mapper)[offset // block_rows :]
        parts = mapper(score_rows, [(ref, alive[s - offset : s - offset + block_rows], target)
                                    for ref, s in zip(refs, starts, strict=False)])
    else:
        parts = mapper(score_block, [(store, s, min(s + block_rows, stop), alive[s - offset : s - offset + block_rows],
                                      target, device) for s in starts])
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.float32)


def _block_refs(store: CandidateStore, block_rows: int, mapper: Mapper) -> list[Any]:
    """The store's blocks put once into the executor's object store (kept on the mapper for every round)."""
    cache = mapper.__dict__.setdefault("blocks", {})
    key = (store.path, block_rows)
    if key not in cache:
        cache[key] = [mapper.put(store.read(s, min(s + block_rows, store.rows)))
                      for s in range(0, store.rows, block_rows)]
    return cache[key]


def lowrank_basis(gram_candidates: np.ndarray, rank: int) -> np.ndarray:
    """The top-`rank` eigenvectors (D×rank, float32) of the candidates' second moment."""
    with threadpool_limits(limits=1):  # multi-threaded LAPACK is ~50x slower on this small matrix here
        _, vecs = np.linalg.eigh(gram_candidates)
    return np.ascontiguousarray(vecs[:, ::-1][:, :rank]).astype(np.float32)


def project_store(store: CandidateStore, basis: np.ndarray, block_rows: int = BLOCK_ROWS,
                  path: str | None = None, num_workers: int = 1, device: str = "cpu",
                  mapper: Mapper | None = None) -> CandidateStore:
    """The candidates projected onto `basis` (M×rank float32): into a file at `path` (read back block
    by block, so memory does not grow with the pool), or in memory without one. Blocks are
    projected by `mapper` (default: `num_workers` threads), one BLAS thread each (the same numbers
    whatever the core count), or on a torch `device`."""
    rank = basis.shape[1]
    starts = range(0, store.rows, block_rows)
    with threadpool_limits(limits=1):  # same numbers whatever the core count
        if path is None or device != "cpu":
            out = np.empty((store.rows, rank), dtype=np.float32) if path is None else None
            if path is not None:
                CandidateStore.create(path, store.rows, rank, np.dtype(np.float32))
            project = projector(basis, device)
            for start in starts:
                stop = min(start + block_rows, store.rows)
                part = project(store.read(start, stop))
                if out is not None:
                    out[start:stop] = part
                else:
                    write_rows(path, start, np.ascontiguousarray(part, dtype=np.float32))
            if out is not None:
                return CandidateStore.from_array(out)
            return CandidateStore(store.rows, rank, np.dtype(np.float32), path=path)
        projected = CandidateStore.create(path, store.rows, rank, np.dtype(np.float32))
        if mapper is not None and getattr(mapper, "put", None) is not None:  # workers without the driver's files
            refs = _block_refs(store, block_rows, mapper)
            for start, part in zip(starts, mapper(project_rows, [(ref, basis) for ref in refs]), strict=True):
                write_rows(path, start, part)
            return projected
        tasks = [(store, start, min(start + block_rows, store.rows), basis, path) for start in starts]
        (mapper or thread_mapper(num_workers))(project_block, tasks)
    return projected


def project_rows(block: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """One block projected onto `basis` (float32, C order), returned to the driver."""
    return np.ascontiguousarray(projector(basis, "cpu")(block), dtype=np.float32)


def project_block(store: CandidateStore, start: int, stop: int, basis: np.ndarray, path: str) -> None:
    """Project one block of the store onto `basis` and write it at the same rows of the file at `path`."""
    part = projector(basis, "cpu")(store.read(start, stop))
    write_rows(path, start, np.ascontiguousarray(part, dtype=np.float32))
