"""The local executor: per-shard tasks on a thread pool, one BLAS thread per task.

Threads, not processes: the heavy steps (zlib-ng inflate, float16 decode, BLAS, parquet
decode) release the GIL, so two threads keep both cores busy (measured ~1.9x on 2 cores,
benchmarks/bench_filter.py) without a process start-up cost or copying results between
processes. The Ray executor runs the same task functions in separate processes.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm


def default_workers() -> int:
    """Cores this process may use."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


@contextlib.contextmanager
def single_threaded_kernels(active: bool) -> Iterator[None]:
    """While tasks run in parallel, give each one BLAS (and torch) thread."""
    if not active:
        yield
        return
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch else None
    with threadpool_limits(limits=1):
        if torch:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            if torch and before:
                torch.set_num_threads(before)


def run_tasks(fn: Callable[..., Any], tasks: Sequence[tuple], num_workers: int, desc: str,
              quiet: bool = False, unit: str = "shard") -> list[Any]:
    """Call `fn(*task)` for every task; results in task order. The first error stops the run."""
    results: list[Any] = [None] * len(tasks)
    parallel = num_workers > 1 and len(tasks) > 1
    with tqdm(total=len(tasks), desc=desc, unit=unit, disable=quiet, leave=False) as bar, \
            single_threaded_kernels(parallel):
        if not parallel:
            for i, task in enumerate(tasks):
                results[i] = fn(*task)
                bar.update()
            return results
        with ThreadPoolExecutor(max_workers=min(num_workers, len(tasks))) as pool:
            futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for fut in done:
                        results[futures[fut]] = fut.result()
                        bar.update()
            finally:
                for fut in pending:
                    fut.cancel()
    return results
