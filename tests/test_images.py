"""The image codec: every format and mode to the right shape, upright, scaled, and refused with a reason."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.images import (
    RESIZE_POLICIES,
    ImageDecodeError,
    decode_batch,
    decode_image,
    encode_image,
    inspect_image,
)

FORMATS = ["png", "jpeg", "webp", "bmp", "tiff", "gif"]


def _pil_bytes(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _quadrants(height=20, width=40) -> np.ndarray:
    """An asymmetric RGB image: four differently coloured quadrants, (H, W, 3)."""
    image = np.zeros((height, width, 3), np.uint8)
    h, w = height // 2, width // 2
    image[:h, :w] = (255, 0, 0)
    image[:h, w:] = (0, 255, 0)
    image[h:, :w] = (0, 0, 255)
    image[h:, w:] = (255, 255, 255)
    return image


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no pixel data: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("resize", RESIZE_POLICIES)
def test_every_format_decodes_to_size_and_channels(fmt, channels, resize):
    data = encode_image(_quadrants(), fmt)
    out = decode_image(data, 16, channels, resize)
    assert out.shape == (16, 16, channels) and out.dtype == np.uint8
    assert out.max() > 100  # real pixels, not a zero-filled failure


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (300, 200), (10, 200, 30)),
        Image.new("L", (300, 200), 77),
        Image.new("CMYK", (300, 200), (0, 255, 255, 0)),  # red in CMYK
    ],
    ids=["rgb", "grey", "cmyk"],
)
@pytest.mark.parametrize("progressive", [False, True])
def test_jpeg_variants(image, progressive):
    data = _pil_bytes(image, "JPEG", quality=95, progressive=progressive)
    rgb = decode_image(data, 32, 3, "stretch")
    grey = decode_image(data, 32, 1, "stretch")
    expected = np.asarray(image.convert("RGB"))[0, 0]
    assert rgb.shape == (32, 32, 3) and grey.shape == (32, 32, 1)
    assert np.abs(rgb.astype(int) - expected).max() <= 6
    assert abs(int(grey[16, 16, 0]) - int(np.asarray(image.convert("L"))[0, 0])) <= 6


def test_greyscale_image_to_three_channels_repeats_luminance():
    out = decode_image(encode_image(np.full((8, 8), 123, np.uint8)), 8, 3)
    assert (out == 123).all()


def test_colour_to_one_channel_is_601_luminance():
    out = decode_image(encode_image(np.full((8, 8, 3), (200, 100, 50), np.uint8)), 8, 1)
    assert abs(int(out[0, 0, 0]) - round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)) <= 1


def test_alpha_is_composited_on_black():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = 128
    rgba[0, 0, 3] = 0
    rgba[0, 1, 3] = 255
    out = decode_image(encode_image(rgba), 4, 3)
    assert tuple(out[0, 0]) == (0, 0, 0)
    assert tuple(out[0, 1]) == (200, 100, 50)
    assert tuple(out[1, 1]) == (100, 50, 25)  # round(c * 128 / 255)
    la = Image.fromarray(np.dstack([np.full((4, 4), 200, np.uint8), np.full((4, 4), 64, np.uint8)]), "LA")
    assert (decode_image(_pil_bytes(la, "PNG"), 4, 1) == 50).all()  # round(200 * 64 / 255)


def test_palette_with_transparency():
    palette = Image.new("P", (4, 2))
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.putpixel((0, 1), 1)
    palette.info["transparency"] = 1  # index 1 (green) is transparent
    for fmt in ("PNG", "GIF"):
        out = decode_image(_pil_bytes(palette, fmt), 4, 3, "stretch")
        assert tuple(out[0, 0]) == (255, 0, 0), fmt
        assert tuple(out[3, 0]) == (0, 0, 0), fmt  # the transparent row, composited on black


def test_16_bit_is_scaled_not_clipped():
    samples = np.array([[0, 257 * 128, 65535, 1000]], np.uint16)
    data = _pil_bytes(Image.fromarray(samples), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = decode_image(data, 4, 1, "stretch")  # 4x1 stretched to 4x4: columns keep their values
    assert out[0, :, 0].tolist() == [0, 128, 255, 4]  # 1000 / 257 = 3.9 -> 4 (clipping would give 255)


def _grey_gradient(height=24, width=40) -> np.ndarray:
    """An 8-bit grey image with every level from 0 to 255 and some texture."""
    y, x = np.mgrid[0:height, 0:width]
    return ((x * 255 // (width - 1) + 37 * (y % 3)) % 256).astype(np.uint8)


@pytest.mark.parametrize("scale", ["fraction", "levels"])
def test_float_tiff_and_16_bit_png_decode_as_their_8_bit_twin(scale):
    """32-bit float grey (as microscopy writes it) and 16-bit grey decode to the 8-bit image
    they stand for, within one level, at any size and in colour too."""
    grey = _grey_gradient()
    eight = _pil_bytes(Image.fromarray(grey, "L"), "PNG")
    floats = grey.astype(np.float32) / (255.0 if scale == "fraction" else 1.0)
    tiff = _pil_bytes(Image.fromarray(floats, "F"), "TIFF")
    assert Image.open(io.BytesIO(tiff)).mode == "F"
    sixteen = _pil_bytes(Image.fromarray(grey.astype(np.uint16) * 257), "PNG")
    assert Image.open(io.BytesIO(sixteen)).mode.startswith("I")
    for size, channels in ((40, 1), (16, 3)):
        reference = decode_image(eight, size, channels).astype(int)
        for data in (tiff, sixteen):
            assert np.abs(decode_image(data, size, channels).astype(int) - reference).max() <= 1


def test_float_tiff_outside_8_bit_range_is_stretched_from_its_percentiles():
    rng = np.random.default_rng(0)
    values = rng.normal(1500.0, 400.0, (32, 32)).astype(np.float32)
    values[0, 0], values[0, 1] = -5e4, 9e5  # outliers beyond the 0.5-99.5 percentiles: clipped
    out = decode_image(_pil_bytes(Image.fromarray(values, "F"), "TIFF"), 32, 1, "stretch")[..., 0]
    low, high = np.percentile(values, (0.5, 99.5))
    expected = np.clip(np.rint((values.astype(np.float64) - low) * 255 / (high - low)), 0, 255)
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert out[0, 0] == 0 and out[0, 1] == 255 and 100 < out.mean() < 155
    again = decode_image(_pil_bytes(Image.fromarray(values, "F"), "TIFF"), 32, 1, "stretch")[..., 0]
    np.testing.assert_array_equal(out, again)  # deterministic


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_comes_out_upright(orientation):
    upright = Image.fromarray(_quadrants(20, 40))
    # What a camera stores so that applying `orientation` shows `upright`.
    inverse = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        4: Image.Transpose.FLIP_TOP_BOTTOM,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }
    stored = upright.transpose(inverse[orientation]) if orientation in inverse else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _pil_bytes(stored, "PNG", exif=exif.tobytes())
    out = decode_image(data, 40, 3, "pad")  # no scaling: the 40x20 image sits in rows 10..29
    np.testing.assert_array_equal(out[10:30], np.asarray(upright))
    assert (out[:10] == 0).all() and (out[30:] == 0).all()
    info = inspect_image(data)
    assert (info.width, info.height) == (40, 20)


def test_exif_rotated_jpeg_comes_out_upright():
    upright = _quadrants(64, 128)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # orientation 6 undoes this
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(_pil_bytes(stored, "JPEG", quality=95, exif=exif.tobytes()), 32, 3, "stretch")
    expected = np.asarray(Image.fromarray(upright).resize((32, 32)))
    assert np.abs(out.astype(int) - expected).mean() < 12


def test_pad_crop_and_stretch_geometry():
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:60] = (0, 255, 0)
    wide[:, 60:] = (0, 0, 255)
    data = encode_image(wide)
    padded = decode_image(data, 40, 3, "pad")  # 80x40 -> 40x20, centred: black rows 0..9 and 30..39
    assert (padded[:10] == 0).all() and (padded[30:] == 0).all() and padded[10:30].min(axis=(0, 1)).sum() == 0
    assert padded[20, 0, 0] == 255 and padded[20, 39, 2] == 255
    cropped = decode_image(data, 40, 3, "crop")  # the centre 40x40 square is all green
    assert (cropped == (0, 255, 0)).all()
    stretched = decode_image(data, 40, 3, "stretch")
    assert stretched[20, 0, 0] == 255 and stretched[20, 20, 1] == 255 and stretched[20, 39, 2] == 255
    assert stretched[0].max() > 0  # no bars


def test_large_jpeg_draft_decode_matches_full_decode():
    rng = np.random.default_rng(0)
    smooth = np.asarray(Image.fromarray(rng.integers(0, 256, (16, 16, 3), np.uint8)).resize((512, 512), Image.BICUBIC))
    data = encode_image(smooth, "jpeg", quality=95)
    drafted = decode_image(data, 64, 3)
    full = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.BILINEAR))
    assert np.abs(drafted.astype(int) - full).mean() < 3
    assert Image.open(io.BytesIO(data)).size == (512, 512)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (None, "missing image"),
        (b"", "empty bytes"),
        (b"definitely not an image", "not an image"),
        (encode_image(_quadrants())[:60], "truncated image"),
        (encode_image(_quadrants(), "jpeg")[:300], "truncated image"),
        (_png_header_only(9000, 9000), "too many pixels (9000 x 9000 > 64000000)"),
        (_png_header_only(20000, 20000), "too many pixels"),  # Pillow's own bomb guard fires first
        (_pil_bytes(Image.fromarray(np.full((4, 4), np.nan, np.float32), "F"), "TIFF"), "non-finite pixel values"),
        ("a str", "not bytes (str)"),
    ],
    ids=["none", "empty", "text", "truncated-png", "truncated-jpeg", "cap", "bomb", "float", "str"],
)
def test_bad_inputs_give_their_reason_and_good_rows_survive(data, reason):
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, 8, 3)
    assert str(caught.value).startswith(reason)
    good = encode_image(_quadrants(8, 8))
    batch, reasons = decode_batch([good, data, good], 8, 3)
    assert reasons[0] is None and reasons[2] is None and reasons[1].startswith(reason)
    np.testing.assert_array_equal(batch[0], _quadrants(8, 8))
    np.testing.assert_array_equal(batch[2], _quadrants(8, 8))
    assert (batch[1] == 0).all()


def test_max_pixels_is_configurable():
    data = encode_image(_quadrants(20, 20))
    with pytest.raises(ImageDecodeError, match=r"too many pixels \(20 x 20 > 399\)"):
        decode_image(data, 8, 3, max_pixels=399)
    assert decode_image(data, 8, 3, max_pixels=400).shape == (8, 8, 3)


def test_bad_arguments_raise_plain_value_error():
    data = encode_image(_quadrants())
    for kwargs in ({"size": 0, "channels": 3}, {"size": 8, "channels": 2}, {"size": 8, "channels": 3, "resize": "zoom"}):
        with pytest.raises(ValueError) as caught:
            decode_batch([data], **kwargs)
        assert not isinstance(caught.value, ImageDecodeError)


def test_decode_batch_of_nothing():
    batch, reasons = decode_batch([], 8, 1)
    assert batch.shape == (0, 8, 8, 1) and reasons == []


@pytest.mark.parametrize("shape", [(6, 10), (6, 10, 1), (6, 10, 3), (6, 10, 4)])
def test_png_encode_round_trip_is_exact(shape):
    pixels = np.random.default_rng(1).integers(0, 256, shape, np.uint8)
    decoded = np.asarray(Image.open(io.BytesIO(encode_image(pixels))))
    np.testing.assert_array_equal(decoded, pixels.reshape(decoded.shape))


def test_encode_refuses_floats_and_alpha_jpeg():
    with pytest.raises(ValueError, match="uint8"):
        encode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="alpha"):
        encode_image(np.zeros((4, 4, 4), np.uint8), "jpeg")
    assert encode_image(np.zeros((4, 4, 3), np.uint8), "jpg")[:2] == b"\xff\xd8"


def test_inspect_image_reports_size_and_format():
    for fmt in FORMATS:
        info = inspect_image(encode_image(_quadrants(20, 40), fmt))
        assert (info.width, info.height, info.format) == (40, 20, fmt)
    with pytest.raises(ImageDecodeError, match="truncated"):
        inspect_image(encode_image(_quadrants(64, 64), "jpeg")[:200])
