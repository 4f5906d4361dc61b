"""The work directory: one result file + completion marker per finished shard task, so a killed
run resumes where it stopped (datatrove-style). Results are plain numpy arrays (never pickle)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_path, save_json


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (the identity of a plan or a phase)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class WorkDir:
    """`{root}/plan.json` + `{root}/{phase}/{shard}.npz` with `{shard}.done` markers."""

    def __init__(self, root: str | os.PathLike, plan: str) -> None:
        self.root = Path(root)
        self.plan = plan
        meta = self.root / "plan.json"
        if meta.exists():
            try:
                same = json.loads(meta.read_text()).get("plan") == plan
            except (OSError, ValueError):
                same = False
            if not same:  # inputs or configuration changed: nothing in here is valid
                shutil.rmtree(self.root)
        self.created = not self.root.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        if not meta.exists():
            save_json(meta, {"plan": plan})
        self.reused = 0

    def path(self, phase: str, name: str = "") -> Path:
        d = self.root / phase
        d.mkdir(exist_ok=True)
        return d / name if name else d

    def has(self, phase: str, name: str) -> bool:
        """Whether the task `name` of `phase` has finished."""
        return (self.root / phase / f"{name}.done").exists()

    def load(self, phase: str, name: str) -> dict[str, np.ndarray] | None:
        """A finished task's arrays, or None if it has not finished."""
        if not (self.root / phase / f"{name}.done").exists():
            return None
        with np.load(self.root / phase / f"{name}.npz", allow_pickle=False) as npz:
            self.reused += 1
            return {k: npz[k] for k in npz.files}

    def save(self, phase: str, name: str, arrays: dict[str, np.ndarray]) -> None:
        """Write the result atomically, then its completion marker."""
        with atomic_path(self.path(phase, f"{name}.npz"), ".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        (self.root / phase / f"{name}.done").touch()

    def read(self, phase: str, name: str, key: str) -> np.ndarray | None:
        """One array of a finished task's result (not counted as reused), or None if there is none."""
        path = self.root / phase / f"{name}.npz"
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as npz:
            return npz[key]

    def put_array(self, phase: str, name: str, array: np.ndarray) -> None:
        """Store one array of the run's own state (a keep mask, a column) as `{phase}/{name}.npy`."""
        with atomic_path(self.path(phase, f"{name}.npy"), ".npy") as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, array, allow_pickle=False)

    def get_array(self, phase: str, name: str) -> np.ndarray:
        """An array stored by `put_array`."""
        return np.load(self.root / phase / f"{name}.npy", allow_pickle=False)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
