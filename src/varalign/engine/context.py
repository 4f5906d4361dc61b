"""What a Selector may ask of the engine: the pool's shards and masks, a map over shards through the
executor (results kept in the work directory, so a killed run resumes), and scratch space."""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ..atomic import atomic_path
from ..npz import load_npz

if TYPE_CHECKING:
    from ..npz import NpzMember
    from ..pool import Shard
    from .run import Run


@dataclass
class Mask:
    """A keep mask over the pool, stored one `.npy` per shard in the work dir (`phase` None: all rows)."""

    phase: str | None
    counts: list[int]  # rows set, per shard

    @property
    def total(self) -> int:
        return int(sum(self.counts))


def safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in label)


@dataclass
class Context:
    """One stage's view of the run. `label`: the stage's name in counts, columns and the manifest;
    `info`: its manifest entry (a Selector may add to it)."""

    run: Run
    label: str
    key: str  # digest of everything the stage depends on: names its resumable work
    info: dict[str, Any] = field(default_factory=dict)
    cols_phase: str | None = None  # where put_array keeps this run's per-shard arrays

    # -- the pool ---------------------------------------------------------------------------------
    @property
    def shards(self) -> list[Shard]:
        return self.run.shards

    @property
    def num_shards(self) -> int:
        return len(self.run.shards)

    @property
    def n_pool(self) -> int:
        return self.run.n_pool

    @property
    def threads(self) -> int:
        return self.run.threads

    @property
    def quiet(self) -> bool:
        return self.run.quiet

    @property
    def shared_filesystem(self) -> bool:
        """Whether tasks may write files the driver reads (local threads: yes; Ray workers: no)."""
        return self.run.executor.shared_filesystem

    def members(self, key: str, dim: int | None) -> list[NpzMember]:
        """Every shard's npz member `key` (validated before the run started)."""
        return self.run.members[(key, dim)]

    def mask(self, mask: Mask, i: int) -> np.ndarray:
        return self.run.mask(mask, i)

    def rows(self, alive: Mask, i: int) -> np.ndarray:
        """Shard-local row numbers of shard i's alive rows."""
        return self.run.rows(alive, i)

    def pool_rows(self, i: int) -> np.ndarray | None:
        """Shard i's rows in the pool (None: all; else the --given_uids_path restriction)."""
        return self.run.pool_rows(i)

    def expand(self, alive: Mask, i: int, keep: np.ndarray) -> np.ndarray:
        """A keep mask over the alive rows of shard i, as a mask over all its rows."""
        if alive.phase is None and isinstance(keep, np.ndarray) and keep.dtype == bool and keep.shape == (self.run.sizes[i],):
            return keep.copy()  # every row alive: the mask is `keep` itself
        a = self.mask(alive, i)
        out = np.zeros_like(a)
        out[np.flatnonzero(a)[keep]] = True
        return out

    def save_masks(self, masks: Iterable[np.ndarray]) -> Mask:
        """The stage's result: one keep mask per shard, in shard order."""
        return self.run.save_masks(self.label, masks)

    # -- work ---------------------------------------------------------------------------------------
    def map(self, name: str, fn: Callable[..., Any], tasks: Iterable[tuple[int, tuple]], desc: str,
            on_result: Callable[[int, Any], dict[str, np.ndarray]] | None = None
            ) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """`fn(*args)` for every `(i, args)` through the executor, yielding `(i, arrays)` in shard order.

        `on_result(i, result)` turns a new result into the arrays kept in the work directory (default:
        the result itself, a dict of arrays); a finished task of an earlier run is read back instead.
        """
        return self.run.map(f"{self._base()}-{name}", fn, tasks, desc, on_result)

    def mapper(self, desc: str) -> Callable[[Callable[..., Any], list[tuple]], list[Any]]:
        """`run(fn, tasks) -> results in order`: tasks on the run's executor (threads, or Ray tasks), kept
        nowhere (for passes that are cheap to redo, such as a VAS-D round over its candidate store)."""
        executor = self.run.executor

        def run(fn: Callable[..., Any], tasks: list[tuple]) -> list[Any]:
            return executor.map(fn, tasks, desc, quiet=True)
        run.workers = getattr(executor, "num_workers", 1)  # type: ignore[attr-defined] - how many tasks a call wants
        if not executor.shared_filesystem and hasattr(executor, "put"):
            run.put = executor.put  # type: ignore[attr-defined] - tasks cannot read the driver's files
        return run

    def scratch(self) -> Path:
        """A folder of the work directory for this stage's own files (kept for resume)."""
        return self.run.work.path(self._base())

    def state(self, name: str) -> tuple[dict[str, np.ndarray] | None, Callable[[dict], None] | None]:
        """A resumable state: the last one saved (or None), and the function that saves one."""
        if self.run.temp_dir is not None:  # no work directory to resume into
            return None, None
        path = self.scratch() / f"{name}.npz"
        state = None
        if path.exists():
            try:
                state = load_npz(path)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile):  # torn by a power loss: start over
                state = None

        def save(st: dict) -> None:
            with atomic_path(path, ".npz", durable=False) as tmp:
                with open(tmp, "wb") as fh:
                    np.savez(fh, **st)

        return state, save

    def put_array(self, kind: str, i: int, array: np.ndarray) -> None:
        """Keep shard i's array `kind` of this run, one value per row of the shard (e.g. a --save_scores
        column), in the work directory (one flat file per kind: see `flat.py`)."""
        self.run.put_array(f"{self._cols()}.{kind}", i, array)

    def get_array(self, kind: str, i: int) -> np.ndarray:
        return self.run.get_array(f"{self._cols()}.{kind}", i)

    def add_column(self, name: str, column: Callable[[int], pa.Array]) -> None:
        """A --save_scores column: `column(i)` is shard i's values (one per row)."""
        self.run.columns[name] = column

    def _base(self) -> str:
        return f"{safe(self.label)}-{self.key}"

    def _cols(self) -> str:
        if self.cols_phase is None:
            self.cols_phase = self.run.phase("cols", self.label)
        return self.cols_phase
