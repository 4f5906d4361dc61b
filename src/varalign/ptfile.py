"""Read a numeric array from a torch `.pt` file without ever unpickling untrusted data.

The one `.pt` reader (targets, NormSim target files, DataComp's centroids and ImageNet-1k
features). A `.pt` holding a numpy array (DataComp's centroids, saved with pickle protocol 4,
which torch's `weights_only` reader cannot parse) is read by a restricted unpickler that resolves
only numpy's array-reconstruction globals, so torch is not needed for it; anything else (tensors,
dicts of tensors, the legacy format) goes through `torch.load(weights_only=True)` with the same
numpy allowlist added through `torch.serialization.safe_globals`. Any other global is refused.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import VaralignError

FEATURE_KEYS = ("image_features", "features", "embeddings")  # tried in order when no key is given


def load_pt(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """A numeric array from a `.pt`: a numpy array, a tensor, or a dict holding one under `key`
    (without `key`: the first of `FEATURE_KEYS` it holds; DataComp's in1k files use "image_features").

    Half-precision tensors (float16, bfloat16) come back as float32; other dtypes as stored.
    """
    path = Path(path)
    try:
        obj = _load_numpy_pickle(path)
    except _NeedsTorch:
        obj = _load_with_torch(path)
    if isinstance(obj, dict):
        name = key if key is not None else next((k for k in FEATURE_KEYS if k in obj), None)
        if name is None or name not in obj:
            raise VaralignError(f".pt holds a dict without key {key or FEATURE_KEYS[0]!r} "
                                f"(keys: {list(obj)[:8]})", path)
        obj = obj[name]
    if hasattr(obj, "detach"):  # a torch tensor
        obj = obj.detach().cpu()
        if obj.is_floating_point() and obj.element_size() < 4:  # float16 / bfloat16 (numpy has no bfloat16)
            obj = obj.float()
        obj = obj.numpy()
    if not isinstance(obj, np.ndarray) or obj.dtype.kind not in "fiu":
        what = f"{obj.dtype} array" if isinstance(obj, np.ndarray) else type(obj).__name__
        raise VaralignError(f".pt must hold a numeric tensor or array, found {what}", path)
    return obj


def _numpy_globals() -> dict[str, Any]:
    """The only globals a pickled numpy array needs: `_reconstruct`, `ndarray`, `dtype`."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return {
        "numpy.core.multiarray._reconstruct": _reconstruct,  # files written by numpy 1.x
        "numpy._core.multiarray._reconstruct": _reconstruct,  # ... by numpy 2.x
        "numpy.ndarray": np.ndarray,
        "numpy.dtype": np.dtype,
        "_codecs.encode": _latin1_encode,  # protocol 2 pickles bytes as codecs.encode(str, "latin1")
    }


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`codecs.encode` restricted to what pickle protocol 2 writes for bytes."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode allowed only as (str, 'latin1'), got {encoding!r}")
    return text.encode("latin1")


def torch_safe_globals() -> list[Any]:
    """Allowlist for `torch.serialization.safe_globals`: numpy's array reconstruction only."""
    dtype_classes = {type(np.dtype(c)) for c in np.typecodes["AllFloat"] + np.typecodes["AllInteger"] + "?"}
    names = [(obj, name) for name, obj in _numpy_globals().items() if name.endswith("_reconstruct")]
    return [*names, np.ndarray, np.dtype, *sorted(dtype_classes, key=str)]


class _NeedsTorch(Exception):
    """The pickle holds more than a numpy array: hand it to torch's weights_only reader."""


class _NumpyUnpickler(pickle.Unpickler):
    """Resolves numpy's array-reconstruction globals and nothing else (no persistent ids)."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _numpy_globals().get(f"{module}.{name}")
        if obj is None:  # tensors, OrderedDict, ... or an attack: torch's allowlist decides
            raise _NeedsTorch(f"{module}.{name}")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise _NeedsTorch("storage")


def _load_numpy_pickle(path: Path) -> Any:
    """Unpickle the `data.pkl` of a zip-format `.pt` with `_NumpyUnpickler`."""
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = next((n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            if pkl is None:
                raise VaralignError("not a torch .pt zip archive (no data.pkl)", path)
            data = zf.read(pkl)
    except zipfile.BadZipFile:
        raise _NeedsTorch("legacy format") from None
    except OSError as exc:
        raise VaralignError(f"cannot read .pt ({exc.strerror or exc})", path) from None
    try:
        return _NumpyUnpickler(io.BytesIO(data)).load()
    except _NeedsTorch:
        raise
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a refused/broken file
        raise VaralignError(f"cannot load .pt safely ({exc})", path) from None


def _load_with_torch(path: Path) -> Any:
    try:
        import torch  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise VaralignError("this .pt holds more than a numpy array: reading it needs torch "
                            "(pip install 'varalign[torch]'), or pass the array as .npy", path) from None
    try:
        with torch.serialization.safe_globals(torch_safe_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # we report the failure
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a refused or bad file
        raise VaralignError(f"cannot load .pt safely (weights_only=True): {torch_load_reason(exc)}", path) from None


def checkpoint_problem(exc: BaseException, path: object) -> str:
    """Why a model checkpoint did not load, in one line without torch's advice to load it unsafely: a numpy
    array, a pickle of objects torch's weights-only reader refuses (never unpickled), or the error itself."""
    try:
        with open(str(path), "rb") as fh:
            magic = fh.read(6)
    except (OSError, TypeError):
        magic = b""
    if magic == b"\x93NUMPY":
        return "a numpy .npy array, not a model checkpoint"
    if isinstance(exc, pickle.UnpicklingError) or "Weights only load failed" in str(exc):
        return (f"not a weights-only checkpoint ({torch_load_reason(exc)}): it holds pickled objects, which varalign "
                "never unpickles; save the weights with torch.save(model.state_dict(), PATH)")
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def torch_load_reason(exc: BaseException) -> str:
    """The informative line of a torch.load error (its weights_only errors wrap it in advice and ANSI codes)."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if ln.strip()]
    detail = next((ln for ln in lines if "nsupported" in ln or "Trying to" in ln),
                  lines[0] if lines else type(exc).__name__)
    detail = detail.replace("WeightsUnpickler error:", "").split(". Please")[0]
    return " ".join(detail.split())[:200]
