"""Nucleus framing: the crop a classifier sees no longer depends on magnification or how tightly it was cut."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from smearpipe.classify import Classifier, prepare_crops
from smearpipe.framing import frame_cell, nucleus_box
from smearpipe.train import train_classifier

from .conftest import SHARED


def synthetic_cell(side: int, centre: tuple[int, int], nucleus_r: int, cell_r: int) -> np.ndarray:
    """Pale background, pink red cells, a lilac cytoplasm and a dark purple nucleus."""
    img = np.full((side, side, 3), (235, 225, 215), np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(6):
        x, y = (int(v) for v in rng.integers(0, side, 2))
        cv2.circle(img, (x, y), side // 12, (215, 150, 150), -1)
    cv2.circle(img, centre, cell_r, (200, 170, 210), -1)
    cv2.circle(img, centre, nucleus_r, (90, 50, 140), -1)
    return img


@pytest.mark.parametrize("side,centre,r", [(360, (180, 180), 40), (360, (200, 160), 25), (120, (60, 60), 40)])
def test_nucleus_box_finds_the_nucleus(side, centre, r):
    x0, y0, x1, y1 = nucleus_box(synthetic_cell(side, centre, r, int(r * 1.5)))
    assert abs((x0 + x1) / 2 - centre[0]) <= 3 and abs((y0 + y1) / 2 - centre[1]) <= 3
    assert abs((x1 - x0) - 2 * r) <= 0.1 * 2 * r + 3 and abs((y1 - y0) - 2 * r) <= 0.1 * 2 * r + 3


def test_frame_cell_makes_magnification_irrelevant():
    """The same cell at two magnifications and framings gives (nearly) the same framed crop."""
    wide = synthetic_cell(360, (170, 190), 30, 45)  # low magnification, wide frame
    tight = cv2.resize(wide[115:265, 95:245], (300, 300), interpolation=cv2.INTER_LINEAR)  # 2x, tight crop
    a, b = frame_cell(wide, 1.6), frame_cell(tight, 1.6)
    assert a.shape[0] == a.shape[1] and b.shape[0] == b.shape[1]
    assert abs(a.shape[0] - 1.6 * 61) <= 6 and abs(b.shape[0] - 2 * 1.6 * 61) <= 12
    small_a, small_b = (cv2.resize(x, (48, 48), interpolation=cv2.INTER_AREA).astype(float) for x in (a, b))
    assert np.abs(small_a - small_b).mean() < 6  # vs ~40 grey levels between the unframed crops
    unframed = np.abs(cv2.resize(wide, (48, 48), interpolation=cv2.INTER_AREA).astype(float)
                      - cv2.resize(tight, (48, 48), interpolation=cv2.INTER_AREA).astype(float)).mean()
    assert unframed > 20


def test_frame_cell_pads_at_the_border_and_passes_blank_crops():
    img = synthetic_cell(200, (30, 100), 25, 30)  # nucleus near the left edge
    out = frame_cell(img, 2.0)  # ~2 x 50 px, reaching 20 px past the left edge: padded
    assert out.dtype == np.uint8 and out.shape[0] == out.shape[1] and 95 <= out.shape[0] <= 120
    c = out.shape[0] // 2
    assert out[c, c, 0] < 120  # the nucleus is in the middle
    blank = np.full((80, 90, 3), 230, np.uint8)
    assert frame_cell(blank, 1.6) is blank and nucleus_box(blank) is None
    with pytest.raises(ValueError, match="margin"):
        frame_cell(img, 1.0)


def test_frame_cell_on_real_crops(pbc_crops):
    """PBC frames show most cells at ~40 % of the width: framing zooms in around the central nucleus."""
    zoomed = 0
    for cls, img in pbc_crops.items():
        x0, y0, x1, y1 = nucleus_box(img)
        h, w = img.shape[:2]
        assert abs((x0 + x1) / 2 - w / 2) < 0.15 * w and abs((y0 + y1) / 2 - h / 2) < 0.15 * h, cls
        out = frame_cell(img, 1.6)
        assert out.shape[0] == out.shape[1] == max(8, round(1.6 * max(x1 - x0, y1 - y0))), cls
        zoomed += out.shape[0] < 0.8 * min(h, w)
    assert zoomed >= 3  # the large monocyte of this set fills its frame already
    crop = cv2.cvtColor(cv2.imread(str(SHARED / "bccd_wbc_subtypes" / "BCCD_cropped" / "Lymphocyte" / "BloodImage_00020_1.jpg")),
                        cv2.COLOR_BGR2RGB) if (SHARED / "bccd_wbc_subtypes").is_dir() else None
    if crop is not None:  # a tightly cut crop keeps about its framing
        out = frame_cell(crop, 1.6)
        assert 0.6 < out.shape[0] / crop.shape[0] < 1.6


def test_framed_training_is_recorded_and_repeated_at_inference(tiny_crops, tmp_path):
    run = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, batch_size=5, input_size=32,
                           out_dir=tmp_path, num_workers=0, frame_margin=1.6)
    assert json.loads(run.record.read_text())["frame_margin"] == 1.6
    clf = Classifier.load(run.weights)
    assert clf.frame_margin == 1.6
    crop = synthetic_cell(200, (110, 90), 30, 45)
    x = prepare_crops([crop], size=32, preprocessing=clf.preprocessing, preprocess_resized=clf.preprocess_resized,
                      mean=clf.mean, std=clf.std, frame_margin=1.6)
    logits_in = clf.model.float()(__import__("torch").from_numpy(x)).softmax(1).detach().numpy()
    np.testing.assert_allclose(Classifier.load(run.weights, precision="fp32").predict_proba([crop]), logits_in, atol=1e-5)
    with pytest.raises(ValueError, match="frame_margin"):
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, input_size=32, out_dir=tmp_path,
                         frame_margin=0.5)
