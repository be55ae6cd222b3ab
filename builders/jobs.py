"""Run the build's units of work: serially, on local loky workers, or on an existing Dask cluster.

Results arrive in completion order and are put back by index, so the output
never depends on scheduling. An interrupted build takes its local workers
down with it (each worker also stops on its own once the main process is
gone).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from builders.config import BuildConfig, ConfigError

DASK_CONNECT_TIMEOUT_S = 10


_watching: int | None = None  # the main process a worker watches (set once per worker process)


def _watch_main_process(main_pid: int) -> None:
    """In a local worker: exit at once when the build's main process is gone.

    A killed build must not leave workers building on (or idling for loky's
    timeout); what they leave half-written carries a temporary name that the
    next run removes. Dask workers have their own life and are not watched.
    """
    global _watching
    if _watching == main_pid or os.getppid() != main_pid:
        return
    _watching = main_pid

    def watch() -> None:
        while os.getppid() == main_pid:
            time.sleep(0.2)
        os._exit(70)

    threading.Thread(target=watch, name="watch-main-process", daemon=True).start()


def _start_worker(main_pid: int) -> None:
    """A local worker's start: watch the main process, then import the chunk builder before any task.

    loky measures a worker's memory after its first task and restarts one that
    grows by 300 MB beyond it as leaking. A worker whose first task was a probe
    batch then grew by importing the chunk builder (webdataset imports torch,
    about 0.5 GB): it was restarted, with a warning, and paid the import twice.
    """
    _watch_main_process(main_pid)
    import builders.shards  # noqa: F401


def _tagged(i: int, fn: Callable, args: tuple, kwargs: dict) -> tuple[int, Any]:
    return i, fn(*args, **kwargs)


def _dask_client(scheduler: str):  # noqa: ANN202 - dask is optional
    """A client of the cluster, or a one-line ConfigError (no 30-second wait and traceback)."""
    try:
        from dask.distributed import Client
    except ImportError:
        raise ConfigError("--backend dask needs dask.distributed: pip install 'bgcheck[dask]'") from None
    try:
        return Client(scheduler, timeout=f"{DASK_CONNECT_TIMEOUT_S}s")
    except (OSError, TimeoutError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot reach the Dask scheduler {scheduler} within {DASK_CONNECT_TIMEOUT_S} s ({reason})") from None


def _stop_local_workers() -> None:
    from joblib.externals.loky import get_reusable_executor

    with contextlib.suppress(Exception):
        get_reusable_executor().shutdown(wait=False, kill_workers=True)


def run_jobs(config: BuildConfig, calls: list, weights: list[int], desc: str, progress: bool) -> list:
    """Run joblib-delayed calls; the progress bar (a terminal only) is weighted by images."""
    import joblib
    from tqdm import tqdm

    tagged = [joblib.delayed(_tagged)(i, fn, args, kwargs) for i, (fn, args, kwargs) in enumerate(calls)]
    results: list = [None] * len(calls)
    n_jobs = min(config.workers, max(1, len(calls)))
    local = config.backend != "dask" and n_jobs > 1
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(tqdm(total=sum(weights), desc=desc, unit="img", disable=not progress))
        if config.backend == "dask":
            stack.enter_context(_dask_client(config.scheduler))
            stack.enter_context(joblib.parallel_config(backend="dask"))
            stream = joblib.Parallel(return_as="generator_unordered")(tagged)
        elif local:
            # every worker, busy or idle, watches this process from the moment it starts
            stack.enter_context(joblib.parallel_config(backend="loky", initializer=_start_worker,
                                                       initargs=(os.getpid(),)))
            stream = joblib.Parallel(n_jobs=n_jobs, return_as="generator_unordered")(tagged)
        else:
            stream = (fn(*args, **kwargs) for fn, args, kwargs in tagged)
        try:
            for i, value in stream:
                results[i] = value
                bar.update(weights[i])
        except BaseException:
            if local:
                _stop_local_workers()
            raise
    return results
