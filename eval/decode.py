"""Shard images to uint8 tensors: the evaluator's decoders (libjpeg-turbo on the CPU, nvJPEG on the GPU).

Only what the shard format defines is decoded (``pipeline.decode.SHARD_FORMATS``),
within the one decompression-bomb limit of ``pipeline.decode``. JPEGs take a
fast path that checks the frame header first and decodes with torchvision's
libjpeg-turbo, whose pixels equal PIL's for RGB and greyscale JPEGs; anything
else goes through PIL with the format allow-list.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from pipeline import decode as source_decode
from pipeline.records import RejectedInput

# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): C0-CF but DHT, JPG, DAC.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_frame_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's start-of-frame header; None if not a readable JPEG.

    Walks the marker segments only (a few microseconds): the size check before
    decoding without PIL parsing the whole header in Python.
    """
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # segments without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            return None
        if marker in _JPEG_SOF:
            if i + 10 > n:
                return None
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            return width, height, data[i + 9]
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _decode_jpeg_libjpeg(data: bytes) -> torch.Tensor | None:
    """torchvision's libjpeg-turbo decode (CHW view of HWC pixels), or None if it refuses the data."""
    with warnings.catch_warnings():  # torchvision flags its decoders as moving to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            return None  # PIL decodes it again and raises its usual one-line error


def _pil(data: bytes, formats: Sequence[str], mode: str) -> np.ndarray:
    """Decode with PIL, any decoder failure (PIL raises SyntaxError, struct.error, ...) as one ValueError."""
    try:
        with source_decode.open_image(data, formats=formats) as image:
            return np.array(image.convert(mode))
    except RejectedInput as exc:
        raise ValueError(f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason) from None
    except Exception as exc:  # noqa: BLE001 - a bad image is a finding about the sample, never a crash
        raise ValueError(f"undecodable_image: {source_decode.stable_message(exc)}") from None


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP -> uint8 (3, H, W) RGB (a channels-last view: batching copies it once anyway)."""
    frame = jpeg_frame_size(data)
    # Greyscale and 3-component JPEGs within the pixel limit only: CMYK/YCCK (4 components) stay
    # with PIL, whose Adobe-inverted CMYK conversion is the reference; anything odd falls through
    # to PIL, which checks the size again and raises its usual error.
    if frame is not None and frame[2] in (1, 3) and 0 < frame[0] * frame[1] <= source_decode.MAX_IMAGE_PIXELS:
        fast = _decode_jpeg_libjpeg(data)
        if fast is not None and tuple(fast.shape[1:]) == (frame[1], frame[0]):
            return fast
    return torch.from_numpy(_pil(data, source_decode.SHARD_FORMATS, "RGB")).permute(2, 0, 1)


def decode_mask(data: bytes) -> torch.Tensor:
    """Encoded mask PNG -> uint8 (H, W)."""
    return torch.from_numpy(_pil(data, source_decode.MASK_FORMATS, "L"))


def check_jpeg_header(data: bytes) -> bool:
    """Whether a JPEG may be decoded later on the device: a readable frame header within the pixel limit."""
    frame = jpeg_frame_size(data)
    return frame is not None and 0 < frame[0] * frame[1] <= source_decode.MAX_IMAGE_PIXELS


class JpegDecodeError(ValueError):
    """A JPEG that neither the device nor the CPU decoder accepts; ``index`` is its place in the batch."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"image {index} of the batch cannot be decoded ({reason})")
        self.index = index
        self.reason = reason


def decode_jpeg_batch(
    encoded: Sequence[torch.Tensor],
    device: str | torch.device,
    cpu_decode: Callable[[bytes], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Decode JPEG byte tensors on ``device`` (nvJPEG on CUDA) in one call.

    Falls back per image: if the batched call fails, each image is retried on
    the device alone and, failing that, on the CPU, so one odd JPEG (CMYK,
    progressive, ...) never sinks a batch. Results are uint8 (3, H, W) on ``device``.
    """
    cpu_decode = cpu_decode or decode_image
    with warnings.catch_warnings():  # torchvision flags its decoders as moving to torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            decoded = decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)
            return [d.to(device) for d in decoded]
        except Exception:  # noqa: BLE001 - any decoder failure is retried per image below
            pass
        out = []
        for data in encoded:
            try:
                out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device).to(device))
            except Exception:  # noqa: BLE001
                try:
                    out.append(cpu_decode(data.numpy().tobytes()).to(device))
                except (ValueError, OSError) as exc:
                    raise JpegDecodeError(len(out), str(exc)) from None
        return out
