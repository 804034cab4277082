"""analyze_smear / analyze_fields / draw / CLI with smoke-trained models (fast; numbers are meaningless).

The shipped default weights are exercised in test_default_weights.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import warnings

import cv2
import numpy as np
import pytest
from scipy.stats import beta

from smearpipe import SmearpipeError, analyze_fields, analyze_smear, draw, load_pipeline
from smearpipe.cli import main as cli_main
from smearpipe.detect import Detection
from smearpipe.errors import ImageReadError, InvalidImageError, WeightsError
from smearpipe.io import read_image
from smearpipe.pipeline import Pipeline, PipelineConfig, SmearResult, clopper_pearson, summarize, write_field_outputs
from smearpipe.scale import ScaleEstimationError, estimate_rbc_diameter

from .conftest import SAMPLES

# most fields here are synthetic, or boxed by a stub or barely trained detector: no red cell on them is expected,
# and analyze_smear's warning about that is tested with the shipped models (test_default_weights.py)
pytestmark = pytest.mark.filterwarnings("ignore:.*no red cells found:UserWarning")

# plain synthetic fields with a smear's and a slide's tint: a grey one would be warned about (analyze_smear)
_SMEAR, _GLASS = (210, 190, 200), (235, 225, 230)


@pytest.fixture(scope="module")
def pipe(smoke_run, tiny_run):
    # a low threshold so that the barely trained detector yields many boxes, WBCs among them; its record has no
    # red-cell box ruler (too few boxes in the smoke run), so rescale="auto" would only warn
    return load_pipeline(detector=smoke_run.weights, classifier=tiny_run.weights,
                         config=PipelineConfig(det_conf=0.001, rescale=False))


def _check(result: SmearResult, w: int = 640, h: int = 480) -> None:
    assert result.image_size == (w, h)
    assert sum(result.counts.values()) == len(result.detections)
    assert sum(result.differential.values()) == result.counts["WBC"]
    for d in result.detections:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h
        if d.label == "WBC":
            assert d.wbc_type in result.differential and 0 <= d.wbc_probability <= 1
            assert abs(sum(d.probabilities.values()) - 1) < 1e-6
            assert d.wbc_probability == max(d.probabilities.values())
        else:
            assert d.wbc_type is None and d.wbc_probability is None


def test_path_and_array_inputs_agree(pipe):
    path = SAMPLES / "BloodImage_00007.jpg"
    a = analyze_smear(path, pipeline=pipe)
    b = analyze_smear(read_image(path), pipeline=pipe)
    _check(a)
    assert a.counts == b.counts and a.differential == b.differential
    assert a.source == str(path) and b.source is None
    assert set(a.timings_ms) >= {"detect", "classify", "total"}
    assert a.models["detector"]["sha256"] == pipe.detector.record.sha256


@pytest.mark.parametrize("camera", ["12-bit TIFF", "EXIF-turned JPEG"])
def test_camera_files_give_the_same_result(pipe, tmp_path, camera):
    """A 12-bit camera's 16-bit TIFF and a phone photo stored sideways with an EXIF orientation are read as the
    field users see: the same boxes and types as the plain 8-bit field (stored-sideways: the upright image)."""
    from PIL import Image

    path = SAMPLES / "BloodImage_00007.jpg"
    rgb = read_image(path)
    if camera == "12-bit TIFF":
        field = tmp_path / "field12.tif"
        twelve = np.rint(rgb.astype(np.float64) * 4095 / 255).astype(np.uint16)  # 8 -> 12 -> 8 bits is exact
        cv2.imwrite(str(field), twelve[:, :, ::-1])
    else:
        field = tmp_path / "field_exif6.png"  # lossless, so the pixels stay the field's own
        exif = Image.Exif()
        exif[0x0112] = 6  # stored turned 90 degrees counter-clockwise: a viewer turns it back clockwise
        Image.fromarray(np.ascontiguousarray(np.rot90(rgb, 1))).save(field, exif=exif.tobytes())
    expected = analyze_smear(rgb, pipeline=pipe)
    got = analyze_smear(field, pipeline=pipe)
    _check(got)
    assert got.counts == expected.counts and got.differential == expected.differential
    assert [d.box for d in got.detections] == [d.box for d in expected.detections]


class StubDetector:
    """Returns fixed detections: pipeline logic tested independently of detector quality."""

    def __init__(self, detections, record):
        self.detections = detections
        self.record = record

    def predict(self, image, *, conf=None, iou=None, imgsz=None):
        return list(self.detections)


def test_many_wbcs_are_all_typed(pipe):
    grid = [Detection((float(x), float(y), x + 60.0, y + 60.0), "WBC", 0.9) for x in range(20, 560, 90) for y in (30, 200)]
    rbcs = [Detection((5.0, 400.0, 45.0, 440.0), "RBC", 0.8), Detection((300.0, 420.0, 340.0, 479.0), "RBC", 0.7)]
    stub = Pipeline(StubDetector(grid + rbcs, pipe.detector.record), pipe.classifier)
    r = analyze_smear(SAMPLES / "BloodImage_00011.jpg", pipeline=stub)
    _check(r)
    assert r.counts == {"WBC": len(grid), "RBC": 2, "Platelets": 0}
    assert len(r.wbcs) == 12 and all(d.wbc_type is not None for d in r.wbcs)
    # the classifier saw exactly these crops, batched
    from smearpipe.datasets import square_crop

    img = read_image(SAMPLES / "BloodImage_00011.jpg")
    expected = pipe.classifier.predict_proba([square_crop(img, d.box, scale=pipe.classifier.crop_scale) for d in grid])
    got = np.array([[d.probabilities[c] for c in pipe.classifier.classes] for d in r.wbcs])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # an RBC at the border is not flagged (flags concern WBC typing), a WBC at the border is
    stub2 = Pipeline(StubDetector([Detection((0.0, 10.0, 50.0, 60.0), "WBC", 0.9)] + rbcs, pipe.detector.record), pipe.classifier)
    r2 = analyze_smear(img, pipeline=stub2)
    assert "touches image border" in r2.wbcs[0].review_reasons
    assert not any(d.needs_review for d in r2.detections if d.label == "RBC")


def test_stub_field_without_wbc(pipe):
    stub = Pipeline(StubDetector([Detection((100.0, 100.0, 140.0, 140.0), "RBC", 0.9)], pipe.detector.record), pipe.classifier)
    r = analyze_smear(SAMPLES / "BloodImage_00135.jpg", pipeline=stub)
    assert r.counts == {"WBC": 0, "RBC": 1, "Platelets": 0} and sum(r.differential.values()) == 0


def test_border_and_low_confidence_flags(pipe):
    boxes = [Detection((200.0, 150.0, 300.0, 250.0), "WBC", 0.9), Detection((590.0, 300.0, 640.0, 380.0), "WBC", 0.8)]
    stub = Pipeline(StubDetector(boxes, pipe.detector.record), pipe.classifier)
    r = analyze_smear(SAMPLES / "BloodImage_00015.jpg", pipeline=stub, config=PipelineConfig(review_probability=1.0))
    assert len(r.wbcs) == 2 and all(d.needs_review for d in r.wbcs)  # nothing is certain at probability 1.0
    # the first box is inside the field, the second ends at the right edge (x2 = 640)
    assert ["touches image border" in d.review_reasons for d in r.wbcs] == [False, True]


@pytest.mark.parametrize(
    "bad, error",
    [("missing.jpg", ImageReadError), (np.zeros((10, 10, 5), np.uint8), InvalidImageError),
     (np.full((8, 8, 3), np.nan), InvalidImageError), (np.zeros((0, 4, 3), np.uint8), InvalidImageError),
     (np.zeros((3, 40, 50), np.uint8), InvalidImageError), ("missing dir/x.png", ImageReadError),
     (None, InvalidImageError), ([[1, 2, 3]], InvalidImageError)],
)
def test_bad_inputs(pipe, tmp_path, bad, error):
    if isinstance(bad, str):
        bad = tmp_path / bad  # a path that does not exist
    with pytest.raises(error):
        analyze_smear(bad, pipeline=pipe)


def test_corrupt_file(pipe, tmp_path):
    f = tmp_path / "corrupt.jpg"
    f.write_bytes(b"\xff\xd8garbage")
    with pytest.raises(SmearpipeError, match="corrupt.jpg"):
        analyze_smear(f, pipeline=pipe)


def test_json_roundtrip(pipe):
    r = analyze_smear(SAMPLES / "BloodImage_00007.jpg", pipeline=pipe)
    back = SmearResult.from_json(r.to_json())
    assert back == r
    assert json.loads(r.to_json())["counts"] == r.counts


def test_draw(pipe):
    img = read_image(SAMPLES / "BloodImage_00007.jpg")
    r = analyze_smear(img, pipeline=pipe)
    out = draw(r, img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).sum() > 0
    np.testing.assert_array_equal(img, read_image(SAMPLES / "BloodImage_00007.jpg"))  # input untouched
    with pytest.raises(ValueError, match="differs"):
        draw(r, img[:100])


@pytest.mark.parametrize("k, n", [(0, 100), (1, 100), (37, 100), (100, 100), (5, 17)])
def test_clopper_pearson_matches_beta_quantiles(k, n):
    lo, hi = clopper_pearson(k, n)
    exp_lo = 0.0 if k == 0 else beta.ppf(0.025, k, n - k + 1)
    exp_hi = 1.0 if k == n else beta.ppf(0.975, k + 1, n - k)
    assert lo == pytest.approx(exp_lo, abs=1e-9) and hi == pytest.approx(exp_hi, abs=1e-9)


@pytest.mark.parametrize("k, n, confidence", [(5, 3, 0.95), (-1, 3, 0.95), (1.5, 3, 0.95), (1, 3, 1.0), (True, 3, 0.95)])
def test_clopper_pearson_bad_counts(k, n, confidence):
    with pytest.raises(ValueError, match="must be"):
        clopper_pearson(k, n, confidence=confidence)


def test_summary_maths():
    r = SmearResult((), {"WBC": 3, "RBC": 10, "Platelets": 1}, {"neutrophil": 2, "lymphocyte": 1}, (10, 10), {}, {})
    s = summarize([r, r])
    assert s.counts == {"WBC": 6, "RBC": 20, "Platelets": 2}
    assert s.differential_percent["neutrophil"] == pytest.approx(400 / 6)
    lo, hi = s.differential_ci95["lymphocyte"]
    assert lo == pytest.approx(100 * beta.ppf(0.025, 2, 5)) and hi == pytest.approx(100 * beta.ppf(0.975, 3, 4))
    assert "neutrophil" in s.table()


def test_batch_continues_past_corrupt_file(pipe, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    slide = analyze_fields([SAMPLES / "BloodImage_00007.jpg", bad, SAMPLES / "BloodImage_00135.jpg"], pipeline=pipe, progress=False)
    assert len(slide.fields) == 2 and len(slide.errors) == 1 and "bad.jpg" in slide.errors[0][0]
    assert slide.summary.fields == 2 and slide.summary.failed == 1
    assert slide.summary.counts["WBC"] == sum(f.counts["WBC"] for f in slide.fields)


def test_cli_end_to_end(smoke_run, tiny_run, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(SAMPLES / "BloodImage_00007.jpg", src)
    (src / "broken.jpg").write_bytes(b"junk")
    out = tmp_path / "out"
    args = ["analyze", str(src), "--out", str(out), "--detector", str(smoke_run.weights),
            "--classifier", str(tiny_run.weights), "--conf", "0.01", "--quiet", "--no-rescale"]
    code = cli_main(args)
    printed = capsys.readouterr()
    assert code == 1  # one bad file: reported, the rest processed
    assert "broken.jpg" in printed.err and "WBC type" in printed.out
    assert (out / "BloodImage_00007.png").is_file() and (out / "BloodImage_00007.json").is_file()
    summary = json.loads((out / "slide_summary.json").read_text())
    assert summary["summary"]["fields"] == 1 and summary["summary"]["failed"] == 1
    assert (out / "slide_summary.csv").read_text().startswith("wbc_type,count,percent")
    before = (out / "BloodImage_00007.json").read_text()
    assert cli_main(args) == 2  # summary exists: refuses, nothing overwritten
    assert (out / "BloodImage_00007.json").read_text() == before
    assert cli_main(args + ["--overwrite"]) == 1


def test_cli_bad_weights(tmp_path, capsys):
    code = cli_main(["analyze", str(SAMPLES / "BloodImage_00007.jpg"), "--out", str(tmp_path / "o"),
                     "--detector", "no-such-detector"])
    assert code == 2
    assert "unknown detector weights" in capsys.readouterr().err


def test_analyze_fields_needs_a_list(pipe):
    with pytest.raises(TypeError, match="list"):
        analyze_fields(str(SAMPLES), pipeline=pipe, progress=False)
    with pytest.raises(TypeError, match="list"):
        analyze_fields(read_image(SAMPLES / "BloodImage_00007.jpg"), pipeline=pipe, progress=False)


class SizeRecordingDetector(StubDetector):
    """Returns one WBC box at fixed coordinates; remembers the network input size it was asked for."""

    def predict(self, image, *, conf=None, iou=None, imgsz=None):
        self.imgsz = imgsz
        return [Detection((100.0, 50.0, 200.0, 150.0), "WBC", 0.9)]


def test_rescaling_sets_the_detector_input_size(pipe):

    meta = {**pipe.detector.record.metadata, "rbc_diameter_px": 100.0, "train_long_side_px": 640}
    det = SizeRecordingDetector([], dataclasses.replace(pipe.detector.record, input_size=512, metadata=meta))
    stub = Pipeline(det, pipe.classifier)
    img = read_image(SAMPLES / "BloodImage_00007.jpg")
    # red cells of 40 px here vs 100 px at training: the 640 px field is seen as if 1600 px wide -> 1280 at 0.8
    r = analyze_smear(img, pipeline=stub, config=PipelineConfig(rbc_diameter_px=40.0))
    assert r.scale_factor == pytest.approx(2.5)
    assert det.imgsz == r.detector_imgsz == 1280
    np.testing.assert_allclose(r.detections[0].box, (100.0, 50.0, 200.0, 150.0))  # the detector's boxes, as is
    # known pixel size: 7.5 um / 0.075 um = 100 px = training scale -> the training input size
    r2 = analyze_smear(img, pipeline=stub, config=PipelineConfig(pixel_size_um=0.075))
    assert r2.scale_factor == 1.0 and det.imgsz == r2.detector_imgsz == 512
    r3 = analyze_smear(img, pipeline=stub, config=PipelineConfig(rescale=False))
    assert det.imgsz is None and r3.detector_imgsz is None  # no rescaling asked: the detector's own default
    assert SmearResult.from_json(r.to_json()).detector_imgsz == 1280
    with pytest.raises(ValueError, match="not both"):
        PipelineConfig(rbc_diameter_px=40.0, pixel_size_um=0.1)
    from smearpipe.errors import WeightsError

    load_pipeline(detector=pipe.detector, classifier=pipe.classifier, config=PipelineConfig(rescale=True))  # train_detector recorded its scale
    old = copy.copy(pipe.detector)
    old.record = dataclasses.replace(pipe.detector.record, metadata={})  # e.g. a record written before it did
    with pytest.raises(WeightsError, match="train_long_side_px"):  # at load time, not per field
        load_pipeline(detector=old, classifier=pipe.classifier, config=PipelineConfig(rescale=True))
    bare = dataclasses.replace(pipe.detector.record, metadata={})
    with pytest.raises(ValueError, match="rbc_diameter_px / train_long_side_px"):
        analyze_smear(img, pipeline=Pipeline(StubDetector([], bare), pipe.classifier), config=PipelineConfig(rescale=True))



class MagnifiedDetector(StubDetector):
    """A field whose red cells are ``cell_px`` wide: the same boxes at every input size (as a detector that finds
    them); remembers every input size it was asked for."""

    def __init__(self, record, cell_px, n_rbc=6, wbc=True):
        super().__init__([], record)
        self.cell_px, self.n_rbc, self.wbc, self.sizes = cell_px, n_rbc, wbc, []

    def predict(self, image, *, conf=None, iou=None, imgsz=None):
        self.sizes.append(imgsz)
        call = len(self.sizes) - 1  # cell_px, n_rbc and wbc: one value, or one per call
        s = float(self.cell_px if np.isscalar(self.cell_px) else self.cell_px[call])
        n = self.n_rbc if isinstance(self.n_rbc, int) else self.n_rbc[call]
        wbc = self.wbc if isinstance(self.wbc, bool) else self.wbc[call]
        rbcs = [Detection((20.0 + 1.2 * s * k, 20.0, 20.0 + 1.2 * s * k + s, 20.0 + s), "RBC", 0.9) for k in range(n)]
        return [*rbcs, *([Detection((10.0, 200.0, 110.0, 300.0), "WBC", 0.95)] if wbc else [])]


def _auto_record(pipe, **meta):
    return dataclasses.replace(pipe.detector.record, input_size=512,
                               metadata={**pipe.detector.record.metadata, "train_long_side_px": 640, **meta})


@pytest.mark.parametrize(("shape", "cell_px", "sizes", "factor"), [
    ((480, 640), 100, [None], 1.0),          # training scale: one pass, nothing changed
    ((480, 640), 88, [None], 1.0),           # within the 1.25x tolerance
    ((480, 640), 40, [None, 1280], 2.5),     # 2.5x lower magnification: seen again at 2.5x, measured, kept
    ((363, 360), 80, [None, 352], 1.25),     # a small field (letterboxed up 1.76x) with large cells: seen smaller
])
def test_auto_rescale_from_the_detectors_red_cells(pipe, shape, cell_px, sizes, factor):
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=None), cell_px)
    r = analyze_smear(np.full((*shape, 3), _SMEAR, np.uint8), pipeline=Pipeline(det, pipe.classifier))
    assert PipelineConfig().rescale == "auto"
    assert det.sizes == sizes
    assert r.scale_factor == pytest.approx(factor) and r.detector_imgsz == sizes[-1]
    assert r.counts["RBC"] == 6


def test_auto_rescale_measures_again_at_most_once(pipe):
    record = _auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=None)
    # first look: 40 px (2.5x); at 1280 the boxes read 55 px (1.82x): a third look at that scale, not measured again
    det = MagnifiedDetector(record, [40, 55, 70])
    r = analyze_smear(np.full((480, 640, 3), _SMEAR, np.uint8), pipeline=Pipeline(det, pipe.classifier))
    assert det.sizes == [None, 1280, 928] and r.scale_factor == pytest.approx(100 / 55) and r.detector_imgsz == 928
    # low-score boxes do not count, whatever det_conf lets through (the record's RBC threshold: 0.25 here)
    det = MagnifiedDetector(record, 40)
    fragments = [Detection((300.0 + 12 * k, 300.0, 310.0 + 12 * k, 310.0), "RBC", 0.1) for k in range(20)]
    det.predict = lambda image, _p=det.predict, **kw: _p(image, **kw) + fragments
    r = analyze_smear(np.full((480, 640, 3), _SMEAR, np.uint8), pipeline=Pipeline(det, pipe.classifier),
                      config=PipelineConfig(det_conf=0.05))
    assert det.sizes == [None, 1280] and r.scale_factor == pytest.approx(2.5)


def test_auto_rescale_without_enough_red_cell_boxes(pipe):
    img = read_image(SAMPLES / "BloodImage_00007.jpg")
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=None), 40, n_rbc=2)
    analyze_smear(img, pipeline=Pipeline(det, pipe.classifier))
    assert det.sizes == [None]  # too few to measure and no image ruler recorded: kept as it is
    # with the image ruler recorded, it decides (here: red cells 2.5x smaller than at training)
    ruler = 2.5 * estimate_rbc_diameter(img)
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=ruler), 40, n_rbc=2)
    r = analyze_smear(img, pipeline=Pipeline(det, pipe.classifier))
    assert det.sizes == [None, 1280] and r.scale_factor == pytest.approx(2.5)
    # the ruler says 2.5x, the boxes of the second look say training scale: back to the first detection
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=ruler), 100, n_rbc=[2, 6])
    r = analyze_smear(img, pipeline=Pipeline(det, pipe.classifier))
    assert det.sizes == [None, 1280] and r.scale_factor == 1.0 and r.detector_imgsz is None
    assert r.counts["RBC"] == 2  # the first detection's
    # the ruler's view loses the WBC and no red-cell box confirms it (a high magnification: few, large cells, a
    # WBC filling the field): taken for a wrong scale, the first detection stays
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=ruler), 40, n_rbc=[2, 0], wbc=[True, False])
    r = analyze_smear(img, pipeline=Pipeline(det, pipe.classifier))
    assert det.sizes == [None, 1280] and r.scale_factor == 1.0 and r.detector_imgsz is None and r.counts["WBC"] == 1
    # red-cell boxes of the right size confirm it: followed, even without a WBC there
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=ruler), 40, n_rbc=[2, 6],
                            wbc=[True, False])
    r = analyze_smear(img, pipeline=Pipeline(det, pipe.classifier))
    assert det.sizes == [None, 1280] and r.scale_factor == pytest.approx(2.5) and r.counts == {"WBC": 0, "RBC": 6, "Platelets": 0}
    # the same when the box ruler chose the view (6 boxes at first), if the new view has none to confirm it
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=None), 40, n_rbc=[6, 0], wbc=[True, False])
    r = analyze_smear(img, pipeline=Pipeline(det, pipe.classifier))
    assert det.sizes == [None, 1280] and r.scale_factor == 1.0 and r.counts["RBC"] == 6 and r.counts["WBC"] == 1
    # nor does it matter when the first view had no WBC either
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=ruler), 40, n_rbc=[2, 0], wbc=False)
    assert analyze_smear(img, pipeline=Pipeline(det, pipe.classifier)).scale_factor == pytest.approx(2.5)
    blank = np.full((480, 640, 3), _GLASS, np.uint8)  # nothing to measure at all: as it is, no error
    det.sizes.clear()
    assert analyze_smear(blank, pipeline=Pipeline(det, pipe.classifier)).scale_factor == 1.0 and det.sizes == [None]


def test_auto_rescale_does_not_follow_an_implausible_ruler(pipe):
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=None), 15)  # 6.7x: outside RESCALE_RANGE
    with pytest.warns(UserWarning, match="outside the 0.2-5.0x"):
        r = analyze_smear(np.full((480, 640, 3), _SMEAR, np.uint8), pipeline=Pipeline(det, pipe.classifier))
    assert det.sizes == [None] and r.scale_factor == 1.0
    # a second look that measures implausibly: kept at the first rescaled look's scale, and the warning says so
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=None), [40, 4])
    with pytest.warns(UserWarning, match=r"both outside the 0.2-5.0x .* kept at the scale of its previous look \(2.50x\)"):
        r = analyze_smear(np.full((480, 640, 3), _SMEAR, np.uint8), pipeline=Pipeline(det, pipe.classifier))
    assert det.sizes == [None, 1280] and r.scale_factor == pytest.approx(2.5)
    # the range is on the red cells' size or on the detector's view, either: a 3000 px wide photo of a field
    # (red cells ~470 px, 0.21x the training boxes) is seen as the training fields are, without a warning
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=None), 470)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = analyze_smear(np.full((2000, 3000, 3), _SMEAR, np.uint8), pipeline=Pipeline(det, pipe.classifier))
        assert det.sizes == [None] and r.scale_factor == 1.0
        # and a wide camera image at the training magnification (red cells of the training size, the view
        # enlarged 6x) is detected at the input size that shows it so
        det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=None), 100)
        r = analyze_smear(np.full((2880, 3840, 3), _SMEAR, np.uint8), pipeline=Pipeline(det, pipe.classifier))
        assert det.sizes == [None, 3072] and r.scale_factor == pytest.approx(1.0) and r.detector_imgsz == 3072


@pytest.mark.parametrize(("factor", "shape", "message"), [
    (8.6, (480, 640), "red cells measured 8.60x smaller than in training and a 8.60x change"),  # noise
    (0.1, (480, 640), "red cells measured 10.00x larger than in training and a 0.10x change"),
    (1.0, (2880, 3840), None),  # a wide image at the training magnification: its view changes 6x
    (0.16, (3000, 4000), None),  # a photo of a field with 6x its pixels: no change of view
    (8.6, (120, 160), None),  # 8.6x smaller red cells on a field a quarter as wide: a 2.15x change of view
])
def test_a_ruler_is_implausible_only_when_both_size_and_view_are_out_of_range(factor, shape, message):
    from smearpipe.pipeline import _implausible_ruler

    got = _implausible_ruler(factor, shape, 640)
    assert got == message if message is None else got.startswith(message) and got.endswith("both outside the 0.2-5.0x")


def test_noise_is_not_measured_as_red_cells(pipe):
    # random noise reads as ~10 px red cells to the image ruler: neither "auto" nor True follows it
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    ruler = pipe.detector.record.metadata["rbc_diameter_px"]
    assert ruler / estimate_rbc_diameter(noise) > 4  # the premise
    det = MagnifiedDetector(_auto_record(pipe, rbc_box_px=100.0, rbc_diameter_px=ruler), 100, n_rbc=0)
    with pytest.warns(UserWarning, match="not rescaled"):
        assert analyze_smear(noise, pipeline=Pipeline(det, pipe.classifier)).scale_factor == 1.0
    assert det.sizes == [None]
    with pytest.raises(ScaleEstimationError, match="rbc_diameter_px"):
        analyze_smear(noise, pipeline=pipe, config=PipelineConfig(rescale=True))
    good = read_image(SAMPLES / "BloodImage_00007.jpg")
    cfg = PipelineConfig(rescale=True, det_conf=0.001)
    alone = analyze_fields([good], pipeline=pipe, config=cfg, progress=False).fields[0].scale_factor
    slide = analyze_fields([good, noise, noise], pipeline=pipe, config=cfg, progress=False)
    # the noise fields do not move the slide's median, and are analysed at the slide's scale (one microscope)
    assert [f.scale_factor for f in slide.fields] == pytest.approx([alone] * 3)


def test_tiny_fields_are_refused(pipe):
    img = read_image(SAMPLES / "BloodImage_00007.jpg")
    for cut in (img[:5, :5], img[:31, :200], img[:1, :2000]):
        with pytest.raises(InvalidImageError, match="at least 32 px"):
            analyze_smear(cut, pipeline=pipe)
    assert analyze_smear(img[:32, :32], pipeline=pipe).image_size == (32, 32)


def test_auto_rescale_needs_the_box_ruler_in_the_record(pipe):
    bare = copy.copy(pipe.detector)
    bare.record = dataclasses.replace(pipe.detector.record, metadata={
        k: v for k, v in pipe.detector.record.metadata.items() if k != "rbc_box_px"})
    with pytest.warns(UserWarning, match="rbc_box_px"):
        load_pipeline(detector=bare, classifier=pipe.classifier)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pipeline(detector=bare, classifier=pipe.classifier, config=PipelineConfig(rescale=False))
    det = MagnifiedDetector(bare.record, 40)
    assert analyze_smear(read_image(SAMPLES / "BloodImage_00007.jpg"), pipeline=Pipeline(det, pipe.classifier)).scale_factor == 1.0
    assert det.sizes == [None]  # seen as it is


@pytest.mark.parametrize("bad", ["yes", 1, None, "AUTO"])
def test_rescale_values(bad):
    with pytest.raises(ValueError, match="rescale"):
        PipelineConfig(rescale=bad)


def test_slide_scale_is_the_median_of_the_first_fields(pipe, tmp_path):
    meta = {**pipe.detector.record.metadata, "rbc_diameter_px": 100.0, "train_long_side_px": 640}
    det = SizeRecordingDetector([], dataclasses.replace(pipe.detector.record, input_size=512, metadata=meta))
    stub = Pipeline(det, pipe.classifier)
    paths = sorted(SAMPLES.glob("*.jpg"))[:4]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    blank = np.full((480, 640, 3), _GLASS, np.uint8)
    # an unreadable field first (reported), a blank one (no red cells to measure) among the first three
    fields = (f for f in [tmp_path / "broken.jpg", paths[0], blank, *paths[1:]])  # any iterable, read once
    each = [estimate_rbc_diameter(read_image(p)) for p in paths]
    stub = Pipeline(det, pipe.classifier, PipelineConfig(rescale=True, slide_scale_fields=3))  # config via the pipeline
    slide = analyze_fields(fields, pipeline=stub, progress=False)
    assert len(slide.errors) == 1 and slide.errors[0][0] == str(tmp_path / "broken.jpg")
    assert [r.source for r in slide.fields] == [str(paths[0]), "array[2]", *map(str, paths[1:])]  # input order kept
    expected = 100.0 / float(np.median(each[:3]))  # the first three measurable fields
    assert all(r.scale_factor == pytest.approx(expected) for r in slide.fields)  # one scale, the blank field too
    with pytest.warns(UserWarning, match="no red cells measurable"):
        alone = analyze_fields([blank, blank], pipeline=stub, progress=False)
    assert len(alone.errors) == 2 and "blank field" in alone.errors[0][1]  # measured alone: reported
    per_field = analyze_fields(paths, pipeline=stub, config=PipelineConfig(rescale=True, slide_scale_fields=0),
                               progress=False)
    assert [r.scale_factor for r in per_field.fields] == pytest.approx([100.0 / d for d in each])


@pytest.mark.parametrize("bad", [-1, True, 1.5, "8"])
def test_slide_scale_fields_must_be_a_count(bad):
    with pytest.raises(ValueError, match="slide_scale_fields"):
        PipelineConfig(slide_scale_fields=bad)
    assert PipelineConfig(slide_scale_fields=np.int64(2)).slide_scale_fields == 2


def test_cli_known_scale(tiny_run, tmp_path, capsys):
    from smearpipe.detect import Detector

    shipped = Detector.load().record.metadata["rbc_diameter_px"]
    out = tmp_path / "out"
    args = ["analyze", str(SAMPLES / "BloodImage_00007.jpg"), "--out", str(out), "--classifier", str(tiny_run.weights),
            "--quiet", "--rbc-diameter-px", str(shipped / 2)]
    assert cli_main(args) == 0
    result = json.loads((out / "BloodImage_00007.json").read_text())
    assert result["scale_factor"] == pytest.approx(2.0)  # red cells half the training size: shown at twice the size
    with pytest.raises(SystemExit) as exc:  # argparse: one way of giving the scale at a time
        cli_main(args + ["--pixel-size-um", "0.1", "--overwrite"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    # measured from the field itself; the paths may follow the flag
    assert cli_main(["analyze", "--rescale", *args[1:-2], "--overwrite"]) == 0
    measured = json.loads((out / "BloodImage_00007.json").read_text())["scale_factor"]
    assert measured == pytest.approx(shipped / estimate_rbc_diameter(read_image(SAMPLES / "BloodImage_00007.jpg")))
    with pytest.raises(SystemExit) as exc:
        cli_main(args[:-2] + ["--rescale", "--no-rescale", "--overwrite"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    assert cli_main(args[:-2] + ["--no-rescale", "--overwrite"]) == 0
    assert json.loads((out / "BloodImage_00007.json").read_text())["detector_imgsz"] is None


def test_duplicate_wbc_boxes_are_dropped(pipe):
    cell = Detection((200.0, 150.0, 320.0, 270.0), "WBC", 0.9)
    nucleus = Detection((230.0, 180.0, 290.0, 240.0), "WBC", 0.6)
    other = Detection((400.0, 150.0, 500.0, 250.0), "WBC", 0.8)
    stub = Pipeline(StubDetector([cell, nucleus, other], pipe.detector.record), pipe.classifier)
    r = analyze_smear(SAMPLES / "BloodImage_00011.jpg", pipeline=stub)
    assert r.counts["WBC"] == 2 and [d.box for d in r.wbcs] == [cell.box, other.box]
    kept = analyze_smear(SAMPLES / "BloodImage_00011.jpg", pipeline=stub, config=PipelineConfig(wbc_max_overlap=None))
    assert kept.counts["WBC"] == 3


@pytest.mark.parametrize("bad", [0.0, 1.2, -1.0])
def test_wbc_max_overlap_must_be_a_fraction(bad):
    with pytest.raises(ValueError, match="wbc_max_overlap"):
        PipelineConfig(wbc_max_overlap=bad)


def test_result_json_that_is_not_a_result():
    for text in ("{}", "[]", '{"detections": [{"box": [1, 2, 3]}]}', '{"detections": [{"box": [0, 0, "nan", 4]}]}'):
        with pytest.raises(ValueError, match="not a smearpipe field result|a box is 4 finite"):
            SmearResult.from_json(text)


@pytest.mark.parametrize("bad", [0, -5, 2.5, True, 1000])
def test_draw_thickness(pipe, bad):
    r = analyze_smear(SAMPLES / "BloodImage_00007.jpg", pipeline=pipe)
    with pytest.raises(ValueError, match="thickness"):
        draw(r, SAMPLES / "BloodImage_00007.jpg", thickness=bad)


def test_analyze_fields_refuses_one_grey_image(pipe):
    with pytest.raises(TypeError, match="list of images"):
        analyze_fields(np.zeros((480, 640), np.uint8), pipeline=pipe, progress=False)


def test_detector_conf_checks_and_box_cap(pipe):
    img = read_image(SAMPLES / "BloodImage_00007.jpg")
    for bad in (True, "0.5"):
        with pytest.raises(TypeError, match="conf must be a number"):
            pipe.detector.predict(img, conf=bad)
    with pytest.warns(UserWarning, match="the most one image returns"):
        assert len(pipe.detector.predict(img, conf=0.0, imgsz=640)) == 1000


def test_a_wbc_box_without_a_nucleus_is_flagged(pipe):
    field = np.full((480, 640, 3), (235, 215, 205), np.uint8)  # background only
    cv2.circle(field, (500, 300), 30, (95, 60, 160), -1)         # one violet nucleus
    boxes = [Detection((100.0, 100.0, 200.0, 200.0), "WBC", 0.9), Detection((450.0, 250.0, 550.0, 350.0), "WBC", 0.9)]
    r = analyze_smear(field, pipeline=Pipeline(StubDetector(boxes, pipe.detector.record), pipe.classifier),
                      config=PipelineConfig(rescale=False))
    blank, cell = sorted(r.wbcs, key=lambda c: c.box[0])
    assert "no nucleus found" in blank.review_reasons and blank.needs_review
    assert "no nucleus found" not in cell.review_reasons


def test_boxes_without_area_are_dropped_not_a_crash(pipe):
    img = read_image(SAMPLES / "BloodImage_00015.jpg")
    h, w = img.shape[:2]
    boxes = [Detection((float(w), 50.0, float(w), 90.0), "WBC", 0.9),  # predicted past the edge, clipped to it
             Detection((200.0, 150.0, 300.0, 250.0), "WBC", 0.8), Detection((10.0, 0.0, 40.0, 0.0), "RBC", 0.7)]
    r = analyze_smear(img, pipeline=Pipeline(StubDetector(boxes, pipe.detector.record), pipe.classifier))
    assert r.counts == {"WBC": 1, "RBC": 0, "Platelets": 0} and r.wbcs[0].box == (200.0, 150.0, 300.0, 250.0)
    slide = analyze_fields([img, img], pipeline=Pipeline(StubDetector(boxes, pipe.detector.record), pipe.classifier),
                           progress=False)
    assert len(slide.fields) == 2 and slide.errors == () and slide.summary.counts["WBC"] == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(pipeline="yolo"), "pipeline must be a Pipeline"),
    (dict(config={"review_probability": 0.5}), "config must be a PipelineConfig"),
])
def test_pipeline_and_config_types(pipe, kwargs, message):
    img = read_image(SAMPLES / "BloodImage_00015.jpg")
    kwargs = {"pipeline": pipe, **kwargs}
    with pytest.raises(TypeError, match=message):
        analyze_smear(img, **kwargs)
    with pytest.raises(TypeError, match=message):
        analyze_fields([img], progress=False, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(review_probability="0.5"), dict(wbc_max_overlap="0.5"), dict(det_conf=2.0),
                                    dict(det_iou="0.7"), dict(det_iou=0), dict(review_probability=True)])
def test_config_numbers_must_be_numbers(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        PipelineConfig(**kwargs)


@pytest.mark.parametrize("known", [dict(rbc_diameter_px=40), dict(pixel_size_um=0.2)])
def test_a_known_scale_and_no_rescaling_contradict(known):
    with pytest.raises(ValueError, match="rescale=False contradicts"):
        PipelineConfig(rescale=False, **known)
    assert PipelineConfig(rescale=True, **known) and PipelineConfig(**known)


def test_saved_results_are_checked_and_draw_wants_a_result():
    img = read_image(SAMPLES / "BloodImage_00007.jpg")
    d = analyze_smear(img).to_dict()  # the shipped models: a typed WBC among the boxes
    with pytest.raises(TypeError, match="SmearResult.from_dict"):
        draw(d, img)
    for change, message in [(dict(image_size="ab"), "image_size"), (dict(image_size=[640, 0]), "image_size"),
                            ({"detections": [{**d["detections"][0], "box": [0, 0, 1e20, 5]}]}, "box"),
                            ({"detections": [{**d["detections"][0], "wbc_probability": "high"}]}, "wbc_probability")]:
        with pytest.raises(ValueError, match=message):
            SmearResult.from_dict({**d, **change})
    wbc = next(i for i, c in enumerate(d["detections"]) if c["wbc_type"] is not None)

    def changed(i, **cell):
        return {**d, "detections": [{**c, **cell} if j == i else c for j, c in enumerate(d["detections"])]}

    for bad, message in [(changed(0, box=[10, 10, 5, 5]), "x2 > x1"), (changed(0, score=float("nan")), "score"),
                         (changed(0, label="Cat"), "label must be one of"), (changed(wbc, wbc_type="dog"), "typed cell"),
                         ({**d, "counts": {**d["counts"], "WBC": 99}}, "not those of its boxes"),
                         ({**d, "differential": {k: 0 for k in d["differential"]}}, "not those of its boxes"),
                         ({**d, "counts": {**d["counts"], "Cat": 5}}, "whole numbers"),
                         ({**d, "counts": {**d["counts"], "RBC": float(d["counts"]["RBC"])}}, "whole numbers"),
                         (changed(wbc, probabilities="neutrophil"), "probabilities must be a mapping")]:
        with pytest.raises(ValueError, match=message):
            SmearResult.from_dict(bad)
    assert draw(SmearResult.from_dict(d), img).shape == img.shape


@pytest.mark.parametrize("stem", ["../escaped", "sub/x", "", ".", ".."])
def test_field_outputs_stay_in_their_folder(pipe, tmp_path, stem):
    img = read_image(SAMPLES / "BloodImage_00007.jpg")
    r = analyze_smear(img, pipeline=Pipeline(StubDetector([], pipe.detector.record), pipe.classifier))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="plain file name"):
        write_field_outputs(r, img, out, stem)
    assert not any(tmp_path.rglob("*.json")) and not any(tmp_path.rglob("*.png"))
    png, js = write_field_outputs(r, img, out, "field 1")
    assert png.parent == out and js.parent == out
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        write_field_outputs(r, img, png, "field 2")
    with pytest.raises(TypeError, match="not one str"):
        write_field_outputs(r, img, out, "field 3", messages="no colour")
    assert sorted(p.name for p in out.iterdir()) == ["field 1.json", "field 1.png"]
    _, js = write_field_outputs(r, img, out, "field 4", messages=(m for m in ["no colour", "no red cells"]))
    assert json.loads(js.read_text())["warnings"] == ["no colour", "no red cells"]  # a generator is read once


@pytest.mark.parametrize("call, error, match", [
    (lambda: analyze_fields(None), TypeError, "takes a list"),
    (lambda: analyze_fields(5), TypeError, "takes a list"),
    (lambda: analyze_fields([], pipeline={}), TypeError, "pipeline must be a Pipeline"),
    (lambda: load_pipeline(config={"rescale": False}), TypeError, "PipelineConfig"),
])
def test_bad_arguments_are_named_before_any_model_loads(call, error, match, monkeypatch):
    import smearpipe.classify
    import smearpipe.detect
    import smearpipe.pipeline

    monkeypatch.setattr(smearpipe.pipeline, "_default_pipeline", lambda: pytest.fail("the default models were loaded"))
    for cls in (smearpipe.classify.Classifier, smearpipe.detect.Detector):
        monkeypatch.setattr(cls, "load", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("name, error, match", [("", WeightsError, "empty"), (123, TypeError, "name or a file path"),
                                                (["classifier-vgg16bn-v8"], TypeError, "name or a file path")])
def test_weights_names_that_are_not_names(name, error, match):
    from smearpipe.classify import Classifier
    from smearpipe.detect import Detector

    for load in (Classifier.load, Detector.load):
        with pytest.raises(error, match=match):
            load(name)


def test_a_grey_field_is_analysed_with_a_warning(pipe):
    rgb = read_image(SAMPLES / "BloodImage_00007.jpg")
    grey = np.repeat(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
    with pytest.warns(UserWarning, match="no colour"):
        analyze_smear(grey, pipeline=pipe)
    nearly = grey.copy()
    nearly[::3, ::5, 0] = np.minimum(nearly[::3, ::5, 0], 253) + 2  # within 2 levels: still grey
    with pytest.warns(UserWarning, match="no colour"):
        analyze_smear(nearly, pipeline=pipe)
    barred = grey.copy()
    barred[440:450, 500:620] = (255, 0, 0)  # a red scale bar burnt into the grey field
    with pytest.warns(UserWarning, match="^field 7 has no colour"):
        analyze_smear(barred, pipeline=pipe, source="field 7")  # named as the caller names it
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no colour")
        analyze_smear(rgb, pipeline=pipe)  # a stained field: no such warning
