"""The experiment loop of DataComp / VAS (run_exp.sh): embed, reshard, train, evaluate, compare.

Heavy dependencies (torch, open_clip_torch, clip_benchmark, webdataset) are imported inside the
functions, so importing this package (and `reshard` and the 38-task aggregation) needs varalign's
core dependencies only. The functions are bound here eagerly: a lazy wrapper named like its
submodule (`evaluate`) would be replaced by the submodule object as soon as that is imported.
"""

from __future__ import annotations

from .embed import embed
from .evaluate import evaluate
from .experiment import run_experiment
from .reshard import ReshardResult, reshard
from .tasks import TASKS, aggregate
from .train import train

__all__ = ["TASKS", "ReshardResult", "aggregate", "embed", "evaluate", "reshard", "run_experiment", "train"]
