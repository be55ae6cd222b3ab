"""Decode images to RGB uint8, the way ImageNet's odd files need: the one decode entry point.

ImageNet holds CMYK JPEGs, grayscale images and one PNG named ``.JPEG``; PIL
sniffs the format from the bytes, so the extension is never trusted. But PIL
sniffs *every* format it has a plugin for, including PostScript/EPS (handed to
Ghostscript), so every open names the formats its context allows
(:func:`open_image`'s ``formats``): what a source image, a mask, a texture or
a shard image may be, and nothing else. Every failure becomes a
:class:`RejectedInput` with a precise, stable, one-line reason that never
quotes the file's bytes.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from typing import IO

import numpy as np
from PIL import Image

from pipeline.records import RejectedInput
from pipeline.shard_format.spec import IMAGE_CODECS

# The one decompression-bomb limit of the project (builder inputs, masks, textures, and the
# evaluator's and verifier's shard images): 8192 x 8192. ImageNet's largest photos are far below
# it, shards hold frames of a few hundred pixels, and PIL's own limit (89 Mpx, an error at twice
# that) stays in force as a second net. Read it as ``decode.MAX_IMAGE_PIXELS`` at call time.
MAX_IMAGE_PIXELS = 1 << 26
MIN_SIDE = 8

# What each context decodes (PIL format names). Sources: ImageNet is JPEG, with one PNG named
# .JPEG, and the readers list .jpeg/.jpg/.png. Masks: PNG (ImageNet-S, our own .mask.png).
# Textures: the files TEXTURE_SUFFIXES names. Shards: the codecs the shard format defines.
SOURCE_FORMATS = ("JPEG", "PNG")
MASK_FORMATS = ("PNG",)
TEXTURE_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
# The file names a --textures folder is searched for (the formats above by their usual extensions).
TEXTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SHARD_FORMATS = tuple(IMAGE_CODECS.values())

# Magic numbers of formats people put under an image name, only to say what a refused file is.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"%!PS", "PostScript"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"%PDF", "PDF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
_ADDRESS = re.compile(r" (object )?at 0x[0-9a-fA-F]+")


def sniff_format(head: bytes) -> str | None:
    """The format a file's first bytes announce (for messages only; PIL decides what decodes)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


def stable_message(exc: BaseException) -> str:
    """``Type: message`` on one line without memory addresses, so a rejection reads the same on every run."""
    text = " ".join(str(exc).split())
    return _ADDRESS.sub("", f"{type(exc).__name__}: {text}" if text else type(exc).__name__)


def _refusal(head: bytes, formats: Sequence[str]) -> str:
    allowed = " or ".join(formats)
    found = sniff_format(head)
    if found is None:
        return f"not a {allowed} image"
    if found in formats:
        return f"{found} data that cannot be read"
    return f"{found} data, not {allowed}"


def open_image(data: bytes | IO[bytes], *, formats: Sequence[str]) -> Image.Image:
    """Open (lazily) and sanity-check an encoded image of one of ``formats``; RejectedInput otherwise.

    ``data`` may be the bytes or a seekable binary file: from a file, only the
    header is read, which is all that planning needs. ``formats`` goes to PIL
    as its allow-list, so no other plugin ever sees the bytes.
    """
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    head = stream.read(16)
    stream.seek(0)
    if not head:
        raise RejectedInput("empty_file", "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(stream, formats=list(formats))
            w, h = img.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise RejectedInput("decompression_bomb", str(exc).split(".")[0]) from None
    except Image.UnidentifiedImageError:
        # PIL's message holds the file's name or the BytesIO's address; say what the bytes are instead
        raise RejectedInput("undecodable_image", _refusal(head, formats)) from None
    except Exception as exc:  # PIL raises many types for garbage bytes
        raise RejectedInput("undecodable_image", stable_message(exc)) from None
    if w * h > MAX_IMAGE_PIXELS:
        raise RejectedInput("decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds the {MAX_IMAGE_PIXELS}-pixel limit")
    return img


# Start-of-frame markers (baseline, extended, progressive, lossless; not DHT C4, JPG C8, DAC CC).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_XMP_PREFIX = b"http://ns.adobe.com/xap/1.0/\x00"
JPEG_HEADER_BYTES = 1 << 16  # what the fast probe reads; a header that does not end within it goes to PIL


def _exif_orientation(tiff: bytes) -> int | None:
    """The orientation tag of IFD0 as PIL's getexif gives it (1 when absent); None when unsure."""
    order = {b"II*\x00": "little", b"MM\x00*": "big"}.get(tiff[:4])
    if order is None or len(tiff) < 8:
        return None
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd < 8 or ifd + 2 > len(tiff):
        return None
    for k in range(int.from_bytes(tiff[ifd : ifd + 2], order)):
        entry = tiff[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        if len(entry) < 12:
            return None
        if int.from_bytes(entry[:2], order) == 0x0112:
            kind, count = int.from_bytes(entry[2:4], order), int.from_bytes(entry[4:8], order)
            return (int.from_bytes(entry[8:10], order) or 1) if kind == 3 and count == 1 else None
    return 1


def jpeg_header(head: bytes) -> tuple[tuple[int, int], int] | None:
    """``((width, height), EXIF orientation)`` from a JPEG's markers up to its scan, or None when unsure.

    What PIL's ``Image.open`` and ``getexif`` report, at a tenth of their cost
    (planning probes every input: 1.28M for ImageNet train). Anything unusual
    (fill bytes, a second frame or Exif segment, XMP, which PIL also reads an
    orientation from, a header longer than ``head``) is None: PIL decides.
    """
    if head[:3] != b"\xff\xd8\xff":
        return None
    size, orientation, exif_seen, i, n = None, 1, False, 2, len(head)
    while i + 4 <= n:
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF or marker == 0xD8 or marker == 0x01 or 0xD0 <= marker <= 0xD9:
            return None  # fill bytes or a standalone marker before the scan: leave it to PIL
        end = i + 2 + int.from_bytes(head[i + 2 : i + 4], "big")
        if end - i < 4 or end > n:
            return None
        segment = head[i + 4 : end]
        if marker == 0xDA:  # start of scan: the header is complete
            return (size, orientation) if size is not None else None
        if marker in _SOF_MARKERS:
            if size is not None or len(segment) < 6:
                return None
            height, width = int.from_bytes(segment[1:3], "big"), int.from_bytes(segment[3:5], "big")
            if width == 0 or height == 0:
                return None
            size = (width, height)
        elif marker == 0xE1 and segment.startswith(b"Exif\x00\x00"):
            found = None if exif_seen else _exif_orientation(segment[6:])
            if found is None:
                return None
            orientation, exif_seen = found, True
        elif marker == 0xE1 and segment.startswith(_XMP_PREFIX):
            return None
        i = end
    return None


def image_header(fh: IO[bytes], formats: Sequence[str]) -> tuple[tuple[int, int], int]:
    """``(stored size, EXIF orientation)`` of an image file from its header; RejectedInput as :func:`open_image`.

    JPEGs whose header :func:`jpeg_header` reads with certainty skip PIL;
    everything else (and every size over the pixel limits) is opened by PIL.
    """
    if "JPEG" in formats:
        head = fh.read(4096)  # the usual header; a long one (an EXIF thumbnail, an ICC profile) reads on
        fast = jpeg_header(head)
        if fast is None and len(head) == 4096:
            fast = jpeg_header(head + fh.read(JPEG_HEADER_BYTES - len(head)))
        fh.seek(0)
        if fast is not None:
            (w, h), orientation = fast
            pil_limit = Image.MAX_IMAGE_PIXELS
            if w * h <= MAX_IMAGE_PIXELS and (pil_limit is None or w * h <= pil_limit):
                return (w, h), orientation
    img = open_image(fh, formats=formats)
    return img.size, exif_transpose_code(img)


def exif_transpose_code(img: Image.Image) -> int:
    """EXIF orientation tag (1 = as stored)."""
    try:
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:
        return 1


def to_rgb_array(img: Image.Image, draft_min_side: int | None = None) -> tuple[np.ndarray, float]:
    """Decode to an RGB uint8 array (H, W, 3) of the *stored* orientation.

    With ``draft_min_side``, JPEGs are decoded at a reduced DCT scale as long
    as the shorter side stays >= that many pixels (libjpeg's free downscale);
    the returned factor maps stored coordinates to decoded ones.
    """
    full_w, full_h = img.size
    if draft_min_side and img.format == "JPEG":
        scale = min(full_w, full_h) / draft_min_side
        if scale >= 2:
            img.draft("RGB", (int(np.ceil(full_w / scale)), int(np.ceil(full_h / scale))))
    try:
        img.load()
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or "premature" in msg.lower() or "broken data" in msg.lower():
            raise RejectedInput("truncated_image", msg) from None
        raise RejectedInput("undecodable_image", stable_message(exc)) from None
    except Exception as exc:
        raise RejectedInput("undecodable_image", stable_message(exc)) from None
    rgb = _convert_to_rgb(img)
    arr = np.asarray(rgb, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise RejectedInput("undecodable_image", f"unexpected pixel layout {arr.shape}")
    return arr, arr.shape[1] / full_w


def _convert_to_rgb(img: Image.Image) -> Image.Image:
    """CMYK, grayscale, palette, RGBA and 16-bit images to 8-bit RGB.

    RGBA/LA/transparent palettes are composited on white, as a viewer shows them.
    16-bit grayscale ("I;16", "I") is scaled by its range, not clipped.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        gray = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), "RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(
    data: bytes, draft_min_side: int | None = None, *, formats: Sequence[str] = SOURCE_FORMATS
) -> tuple[np.ndarray, int, tuple[int, int], float]:
    """Bytes -> (RGB uint8 array as stored, EXIF orientation, stored (w, h), decode scale).

    ``formats`` defaults to what a source image may be; textures pass :data:`TEXTURE_FORMATS`.
    """
    img = open_image(data, formats=formats)
    stored_size = img.size
    if min(stored_size) < 1:
        raise RejectedInput("undecodable_image", f"size {stored_size}")
    orientation = exif_transpose_code(img)
    arr, scale = to_rgb_array(img, draft_min_side)
    return arr, orientation, stored_size, scale


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to an (H, W[, C]) array, as ImageOps.exif_transpose does."""
    ops = {
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1, :],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.swapaxes(a, 0, 1)[:, ::-1],
        7: lambda a: np.swapaxes(a, 0, 1)[::-1, ::-1],
        8: lambda a: np.swapaxes(a, 0, 1)[::-1, :],
    }
    op = ops.get(orientation)
    return np.ascontiguousarray(op(arr)) if op else arr


def orient_point_map(orientation: int, width: float, height: float):
    """Function mapping stored (x, y) to oriented (x, y) for boxes (continuous coordinates)."""
    maps = {
        1: lambda x, y: (x, y),
        2: lambda x, y: (width - x, y),
        3: lambda x, y: (width - x, height - y),
        4: lambda x, y: (x, height - y),
        5: lambda x, y: (y, x),
        6: lambda x, y: (height - y, x),
        7: lambda x, y: (height - y, width - x),
        8: lambda x, y: (y, width - x),
    }
    return maps.get(orientation, maps[1])
