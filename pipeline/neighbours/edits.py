"""The edits that make a near-duplicate, one kind at a time: what the duplicate threshold is calibrated on.

In the collections this project is for (web crawls, product photos, scans) a duplicate is an
image that went through one or more of these:

- crop      a share of width and of height cut off (the same share of each, at a random offset);
- rescale   stored smaller, by a factor in the range (the embed job resizes it back);
- jpeg      re-encoded as JPEG at a quality in the range;
- border    a uniform frame on every side, or letterbox bars on two opposite sides, each bar
            a share of the side in the range, in black, white or a grey;
- overlay   a watermark: a filled box with text in it (a logo or caption), covering a share of
            the area in the range, opaque or half transparent;
- flip      mirrored left to right (opt-in: whether a mirror image is a duplicate depends on
            the collection).

`edited_copy` applies exactly one edit, so what a threshold catches can be told per kind;
every kind but `jpeg` is stored losslessly (PNG). The ranges are `Edits`' fields, each a flag
of the neighbours job.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError
from pipeline.images import DEFAULT_MAX_PIXELS, RESAMPLE, SUPPORTED_FORMATS, encode_image

EDIT_KINDS = ("crop", "rescale", "jpeg", "border", "overlay", "flip")
DEFAULT_EDITS = ("crop", "rescale", "jpeg", "border", "overlay")  # flip is opt-in
OVERLAY_WORDS = ("SAMPLE", "© 2026", "SALE", "logo", "preview", "www.example.com", "NEW")


@dataclass(frozen=True)
class Edits:
    """Which edits calibration copies get, and how strong each is: (low, high) drawn uniformly per copy."""

    kinds: tuple[str, ...] = DEFAULT_EDITS
    crop: tuple[float, float] = (0.0, 0.15)  # share of width and of height cut off
    rescale: tuple[float, float] = (0.5, 1.0)  # stored at this factor of the original size
    quality: tuple[int, int] = (30, 95)  # JPEG quality
    border: tuple[float, float] = (0.02, 0.10)  # each bar's share of the side it is added to
    overlay: tuple[float, float] = (0.02, 0.10)  # share of the image area covered

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", tuple(self.kinds))
        unknown = [kind for kind in self.kinds if kind not in EDIT_KINDS]
        if unknown or not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise InputError(f"calibration edits must be distinct names from {', '.join(EDIT_KINDS)}, "
                             f"got {','.join(self.kinds) or 'none'}")
        for name, (least, most) in (("crop", (0.0, 0.5)), ("rescale", (0.05, 1.0)), ("quality", (1, 100)),
                                    ("border", (0.0, 0.5)), ("overlay", (0.0, 0.5))):
            low, high = getattr(self, name)
            if not least <= low <= high <= most:
                raise InputError(f"calibration {name} must be LOW,HIGH with {least} <= LOW <= HIGH <= {most}, "
                                 f"got {low},{high}")
            object.__setattr__(self, name, (low, high))


def edited_copy(data: bytes, kind: str, rng: np.random.Generator, edits: Edits = Edits()) -> bytes:
    """A near-duplicate of an encoded image made by one edit `kind`, encoded (JPEG for `jpeg`, else PNG).

    Raises (any exception) when the original cannot be opened; the caller counts that image.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS) as opened:
        if opened.size[0] * opened.size[1] > DEFAULT_MAX_PIXELS:
            raise ValueError("too many pixels")
        image = ImageOps.exif_transpose(opened).convert("RGB")
    if kind == "jpeg":
        low, high = edits.quality
        return encode_image(np.asarray(image), "jpeg", quality=int(rng.integers(low, high + 1)))
    edit = {"crop": _crop, "rescale": _rescale, "border": _border, "overlay": _overlay, "flip": _flip}[kind]
    return encode_image(np.asarray(edit(image, rng, edits)), "png", compress_level=1)


def _crop(image, rng: np.random.Generator, edits: Edits):
    width, height = image.size
    share = rng.uniform(*edits.crop)
    cut_w, cut_h = min(round(width * share), width - 1), min(round(height * share), height - 1)
    left, top = int(rng.integers(0, cut_w + 1)), int(rng.integers(0, cut_h + 1))
    return image.crop((left, top, left + width - cut_w, top + height - cut_h))


def _rescale(image, rng: np.random.Generator, edits: Edits):
    width, height = image.size
    factor = rng.uniform(*edits.rescale)
    return image.resize((max(1, round(width * factor)), max(1, round(height * factor))), RESAMPLE)


def _border(image, rng: np.random.Generator, edits: Edits):
    from PIL import Image

    width, height = image.size
    share = rng.uniform(*edits.border)
    colour = (0, 0, 0) if rng.random() < 0.4 else (255, 255, 255) if rng.random() < 0.6 else \
        (int(rng.integers(64, 192)),) * 3
    style = ("frame", "letterbox", "pillarbox")[int(rng.integers(3))]
    pad_x = round(width * share) if style != "letterbox" else 0
    pad_y = round(height * share) if style != "pillarbox" else 0
    framed = Image.new("RGB", (width + 2 * pad_x, height + 2 * pad_y), colour)
    framed.paste(image, (pad_x, pad_y))
    return framed


def _overlay(image, rng: np.random.Generator, edits: Edits):
    from PIL import Image, ImageDraw, ImageFont

    width, height = image.size
    area = rng.uniform(*edits.overlay) * width * height
    aspect = rng.uniform(1.5, 4.0)  # wider than tall, as captions and logos are
    box_w = int(min(width, max(1, round(np.sqrt(area * aspect)))))
    box_h = int(min(height, max(1, round(area / box_w))))
    left, top = int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1))
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    ink = (0, 0, 0) if sum(fill) > 384 else (255, 255, 255)
    opacity = 255 if rng.random() < 0.5 else 128
    mark = Image.new("RGBA", (box_w, box_h), (*fill, opacity))  # drawn apart: the text stays inside the box
    font = ImageFont.load_default(size=max(6, int(box_h * 0.6)))
    word = OVERLAY_WORDS[int(rng.integers(len(OVERLAY_WORDS)))]
    ImageDraw.Draw(mark).text((box_w / 2, box_h / 2), word, fill=(*ink, opacity), font=font, anchor="mm")
    marked = image.convert("RGBA")
    marked.alpha_composite(mark, (left, top))
    return marked.convert("RGB")


def _flip(image, rng: np.random.Generator, edits: Edits):
    from PIL import ImageOps

    return ImageOps.mirror(image)
