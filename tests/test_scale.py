from __future__ import annotations

from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from smearpipe.io import read_image
from smearpipe.scale import (
    ScaleEstimationError,
    check_known_scale,
    detector_input_size,
    estimate_rbc_diameter,
    measure_rbc_box_px,
    rbc_box_diameter,
    rescale_factor,
)

from .conftest import SAMPLES


def synthetic_field(diameter: float, *, seed: int = 0, size=(480, 640), n: int | None = None, overlap: bool = True) -> np.ndarray:
    """Pink disks with a pale centre on a light background; touching/overlapping when ``overlap``."""
    rng = np.random.default_rng(seed)
    img = np.empty((*size, 3), np.uint8)
    img[:] = (235, 232, 228)
    r = diameter / 2
    n = n or int(0.45 * size[0] * size[1] / (np.pi * r * r))
    centres = []
    for _ in range(n * 20):
        if len(centres) >= n:
            break
        c = rng.uniform([r, r], [size[1] - r, size[0] - r])
        min_gap = 1.6 * r if overlap else 2.1 * r
        if all(np.hypot(*(c - d)) >= min_gap for d in centres):
            centres.append(c)
    for cx, cy in centres:
        cv2.circle(img, (int(round(cx)), int(round(cy))), int(round(r)), (200, 140, 150), -1, cv2.LINE_AA)
        cv2.circle(img, (int(round(cx)), int(round(cy))), int(round(r * 0.35)), (222, 190, 195), -1, cv2.LINE_AA)
    return img


@pytest.mark.parametrize("diameter", [20, 40, 80])
@pytest.mark.parametrize("overlap", [False, True])
def test_known_size_synthetic_fields(diameter, overlap):
    est = estimate_rbc_diameter(synthetic_field(diameter, overlap=overlap))
    assert est == pytest.approx(diameter, rel=0.12), est


def test_bccd_field_scales_proportionally(bccd_root):
    img = read_image(bccd_root / "JPEGImages" / "BloodImage_00231.jpg")
    base = estimate_rbc_diameter(img)
    assert 60 < base < 140  # annotated BCCD red cells: median box side ~105 px
    for s in (0.7, 0.4, 0.25):
        small = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_AREA)
        assert estimate_rbc_diameter(small) / s == pytest.approx(base, rel=0.15), s


def test_blank_field_raises_ours():
    with pytest.raises(ScaleEstimationError):
        estimate_rbc_diameter(np.full((100, 120, 3), 240, np.uint8))


def test_rescale_factor():
    img = synthetic_field(40)
    assert rescale_factor(img, target_rbc_diameter=40) == 1.0  # within tolerance: no resampling
    assert rescale_factor(img, target_rbc_diameter=100) == pytest.approx(2.5, rel=0.12)
    assert rescale_factor(img, target_rbc_diameter=100, rbc_diameter_px=25) == 4.0
    assert rescale_factor(img, target_rbc_diameter=100, pixel_size_um=0.15) == pytest.approx(2.0)  # 7.5 um / 0.15 = 50 px
    with pytest.raises(ValueError):
        rescale_factor(img, target_rbc_diameter=100, rbc_diameter_px=20, pixel_size_um=0.1)
    with pytest.raises(ValueError):
        rescale_factor(img, target_rbc_diameter=100, pixel_size_um=0)


def test_detector_input_size():
    # the training fields themselves: 640 px long side letterboxed to 512
    assert detector_input_size((480, 640, 3), factor=1.0, input_size=512, train_long_side=640) == 512
    # same magnification and pixel size, a field of view twice as wide: twice the input size keeps the cells' size
    assert detector_input_size((960, 1280, 3), factor=1.0, input_size=512, train_long_side=640) == 1024
    # same field of view on a camera with twice the pixel density: red cells twice as large (factor 0.5)
    assert detector_input_size((960, 1280, 3), factor=0.5, input_size=512, train_long_side=640) == 512
    # red cells 2.5x smaller than at training (lower magnification): seen 2.5x larger
    assert detector_input_size((480, 640), factor=2.5, input_size=512, train_long_side=640) == 1280
    # rounded to the stride, clipped to [stride, max_size]
    assert detector_input_size((480, 650), factor=1.0, input_size=512, train_long_side=640) == 512
    with pytest.warns(UserWarning, match="raised to 32 px"):  # 3.2 px: the cells are seen 10x larger than trained
        assert detector_input_size((30, 40), factor=0.1, input_size=512, train_long_side=640) == 32
    with pytest.warns(UserWarning, match="tiles"):
        assert detector_input_size((3000, 4000), factor=4.0, input_size=512, train_long_side=640) == 4096
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            detector_input_size((480, 640), factor=bad, input_size=512, train_long_side=640)


def _boxes(*boxes, label="RBC"):
    return [SimpleNamespace(label=label, box=b) for b in boxes]


def test_rbc_box_diameter():
    inside = _boxes((10, 10, 50, 40), (100, 100, 130, 140), (200, 50, 240, 90))  # 35, 35, 40 px
    assert rbc_box_diameter(inside, (300, 300, 3)) == pytest.approx(35.0)
    cut = _boxes((0, 10, 30, 40), (270, 270, 300, 300), (2.9, 100, 40, 140))  # at or within 3 px of the border
    wbc = _boxes((60, 60, 160, 160), (150, 150, 250, 250), label="WBC")
    assert rbc_box_diameter(inside + cut + wbc, (300, 300, 3)) == pytest.approx(35.0)
    assert rbc_box_diameter(inside[:2] + cut, (300, 300, 3)) is None  # fewer than 3 usable
    assert rbc_box_diameter(inside[:2], (300, 300, 3), min_cells=2) == pytest.approx(35.0)
    with pytest.raises(ValueError, match="min_cells"):
        rbc_box_diameter(inside, (300, 300, 3), min_cells=0)


def test_measure_rbc_box_px(tmp_path):
    class Fixed:
        def __init__(self):
            self.calls = []

        def predict(self, image):
            self.calls.append(image.shape)
            s = 20.0 if image.shape[0] == 100 else 30.0
            return _boxes(*[(10 + 1.5 * s * k, 10, 10 + 1.5 * s * k + s, 10 + s) for k in range(3)])

    path = tmp_path / "field.png"
    cv2.imwrite(str(path), np.full((120, 200, 3), 200, np.uint8))
    det = Fixed()
    fields = [np.zeros((100, 200, 3), np.uint8), path, np.zeros((120, 200, 3), np.uint8)]
    assert measure_rbc_box_px(det, fields) == pytest.approx(30.0)  # median of 20, 30, 30
    assert det.calls == [(100, 200, 3), (120, 200, 3), (120, 200, 3)]  # a path is read once

    class Nothing:
        def predict(self, image):
            return []

    with pytest.raises(ScaleEstimationError, match="enough red-cell boxes"):
        measure_rbc_box_px(Nothing(), fields)


def test_scale_functions_refuse_absurd_arguments():
    rgb = read_image(SAMPLES / "BloodImage_00007.jpg")
    for kw in ({"target_rbc_diameter": 0}, {"target_rbc_diameter": -1}, {"target_rbc_diameter": float("nan")},
               {"target_rbc_diameter": 80, "rbc_diameter_px": float("inf")},
               {"target_rbc_diameter": 80, "pixel_size_um": float("inf")}):
        with pytest.raises(ValueError, match="finite number > 0"):
            rescale_factor(rgb, **kw)
    for shape in ((0, 0), (-480, -640), ()):
        with pytest.raises(ValueError, match="image_shape"):
            detector_input_size(shape, factor=1.0, input_size=512, train_long_side=640)
    for kw in ({"max_pixels": -1}, {"max_pixels": 10.5}, {"min_diameter": -5}, {"min_diameter": float("nan")}):
        with pytest.raises(ValueError):
            estimate_rbc_diameter(rgb, **kw)


@pytest.mark.parametrize("kwargs, message", [
    (dict(pixel_size_um=2.5e-7), "3e\\+07 px"),       # metres given as micrometres
    (dict(pixel_size_um=100.0), "0.075 px"),         # a red cell under a tenth of a pixel
    (dict(rbc_diameter_px=1e-306), "outside 2-4000"),
    (dict(rbc_diameter_px=5000.0), "outside 2-4000"),
    (dict(rbc_diameter_px=float("inf")), "finite"),
])
def test_known_scale_in_a_wrong_unit_is_refused(kwargs, message):
    img = np.full((100, 100, 3), 200, np.uint8)
    with pytest.raises(ValueError, match=message):
        rescale_factor(img, target_rbc_diameter=40, **kwargs)
    with pytest.raises(ValueError, match=message):
        check_known_scale(**kwargs)


def test_known_scale_bounds_are_accepted():
    check_known_scale(rbc_diameter_px=2.0)
    check_known_scale(rbc_diameter_px=4000.0)
    check_known_scale(pixel_size_um=0.075)  # BCCD-like: 100 px red cells


def test_detector_input_size_below_the_stride_warns_and_overflow_raises():
    with pytest.warns(UserWarning, match="raised to 32 px"):
        assert detector_input_size((480, 640), factor=0.01, input_size=512, train_long_side=640) == 32
    with pytest.raises(ValueError, match="detector input"):
        detector_input_size((480, 640), factor=1e308, input_size=512, train_long_side=640)
