from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from smearpipe.errors import InvalidImageError
from smearpipe.framing import Framing, apply_framing, frame_cell, nucleus_box

from .conftest import REPO, SHARED

BACKGROUND = (235, 215, 205)  # pinkish-cream, as between cells
RBC = (215, 150, 160)  # blue close to green, as red cells
NUCLEUS = (95, 60, 160)  # violet: blue far above green


def cell_image(size: int, center: tuple[int, int], radius: int, *, rbcs: bool = True) -> np.ndarray:
    img = np.full((size, size, 3), BACKGROUND, np.uint8)
    if rbcs:
        step = max(8, size // 5)
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                cv2.circle(img, (x, y), step // 3, RBC, -1)
    cv2.circle(img, center, int(radius * 1.5), (200, 170, 210), -1)  # cytoplasm
    cv2.circle(img, center, radius, NUCLEUS, -1)
    return img


def test_nucleus_box_finds_the_central_nucleus():
    img = cell_image(300, (160, 140), 30)
    cv2.circle(img, (20, 20), 4, NUCLEUS, -1)  # a platelet in the corner is not the nucleus
    x0, y0, x1, y1 = nucleus_box(img)
    assert abs((x0 + x1) / 2 - 160) < 6 and abs((y0 + y1) / 2 - 140) < 6
    assert abs((x1 - x0) - 60) < 10 and abs((y1 - y0) - 60) < 10


def test_lobes_of_one_nucleus_are_merged():
    img = np.full((200, 200, 3), BACKGROUND, np.uint8)
    for cx in (80, 100, 120):  # three lobes 4 px apart, as a segmented neutrophil's
        cv2.circle(img, (cx, 100), 8, NUCLEUS, -1)
    x0, _, x1, _ = nucleus_box(img)
    assert x1 - x0 > 50  # the whole nucleus, not one lobe


def test_frame_cell_centres_and_scales_the_cell():
    img = cell_image(360, (150, 200), 25)
    out = frame_cell(img, context=2.0)
    assert out.shape[0] == out.shape[1] and out.dtype == np.uint8
    assert abs(out.shape[0] - 100) <= 8  # 2 x the nucleus diameter
    box = nucleus_box(out)
    assert abs((box[0] + box[2]) / 2 - out.shape[1] / 2) < 4 and abs((box[1] + box[3]) / 2 - out.shape[0] / 2) < 4


def test_same_cell_framed_wide_or_tight_looks_the_same():
    """The point of framing: a wide field view and a tight crop of one cell give nearly the same input."""
    wide = cell_image(360, (180, 180), 30)
    tight = wide[125:235, 125:235]  # the cell fills the crop (as BCCD's crops)
    a, b = (cv2.resize(frame_cell(x), (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32) for x in (wide, tight))
    raw_a, raw_b = (cv2.resize(x, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32) for x in (wide, tight))
    assert np.abs(a - b).mean() < 0.3 * np.abs(raw_a - raw_b).mean()


def test_tight_crop_is_recentred_not_padded_out():
    img = cell_image(200, (100, 100), 45, rbcs=False)[45:155, 45:155]  # 110 px crop, nucleus 90 px: context needs 162
    assert nucleus_box(img) is not None
    out = frame_cell(img)
    assert out.shape == (110, 110, 3)  # max_growth 1.0: at most the crop's own size
    assert frame_cell(img, max_growth=1.3).shape == (143, 143, 3)  # allowed to grow: padded out to 1.3x


def test_padding_takes_the_background_colour():
    img = cell_image(200, (100, 100), 40, rbcs=False)[20:180, 45:200]  # nucleus box near the left edge
    out = frame_cell(img, context=2.5)  # wants 200 px, capped at the crop's 160; centred on x = 55: padded on the left
    assert out.shape == (160, 160, 3)
    corner = out[:4, :4].reshape(-1, 3).astype(int)
    assert np.abs(corner - BACKGROUND).max() <= 2  # the pale background between cells, not black or the cell's colour


def test_no_nucleus_returns_the_crop_unchanged():
    flat = np.full((80, 90, 3), 200, np.uint8)
    assert frame_cell(flat) is flat
    red_cells_only = cell_image(120, (60, 60), 0, rbcs=True)
    assert nucleus_box(red_cells_only) is None and frame_cell(red_cells_only) is red_cells_only


def test_apply_framing_and_the_framing_record():
    img = cell_image(200, (100, 100), 20)
    assert apply_framing(img, "as_given") is img
    assert apply_framing(img, "cell").shape[0] < 200
    assert np.array_equal(apply_framing(img, Framing().to_dict()), frame_cell(img))  # a record's dict works too
    assert Framing.from_value(None) == Framing("as_given")  # records before v5
    assert Framing.from_value(Framing(context=2.0).to_dict()) == Framing(context=2.0)
    with pytest.raises(ValueError, match="unknown framing"):
        apply_framing(img, "tight")
    with pytest.raises(ValueError, match="nucleus-detection settings"):
        Framing.from_value({**Framing().to_dict(), "min_blue": 30})  # recorded by another version: refused
    for bad in (0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="context"):
            frame_cell(img, context=bad)


@pytest.mark.parametrize("bad", [np.zeros((0, 10, 3), np.uint8), np.zeros((10, 10, 5), np.uint8),
                                 np.full((10, 10, 3), np.nan, np.float32), "not an array"])
def test_bad_crops_raise_our_error(bad):
    with pytest.raises(InvalidImageError):
        frame_cell(bad)


def test_other_layouts_are_converted_like_everywhere_else():
    img = cell_image(200, (100, 100), 20)
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    assert np.array_equal(frame_cell(rgba), frame_cell(img))
    assert np.array_equal(frame_cell(img.astype(np.float32) / 255), frame_cell(img))
    assert frame_cell(img[..., 0]).ndim == 3  # grey: no violet, returned as RGB, unframed


def test_classifier_input_is_framed_as_in_training():
    """Inference (prepare_crops with the model's framing) = framing first, then the unframed path."""
    from smearpipe.classify import prepare_crops
    from smearpipe.preprocess import Preprocessing

    crop = cell_image(300, (140, 170), 35)
    prep = Preprocessing(steps=("reinhard",)).resolved()
    a = prepare_crops([crop], size=64, preprocessing=prep, preprocess_resized=True, framing="cell")
    b = prepare_crops([frame_cell(crop)], size=64, preprocessing=prep, preprocess_resized=True, framing="as_given")
    np.testing.assert_array_equal(a, b)


def test_real_crops_from_two_labs_come_out_at_similar_scale(pbc_root):
    """A PBC lymphocyte (small in a wide frame) and a BCCD one (cut tightly): nucleus share after framing."""
    from smearpipe.io import read_image

    pbc_files = sorted((pbc_root / "PBC_dataset_normal_DIB" / "lymphocyte").glob("*.jpg"))
    bccd_files = sorted((SHARED / "bccd_wbc_subtypes" / "BCCD_cropped" / "Lymphocyte").glob("*"))
    if not (pbc_files and bccd_files):
        pytest.skip("PBC / bccd_wbc_subtypes lymphocyte crops not found")
    pbc, bccd = read_image(pbc_files[0]), read_image(bccd_files[0])
    shares = []
    for img in (pbc, bccd):
        out = frame_cell(img)
        x0, y0, x1, y1 = nucleus_box(out)
        shares.append(max(x1 - x0, y1 - y0) / out.shape[0])
    raw = [max(b[2] - b[0], b[3] - b[1]) / img.shape[0] for img, b in ((pbc, nucleus_box(pbc)), (bccd, nucleus_box(bccd)))]
    assert abs(raw[0] - raw[1]) > 0.2  # as given, the nucleus fills very different shares of the crop
    # framed, the gap is at least halved (0.38 -> 0.14 for these two; the tight crop is not padded out: MAX_GROWTH)
    assert abs(shares[0] - shares[1]) < abs(raw[0] - raw[1]) / 2


def test_every_real_wbc_crop_shows_a_nucleus(pbc_root):
    """Backs the pipeline's "no nucleus found" review flag: real WBC crops, of two labs, all have one."""
    import csv

    from smearpipe.io import read_image

    from .conftest import SHARED, _need

    bccd = sorted(_need(SHARED / "bccd_wbc_subtypes" / "BCCD_cropped").rglob("*.jp*g"))
    rows = [r for r in csv.DictReader(open(pbc_root / "splits.csv", newline="")) if r["split"] == "val"][::5]
    crops = [read_image(p) for p in bccd] + [read_image(pbc_root / "PBC_dataset_normal_DIB" / r["path"]) for r in rows]
    assert len(bccd) == 351 and len(rows) == 206
    assert [i for i, c in enumerate(crops) if nucleus_box(c) is None] == []
    assert nucleus_box(np.full((64, 64, 3), 255, np.uint8)) is None  # a blank crop has none


def test_mask_radius_keeps_a_disk_around_the_nucleus_and_paints_the_rest():
    img = cell_image(300, (150, 150), 30)  # red cells all around, a cell of radius 45 px in the middle
    whole, masked = frame_cell(img), frame_cell(img, mask_radius=0.75)
    assert masked.shape == whole.shape and masked.dtype == np.uint8
    side = whole.shape[0]
    c, r = (side - 1) / 2, 0.75 * side / 2
    yy, xx = np.mgrid[:side, :side]
    d = np.hypot(xx - c, yy - c)
    assert np.array_equal(masked[d <= r], whole[d <= r])  # inside the disk: the crop as framed
    assert (np.abs(masked[d >= 1.1 * r].astype(int) - BACKGROUND).max(axis=1) <= 1).all()  # beyond: background
    assert (np.abs(whole[d >= 1.1 * r].astype(int) - BACKGROUND).max(axis=1) > 5).any()  # where red cells were
    ring = (d > r + 0.5) & (d < 1.1 * r - 0.5) & (np.abs(whole.astype(int) - BACKGROUND).max(axis=2) > 10)
    lo, hi = np.minimum(whole, BACKGROUND)[ring].astype(int), np.maximum(whole, BACKGROUND)[ring].astype(int)
    m = masked[ring].astype(int)
    assert ring.any() and ((m >= lo - 1) & (m <= hi + 1)).all()  # the soft edge: between the two ...
    assert (np.abs(m - whole[ring]).max(axis=1) > 0).any() and (np.abs(m - BACKGROUND).max(axis=1) > 1).any()  # ... strictly


def test_mask_radius_in_the_record_and_its_checks():
    img = cell_image(200, (100, 100), 20)
    masked = Framing(mask_radius=0.8)
    shipped = json.loads((REPO / "weights" / "classifier-vgg16bn-v8.json").read_text())["framing"]
    assert Framing().to_dict() == shipped  # a record from before the option reads, and is written, the same
    assert Framing.from_value(shipped) == Framing()
    assert Framing.from_value(masked.to_dict()) == masked
    assert np.array_equal(apply_framing(img, masked.to_dict()), frame_cell(img, mask_radius=0.8))
    assert not np.array_equal(frame_cell(img, mask_radius=0.8), frame_cell(img))
    assert Framing(mask_radius=1.4).mask_radius == 1.4  # the largest that still touches the square's corners
    for bad in (0, -0.5, 1.41, float("nan"), True, "0.8"):
        with pytest.raises(ValueError, match="mask_radius"):
            Framing(mask_radius=bad)
    with pytest.raises(ValueError, match="mask_radius needs the 'cell' framing"):
        Framing("as_given", mask_radius=0.8)
    flat = np.full((80, 90, 3), 200, np.uint8)
    assert frame_cell(flat, mask_radius=0.8) is flat  # no nucleus: nothing to centre a disk on, crop as given
