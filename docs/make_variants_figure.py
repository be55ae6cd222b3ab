"""Draw one demo image in all nine variants as a labelled 3x3 grid (docs/variants.png).

Every tile comes from the pipeline's own functions (``prepare_sample`` and
``pipeline.variants``), so the picture shows what the builder writes, not a
mock-up. Run from the repository root:

    python docs/make_variants_figure.py            # writes docs/variants.png
    python docs/make_variants_figure.py --help
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.demo import DemoUnavailable, read_demo  # noqa: E402
from pipeline.prepare import PreparedSample, prepare_sample  # noqa: E402
from pipeline.records import RejectedInput, SourceRecord  # noqa: E402
from pipeline.rng import rng_for  # noqa: E402
from pipeline.textures import N_PROCEDURAL, procedural_texture, texture_frame  # noqa: E402
from pipeline.variants import (  # noqa: E402
    FILLS,
    VARIANTS,
    composite,
    make_fill,
    no_fg,
    only_bg_b,
    only_bg_t,
    only_fg,
)

CAPTION_HEIGHT = 20


def render_variants(
    sample: PreparedSample,
    partners: dict[str, PreparedSample],
    fill: str,
    seed: int,
) -> dict[str, np.ndarray]:
    """All nine variants of ``sample``; ``partners`` maps mixed_* ids to their background source."""
    key = sample.record.key
    size = sample.image.shape[0]
    fill_image = make_fill(fill, sample.image, rng_for(seed, key, "fill"))
    texture_rng = rng_for(seed, key, "texture")
    texture = procedural_texture(int(texture_rng.integers(0, N_PROCEDURAL)), size)
    tiles = {
        "original": sample.image,
        "only_fg": only_fg(sample.image, sample.fg_mask, fill_image),
        "only_bg_b": only_bg_b(sample.image, sample.box_mask, fill_image),
        "only_bg_t": only_bg_t(sample.image, sample.box_mask),
        "no_fg": no_fg(sample.image, sample.fg_mask, fill_image),
        "texture": composite(sample.image, sample.fg_mask, texture_frame(texture, size, texture_rng)),
    }
    for variant, partner in partners.items():
        background = only_bg_t(partner.image, partner.box_mask)
        tiles[variant] = composite(sample.image, sample.fg_mask, background)
    return {variant: tiles[variant] for variant in VARIANTS}


def caption_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # older Pillow or no FreeType: the bitmap default
        return ImageFont.load_default()


def grid(tiles: dict[str, np.ndarray], columns: int = 3, gap: int = 4) -> Image.Image:
    """Tiles in rows of ``columns``, each with its variant id written underneath."""
    names = list(tiles)
    size = next(iter(tiles.values())).shape[0]
    rows = -(-len(names) // columns)
    cell_w, cell_h = size + gap, size + CAPTION_HEIGHT + gap
    sheet = Image.new("RGB", (columns * cell_w + gap, rows * cell_h + gap), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    font = caption_font(15)
    for i, name in enumerate(names):
        x = gap + (i % columns) * cell_w
        y = gap + (i // columns) * cell_h
        sheet.paste(Image.fromarray(tiles[name]), (x, y))
        draw.rectangle((x, y + size, x + size - 1, y + size + CAPTION_HEIGHT - 1), fill=(40, 40, 40))
        draw.text(
            (x + size // 2, y + size + CAPTION_HEIGHT // 2),
            name,
            fill=(255, 255, 255),
            font=font,
            anchor="mm",
        )
    return sheet


def load(
    records: dict[str, SourceRecord], key: str, mask: str, size: int, resize: int, seed: int
) -> PreparedSample:
    if key not in records:
        raise KeyError(f"no demo image {key!r}; choose one of {', '.join(sorted(records))}")
    record = records[key]
    return prepare_sample(
        record, Path(record.image).read_bytes(), size=size, resize=resize, mask_source=mask, seed=seed
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Draw one demo image in all nine background variants as a labelled grid PNG."
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "variants.png", help="output PNG path")
    parser.add_argument("--key", default="coffee", help="demo image to show (default: coffee)")
    parser.add_argument(
        "--mask", default="segm", choices=("box", "segm", "grabcut"), help="foreground mask source"
    )
    parser.add_argument("--fill", default="black", choices=FILLS, help="fill for only_fg/only_bg_b/no_fg")
    parser.add_argument("--same", default="coffee_mirror", help="mixed_same background image (same class)")
    parser.add_argument("--rand", default="rocket", help="mixed_rand background image")
    parser.add_argument("--next", dest="next_key", default="quokka", help="mixed_next background image")
    parser.add_argument("--size", type=int, default=224, help="frame size (default 224)")
    parser.add_argument("--resize", type=int, default=256, help="shorter side before the crop (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed for texture choice and noise fill")
    parser.add_argument(
        "--colors", type=int, default=256, help="palette size of the PNG, 0 = full RGB (larger file)"
    )
    parser.add_argument("--cache", type=Path, default=None, help="where the demo photos are written")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        records = {r.key: r for r in read_demo(args.cache) if isinstance(r, SourceRecord)}
        sample = load(records, args.key, args.mask, args.size, args.resize, args.seed)
        partners = {
            variant: load(records, key, "box", args.size, args.resize, args.seed)
            for variant, key in (
                ("mixed_same", args.same),
                ("mixed_rand", args.rand),
                ("mixed_next", args.next_key),
            )
        }
        tiles = render_variants(sample, partners, args.fill, args.seed)
    except (DemoUnavailable, KeyError, RejectedInput, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return 2
    sheet = grid(tiles)
    if args.colors:
        # A palette keeps the committed picture small; the tiles are photos, so dither.
        sheet = sheet.quantize(
            colors=args.colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG
        )
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", optimize=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(buf.getvalue())
    print(f"wrote {args.out} ({sheet.size[0]}x{sheet.size[1]}, {len(buf.getvalue()) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
