"""The worst case over backgrounds, on the device: composites built from indices, fooled foregrounds dropped at once.

Noise or Signal's Backgrounds Challenge pastes each foreground (its masked
pixels) onto every ``only_bg_t`` background and calls the foreground
*vulnerable* as soon as one composite is misclassified. Here foregrounds,
masks and backgrounds are uint8 tensors already on the device; a batch is a
list of (foreground, background) index pairs, its composites are one
``torch.where`` (``mask ? foreground : background``, which is
``bg * (1 - mask) + mask * fg`` for a binary mask), so nothing is re-decoded
and no composite is stored.

Scheduling: every foreground still in play walks the backgrounds in their
order; a batch gives each of them a run of its next backgrounds as long as
the backgrounds it has already withstood (1, 1, 2, 4, ...), capped at an
equal share of the batch (``batch_size // in play``). Most foregrounds fall
to one of their first backgrounds, so little is scored past the one that
fools them; a robust foreground soon takes its whole share, so batches fill
up once only the robust ones are left. A foreground leaves the search in the
batch that fools it, and its *first* fooling background (the lowest index:
within a run the minimum, and runs are in order) does not depend on the
batch size. ``exhaustive`` keeps every foreground to the end and returns the
whole prediction matrix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

# Composites (uint8, on the device) and the foreground index of each -> predicted class per composite.
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

NOT_FOOLED = -1


@dataclass
class SearchResult:
    """Per foreground: the first background that fooled it (or -1), the class it predicted then, backgrounds tried."""

    fooled_by: np.ndarray  # (n,) int64 background index, NOT_FOOLED for a robust foreground
    pred: np.ndarray  # (n,) int64 prediction on that composite, -1 for a robust foreground
    tried: np.ndarray  # (n,) int64 backgrounds it withstood, plus the one that fooled it (all, when robust)
    composites: int  # composites scored in all
    matrix: np.ndarray | None = None  # (n, n_backgrounds) predictions, exhaustive searches only

    @property
    def vulnerable(self) -> np.ndarray:
        return self.fooled_by != NOT_FOOLED


def composite(
    foregrounds: torch.Tensor, masks: torch.Tensor, backgrounds: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor
) -> torch.Tensor:
    """uint8 (P, 3, H, W): foreground ``fg[p]``'s masked pixels over background ``bg[p]``.

    ``foregrounds`` (F, 3, H, W) uint8, ``masks`` (F, 1, H, W) bool, ``backgrounds`` (B, 3, H, W) uint8.
    """
    return torch.where(masks[fg], foregrounds[fg], backgrounds[bg])


def schedule(next_bg: np.ndarray, in_play: list[int], n_backgrounds: int, batch_size: int,
             start: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One batch of (foreground, background) pairs, foreground-major with backgrounds in order.

    Each foreground in play, from position ``start`` of ``in_play`` round, gets
    its next ``min(max(1, withstood), max(1, batch_size // len(in_play)))``
    backgrounds (fewer if it has fewer left or the batch is full). Returns the
    pairs and where the next batch starts.
    """
    share = max(1, batch_size // len(in_play))
    fgs: list[np.ndarray] = []
    bgs: list[np.ndarray] = []
    room = batch_size
    position = start
    for _ in range(len(in_play)):
        if room == 0:
            break
        f = in_play[position % len(in_play)]
        take = min(max(1, int(next_bg[f])), share, n_backgrounds - int(next_bg[f]), room)
        fgs.append(np.full(take, f, dtype=np.int64))
        bgs.append(np.arange(next_bg[f], next_bg[f] + take, dtype=np.int64))
        room -= take
        position += 1
    return np.concatenate(fgs), np.concatenate(bgs), position % len(in_play)


def _first_per_foreground(fg: np.ndarray, bg: np.ndarray, fooled: np.ndarray,
                          pred: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(foreground, first fooling background, prediction) for each foreground fooled in a batch."""
    hits = np.flatnonzero(fooled)
    if hits.size == 0:
        return
    # Pairs are foreground-major with increasing backgrounds: a foreground's first hit is its first fooling one.
    _, first = np.unique(fg[hits], return_index=True)
    for i in hits[first]:
        yield int(fg[i]), int(bg[i]), int(pred[i])


def search(
    foregrounds: torch.Tensor,
    masks: torch.Tensor,
    labels: np.ndarray,
    backgrounds: torch.Tensor,
    predict: Predict,
    batch_size: int,
    *,
    exhaustive: bool = False,
) -> SearchResult:
    """The Backgrounds Challenge for one set of foregrounds and one model.

    ``labels`` (n,) are the foregrounds' classes in the label space ``predict``
    answers in; a composite whose prediction differs fools its foreground.
    """
    n, n_backgrounds = foregrounds.shape[0], backgrounds.shape[0]
    result = SearchResult(np.full(n, NOT_FOOLED, np.int64), np.full(n, -1, np.int64), np.zeros(n, np.int64), 0,
                          np.full((n, n_backgrounds), -1, np.int64) if exhaustive else None)
    if n == 0 or n_backgrounds == 0:
        return result
    next_bg = np.zeros(n, np.int64)
    in_play = list(range(n))
    start = 0
    device = foregrounds.device
    while in_play:
        fg, bg, start = schedule(next_bg, in_play, n_backgrounds, batch_size, start)
        fg_t = torch.from_numpy(fg).to(device, non_blocking=True)
        bg_t = torch.from_numpy(bg).to(device, non_blocking=True)
        pred = predict(composite(foregrounds, masks, backgrounds, fg_t, bg_t), fg_t).cpu().numpy().astype(np.int64)
        result.composites += fg.size
        np.add.at(next_bg, fg, 1)
        if result.matrix is not None:
            result.matrix[fg, bg] = pred
        done = set()
        for f, b, p in _first_per_foreground(fg, bg, pred != labels[fg], pred):
            if result.fooled_by[f] == NOT_FOOLED:
                result.fooled_by[f], result.pred[f] = b, p
                result.tried[f] = b + 1
            if not exhaustive:
                done.add(f)
        done.update(f for f in set(fg.tolist()) if next_bg[f] >= n_backgrounds)
        if done:  # the next batch starts at the first survivor from the cursor on
            start = sum(1 for f in in_play[:start] if f not in done)
            in_play = [f for f in in_play if f not in done]
            start = start if start < len(in_play) else 0
    result.tried[result.fooled_by == NOT_FOOLED] = n_backgrounds
    return result
