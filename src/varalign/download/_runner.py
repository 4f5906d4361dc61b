"""Child process that runs `img2dataset.download` for `varalign download` (`python _runner.py CONFIG.json`).

It runs in its own process group with img2dataset's workers; when its parent (the `varalign` command)
dies, even by SIGKILL, a watchdog thread kills the whole group, so no orphaned worker goes on writing
shards that a resumed run is rewriting. img2dataset spawns its workers, which run this file first
(as `__mp_main__`), so the settings at the top apply to every process of the group. Standard library
only: it is run by path, without importing the varalign package.
"""

import os
import sys
import types

# run by path, Python put this folder first on sys.path: its hub.py, plan.py, ... must not shadow other modules
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]

# albumentations (imported by img2dataset) asks PyPI for a newer version at import unless told not to
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"
# imports img2dataset makes but never uses here, kept out of every process: webdataset imports torch when it
# can (~1 GB and ~2 s per process), img2dataset's distributor module imports ray (we run its multiprocessing
# one), and its logger imports wandb, which it only calls with enable_wandb (pinned img2dataset 1.47.0)
sys.modules.setdefault("torch", None)
sys.modules.setdefault("ray", None)
if os.environ.get("VARALIGN_DOWNLOAD_WANDB") != "1":
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))


def _watch_parent(parent: int) -> None:
    import signal  # noqa: PLC0415
    import time  # noqa: PLC0415

    while os.getppid() == parent:
        time.sleep(0.2)
    os.killpg(0, signal.SIGKILL)


def main(config_path: str) -> None:
    import json  # noqa: PLC0415
    import threading  # noqa: PLC0415

    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    with open(config_path) as fh:
        config = json.load(fh)
    from img2dataset import download  # noqa: PLC0415

    download(**config)


if __name__ == "__main__":
    main(sys.argv[1])
