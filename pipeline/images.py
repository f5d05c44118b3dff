"""The image codec: encoded bytes (PNG, JPEG, WebP, ...) <-> uint8 arrays of one fixed size.

Every stage that touches pixels goes through here, so training, embedding, ingest and the
report all see an image the same way:

- `decode_image(data, size, channels)` -> (size, size, channels) uint8, or `ImageDecodeError`
  whose str() is a short reason ("truncated image", "not an image", ...).
- `decode_batch(images, size, channels)` -> ((N, size, size, channels) uint8, reasons): one
  bad row never sinks the batch; its pixels are zeros and its reason is set.
- `encode_image(array)` -> bytes, for synthetic corpora, ingest, reconstructions and reports.
- `inspect_image(data)` -> width, height and format after a full (validating) decode.

Normalisation, in order:
1. Decompression-bomb cap: the header's width x height is checked against `max_pixels`
   before any pixel is decoded.
2. Large JPEGs are decoded at a reduced scale by libjpeg itself (`Image.draft`, 1/2, 1/4 or
   1/8 in the DCT), which skips most of the decode work; the draft keeps at least twice the
   target resolution (Pillow's `thumbnail` default) so the final resize still antialiases.
3. EXIF orientation is applied, so images come out upright as a viewer shows them.
4. Colour: alpha is composited on black (a transparent pixel carries no colour, and black
   is what zero-padding adds, so both read as "nothing here"); palettes are expanded
   (with their transparency); 16-bit samples are rescaled to 8 bits (x / 257, rounded),
   not clipped; CMYK / YCbCr / HSV become RGB. channels=1 is ITU-R 601 luminance.
   Floating-point grey ("F", 32-bit float TIFFs from microscopy or remote sensing) is
   mapped by its range, the same way everywhere: values all within [0, 1] are fractions of
   full scale (x 255); within [0, 255], 8-bit levels; anything else (negative values,
   larger ranges) is stretched linearly from the image's 0.5th-99.5th percentiles to
   0-255 and clipped. A NaN or infinite pixel is a reason ("non-finite pixel values"),
   never a guess.
5. Resize to a square (`resize`):
   - "pad" (default): fit inside the square keeping the aspect ratio, centred, black bars.
     Nothing of the image is lost and nothing is distorted, which matters for anomaly
     scoring: a defect at the edge of a wide photo must still be seen.
   - "crop": scale the short side to `size`, keep the centre square (loses the edges).
   - "stretch": scale each axis to `size` (distorts the aspect ratio).
   Resampling is antialiased bilinear (as torchvision's `Resize(antialias=True)`).

Multi-frame files (GIF, animated WebP, multi-page TIFF) give their first frame.
Only the formats in `SUPPORTED_FORMATS` are opened: Pillow plugins such as EPS would run
external programs on untrusted bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Register the plugins of the allow-list below (Pillow loads most lazily, and `formats=`
# in Image.open only looks at registered ones).
from PIL import (  # noqa: F401
    AvifImagePlugin,
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    Jpeg2KImagePlugin,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

RESIZE_POLICIES = ("pad", "crop", "stretch")
DEFAULT_RESIZE = "pad"
DEFAULT_MAX_PIXELS = 64_000_000
# Pillow format names (what `Image.format` says), the allow-list for `Image.open`.
SUPPORTED_FORMATS = tuple(
    name
    for name in ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF", "PPM", "JPEG2000", "AVIF")
    if name in Image.OPEN  # AVIF only where Pillow was built with libavif
)

# A JPEG draft keeps at least this multiple of the target size before the final resize.
DRAFT_GAP = 2.0
# Switch for bench/decode.py, which shows what the draft decode is worth; always on otherwise.
JPEG_DRAFT = True
# Resample in two steps (a cheap integer box reduce, then bilinear) when shrinking by more
# than this factor: Pillow's documented speed/quality knob; 3.0 is visually lossless.
REDUCING_GAP = 3.0
RESAMPLE = Image.Resampling.BILINEAR
_ORIENTATION_TAG = 0x0112

_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_MODES_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_MODES_TO_RGB = ("RGB", "RGBX", "CMYK", "YCbCr", "HSV")


class ImageDecodeError(ValueError):
    """An image that cannot be decoded; str() is a short reason meant for an `error` column."""


@dataclass(frozen=True)
class ImageInfo:
    """What `inspect_image` learns: the upright size (after EXIF orientation) and the format."""

    width: int
    height: int
    format: str  # Pillow's name, lower-cased: "png", "jpeg", "webp", ...


def _check_args(size: int, channels: int, resize: str) -> None:
    # Bad arguments are the caller's bug, not a bad row: plain ValueError, raised at once.
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be one of {RESIZE_POLICIES}, got {resize!r}")


def _open(data: bytes | None, max_pixels: int) -> Image.Image:
    """Open (header only) and apply the pixel cap; the caller must close the image."""
    if data is None:
        raise ImageDecodeError("missing image")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageDecodeError(f"not bytes ({type(data).__name__})")
    if len(data) == 0:
        raise ImageDecodeError("empty bytes")
    im = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise ImageDecodeError(f"too many pixels ({width} x {height} > {max_pixels})")
    if width < 1 or height < 1:
        im.close()
        raise ImageDecodeError(f"zero-sized image ({width} x {height})")
    return im


def _reason(error: Exception, max_pixels: int) -> str:
    """Translate Pillow's zoo of exceptions into a short, stable reason."""
    if isinstance(error, UnidentifiedImageError):
        return "not an image"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels (> {max_pixels})"
    message = str(error).strip() or type(error).__name__
    if "truncated" in message.lower() or isinstance(error, EOFError):
        return "truncated image"
    if isinstance(error, MemoryError):
        return "out of memory while decoding"
    return f"corrupt image ({message[:120]})"


def _draft_jpeg(im: Image.Image, size: int, channels: int, resize: str) -> None:
    """Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode that still covers the target size."""
    width, height = im.size
    if resize == "pad":
        scale = size / max(width, height)
    elif resize == "crop":
        scale = size / min(width, height)
    else:  # stretch: each axis on its own; draft takes the smaller reduction of the two
        scale = max(size / width, size / height)
    target = (math.ceil(width * scale * DRAFT_GAP), math.ceil(height * scale * DRAFT_GAP))
    # "L" makes libjpeg skip the chroma planes of a colour JPEG (its Y plane is 601 luma).
    im.draft("L" if channels == 1 else None, target)


def _upright(im: Image.Image) -> Image.Image:
    orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        from PIL import ImageOps

        return ImageOps.exif_transpose(im)
    return im


def _composite_on_black(im: Image.Image) -> np.ndarray:
    """(H, W, k+1) colour+alpha -> (H, W, k) premultiplied, i.e. composited on black."""
    target = "LA" if im.mode in ("LA", "La") else "RGBA"
    pixels = np.asarray(im.convert(target) if im.mode != target else im)
    alpha = pixels[..., -1:].astype(np.uint16)
    # Pillow's own premultiply ("RGBa") rounds down by one in places; exact here.
    return ((pixels[..., :-1] * alpha + 127) // 255).astype(np.uint8)


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit grey ("I;16*", or "I" holding 16-bit samples as PNG/TIFF give) -> "L" by x/257."""
    samples = np.asarray(im).astype(np.int64)
    samples = np.clip(samples, 0, 65535)
    return Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8), "L")


def _float_to_8bit(im: Image.Image) -> Image.Image:
    """32-bit float grey ("F") -> "L" by its range (module docstring, step 4)."""
    samples = np.asarray(im, dtype=np.float64)
    if not np.isfinite(samples).all():
        raise ImageDecodeError("non-finite pixel values (NaN or infinity)")
    lowest, highest = (float(samples.min()), float(samples.max())) if samples.size else (0.0, 0.0)
    if lowest >= 0.0 and highest <= 1.0:
        scaled = samples * 255.0
    elif lowest >= 0.0 and highest <= 255.0:
        scaled = samples
    else:
        low, high = np.percentile(samples, (0.5, 99.5))
        scaled = (samples - low) * (255.0 / (high - low)) if high > low else np.zeros_like(samples)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def _normalise_mode(im: Image.Image, channels: int) -> Image.Image | np.ndarray:
    """Bring any supported mode to "L" (channels=1) or "RGB" (channels=3).

    Returns an image, or an array when alpha compositing already produced the pixels.
    """
    mode = im.mode
    if mode == "P":
        mode = "PA" if im.has_transparency_data else "RGB"
        im = im.convert("RGBA" if mode == "PA" else "RGB")
    elif mode in _MODES_16BIT:
        im, mode = _to_8bit(im), "L"
    elif mode == "F":
        im, mode = _float_to_8bit(im), "L"
    elif mode == "1":
        im, mode = im.convert("L"), "L"
    if mode in _MODES_WITH_ALPHA:
        pixels = _composite_on_black(im)  # (H, W, 1) or (H, W, 3)
        if pixels.shape[-1] == channels:
            return pixels
        im = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        mode = im.mode
    if mode not in ("L", *_MODES_TO_RGB):
        raise ImageDecodeError(f"unsupported mode {mode}")
    if mode not in ("L", "RGB"):  # Pillow converts these to RGB, not always straight to L
        im, mode = im.convert("RGB"), "RGB"
    target = "L" if channels == 1 else "RGB"
    return im if mode == target else im.convert(target)


def _resize_into(pixels: Image.Image | np.ndarray, size: int, resize: str, out: np.ndarray) -> None:
    """Resize to (size, size) by `resize` policy and write into `out` (size, size, C)."""
    if isinstance(pixels, np.ndarray):
        im = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    else:
        im = pixels
    width, height = im.size
    if (width, height) == (size, size):
        resized = im
        top = left = 0
    elif resize == "stretch" or width == height:
        resized = im.resize((size, size), RESAMPLE, reducing_gap=REDUCING_GAP)
        top = left = 0
    elif resize == "crop":
        side = min(width, height)
        box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
        resized = im.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
        top = left = 0
    else:  # pad
        scale = size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        resized = im.resize((new_w, new_h), RESAMPLE, reducing_gap=REDUCING_GAP)
        top, left = (size - new_h) // 2, (size - new_w) // 2
        out[...] = 0
    arr = np.asarray(resized)
    if arr.ndim == 2:
        arr = arr[..., None]
    out[top : top + arr.shape[0], left : left + arr.shape[1]] = arr


def _decode_into(data: bytes | None, size: int, channels: int, resize: str, max_pixels: int, out: np.ndarray) -> None:
    try:
        with _open(data, max_pixels) as im:
            if JPEG_DRAFT and im.format in ("JPEG", "MPO") and max(im.size) > size:
                _draft_jpeg(im, size, channels, resize)
            im.load()
            pixels = _normalise_mode(_upright(im), channels)
            _resize_into(pixels, size, resize, out)
    except ImageDecodeError:
        raise
    except Exception as error:  # noqa: BLE001 - untrusted bytes: every failure is a reason
        raise ImageDecodeError(_reason(error, max_pixels)) from error


def decode_image(
    data: bytes,
    size: int,
    channels: int,
    resize: str = DEFAULT_RESIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode one encoded image to uint8 (size, size, channels); `ImageDecodeError` if it cannot."""
    _check_args(size, channels, resize)
    out = np.empty((size, size, channels), dtype=np.uint8)
    _decode_into(data, size, channels, resize, max_pixels, out)
    return out


def decode_batch(
    images: Sequence[bytes | None],
    size: int,
    channels: int,
    resize: str = DEFAULT_RESIZE,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, list[str | None]]:
    """Decode N images to (N, size, size, channels) uint8 plus one reason per row (None = fine).

    Failed rows are all zeros. Never raises for a bad row; raises ValueError only for bad
    arguments.
    """
    _check_args(size, channels, resize)
    batch = np.zeros((len(images), size, size, channels), dtype=np.uint8)
    reasons: list[str | None] = [None] * len(images)
    for row, data in enumerate(images):
        try:
            _decode_into(data, size, channels, resize, max_pixels, batch[row])
        except ImageDecodeError as error:
            batch[row] = 0
            reasons[row] = str(error)
    return batch, reasons


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Fully decode `data` (at a reduced JPEG scale: every DCT block is still read, so a
    truncated file is caught) and give its upright size and format; `ImageDecodeError` if
    the decoder would refuse it."""
    try:
        with _open(data, max_pixels) as im:
            width, height = im.size
            image_format = (im.format or "").lower()
            if im.format in ("JPEG", "MPO"):
                im.draft(None, (max(1, width // 8), max(1, height // 8)))
            im.load()
            if im.mode not in ("1", "L", "P", "F", *_MODES_16BIT, *_MODES_WITH_ALPHA, *_MODES_TO_RGB):
                raise ImageDecodeError(f"unsupported mode {im.mode}")
            # Read after load: a PNG may keep its eXIf chunk after the pixel data.
            orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    except ImageDecodeError:
        raise
    except Exception as error:  # noqa: BLE001 - untrusted bytes: every failure is a reason
        raise ImageDecodeError(_reason(error, max_pixels)) from error
    if orientation in (5, 6, 7, 8):  # a quarter turn swaps the axes
        width, height = height, width
    return ImageInfo(width=width, height=height, format=image_format)


def encode_image(array: np.ndarray, format: str = "png", quality: int = 90, *, compress_level: int = 6) -> bytes:
    """Encode uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) to PNG / JPEG / WebP / ... bytes.

    `quality` applies to lossy formats (JPEG, WebP); `compress_level` (zlib 0-9) to PNG,
    which is lossless and byte-identical for identical input, so seeded corpora reproduce.
    """
    pixels = np.asarray(array)
    if pixels.dtype != np.uint8:
        raise ValueError(
            f"encode_image needs uint8 pixels, got {pixels.dtype}; "
            "convert floats in [0, 1] with (x * 255).round().clip(0, 255).astype(np.uint8)"
        )
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] in (3, 4))):
        raise ValueError(f"encode_image needs (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {pixels.shape}")
    image_format = {"JPG": "JPEG", "TIF": "TIFF"}.get(format.upper(), format.upper())
    if image_format in ("JPEG", "WEBP", "AVIF"):
        options = {"quality": quality}
    else:
        options = {"compress_level": compress_level} if image_format == "PNG" else {}
    image = Image.fromarray(np.ascontiguousarray(pixels))
    if image_format == "JPEG" and image.mode == "RGBA":
        raise ValueError("JPEG has no alpha channel: drop it or encode as PNG / WebP")
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()
