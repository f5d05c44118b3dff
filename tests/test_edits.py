"""The near-duplicate edits the duplicate threshold is calibrated on: each does what it says, alone."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.errors import InputError
from pipeline.images import encode_image
from pipeline.neighbours.calibrate import edit_kinds, recall_by_edit
from pipeline.neighbours.edits import DEFAULT_EDITS, EDIT_KINDS, Edits, edited_copy
from pipeline.synth import synthetic_image

SIDE = 96


def _original() -> tuple[np.ndarray, bytes]:
    pixels = synthetic_image(5, 11, SIDE, 3)
    return pixels, encode_image(pixels)


def _open(data: bytes) -> tuple[str, np.ndarray]:
    with Image.open(io.BytesIO(data)) as image:
        return image.format, np.asarray(image.convert("RGB"))


def _copies(kind: str, edits: Edits = Edits(), n: int = 20) -> list[tuple[str, np.ndarray]]:
    _, data = _original()
    return [_open(edited_copy(data, kind, np.random.default_rng(seed), edits)) for seed in range(n)]


def test_a_crop_cuts_a_share_of_each_side_in_range_and_keeps_the_rest_as_it_was():
    pixels, _ = _original()
    edits = Edits(crop=(0.05, 0.15))
    for fmt, copy in _copies("crop", edits):
        height, width = copy.shape[:2]
        assert fmt == "PNG" and height == width and 0.05 * SIDE - 1 <= SIDE - width <= 0.15 * SIDE + 1
        # the copy is a window of the original, pixel for pixel
        found = [(top, left) for top in range(SIDE - height + 1) for left in range(SIDE - width + 1)
                 if np.array_equal(pixels[top:top + height, left:left + width], copy)]
        assert len(found) >= 1


def test_a_rescale_stores_the_image_smaller_by_a_factor_in_range():
    sides = [copy.shape[0] for _, copy in _copies("rescale", Edits(rescale=(0.5, 0.7)))]
    assert all(round(0.5 * SIDE) <= side <= round(0.7 * SIDE) for side in sides) and len(set(sides)) > 3


def test_a_jpeg_copy_is_a_jpeg_at_a_quality_in_range_and_lossy():
    pixels, _ = _original()
    for fmt, copy in _copies("jpeg", Edits(quality=(30, 40)), n=5):
        assert fmt == "JPEG" and copy.shape == pixels.shape and not np.array_equal(copy, pixels)


def test_a_border_frames_the_untouched_image_in_one_colour():
    pixels, _ = _original()
    styles = set()
    for fmt, copy in _copies("border", Edits(border=(0.05, 0.10)), n=30):
        height, width = copy.shape[:2]
        pad_y, pad_x = (height - SIDE) // 2, (width - SIDE) // 2
        assert fmt == "PNG" and (pad_y or pad_x) and np.array_equal(copy[pad_y:pad_y + SIDE, pad_x:pad_x + SIDE], pixels)
        for bar in (copy[:pad_y], copy[:, :pad_x]):
            if bar.size:
                assert (bar == bar.reshape(-1, 3)[0]).all()
                assert 0.05 * SIDE - 1 <= max(pad_y, pad_x) <= 0.10 * SIDE + 1
        styles.add((pad_y > 0, pad_x > 0))
    assert styles == {(True, True), (True, False), (False, True)}  # frame, letterbox, pillarbox


def test_an_overlay_changes_only_a_box_of_the_share_of_the_area_asked():
    pixels, _ = _original()
    for fmt, copy in _copies("overlay", Edits(overlay=(0.04, 0.08))):
        changed = np.any(copy != pixels, axis=2)
        rows, cols = np.flatnonzero(changed.any(axis=1)), np.flatnonzero(changed.any(axis=0))
        box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
        assert fmt == "PNG" and copy.shape == pixels.shape
        assert changed.mean() >= 0.5 * 0.04 and box <= 0.08 * SIDE * SIDE * 1.15  # rounding of a small box


def test_a_flip_is_the_mirror_image():
    pixels, _ = _original()
    fmt, copy = _copies("flip", n=1)[0]
    assert fmt == "PNG" and np.array_equal(copy, pixels[:, ::-1])


def test_copies_are_the_same_for_the_same_seed_and_differ_between_seeds():
    _, data = _original()
    for kind in EDIT_KINDS:
        if kind == "flip":
            continue
        first, again, other = (edited_copy(data, kind, np.random.default_rng(s), Edits()) for s in (1, 1, 2))
        assert first == again and first != other, kind


def test_a_file_that_is_not_an_image_raises():
    with pytest.raises(Exception):
        edited_copy(b"not an image", "crop", np.random.default_rng(0))


@pytest.mark.parametrize("settings, message", [
    ({"kinds": ("crop", "zoom")}, "distinct names"),
    ({"kinds": ()}, "distinct names"),
    ({"kinds": ("crop", "crop")}, "distinct names"),
    ({"crop": (0.2, 0.1)}, "calibration crop"),
    ({"overlay": (0.0, 0.9)}, "calibration overlay"),
    ({"quality": (0, 50)}, "calibration quality"),
])
def test_edits_out_of_range_are_refused(settings, message):
    with pytest.raises(InputError, match=message):
        Edits(**settings)


def test_the_kinds_take_turns_along_the_sample_and_flip_is_opt_in():
    assert "flip" in EDIT_KINDS and "flip" not in DEFAULT_EDITS
    keys = np.random.default_rng(0).integers(0, 2**63, 103, dtype=np.uint64)
    kinds = edit_kinds(keys, DEFAULT_EDITS)
    counts = {kind: kinds.count(kind) for kind in DEFAULT_EDITS}
    assert set(counts.values()) == {20, 21} and kinds == edit_kinds(keys, DEFAULT_EDITS)
    smallest = int(np.argmin(keys))
    assert kinds[smallest] == DEFAULT_EDITS[0]


def test_recall_by_edit_counts_each_kind_against_the_threshold():
    positives = np.array([0.1, 0.5, 0.2, 0.9, 0.3])
    kinds = np.array(["crop", "crop", "jpeg", "jpeg", "jpeg"])
    got = recall_by_edit(positives, kinds, ("crop", "jpeg", "border"), threshold=0.35)
    assert got["crop"] == {"copies": 2, "recall": 0.5, "median_distance": pytest.approx(0.3)}
    assert got["jpeg"]["recall"] == pytest.approx(2 / 3) and got["jpeg"]["copies"] == 3
    assert got["border"] == {"copies": 0, "recall": None, "median_distance": None}


def test_the_neighbours_flags_set_the_calibration_edits():
    from jobs.neighbours import parse_args

    cfg = parse_args(["--latents", "l", "--out", "o", "--model", "m", "--data", "d", "--calibration-edits",
                      "crop, flip", "--calibration-crop", "0.1,0.2", "--calibration-overlay", "0.01,0.03"])
    assert cfg.edits == Edits(kinds=("crop", "flip"), crop=(0.1, 0.2), overlay=(0.01, 0.03))
    assert parse_args(["--latents", "l", "--out", "o", "--model", "m", "--data", "d"]).edits == Edits()
    with pytest.raises(InputError, match="distinct names .* got crop,rotate"):
        parse_args(["--latents", "l", "--out", "o", "--model", "m", "--data", "d", "--calibration-edits",
                    "crop,rotate"])
