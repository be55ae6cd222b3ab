"""torchrun for the evaluator and the challenge: one process per GPU, and every rank learns when one fails.

Each phase that can fail on one rank only (opening the output, reading the
shard lists, building the models, scoring) runs through :func:`together`, so
the ranks always reach the same collective and stop together with one line
each, never waiting at a barrier for a peer that is gone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from eval.errors import EvalError


def init_distributed(device_name: str) -> tuple[int, int, int]:
    """(rank, world, local_rank) from torchrun's environment; a process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device_name == "cuda" else "gloo"
        if device_name == "cuda":
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(hours=2))
    return rank, world, local_rank


def agree(world: int, device: torch.device, failure: str | None) -> None:
    """Every rank learns whether any rank failed, so none waits at a collective for a peer that is gone."""
    if world > 1:
        flag = torch.tensor([1 if failure else 0], device=device if device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and not failure:
            failure = "another rank failed (its error is above)"
    if failure:
        raise EvalError(failure)


def together(world: int, device: torch.device, action: Callable[[], Any]) -> Any:
    """``action()`` on every rank; when it fails on any rank, every rank stops with one line.

    In one process the error is raised as it is (the CLI words it); under
    torchrun each rank reaches the same collective whatever happened to it.
    """
    if world == 1:
        return action()
    failure, result = None, None
    try:
        result = action()
    except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, not strand them
        failure = one_line(exc)
    agree(world, device, failure)
    return result


def same_models(world: int, ids: list[str]) -> None:
    """Ranks must score the same models (``--skip-unavailable`` may skip different ones on different nodes)."""
    if world == 1:
        return
    every: list[list[str] | None] = [None] * world
    torch.distributed.all_gather_object(every, ids)
    if any(other != ids for other in every):
        raise EvalError(f"the ranks have different models ({' | '.join(','.join(o or []) for o in every)}): "
                        "make the same weights available on every node")


def one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def failed_anywhere(world: int, device: torch.device, models: Sequence[Any]) -> list[str]:
    """Models that failed on any rank (each rank only sees its own batches)."""
    if world == 1:
        return []
    flags = torch.tensor([1 if m.error else 0 for m in models], device=device if device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    return [m.id for m, flag in zip(models, flags.tolist(), strict=True) if flag]


def run_command(run: Callable[[Any], Any], args: Any, results_file: Path) -> int:
    """A scoring command's exit status: 0, 2 with one line for input that cannot be scored, 1 when a model failed.

    ``run(args)`` returns stats with a ``failed`` list of model ids; their errors
    are in ``results_file``. The process group, if any, is always torn down.
    """
    from eval import zoo
    from pipeline.locks import FolderBusy
    from pipeline.shard_format import ShardSpecError, StreamError

    try:
        stats = run(args)
    except (EvalError, FolderBusy, ShardSpecError, StreamError, zoo.UnknownModel, zoo.WeightsUnavailable,
            OSError) as exc:
        sys.stderr.write(f"error: {one_line(exc)}\n")  # one write: under torchrun the ranks share stderr
        sys.stderr.flush()
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if stats.failed:
        print(f"error: {len(stats.failed)} model(s) failed ({', '.join(stats.failed)}): see the error column of "
              f"{results_file}", file=sys.stderr)
        return 1
    return 0
