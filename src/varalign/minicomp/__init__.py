"""A small real-image DataComp-format pool with known noise (`varalign minicomp build`).

Needs the `train` extra (torch, open_clip_torch, open_clip_train, webdataset) plus scikit-learn and Pillow.
"""

from __future__ import annotations

from .build import LABEL_COLUMNS, BuildConfig, BuildResult, build

__all__ = ["LABEL_COLUMNS", "BuildConfig", "BuildResult", "build"]
