from __future__ import annotations

import dataclasses
import json

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from smearpipe import SmearpipeError
from smearpipe.datasets import read_voc
from smearpipe.errors import InvalidImageError, NotFittedError, StainEstimationError
from smearpipe.io import read_image
from smearpipe.preprocess import (
    MacenkoNormalizer,
    MacenkoReference,
    Preprocessing,
    ReinhardReference,
    clahe,
    default_reinhard_reference,
    estimate_background,
    field_reinhard_reference,
    lab_statistics,
    match_sharpness,
    median_filter,
    reinhard_normalize,
    sharpness,
    stained_mask,
)

from .conftest import REPO

FUNCS = {
    "median": lambda im: median_filter(im, ksize=3),
    "median5": lambda im: median_filter(im, ksize=5),
    "clahe": lambda im: clahe(im),
    "macenko": lambda im: MacenkoNormalizer.default().transform(im),
    "reinhard": lambda im: reinhard_normalize(im),
    "sharpen": lambda im: match_sharpness(im),
}


def _lum(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64).mean(axis=-1)


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_shape_dtype_preserved_on_real_field(name, bccd_field):
    out = FUNCS[name](bccd_field)
    assert out.shape == bccd_field.shape and out.dtype == np.uint8
    assert out is not bccd_field


@pytest.mark.parametrize("name", sorted(FUNCS))
def test_shape_dtype_preserved_on_pbc_crop(name, pbc_crops):
    crop = pbc_crops["monocyte"]
    out = FUNCS[name](crop)
    assert out.shape == crop.shape and out.dtype == np.uint8


def test_median_bad_ksize_names_the_limit():
    """OpenCV's constant-time median of uint8 images counts in 16 bits: 257 can fail (k < 16) or be wrong."""
    img = np.zeros((4, 4, 3), np.uint8)
    assert median_filter(img, ksize=255).shape == img.shape
    for ksize in (257, 1001, 99999):
        with pytest.raises(ValueError, match=r"odd integer in \[1, 255\]"):
            median_filter(img, ksize=ksize)
    with pytest.raises(ValueError, match="255"):
        Preprocessing(median_ksize=257)


def test_median_removes_salt_noise():
    img = np.full((32, 32, 3), 100, np.uint8)
    noisy = img.copy()
    noisy[5, 7] = 255
    noisy[20, 3] = 0
    np.testing.assert_array_equal(median_filter(noisy, ksize=3), img)
    np.testing.assert_array_equal(median_filter(noisy, ksize=1), noisy)


@pytest.mark.parametrize("ksize", [0, 2, -3, 4.0, True, "3"])
def test_median_bad_ksize(ksize):
    with pytest.raises(ValueError, match="odd integer"):
        median_filter(np.zeros((4, 4, 3), np.uint8), ksize=ksize)


def _local_contrast(gray: np.ndarray) -> float:
    mean = cv2.blur(gray.astype(np.float32), (15, 15))
    sq = cv2.blur(gray.astype(np.float32) ** 2, (15, 15))
    return float(np.sqrt(np.maximum(sq - mean**2, 0)).mean())


def test_clahe_raises_local_contrast_and_keeps_colour(bccd_field):
    out = clahe(bccd_field, clip_limit=2.0)
    lab_in = cv2.cvtColor(bccd_field, cv2.COLOR_RGB2LAB)
    lab_out = cv2.cvtColor(out, cv2.COLOR_RGB2LAB)
    before, after = _local_contrast(lab_in[..., 0]), _local_contrast(lab_out[..., 0])
    assert after > 1.2 * before, (before, after)
    # chroma channels move only by the Lab<->RGB round trip and gamut clipping
    assert np.abs(lab_out[..., 1:].astype(int) - lab_in[..., 1:]).mean() < 2.0


@pytest.mark.parametrize("kwargs", [{"clip_limit": 0}, {"clip_limit": -1}, {"clip_limit": float("nan")},
                                    {"tile_grid": (0, 8)}, {"tile_grid": (8,)}, {"tile_grid": "ab"}])
def test_clahe_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        clahe(np.zeros((8, 8, 3), np.uint8), **kwargs)


def test_clahe_tile_grid_limit():
    img = np.zeros((8, 8, 3), np.uint8)
    assert clahe(img, tile_grid=(256, 256)).shape == img.shape  # more tiles than pixels: OpenCV pads
    for grid in ((8, 257), (100000, 100000), (float("inf"), 8)):
        with pytest.raises(ValueError, match=r"tile_grid must be two integers in \[1, 256\]"):
            clahe(img, tile_grid=grid)
        with pytest.raises(ValueError, match=r"clahe_tile_grid must be two integers in \[1, 256\]"):
            Preprocessing(clahe_tile_grid=grid)


def test_background_estimate(bccd_field, pbc_crops):
    bg = estimate_background(bccd_field)
    # BCCD background is a light grey; PBC is a light beige (R > G > B)
    assert bg.min() > 180
    pbc_bg = estimate_background(pbc_crops["neutrophil"])
    assert pbc_bg[0] > pbc_bg[1] > pbc_bg[2] > 150


def test_default_reference_is_ordered_nucleus_first(pbc_crops):
    ref = MacenkoNormalizer.default().reference
    stains = np.asarray(ref.stain_matrix)
    np.testing.assert_allclose(np.linalg.norm(stains, axis=1), 1.0, rtol=1e-9)
    assert "train split" in ref.source
    # the densest pixels (nuclei) of each PBC crop point closer to the nuclear vector (row 0)
    for cls, img in pbc_crops.items():
        od = -np.log((img.reshape(-1, 3) + 1.0) / (np.asarray(ref.background) + 1.0))
        dense = od[np.linalg.norm(od, axis=1) >= np.percentile(np.linalg.norm(od, axis=1), 99)].mean(axis=0)
        cos = stains @ (dense / np.linalg.norm(dense))
        assert cos[0] > cos[1], (cls, cos)


@pytest.mark.parametrize("cls", ["neutrophil", "lymphocyte", "eosinophil"])
def test_macenko_fit_on_a_apply_to_a_is_near_identity(cls, pbc_crops):
    img = pbc_crops[cls]
    out = MacenkoNormalizer().fit(img).transform(img)
    diff = np.abs(out.astype(int) - img)
    # Not exact: Macenko keeps only the optical-density component in the two-stain plane, and
    # pale background pixels below the stained threshold are projected too. Measured on PBC
    # train crops: mean 1.5-10, 99th percentile 11-46 grey levels.
    assert diff.mean() < 8.0, diff.mean()
    assert np.percentile(diff, 99) < 40


def test_macenko_fit_on_several_images(pbc_crops):
    norm = MacenkoNormalizer().fit(list(pbc_crops.values()), source="five PBC crops")
    assert norm.reference.source == "five PBC crops"
    out = norm.transform(pbc_crops["basophil"])
    assert np.abs(out.astype(int) - pbc_crops["basophil"]).mean() < 8.0


BCCD_FIELDS = ["BloodImage_00000", "BloodImage_00001", "BloodImage_00010", "BloodImage_00100", "BloodImage_00300"]


@pytest.mark.parametrize("stem", BCCD_FIELDS)
def test_bccd_to_pbc_keeps_nucleus_purple_and_background_bright(stem, bccd_root):
    """The torchstain failure (nucleus turned white, plasma purple) must not happen."""
    img = read_image(bccd_root / "JPEGImages" / f"{stem}.jpg")
    (_, _), boxes = read_voc(bccd_root / "Annotations" / f"{stem}.xml")
    wbc = [b for b in boxes if b.label == "WBC"][0]
    out = MacenkoNormalizer.default().transform(img)

    lum_src = _lum(img)
    box = np.zeros(lum_src.shape, bool)
    box[int(wbc.ymin): int(wbc.ymax), int(wbc.xmin): int(wbc.xmax)] = True
    # nucleus: darkest 15 % of the WBC box in the source; background: brightest 10 % of the field
    nucleus = box & (lum_src <= np.percentile(lum_src[box], 15))
    background = lum_src >= np.percentile(lum_src, 90)
    rest = ~nucleus & ~background

    lum_out = _lum(out)
    assert lum_out[nucleus].mean() < lum_out[rest].mean() < lum_out[background].mean()
    assert np.percentile(lum_out[background], 50) > np.percentile(lum_out, 75)
    o = out.astype(np.float64)
    blue_purple = o[..., 2] - o[..., 0]  # B - R: positive for blue/purple, negative for pink/orange/beige
    assert blue_purple[nucleus].mean() > 15
    assert blue_purple[nucleus].mean() > blue_purple[rest].mean() + 10
    assert blue_purple[nucleus].mean() > blue_purple[background].mean() + 10


def test_blank_white_field_raises_ours_or_passes_through():
    white = np.full((480, 640, 3), 255, np.uint8)
    norm = MacenkoNormalizer.default()
    with pytest.raises(StainEstimationError, match="too few stained pixels"):
        norm.transform(white)
    out = norm.transform(white, on_failure="passthrough")
    np.testing.assert_array_equal(out, white)
    with pytest.raises(StainEstimationError):
        MacenkoNormalizer().fit(white)


def test_black_and_single_colour_images_raise_ours():
    norm = MacenkoNormalizer.default()
    with pytest.raises(StainEstimationError, match="background"):
        norm.transform(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(StainEstimationError):
        norm.transform(np.full((64, 64, 3), (150, 90, 160), np.uint8))


def test_one_pixel_image():
    px = np.full((1, 1, 3), 120, np.uint8)
    assert median_filter(px).shape == (1, 1, 3)
    assert median_filter(px, ksize=5).shape == (1, 1, 3)
    assert clahe(px).shape == (1, 1, 3)
    with pytest.raises(StainEstimationError):
        MacenkoNormalizer.default().transform(px)


@pytest.mark.parametrize("fn", [
    median_filter, clahe, reinhard_normalize, match_sharpness, sharpness, estimate_background, lab_statistics,
    stained_mask, lambda im: MacenkoNormalizer.default().transform(im, on_failure="passthrough"),
    lambda im: MacenkoNormalizer().fit(im),
], ids=["median", "clahe", "reinhard", "sharpen", "sharpness", "background", "lab_statistics", "stained_mask",
        "macenko_passthrough", "macenko_fit"])
@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3), (5, 0, 3)])
def test_empty_images_rejected_with_our_error(fn, shape):
    """An RGB uint8 array without pixels used to pass the fast path of the image check and crash in OpenCV
    (cv2.error) or numpy (IndexError)."""
    with pytest.raises(InvalidImageError, match="at least one pixel"):
        fn(np.zeros(shape, np.uint8))


def test_nan_input_rejected():
    nan = np.full((8, 8, 3), np.nan, np.float32)
    for fn in FUNCS.values():
        with pytest.raises(InvalidImageError, match="NaN"):
            fn(nan)


def test_huge_field(bccd_field):
    big = cv2.resize(bccd_field, (4000, 3000), interpolation=cv2.INTER_LINEAR)
    for name, fn in FUNCS.items():
        out = fn(big)
        assert out.shape == big.shape and out.dtype == np.uint8, name


def test_unfitted_normaliser_and_bad_options(bccd_field):
    with pytest.raises(NotFittedError, match="not fitted"):
        MacenkoNormalizer().transform(bccd_field)
    with pytest.raises(ValueError):
        MacenkoNormalizer.default().transform(bccd_field, on_failure="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        MacenkoNormalizer(beta=0)


image_strategy = arrays(
    np.uint8,
    st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3)),
    elements=st.integers(0, 255),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(image=image_strategy, name=st.sampled_from(sorted(FUNCS)))
def test_random_images_raise_only_our_errors(image, name):
    try:
        out = FUNCS[name](image)
    except SmearpipeError:
        assert name == "macenko"  # median, CLAHE, Reinhard and sharpening accept every valid uint8 image
        return
    assert out.shape == image.shape and out.dtype == np.uint8


@settings(max_examples=40, deadline=None)
@given(
    image=arrays(np.uint8, st.tuples(st.integers(8, 48), st.integers(8, 48), st.just(3)), elements=st.integers(0, 255)),
    steps=st.permutations(["median", "clahe", "macenko", "reinhard", "sharpen"]).map(tuple),
)
def test_random_images_through_preprocessing(image, steps):
    p = Preprocessing(steps=steps, macenko_on_failure="passthrough")
    out = p(image)
    assert out.shape == image.shape and out.dtype == np.uint8


def test_preprocessing_roundtrip_and_apply(bccd_field):
    p = Preprocessing(steps=("median", "clahe", "macenko"), median_ksize=5, clahe_clip_limit=3.0, clahe_tile_grid=(4, 6))
    r = p.resolved()
    assert r.macenko_reference == MacenkoNormalizer.default().reference
    for q in (p, r):
        back = Preprocessing.from_json(q.to_json())
        assert back == q
        assert json.loads(q.to_json())["steps"] == ["median", "clahe", "macenko"]
    expected = MacenkoNormalizer.default().transform(clahe(median_filter(bccd_field, ksize=5), clip_limit=3.0, tile_grid=(4, 6)))
    np.testing.assert_array_equal(r(bccd_field), expected)
    np.testing.assert_array_equal(Preprocessing()(bccd_field), bccd_field)


def test_preprocessing_order_matters(bccd_field):
    a = Preprocessing(steps=("clahe", "median"))(bccd_field)
    b = Preprocessing(steps=("median", "clahe"))(bccd_field)
    assert np.abs(a.astype(int) - b).mean() > 0.1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": ("blur",)},
        {"steps": ("median", "median")},
        {"median_ksize": 4},
        {"clahe_clip_limit": 0},
        {"clahe_clip_limit": float("inf")},
        {"clahe_clip_limit": float("nan")},
        {"clahe_tile_grid": (0, 1)},
        {"macenko_on_failure": "skip"},
        {"sharpen_target": 0},
        {"sharpen_sigma": -1.0},
        {"sharpen_max_amount": float("nan")},
        {"sharpen_max_amount": 50.0},
    ],
)
def test_preprocessing_validates(kwargs):
    with pytest.raises(ValueError):
        Preprocessing(**kwargs)


@pytest.mark.parametrize("kwargs", [{"target": True}, {"sigma": "2"}, {"max_amount": None}])
def test_sharpening_refuses_non_numbers(kwargs):
    with pytest.raises(TypeError, match="sharpening"):
        match_sharpness(np.zeros((8, 8, 3), np.uint8), **kwargs)
    with pytest.raises(TypeError, match="sharpening"):
        Preprocessing(**{f"sharpen_{k}": v for k, v in kwargs.items()})


def test_preprocessing_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown Preprocessing field"):
        Preprocessing.from_dict({"steps": [], "gamma": 2})
    with pytest.raises(ValueError, match="malformed Macenko reference"):
        MacenkoReference.from_dict({"stain_matrix": [[1, 2]]})


def test_fit_rejects_bad_layouts_with_our_error():
    with pytest.raises(InvalidImageError, match="channel-first"):
        MacenkoNormalizer().fit(np.zeros((3, 40, 50), np.uint8))
    with pytest.raises(InvalidImageError):
        MacenkoNormalizer().fit(np.zeros((40, 50, 5), np.uint8))


@pytest.mark.parametrize("bad", [3.0, True, "3"])
def test_preprocessing_rejects_non_integer_ksize(bad):
    with pytest.raises(ValueError):
        Preprocessing(median_ksize=bad)


# ----------------------------------------------------------------------------- Reinhard


def test_reinhard_gives_the_reference_statistics(bccd_field, pbc_crops):
    ref = default_reinhard_reference()
    assert "PBC" in ref.source and "train" in ref.source
    for img in (bccd_field, pbc_crops["eosinophil"]):
        mean, std = lab_statistics(reinhard_normalize(img))
        np.testing.assert_allclose(mean, ref.mean, atol=2.0)  # uint8 rounding and clipping of the few extreme pixels
        np.testing.assert_allclose(std, ref.std, rtol=0.1)


def test_reinhard_removes_a_lab_wide_brightness_contrast_and_cast_but_keeps_structure(pbc_crops):
    crop = pbc_crops["neutrophil"]
    # another lab: dimmer lamp, lower contrast, a blue cast
    other = np.clip(crop.astype(np.float64) * [0.75, 0.8, 0.95] + 20, 0, 255).astype(np.uint8)
    assert np.abs(other.astype(int) - crop).mean() > 15
    a, b = reinhard_normalize(crop), reinhard_normalize(other)
    assert np.abs(a.astype(int) - b).mean() < 5
    # the nucleus stays the darkest part: structure is kept, only the statistics move
    dark = _lum(crop) < np.percentile(_lum(crop), 10)
    assert _lum(a)[dark].mean() < np.percentile(_lum(a), 30)


def test_field_reference_barely_moves_a_bccd_field_and_undoes_another_labs_cast(bccd_field):
    ref = field_reinhard_reference()
    assert "BCCD" in ref.source and "trainval" in ref.source
    assert ref != default_reinhard_reference()
    same = reinhard_normalize(bccd_field, reference=ref)
    # a BCCD field is close to the average BCCD field already: the detector sees nearly what it was trained on
    assert np.abs(same.astype(int) - bccd_field).mean() < 4
    # the same field as another lab's camera might record it: brighter, paler, a pink cast
    other = np.clip(bccd_field.astype(np.float64) * [0.7, 0.55, 0.6] + [90, 100, 80], 0, 255).astype(np.uint8)
    assert np.abs(other.astype(int) - bccd_field).mean() > 15
    back = reinhard_normalize(other, reference=ref)
    assert np.abs(back.astype(int) - bccd_field).mean() < 5


def test_reinhard_flat_and_tiny_images():
    for img in (np.full((20, 30, 3), 200, np.uint8), np.zeros((1, 1, 3), np.uint8)):
        out = reinhard_normalize(img)
        assert out.shape == img.shape and out.dtype == np.uint8
        assert len(np.unique(out.reshape(-1, 3), axis=0)) == 1  # a blank image stays blank: no noise is amplified
    with pytest.raises(InvalidImageError):
        reinhard_normalize(np.zeros((3, 20, 20), np.uint8))


def _in_eyepiece(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A field as a photo through the eyepiece shows it (``scripts/eval_eyepiece.py``'s views): inside a circle that
    cuts its corners, and that circle inside a larger black frame."""
    from .test_cross_lab_scripts import _script

    views = _script("eval_eyepiece").eyepiece_views(field)
    return views["circle"], views["framed"]


def test_reinhard_leaves_out_the_black_around_an_eyepiece_circle(bccd_field):
    """The black outside a photo's lit circle is no part of the smear: it would darken and stretch every colour."""
    from smearpipe.augment import reinhard_batch
    from smearpipe.preprocess import _lab_with_statistics, _to_lab

    circle, framed = _in_eyepiece(bccd_field)
    lit = framed.max(axis=2) > 0
    assert 0.3 < 1 - lit.mean() < 0.6  # the black is a large part of the photo
    inside = np.ascontiguousarray(framed[lit].reshape(-1, 1, 3))  # the lit pixels alone, as a 1-px-wide image
    np.testing.assert_allclose(_lab_with_statistics(framed)[1:], _lab_with_statistics(inside)[1:], rtol=1e-5)
    for ref in (default_reinhard_reference(), field_reinhard_reference()):
        # so the lit field is normalised as it would be alone, not brightened against the black
        np.testing.assert_array_equal(reinhard_normalize(framed, reference=ref)[lit],
                                      reinhard_normalize(inside, reference=ref).reshape(-1, 3))
    mean_with_black = cv2.meanStdDev(cv2.cvtColor(framed.astype(np.float32) / 255, cv2.COLOR_RGB2LAB))[0].ravel()
    assert mean_with_black[0] < _lab_with_statistics(framed)[1][0] - 20  # what the statistics were before
    # the torch twin (training) does the same, and leaves a crop with a few dark pixels (< 1 %) as it was
    import torch

    batch = [framed, cv2.resize(bccd_field, framed.shape[1::-1])]  # one photo with black, one without
    batch.append(np.zeros_like(framed))  # all black: statistics of all its pixels
    batch.append((cv2.resize(bccd_field, framed.shape[1::-1]) * 0.19).astype(np.uint8))  # dark nuclei, no frame
    x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
    got = np.rint(reinhard_batch(x).permute(0, 2, 3, 1).numpy() * 255).astype(int)
    expected = np.stack([reinhard_normalize(im) for im in batch]).astype(int)
    assert np.quantile(np.abs(got - expected), 0.999) <= 1

    def all_pixels(image):
        return cv2.meanStdDev(cv2.cvtColor(image.astype(np.float32) / 255, cv2.COLOR_RGB2LAB))[0].ravel()

    dotted = bccd_field.copy()
    dotted[::12, ::12] = 0  # 0.7 % black pixels: kept in the statistics
    np.testing.assert_allclose(_lab_with_statistics(dotted)[1], all_pixels(dotted), rtol=1e-6)
    # an underexposed field: its darkest nuclei are black too (> 1 %), but inside the field, so they count
    dim = (bccd_field * 0.19).astype(np.uint8)  # 5x underexposed: 3.7 % of it darker than L* 10
    assert (_to_lab(dim)[..., 0] < 10).mean() > 0.01
    np.testing.assert_allclose(_lab_with_statistics(dim)[1], all_pixels(dim), rtol=1e-6)
    # and in a black frame, the frame is left out (with the few dark pixels of cells cut by the field's edge)
    framed_dim = np.zeros_like(framed)
    framed_dim[120:600, 160:800] = dim
    np.testing.assert_allclose(_lab_with_statistics(framed_dim)[1], all_pixels(dim), atol=0.05)
    assert abs(all_pixels(framed_dim)[0] - all_pixels(dim)[0]) > 5  # what counting the frame would do
    # a surround that is not quite black (stray light, sensor noise: RGB 12 +- 3) is left out all the same
    noisy = framed.copy()
    surround = framed.max(axis=2) == 0
    noisy[surround] = np.clip(12 + np.random.default_rng(0).normal(0, 3, (surround.sum(), 3)), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(_lab_with_statistics(noisy)[1], _lab_with_statistics(framed)[1], atol=0.05)
    # dark, not black, where it touches the edge (a dark cell cut by it; a field dark all over): kept
    for image in (np.where(np.arange(640)[None, :, None] < 80, 20, bccd_field).astype(np.uint8),  # L* ~ 7
                  (bccd_field * 0.12).astype(np.uint8)):
        assert (_to_lab(image)[..., 0] < 10).mean() > 0.1
        np.testing.assert_allclose(_lab_with_statistics(image)[1], all_pixels(image), rtol=1e-6)
    # black over more than 95 % of the image: too little lit field to take statistics from, all pixels count
    mostly_black = np.zeros_like(framed)
    mostly_black[300:420, 400:560] = bccd_field[:120, :160]
    np.testing.assert_allclose(_lab_with_statistics(mostly_black)[1], all_pixels(mostly_black), rtol=1e-6)
    # a strip 2 px wide: every pixel touches its edge, so nothing is left out
    strip = np.ascontiguousarray(np.where(np.arange(200)[:, None, None] % 10 == 0, 0, bccd_field[:200, :2]).astype(np.uint8))
    np.testing.assert_allclose(_lab_with_statistics(strip)[1], all_pixels(strip), rtol=1e-6)


def _reinhard_reference_implementation(image, ref):
    """reinhard_normalize as first written, in numpy (before its OpenCV fast path): the values must not change."""
    from smearpipe import preprocess as P

    lab = cv2.cvtColor(np.multiply(image, np.float32(1 / 255), dtype=np.float32), cv2.COLOR_RGB2LAB)
    bg = np.multiply(estimate_background(image), 1 / 255).astype(np.float32).reshape(1, 1, 3)
    dist = np.linalg.norm(lab - cv2.cvtColor(bg, cv2.COLOR_RGB2LAB).reshape(3), axis=2)
    stained = (dist >= P._STAINED_MIN_DELTA_E) & (lab[..., 0] >= P._STAINED_MIN_L)
    # since 2026-11-28: black pixels reaching the image's edge (outside the lit field), where more than 1 % of the
    # image, are left out
    from scipy import ndimage

    dark = lab[..., 0] < P._UNLIT_MAX_L
    labels, _ = ndimage.label(dark, structure=np.ones((3, 3)))
    unlit = np.isin(labels, sorted(set(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])) - {0}))
    if (min(dark.shape) >= 3 and P._UNLIT_MAX_SHARE < unlit.mean() <= 1 - P._UNLIT_MIN_LIT
            and np.median(lab[..., 0][unlit]) < P._UNLIT_BLACK_L):
        lit = ~unlit
    else:
        lit = np.ones_like(dark)
    share, mask = float(stained.sum() / lit.sum()), (None if lit.all() else lit.view(np.uint8))
    if ref.region == "stained" and share >= P._STAINED_MIN_FRACTION:
        mask = stained.view(np.uint8)
    elif (ref.region == "all" and ref.min_stained_fraction is not None
          and P._STAINED_MIN_FRACTION <= share < ref.min_stained_fraction):
        m_s, s_s = (v.ravel() for v in cv2.meanStdDev(lab, mask=stained.view(np.uint8)))
        m_b, s_b = (v.ravel() for v in cv2.meanStdDev(lab, mask=(lit & ~stained).view(np.uint8)))
        p = ref.min_stained_fraction
        mean = p * m_s + (1 - p) * m_b
        std = np.sqrt(p * (s_s ** 2 + (m_s - mean) ** 2) + (1 - p) * (s_b ** 2 + (m_b - mean) ** 2))
        mask = "pooled"
    if not isinstance(mask, str):
        mean, std = (v.ravel() for v in cv2.meanStdDev(lab, mask=mask))
    scale = np.asarray(ref.std) / np.maximum(std, P._REINHARD_MIN_STD)
    out = (lab - mean.astype(np.float32)) * scale.astype(np.float32) + np.asarray(ref.mean, np.float32)
    np.clip(out[..., 0], 0.0, 100.0, out=out[..., 0])
    rgb = cv2.cvtColor(out, cv2.COLOR_LAB2RGB)
    return cv2.convertScaleAbs(np.maximum(rgb, 0.0), alpha=255.0)


def test_reinhard_fast_path_gives_the_reference_implementation_values(bccd_field, pbc_crops):
    rng = np.random.default_rng(3)
    images = [bccd_field, *pbc_crops.values(), bccd_field[100:103, 50:250], bccd_field[::7, ::5].copy(),
              rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), np.zeros((1, 1, 3), np.uint8),
              *_in_eyepiece(bccd_field), (bccd_field * 0.15).astype(np.uint8), _in_eyepiece(bccd_field * 0.3)[1]]
    detector_ref = ReinhardReference.from_dict(  # the shipped detector's: pooled statistics (analyze_smear's path)
        json.loads((REPO / "weights" / "detector-bccd-yolov8n-v5.json").read_text())["preprocessing"]["reinhard_reference"])
    assert detector_ref.min_stained_fraction is not None
    refs = [default_reinhard_reference(), field_reinhard_reference(), detector_ref,
            dataclasses.replace(default_reinhard_reference(), region="stained")]
    for ref in refs:
        for img in images:
            np.testing.assert_array_equal(reinhard_normalize(img, reference=ref),
                                          _reinhard_reference_implementation(img, ref))


def test_stained_distance_test_matches_numpy_norm_at_the_threshold():
    """The OpenCV form of ``np.linalg.norm(lab - colour, axis=2) >= delta`` (float32) agrees where rounding decides:
    pixels within a few float32 steps of the threshold distance, in every direction."""
    from smearpipe import preprocess as P

    delta = np.float32(P._STAINED_MIN_DELTA_E)
    assert np.sqrt(P._STAINED_MIN_DIST2) >= delta > np.sqrt(np.nextafter(P._STAINED_MIN_DIST2, np.float32(0)))
    rng = np.random.default_rng(0)
    colour = np.array([60.0, 12.5, -7.25], np.float32)
    unit = rng.normal(size=(400, 500, 3))
    unit /= np.linalg.norm(unit, axis=2, keepdims=True)
    lab = (colour + unit * (delta + rng.uniform(-4e-6, 4e-6, (400, 500, 1)))).astype(np.float32)
    expected = np.linalg.norm(lab - colour, axis=2) >= delta
    assert 0.2 < expected.mean() < 0.8  # both sides of the threshold are sampled
    np.testing.assert_array_equal(P._far_from(lab, colour), expected)


def test_reinhard_reference_in_preprocessing_roundtrip(bccd_field):
    p = Preprocessing(steps=("reinhard",))
    r = p.resolved()
    assert p.reinhard_reference is None and r.reinhard_reference == default_reinhard_reference()
    assert Preprocessing(steps=("median",)).resolved() == Preprocessing(steps=("median",))
    mine = ReinhardReference(mean=(70.0, 10.0, 0.0), std=(15.0, 8.0, 12.0), source="my lab")
    q = Preprocessing(steps=("median", "reinhard"), reinhard_reference=mine)
    for x in (r, q):
        assert Preprocessing.from_json(x.to_json()) == x
    np.testing.assert_array_equal(r(bccd_field), reinhard_normalize(bccd_field))
    np.testing.assert_array_equal(q(bccd_field), reinhard_normalize(median_filter(bccd_field), reference=mine))


@pytest.mark.parametrize("bad", [{"mean": [1, 2], "std": [1, 1, 1]}, {"mean": [1, 2, 3], "std": [1, 0, 1]},
                                 {"mean": [1, 2, float("nan")], "std": [1, 1, 1]}, {"mean": [1, 2, 3]},
                                 {"mean": [1, 2, 3], "std": [1, 1, 1], "gamma": 1}, {"mean": "abc", "std": [1, 1, 1]}])
def test_reinhard_reference_validates(bad):
    with pytest.raises(ValueError):
        ReinhardReference.from_dict(bad)


def test_reinhard_reference_as_mapping_or_refused(bccd_field):
    ref = field_reinhard_reference("stained")
    np.testing.assert_array_equal(reinhard_normalize(bccd_field, reference=ref.to_dict()),
                                  reinhard_normalize(bccd_field, reference=ref))
    with pytest.raises(ValueError, match="Reinhard reference"):
        reinhard_normalize(bccd_field, reference={"mean": [70, 0, 0]})
    with pytest.raises(TypeError, match="ReinhardReference"):
        reinhard_normalize(bccd_field, reference="stained")  # type: ignore[arg-type]


def _on_canvas(field: np.ndarray, factor: float, fill) -> tuple[np.ndarray, tuple[slice, slice], np.ndarray]:
    """The field shrunk by ``factor`` at the centre of a field-sized canvas of colour ``fill``."""
    h, w = field.shape[:2]
    small = cv2.resize(field, (round(w / factor), round(h / factor)), interpolation=cv2.INTER_AREA)
    canvas = np.empty_like(field)
    canvas[:] = fill
    y, x = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    canvas[y:y + small.shape[0], x:x + small.shape[1]] = small
    return canvas, (slice(y, y + small.shape[0]), slice(x, x + small.shape[1])), small


def test_stained_mask_keeps_cells_and_leaves_out_glass_and_black_borders(bccd_field):
    mask = stained_mask(bccd_field)
    assert mask.shape == bccd_field.shape[:2] and mask.dtype == bool
    assert 0.3 < mask.mean() < 0.8  # red cells and the WBC, not the plasma between them
    lum = _lum(bccd_field)
    assert lum[mask].mean() < lum[~mask].mean() - 20
    canvas, inner, _ = _on_canvas(bccd_field, 2.5, 0)  # black surround, as a field stop
    m = stained_mask(canvas)
    outside = np.ones(m.shape, bool)
    outside[inner] = False
    assert not m[outside].any() and m[inner].mean() > 0.3


@pytest.mark.parametrize("fill", ["background", "black"])
def test_stained_reference_ignores_how_much_glass_or_border_surrounds_the_cells(bccd_field, fill):
    """A field shrunk onto a canvas (a lower magnification, a field stop) is normalised like the field
    itself with region="stained"; with statistics of all pixels the canvas changes the mapping."""
    colour = np.round(estimate_background(bccd_field)).astype(np.uint8) if fill == "background" else 0
    canvas, inner, small = _on_canvas(bccd_field, 2.5, colour)
    stained, whole = field_reinhard_reference("stained"), field_reinhard_reference()
    assert stained.region == "stained" and whole.region == "all"

    def shift(ref):
        return np.abs(reinhard_normalize(canvas, reference=ref)[inner].astype(int) - reinhard_normalize(small, reference=ref)).mean()

    assert shift(stained) < 5  # BloodImage_00000: 0.0 grey levels on glass, 2.6 on black
    if fill == "background":
        assert shift(whole) > 20  # 36
    else:  # black is outside the lit field and left out of every statistic (before 2026-11-28: 49); 84 % black here
        assert shift(whole) < 0.5


def test_reinhard_region_round_trip_and_refusals(bccd_field):
    ref = field_reinhard_reference("stained")
    assert ReinhardReference.from_dict(ref.to_dict()) == ref
    p = Preprocessing(steps=("reinhard",), reinhard_reference=ref)
    assert Preprocessing.from_json(p.to_json()) == p
    assert "region" not in field_reinhard_reference().to_dict()  # records from before regions are unchanged
    mean, _ = lab_statistics(bccd_field, region="stained")
    assert not np.allclose(mean, lab_statistics(bccd_field)[0], atol=1)
    blank = np.full((20, 20, 3), 200, np.uint8)  # nothing stained: statistics of all pixels, no crash
    np.testing.assert_allclose(lab_statistics(blank, region="stained")[0], lab_statistics(blank)[0])
    assert reinhard_normalize(blank, reference=ref).shape == blank.shape
    with pytest.raises(ValueError, match="region"):
        ReinhardReference(mean=(70, 0, 0), std=(10, 5, 5), region="cells")
    with pytest.raises(ValueError, match="region"):
        field_reinhard_reference("cells")
    with pytest.raises(ValueError, match="region"):
        lab_statistics(bccd_field, region="cells")


# ----------------------------------------------------------------------------- sharpness


@pytest.fixture
def crop64(pbc_crops) -> np.ndarray:
    """A PBC lymphocyte at a classifier's input size, where the sharpening step runs."""
    return cv2.resize(pbc_crops["lymphocyte"], (64, 64), interpolation=cv2.INTER_AREA)


def test_sharpness_falls_with_blur_and_ignores_contrast(crop64):
    s = sharpness(crop64)
    assert sharpness(cv2.GaussianBlur(crop64, (0, 0), 1.0)) < 0.6 * s
    low_contrast = np.clip(np.rint(crop64.astype(np.float64) * 0.6 + 60), 0, 255).astype(np.uint8)
    assert sharpness(low_contrast) == pytest.approx(s, rel=0.05)
    assert sharpness(np.full((20, 20, 3), 90, np.uint8)) == 0.0


def test_match_sharpness_sharpens_a_soft_crop_to_the_target_and_keeps_it(crop64):
    soft = cv2.GaussianBlur(crop64, (0, 0), 1.2)
    target = 0.45
    assert sharpness(soft) < target <= sharpness(crop64)
    out = match_sharpness(soft, target=target)
    assert out.shape == soft.shape and out.dtype == np.uint8
    assert sharpness(out) == pytest.approx(target, abs=0.03)  # the smallest amount that reaches it, up to rounding
    assert np.corrcoef(_lum(out).ravel(), _lum(soft).ravel())[0, 1] > 0.9  # the same cell (with halos at its edges)
    assert np.abs(np.median(out, axis=(0, 1)) - np.median(soft, axis=(0, 1))).max() < 5  # same colours
    np.testing.assert_array_equal(match_sharpness(crop64, target=target), crop64)  # never blurs a sharp crop
    higher = match_sharpness(soft, target=0.6)
    assert sharpness(higher) > sharpness(out)


def test_match_sharpness_stops_at_max_amount(crop64):
    soft = cv2.GaussianBlur(crop64, (0, 0), 2.5)
    out = match_sharpness(soft, target=0.9, sigma=2.0, max_amount=0.5)
    x = soft.astype(np.float32)
    expected = np.clip(np.rint(x + 0.5 * (x - cv2.GaussianBlur(x, (0, 0), 2.0))), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert sharpness(out) < 0.9
    flat = np.full((16, 16, 3), 120, np.uint8)  # nothing to sharpen: unchanged, and a new array
    out = match_sharpness(flat)
    np.testing.assert_array_equal(out, flat)
    assert out is not flat
    for bad in ({"sigma": 0.0}, {"target": float("nan")}, {"max_amount": -1.0}, {"max_amount": 1e6}):
        with pytest.raises(ValueError, match="sharpening"):
            match_sharpness(soft, **bad)
    assert Preprocessing(sharpen_sigma=np.float32(1.5)).sharpen_sigma == 1.5  # numpy scalars are numbers too
    with pytest.raises(InvalidImageError):
        match_sharpness(np.zeros((3, 20, 20), np.uint8))


@pytest.mark.parametrize("sigma", [100.5, 1e6])
def test_sharpening_sigma_limit(sigma):
    """A huge sigma used to make OpenCV allocate a Gaussian kernel of 8 * sigma taps (std::bad_alloc)."""
    soft = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8), (0, 0), 2.0)
    assert match_sharpness(soft, sigma=100.0).shape == soft.shape
    with pytest.raises(ValueError, match="sharpening sigma must be at most 100"):
        match_sharpness(soft, sigma=sigma)
    with pytest.raises(ValueError, match="sharpening sigma must be at most 100"):
        Preprocessing(sharpen_sigma=sigma)


def test_sharpen_step_in_preprocessing(crop64):
    p = Preprocessing(steps=("reinhard", "sharpen"), sharpen_target=0.5, sharpen_sigma=1.5, sharpen_max_amount=3.0)
    assert Preprocessing.from_json(p.to_json()) == p
    np.testing.assert_array_equal(p(crop64), match_sharpness(reinhard_normalize(crop64), target=0.5, sigma=1.5,
                                                             max_amount=3.0))
    # records written before the step existed have no sharpen_* fields: they load with the defaults
    old = {k: v for k, v in Preprocessing(steps=("reinhard",)).to_dict().items() if not k.startswith("sharpen_")}
    assert Preprocessing.from_dict(old) == Preprocessing(steps=("reinhard",))


@settings(max_examples=40, deadline=None)
@given(image=arrays(np.uint8, st.tuples(st.integers(1, 40), st.integers(1, 40), st.just(3)), elements=st.integers(0, 255)),
       blur=st.floats(0.5, 4.0), target=st.floats(0.05, 1.5))
def test_match_sharpness_on_soft_images_of_any_shape(image, blur, target):
    """Blurred random images (1 x N and 2 x 2 included) are sharpened up to the target or by the largest amount."""
    soft = cv2.GaussianBlur(image, (0, 0), blur)
    out = match_sharpness(soft, target=target)
    assert out.shape == soft.shape and out.dtype == np.uint8
    assert sharpness(out) >= sharpness(soft)  # never blurs, rounding to uint8 included


def test_match_sharpness_never_returns_a_less_sharp_image_after_rounding():
    """Found by hypothesis in CI: a 1 x 12 nearly black image, sharpened by the amount the moments ask for,
    came out of rounding to uint8 less sharp (0.55) than it went in (0.61); it is now returned unchanged."""
    image = np.full((1, 12, 3), 2, np.uint8)
    image[0, 1, 1], image[0, 6, 1], image[0, 10, 0] = 213, 121, 187
    soft = cv2.GaussianBlur(image, (0, 0), 3.65625)
    out = match_sharpness(soft, target=0.6875)
    assert sharpness(out) >= sharpness(soft)
    np.testing.assert_array_equal(out, soft)


def test_capped_background_keeps_ordinary_fields_and_steadies_sparse_ones(bccd_field):
    """min_stained_fraction: a field with at least that stained share is normalised exactly as with all
    pixels; the same field shrunk onto a canvas of bare background (mostly glass) is mapped much closer to
    the field itself than with plain statistics of all pixels."""
    whole = field_reinhard_reference()
    capped = dataclasses.replace(whole, min_stained_fraction=0.417)
    assert stained_mask(bccd_field).mean() >= 0.417
    np.testing.assert_array_equal(reinhard_normalize(bccd_field, reference=capped),
                                  reinhard_normalize(bccd_field, reference=whole))
    colour = np.round(estimate_background(bccd_field)).astype(np.uint8)
    canvas, inner, small = _on_canvas(bccd_field, 2.5, colour)
    assert stained_mask(canvas).mean() < 0.2

    def shift(ref):
        return np.abs(reinhard_normalize(canvas, reference=ref)[inner].astype(int) - reinhard_normalize(small, reference=ref)).mean()

    assert shift(whole) > 20  # BloodImage_00000: 36 grey levels
    assert shift(capped) < 15  # 11: the field itself (65 % stained) still weighs its own glass fully, the canvas 41.7 %
    blank = np.full((20, 20, 3), 200, np.uint8)  # nothing stained: statistics of all pixels
    np.testing.assert_array_equal(reinhard_normalize(blank, reference=capped), reinhard_normalize(blank, reference=whole))


def test_capped_reference_round_trip_and_refusals():
    capped = dataclasses.replace(field_reinhard_reference(), min_stained_fraction=0.4)
    assert ReinhardReference.from_dict(capped.to_dict()) == capped
    assert capped.to_dict()["min_stained_fraction"] == 0.4
    assert "min_stained_fraction" not in field_reinhard_reference().to_dict()  # older records unchanged
    p = Preprocessing(steps=("reinhard",), reinhard_reference=capped)
    assert Preprocessing.from_json(p.to_json()) == p
    for bad in (0.0, 1.0, -0.2, float("nan"), True, "0.4"):
        with pytest.raises(ValueError, match="min_stained_fraction"):
            ReinhardReference(mean=(70, 0, 0), std=(10, 5, 5), min_stained_fraction=bad)
    with pytest.raises(ValueError, match="region 'all'"):
        ReinhardReference(mean=(70, 0, 0), std=(10, 5, 5), region="stained", min_stained_fraction=0.4)
    torch = pytest.importorskip("torch")
    from smearpipe.augment import reinhard_batch

    with pytest.raises(ValueError, match="min_stained_fraction"):
        reinhard_batch(torch.rand(1, 3, 8, 8), reference=capped)
