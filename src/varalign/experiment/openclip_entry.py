"""`python -m varalign.experiment.openclip_entry ARGS`: open_clip_train's main with varalign's model configs.

Registers the JSON model config named by `$VARALIGN_MODEL_CONFIG` (e.g. the `tiny` model) before
handing the arguments to `open_clip_train.main.main`; works under `torchrun` too.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    import open_clip
    from open_clip_train.main import main as train_main

    config = os.environ.get("VARALIGN_MODEL_CONFIG")
    if config:
        open_clip.add_model_config(config)
    ret = train_main(argv)
    return 1 if ret == -1 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
