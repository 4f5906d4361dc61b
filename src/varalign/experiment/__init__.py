"""The experiment loop of DataComp / VAS (run_exp.sh): embed, reshard, train, evaluate, compare.

Heavy dependencies (torch, open_clip_torch, clip_benchmark, webdataset) are imported lazily, so
`reshard` and the 38-task aggregation work with varalign's core dependencies only.
"""

from __future__ import annotations

from .reshard import ReshardResult, reshard
from .tasks import TASKS, aggregate

__all__ = ["TASKS", "ReshardResult", "aggregate", "embed", "evaluate", "reshard", "run_experiment", "train"]


def embed(*args, **kwargs):
    """See `varalign.experiment.embed.embed`."""
    from .embed import embed as _embed

    return _embed(*args, **kwargs)


def train(*args, **kwargs):
    """See `varalign.experiment.train.train`."""
    from .train import train as _train

    return _train(*args, **kwargs)


def evaluate(*args, **kwargs):
    """See `varalign.experiment.evaluate.evaluate`."""
    from .evaluate import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def run_experiment(*args, **kwargs):
    """See `varalign.experiment.experiment.run_experiment`."""
    from .experiment import run_experiment as _run

    return _run(*args, **kwargs)
