"""``python -m bench.make_tree OUT --n 1000``: an ImageNet-shaped val tree for benchmarks.

Photo-like JPEGs at ImageNet's common sizes (500x375 and 640x480), one VOC
XML box each, spread over the 1000 ImageNet classes. Trees are cached by
size under ``OUT/n<N>-c<C>``: a finished tree (marked by a ``DONE`` file) is
reused, so reruns time the builder and not the generator.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH_SIZES = ((500, 375), (640, 480))
DONE_NAME = "DONE"


def tree_dir(out: str | Path, n: int, n_classes: int) -> Path:
    return Path(out) / f"n{n}-c{n_classes}"


def tree_classes(n_classes: int) -> tuple[str, ...]:
    """The classes of a tree: all 1000 in index order, or for fewer, the ImageNet-9 superclasses in turn.

    A small tree then still has images of several superclasses, so the class
    relations of mixed_same and mixed_next (also at the superclass level) find partners.
    """
    from itertools import zip_longest

    from pipeline.classes import imagenet_classes, in9_members, to_in9

    wnids = imagenet_classes().wnids
    if n_classes >= len(wnids):
        return tuple(wnids)
    order = [i for group in zip_longest(*in9_members()) for i in group if i is not None]
    order += [i for i in range(len(wnids)) if to_in9(i) < 0]
    return tuple(wnids[i] for i in order[:n_classes])


def _write_range(root: Path, start: int, stop: int, wnids: tuple[str, ...], seed: int) -> None:
    """Images ``start..stop-1`` exactly as make_val_tree writes them (it seeds per image)."""
    import numpy as np

    from bench.imagenet_tree import write_sample

    images_dir, boxes_dir = root / "val", root / "ILSVRC2012_bbox_val_v3"
    for i in range(start, stop):
        key = f"ILSVRC2012_val_{i + 1:08d}"
        write_sample(
            images_dir / f"{key}.JPEG",
            boxes_dir / "val" / f"{key}.xml",
            key,
            wnids[i % len(wnids)],
            np.random.default_rng([seed, i]),
            BENCH_SIZES,
            True,
            1,
        )


def make_tree(
    out: str | Path, n: int, n_classes: int = 1000, seed: int = 0, workers: int = 1, progress: bool = False
) -> tuple[Path, Path]:
    """Generate (or reuse) the tree; returns ``(images_dir, boxes_dir)`` for ``--source imagenet-val``."""
    from bench.imagenet_tree import make_val_tree

    root = tree_dir(out, n, n_classes)
    images_dir, boxes_dir = root / "val", root / "ILSVRC2012_bbox_val_v3"
    if (root / DONE_NAME).exists():
        return images_dir, boxes_dir
    wnids = tree_classes(n_classes)
    # make_val_tree creates the layout (and writes image 0); the rest in parallel blocks.
    make_val_tree(root, min(n, 1), classes=wnids, seed=seed, size_choices=BENCH_SIZES, photo_like=True)
    import joblib
    from tqdm import tqdm

    block = 250
    starts = list(range(1, n, block))
    jobs = (joblib.delayed(_write_range)(root, s, min(s + block, n), wnids, seed) for s in starts)
    bar = tqdm(total=max(n - 1, 0), desc=f"tree n={n}", unit="img", disable=not progress)
    for _ in joblib.Parallel(n_jobs=workers, return_as="generator_unordered")(jobs):
        bar.update(block)
    bar.close()
    (root / DONE_NAME).write_text(f"{n} images, {n_classes} classes, seed {seed}\n")
    return images_dir, boxes_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.make_tree", description=__doc__.splitlines()[0])
    p.add_argument("out", help="cache folder; the tree goes to OUT/n<N>-c<C>")
    p.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--classes", type=int, default=1000, help="number of ImageNet classes used (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="generator processes (default 2)")
    args = p.parse_args(argv)
    if args.n < 1 or not 1 <= args.classes <= 1000 or args.workers < 1:
        print("make_tree: error: need --n >= 1, 1 <= --classes <= 1000, --workers >= 1", file=sys.stderr)
        return 2
    images, boxes = make_tree(args.out, args.n, args.classes, args.seed, args.workers, progress=sys.stderr.isatty())
    print(f"images: {images}\nboxes:  {boxes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
