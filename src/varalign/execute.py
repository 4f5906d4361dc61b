"""Executors: run a list of per-shard tasks, locally (threads) or on a Ray cluster, same results.

Local: threads, not processes. The heavy steps (zlib-ng inflate, float16 decode, BLAS, parquet
decode) release the GIL, so two threads keep both cores busy without a process start-up cost
or copying results between processes; each task gets one BLAS thread.
Ray: the same task functions as Ray tasks (1 CPU each), results through the object store.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, ThreadPoolExecutor, wait
from typing import Any

from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from .errors import VaralignError


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


class LocalExecutor:
    """Tasks on a thread pool of `num_workers` threads (in-process when 1)."""

    name = "local"
    shared_filesystem = True  # tasks may write into files the driver reads

    def __init__(self, num_workers: int | None = None, limit_kernels: bool = True) -> None:
        self.num_workers = num_workers or default_workers()
        self.limit_kernels = limit_kernels  # False: tasks keep the BLAS/torch threads they have (e.g. a model)

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], desc: str, quiet: bool = False,
            on_result: Callable[[int, Any], None] | None = None, bar: Any = None) -> list[Any]:
        """`fn(*task)` for every task, results in task order; `on_result(i, r)` as each finishes.

        `bar`: a progress bar to advance (the caller's, spanning several calls); else one of our own.
        """
        results: list[Any] = [None] * len(tasks)
        parallel = self.num_workers > 1 and len(tasks) > 1
        # one BLAS thread per task even when running serially: BLAS results depend on its thread
        # count, and a subset must not depend on --num_workers or the executor
        with _progress(bar, len(tasks), desc, quiet) as bar, single_threaded_kernels(self.limit_kernels):
            if not parallel:
                for i, task in enumerate(tasks):
                    results[i] = _finish(on_result, i, fn(*task))
                    bar.update()
                return results
            with ThreadPoolExecutor(max_workers=min(self.num_workers, len(tasks))) as pool:
                _gather(pool, fn, tasks, results, on_result, bar)
        return results


class ProcessExecutor:
    """Tasks in `num_workers` processes of this machine, for work that holds the GIL (tar writing,
    image generation); task functions and their arguments must be picklable (module-level)."""

    name = "local"
    shared_filesystem = True

    def __init__(self, num_workers: int | None = None) -> None:
        self.num_workers = num_workers or default_workers()

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], desc: str, quiet: bool = False,
            on_result: Callable[[int, Any], None] | None = None, bar: Any = None) -> list[Any]:
        """As `LocalExecutor.map`; in-process when one worker or one task."""
        if self.num_workers <= 1 or len(tasks) <= 1:
            return LocalExecutor(1).map(fn, tasks, desc, quiet, on_result, bar)
        results: list[Any] = [None] * len(tasks)
        with _progress(bar, len(tasks), desc, quiet) as bar, \
                ProcessPoolExecutor(max_workers=min(self.num_workers, len(tasks)),
                                    initializer=_one_kernel_thread) as pool:
            _gather(pool, fn, tasks, results, on_result, bar)
        return results


def _gather(pool: Any, fn: Callable[..., Any], tasks: Sequence[tuple], results: list[Any],
            on_result: Callable[[int, Any], None] | None, bar: Any) -> None:
    """Submit every task to a futures pool; results in task order, `on_result` as each finishes; the
    first failure cancels what has not started."""
    futures = {pool.submit(fn, *task): i for i, task in enumerate(tasks)}
    pending = set(futures)
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                i = futures[fut]
                results[i] = _finish(on_result, i, fut.result())
                bar.update()
    finally:
        for fut in pending:
            fut.cancel()


def _one_kernel_thread() -> None:
    threadpool_limits(limits=1)


_LOCAL_RAY: list[str | None] = [None]  # the address of the one-node Ray this process started, if it did


class RayExecutor:
    """The same tasks as Ray tasks on a local or remote Ray cluster (`pip install 'varalign[ray]'`).

    Tasks read their shard straight from where the pool is (a URL of an object store, or a path every
    node sees); results, and VAS-D's candidates, travel through Ray's object store, so no filesystem
    needs to be shared between the nodes.
    """

    name = "ray"
    # False: results come back to the driver and workers write no shared files. True only for the one-node
    # Ray this process started itself (its workers share this machine's disk: VAS-D's candidates and reshard's
    # shards are written in place, not sent through the object store); a cluster given by address may have
    # other nodes, now or after it scales, so it is never assumed to share one
    shared_filesystem = False

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray  # noqa: PLC0415
        except ImportError:
            raise VaralignError("--executor ray needs Ray: pip install 'varalign[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            kwargs: dict[str, Any] = ({"address": address} if address else  # else a new local Ray, never another's
                                      {"address": "local", "num_cpus": num_cpus or default_workers()})
            from . import storage  # noqa: PLC0415 - workers on other nodes need the same storage options

            env = {storage.ENV: os.environ[storage.ENV]} if os.environ.get(storage.ENV) else {}
            ray.init(log_to_driver=False, include_dashboard=False,
                     runtime_env={"env_vars": env} if env else None, **kwargs)
            _LOCAL_RAY[0] = None if address else ray.get_runtime_context().gcs_address
        self.shared_filesystem = (not address and _LOCAL_RAY[0] == ray.get_runtime_context().gcs_address
                                  and sum(1 for n in ray.nodes() if n.get("Alive")) == 1)
        self.num_workers = int(ray.cluster_resources().get("CPU", 1))
        self._remote: dict[Callable, Any] = {}

    def put(self, obj: Any) -> Any:
        """Keep `obj` in Ray's object store (a task given the reference gets the object on any node)."""
        return self.ray.put(obj)

    def map(self, fn: Callable[..., Any], tasks: Sequence[tuple], desc: str, quiet: bool = False,
            on_result: Callable[[int, Any], None] | None = None, bar: Any = None) -> list[Any]:
        remote = self._remote.setdefault(fn, self.ray.remote(num_cpus=1)(_ray_task).options(name=desc))
        refs = {remote.remote(fn, *task): i for i, task in enumerate(tasks)}
        results: list[Any] = [None] * len(tasks)
        pending = list(refs)
        with _progress(bar, len(tasks), desc, quiet) as bar:
            try:
                while pending:
                    done, pending = self.ray.wait(pending, num_returns=1)
                    for ref in done:
                        results[refs[ref]] = _finish(on_result, refs[ref], self._get(ref))
                        bar.update()
            finally:
                for ref in pending:
                    self.ray.cancel(ref)
        return results

    def _get(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            if isinstance(cause, VaralignError) or isinstance(getattr(exc, "cause", None), VaralignError):
                raise VaralignError(str(getattr(exc, "cause", cause))) from None
            raise


@contextlib.contextmanager
def _progress(bar: Any, total: int, desc: str, quiet: bool) -> Iterator[Any]:
    """The caller's bar if given (left open), else a new one closed at the end."""
    if bar is not None:
        yield bar
        return
    with tqdm(total=total, desc=desc, unit="shard", disable=quiet, leave=False) as own:
        yield own


def _ray_task(fn: Callable[..., Any], *args: Any) -> Any:
    with threadpool_limits(limits=1):
        return fn(*args)


def _finish(on_result: Callable[[int, Any], None] | None, i: int, result: Any) -> Any:
    if on_result is not None:
        on_result(i, result)
    return result


def make_executor(name: str = "local", num_workers: int | None = None, address: str | None = None,
                  processes: bool = False):
    """`local` (threads on this machine; `processes=True`: processes, for GIL-bound tasks) or `ray`
    (a Ray cluster; `address` or a new local one)."""
    if name == "local":
        return ProcessExecutor(num_workers) if processes else LocalExecutor(num_workers)
    if name == "ray":
        return RayExecutor(address, num_workers)
    raise VaralignError(f"--executor must be 'local' or 'ray', got {name!r}")


def run_tasks(fn: Callable[..., Any], tasks: Sequence[tuple], num_workers: int, desc: str,
              quiet: bool = False, unit: str = "shard") -> list[Any]:
    """Shorthand: run tasks on a local executor."""
    return LocalExecutor(num_workers).map(fn, tasks, desc, quiet)
