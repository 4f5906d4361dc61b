"""`python -m varalign.experiment.openclip_entry ARGS`: open_clip_train's main with varalign's model configs.

Registers the JSON model config named by `$VARALIGN_MODEL_CONFIG` (e.g. the `tiny` model) before
handing the arguments to `open_clip_train.main.main`; works under `torchrun` too.

It also makes the training data order reproducible: open_clip_train's sample shuffle
(`webdataset.shuffle` without an rng) seeds itself from the process id and the clock, so two runs
with the same `--seed` saw the samples in different orders. Here that buffer shuffle draws from
`random.Random` seeded by (`--seed`, dataloader worker, how many times this worker started a pass),
so a run is repeatable given its arguments, and each epoch still gets a new order.
"""

from __future__ import annotations

import itertools
import os
import random
import sys


def _seed_from(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg == "--seed" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--seed="):
            return int(arg.split("=", 1)[1])
    return 0  # open_clip_train's default


def seed_sample_shuffle(seed: int) -> None:
    """Give `webdataset.shuffle` a seeded default rng (see the module docstring)."""
    import torch.utils.data
    import webdataset
    import webdataset.filters as wf

    passes = itertools.count()
    original = wf._shuffle

    def _seeded_shuffle(data, bufsize=1000, initial=100, rng=None, handler=None):
        if rng is None:
            info = torch.utils.data.get_worker_info()
            worker = info.id if info is not None else -1
            rng = random.Random(f"varalign-shuffle-{seed}-{worker}-{next(passes)}")
        return original(data, bufsize, initial, rng, handler)

    shuffle = wf.pipelinefilter(_seeded_shuffle)
    webdataset.shuffle = shuffle
    wf.shuffle = shuffle


def main(argv: list[str]) -> int:
    import open_clip
    from open_clip_train.main import main as train_main

    config = os.environ.get("VARALIGN_MODEL_CONFIG")
    if config:
        open_clip.add_model_config(config)
    seed_sample_shuffle(_seed_from(argv))
    ret = train_main(argv)
    return 1 if ret == -1 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
