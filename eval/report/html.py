"""report.html: one self-contained page (figures and thumbnails embedded as data: URIs, inline CSS, no script,
no network).

It opens from disk in any browser and travels as one file. Everything shown
comes from the same :class:`ReportDocument` as report.md, plus the
:class:`Gallery`; every piece of user data (model ids, keys, notes, class
names) passes through :func:`html.escape` exactly once, here. The gallery is
generic: sections of rows of (image, caption lines), so the Backgrounds
Challenge's images (a foreground beside the background that fooled it and
their composite; the strongest backgrounds) are new rows, not new markup.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

from eval.report.tables import Cell, ChallengeSection, FigureFile, ReportDocument, Table

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232b; margin: 0;
       background: #f6f7f9; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 24px 48px; }
h1 { font-size: 24px; margin: 8px 0 4px; } h2 { font-size: 19px; margin: 28px 0 8px; border-bottom: 1px solid #d5d9e0;
     padding-bottom: 4px; } h3 { font-size: 15px; margin: 20px 0 4px; }
p.caption, figcaption { color: #4a5361; margin: 2px 0 8px; font-size: 13px; }
nav a { margin-right: 12px; }
.scroll { overflow-x: auto; background: #fff; border: 1px solid #d5d9e0; border-radius: 4px; }
table { border-collapse: collapse; font-size: 13px; width: 100%; }
th, td { padding: 4px 8px; border-bottom: 1px solid #e6e9ee; text-align: left; vertical-align: top; }
th { background: #eef1f5; position: sticky; top: 0; white-space: nowrap; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.ci { display: block; color: #6b7482; font-size: 11px; }
.empty, .skipped { color: #6b7482; font-style: italic; }
.figures { display: grid; grid-template-columns: repeat(auto-fill, minmax(480px, 1fr)); gap: 16px; }
figure { margin: 0; background: #fff; border: 1px solid #d5d9e0; border-radius: 4px; padding: 8px; }
figure img { width: 100%; height: auto; display: block; }
ul.notes li { margin: 2px 0; }
.gallery-row { display: flex; gap: 6px; overflow-x: auto; padding: 8px 0; border-bottom: 1px solid #e6e9ee;
               align-items: flex-start; }
.row-head { flex: 0 0 160px; font-size: 12px; overflow-wrap: anywhere; }
.row-head div:first-child { font-weight: 600; }
figure.thumb { flex: 0 0 auto; width: 128px; padding: 4px; }
figure.thumb img { width: auto; height: auto; max-width: 100%; margin: 0 auto; }
figure.thumb figcaption { font-size: 11px; line-height: 1.3; margin: 4px 0 0; overflow-wrap: anywhere; }
figure.thumb .label { font-weight: 600; color: #1d232b; }
figure.context { background: #f1f3f6; border-style: dashed; }
.no-image { margin: 0 auto; background: repeating-linear-gradient(45deg, #eef1f5 0 6px, #e2e6ec 6px 12px); }
.right { color: #1a7f37; } .wrong { color: #b42318; } .muted { color: #6b7482; }
code { background: #eef1f5; padding: 0 3px; border-radius: 3px; }
"""


# ---------------------------------------------------------------- the gallery: sections of rows of images


@dataclass(frozen=True)
class CaptionLine:
    """One line under a thumbnail; ``tone`` colours it: "right", "wrong", "muted" or "" (plain)."""

    text: str
    tone: str = ""


@dataclass(frozen=True)
class GalleryImage:
    """One thumbnail: ``src`` is a data: URI or a path relative to report.html; "" shows ``caption`` alone.

    ``context`` marks an image shown for reference beside the row's own variants
    (the photo a mixed image's background came from; later, the background that
    fooled a foreground in the Backgrounds Challenge).
    """

    src: str
    alt: str
    label: str
    caption: tuple[CaptionLine, ...] = ()
    width: int = 0
    height: int = 0
    context: bool = False


@dataclass(frozen=True)
class GalleryRow:
    """One source image (sample key) with its images side by side; ``lines`` head the row."""

    key: str
    images: tuple[GalleryImage, ...]
    lines: tuple[CaptionLine, ...] = ()


@dataclass(frozen=True)
class GallerySection:
    """A group of rows, e.g. one Noise or Signal category or the largest background-driven flips."""

    ident: str
    title: str
    caption: str
    rows: tuple[GalleryRow, ...]
    empty: str = "No image qualifies."


@dataclass(frozen=True)
class Gallery:
    """What the gallery shows: its sections, and one-line notices (a fallback, or why there is no gallery)."""

    sections: tuple[GallerySection, ...] = ()
    lines: tuple[str, ...] = ()
    intro: str = ""

    @property
    def shown(self) -> bool:
        return bool(self.sections or self.lines or self.intro)


def _caption_lines(lines: Sequence[CaptionLine]) -> str:
    return "".join(f'<div class="{escape(line.tone)}">{escape(line.text)}</div>' if line.tone
                   else f"<div>{escape(line.text)}</div>" for line in lines)


def _gallery_image(image: GalleryImage) -> str:
    klass = "thumb context" if image.context else "thumb"
    label = f'<div class="label">{escape(image.label)}</div>'
    if not image.src:
        picture = f'<div class="no-image" style="width:{image.width}px;height:{image.height}px"></div>'
    else:
        size = f' width="{image.width}" height="{image.height}"' if image.width and image.height else ""
        # Lazy: off-screen thumbnails are decoded (and, from a folder, fetched) only when scrolled to.
        picture = f'<img loading="lazy" decoding="async" src="{escape(image.src)}" alt="{escape(image.alt)}"{size}>'
    return f'<figure class="{klass}">{picture}<figcaption>{label}{_caption_lines(image.caption)}</figcaption></figure>'


def gallery_html(gallery: Gallery) -> str:
    """The gallery section; nothing at all when there is neither a section nor a notice."""
    if not gallery.shown:
        return ""
    parts = ['<section id="gallery"><h2>Gallery</h2>']
    if gallery.intro:
        parts.append(f'<p class="caption">{escape(gallery.intro)}</p>')
    parts += [f'<p class="skipped">{escape(line)}</p>' for line in gallery.lines]
    parts += [gallery_section_html(section) for section in gallery.sections]
    parts.append("</section>")
    return "\n".join(parts)


def gallery_section_html(section: GallerySection) -> str:
    """One section of rows of captioned images (the gallery's, or the Backgrounds Challenge's)."""
    parts = [f'<section class="gallery-section" data-section="{escape(section.ident)}">'
             f"<h3>{escape(section.title)}</h3><p class=\"caption\">{escape(section.caption)}</p>"]
    if not section.rows:
        parts.append(f'<p class="empty">{escape(section.empty)}</p>')
    for row in section.rows:
        parts.append(f'<div class="gallery-row" data-key="{escape(row.key)}">'
                     f'<div class="row-head">{_caption_lines(row.lines)}</div>'
                     + "".join(_gallery_image(image) for image in row.images) + "</div>")
    parts.append("</section>")
    return "\n".join(parts)


# ---------------------------------------------------------------- page


def inline_markup(text: str) -> str:
    """Escape text, then render the two inline marks the metric definitions use: `code` and **bold**."""
    out = escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _cell(cell: Cell) -> str:
    title = f' title="{escape(cell.note)}"' if cell.note else ""
    klass = ' class="num"' if cell.numeric else ""
    interval = f'<span class="ci">{escape(cell.interval)}</span>' if cell.interval else ""
    text = inline_markup(cell.text) if cell.markup else escape(cell.text)
    return f"<td{klass}{title}>{text}{interval}</td>"


def table_html(table: Table, level: int = 3) -> str:
    head = f'<h{level} id="{escape(table.ident)}">{escape(table.title)}</h{level}>'
    caption = f'<p class="caption">{inline_markup(table.caption)}</p>' if table.caption else ""  # our own text
    if not table.rows:
        return f'{head}{caption}<p class="empty">{escape(table.empty)}</p>'
    header = "".join(f"<th>{escape(h)}</th>" for h in table.header)
    rows = "\n".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in table.rows)
    return (f'{head}{caption}<div class="scroll"><table data-table="{escape(table.ident)}">'
            f"<thead><tr>{header}</tr></thead><tbody>\n{rows}\n</tbody></table></div>")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(fig: FigureFile, out_dir: Path) -> str:
    return (f'<figure data-figure="{escape(fig.name)}"><img src="{_data_uri(out_dir / fig.name)}" '
            f'alt="{escape(fig.title)}" width="640"><figcaption><strong>{escape(fig.title)}.</strong> '
            f"{escape(fig.caption)}</figcaption></figure>")


def challenge_html(section: ChallengeSection, out_dir: Path, images: Sequence[GallerySection]) -> str:
    """The Backgrounds Challenge: its table, its figure, and its rows of images."""
    parts = ['<section id="challenge-section">', table_html(section.table, 2)]
    if section.figures:
        parts.append('<div class="figures">' + "".join(_figure(f, out_dir) for f in section.figures) + "</div>")
    parts += [f'<p class="skipped">{escape(line)}</p>' for line in (*section.figures_skipped, *section.lines)]
    parts += [gallery_section_html(s) for s in images]
    parts.append("</section>")
    return "\n".join(parts)


def report_html(doc: ReportDocument, out_dir: Path, gallery: Gallery | None = None,
                challenge_images: Sequence[GallerySection] = ()) -> str:
    """The whole page; figures are read from ``out_dir`` and embedded."""
    gallery = gallery or Gallery()
    nav = ['<a href="#models">Models</a>']
    if doc.published.rows:
        nav.append('<a href="#published">Published figures</a>')
    if gallery.shown:
        nav.append('<a href="#gallery">Gallery</a>')
    if doc.challenge is not None:
        nav.append('<a href="#challenge">Backgrounds Challenge</a>')
    nav += [f'<a href="#ls-{escape(s.label_space)}">{escape(s.label_space)}</a>' for s in doc.sections]
    nav += ['<a href="#notes">Notes</a>', '<a href="#definitions">Definitions</a>']
    body = [f"<header><h1>Background reliance report</h1><p>{escape(doc.intro)}</p><nav>{''.join(nav)}</nav></header>",
            f'<section id="models-section">{table_html(doc.models, 2)}</section>']
    if doc.published.rows:
        body.append(f'<section id="published-section">{table_html(doc.published, 2)}</section>')
    # The images first: what a reader looks at before the numbers (the nav reaches every table).
    body.append(gallery_html(gallery))
    if doc.challenge is not None:
        body.append(challenge_html(doc.challenge, out_dir, challenge_images))
    for section in doc.sections:
        parts = [f'<section id="ls-{escape(section.label_space)}"><h2>{escape(section.title)}</h2>']
        if section.figures:
            parts.append('<div class="figures">' + "".join(_figure(f, out_dir) for f in section.figures) + "</div>")
        parts += [f'<p class="skipped">{escape(reason)}</p>' for reason in section.figures_skipped]
        parts += [table_html(t) for t in section.tables]
        parts.append("</section>")
        body.append("\n".join(parts))
    notes = "".join(f"<li>{escape(n)}</li>" for n in doc.notes) or "<li>none</li>"
    body.append(f'<section><h2 id="notes">Notes</h2><ul class="notes">{notes}</ul></section>')
    body.append(f"<section>{table_html(doc.definitions, 2)}</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>Background reliance report</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(b for b in body if b) + "\n</main>\n</body>\n</html>\n")
