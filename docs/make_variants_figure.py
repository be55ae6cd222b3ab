"""Draw one demo image in all nine variants as a labelled 3x3 grid (docs/variants.png).

The tiles are read back from shards this script builds with the builder itself
(``builders.make_shards`` into a temporary folder, read with
``eval.stream.samples``), so the picture is exactly what a build writes: the
same renderers, fills, partners and textures, drawn from the same seed. Run
from the repository root:

    python docs/make_variants_figure.py            # writes docs/variants.png
    python docs/make_variants_figure.py --help
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from builders.config import ConfigError  # noqa: E402
from builders.make_shards import build  # noqa: E402
from builders.make_shards import parse_args as build_args  # noqa: E402
from eval.stream import samples  # noqa: E402
from pipeline.sources import SourceError  # noqa: E402
from pipeline.sources.demo import DemoUnavailable  # noqa: E402
from pipeline.variants import FILLS, VARIANT_SPECS, VARIANTS  # noqa: E402

CAPTION_HEIGHT = 20


@contextlib.contextmanager
def demo_cache(folder: Path | None) -> Iterator[None]:
    """Where the demo photos are written (the builder reads BGCHECK_CACHE)."""
    before = os.environ.get("BGCHECK_CACHE")
    if folder is not None:
        os.environ["BGCHECK_CACHE"] = str(folder)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("BGCHECK_CACHE", None)
        else:
            os.environ["BGCHECK_CACHE"] = before


def caption(variant: str, meta: dict) -> str:
    spec = VARIANT_SPECS[variant]
    if spec.partner is not None:
        return f"{variant} (bg: {meta['bg_key']})"
    if spec.texture:
        return f"{variant} ({meta['texture'].split(':')[-1]})"
    return variant


def built_tiles(args: argparse.Namespace, out: Path) -> dict[str, np.ndarray]:
    """Build the demo in every variant and take ``args.key``'s sample from each."""
    config, _ = build_args(["--variant", "all", "--out", str(out), "--mask", args.mask, "--fill", args.fill,
                            "--seed", str(args.seed), "--size", str(args.size), "--resize", str(args.resize),
                            "--no-progress"])
    build(config, progress=False)
    tiles: dict[str, np.ndarray] = {}
    for variant in VARIANTS:
        for sample in samples(str(out / variant)):
            if sample.key == args.key:
                tiles[caption(variant, sample.meta)] = sample.image.permute(1, 2, 0).numpy()
    if len(tiles) != len(VARIANTS):
        raise KeyError(f"demo image {args.key!r} is not in every variant (with --mask {args.mask})")
    return tiles


def caption_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # older Pillow or no FreeType: the bitmap default
        return ImageFont.load_default()


def grid(tiles: dict[str, np.ndarray], columns: int = 3, gap: int = 4) -> Image.Image:
    """Tiles in rows of ``columns``, each with its caption written underneath."""
    names = list(tiles)
    size = next(iter(tiles.values())).shape[0]
    rows = -(-len(names) // columns)
    cell_w, cell_h = size + gap, size + CAPTION_HEIGHT + gap
    sheet = Image.new("RGB", (columns * cell_w + gap, rows * cell_h + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = caption_font(14)
    for i, name in enumerate(names):
        x = gap + (i % columns) * cell_w
        y = gap + (i // columns) * cell_h
        sheet.paste(Image.fromarray(np.ascontiguousarray(tiles[name])), (x, y))
        draw.rectangle((x, y + size, x + size - 1, y + size + CAPTION_HEIGHT - 1), fill=(40, 40, 40))
        draw.text((x + size // 2, y + size + CAPTION_HEIGHT // 2), name, fill=(255, 255, 255), font=font,
                  anchor="mm")
    return sheet


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Build the demo in all nine variants and draw one of its images as a labelled grid PNG."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "variants.png", help="output PNG path")
    parser.add_argument("--key", default="coffee", help="demo image to show (default: coffee)")
    parser.add_argument("--mask", default="segm", choices=("box", "segm", "grabcut"), help="foreground mask source")
    parser.add_argument("--fill", default="black", choices=FILLS, help="fill for only_fg/only_bg_b/no_fg")
    parser.add_argument("--size", type=int, default=224, help="frame size (default 224)")
    parser.add_argument("--resize", type=int, default=256, help="shorter side before the crop (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="build seed: partners, textures, noise fills")
    parser.add_argument("--colors", type=int, default=256, help="palette size of the PNG, 0 = full RGB (larger file)")
    parser.add_argument("--cache", type=Path, default=None, help="where the demo photos are written")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with demo_cache(args.cache), tempfile.TemporaryDirectory(prefix="variants-") as tmp:
            tiles = built_tiles(args, Path(tmp) / "shards")
    except (DemoUnavailable, KeyError, ConfigError, SourceError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    sheet = grid(tiles)
    if args.colors:
        # A palette keeps the committed picture small; the tiles are photos, so dither.
        sheet = sheet.quantize(colors=args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(buf.getvalue())
    print(f"wrote {args.out} ({sheet.size[0]}x{sheet.size[1]}, {len(buf.getvalue()) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
