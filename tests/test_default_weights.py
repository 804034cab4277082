"""The shipped default weights: records, sha256, behaviour on real fields/crops, reproducible reports."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from smearpipe.datasets import WBC_CLASSES, read_voc, voc_to_yolo
from smearpipe.detect import Detector
from smearpipe.weights import DEFAULT_CLASSIFIER, DEFAULT_DETECTOR, available, weights_dir

from .conftest import SAMPLES


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.load()


def test_registry_lists_the_defaults():
    assert DEFAULT_DETECTOR in available("detector")
    assert DEFAULT_CLASSIFIER in available("classifier")
    for name in (DEFAULT_DETECTOR, DEFAULT_CLASSIFIER):
        rec = json.loads((weights_dir() / f"{name}.json").read_text())
        for key in ("sha256", "classes", "input_size", "preprocessing", "training", "metrics"):
            assert key in rec, (name, key)


def test_default_detector_finds_the_annotated_wbcs(detector):
    assert detector.record.name == DEFAULT_DETECTOR and detector.record.classes == ("WBC", "RBC", "Platelets")
    for stem in ("BloodImage_00007", "BloodImage_00015", "BloodImage_00021", "BloodImage_00031"):
        truth = [(b.xmin, b.ymin, b.xmax, b.ymax) for b in read_voc(SAMPLES / f"{stem}.xml")[1] if b.label == "WBC"]
        found = [d.box for d in detector.predict(SAMPLES / f"{stem}.jpg") if d.label == "WBC"]
        assert len(found) == len(truth), stem
        for t in truth:
            assert max(_iou(t, f) for f in found) > 0.5, stem


def test_low_conf_returns_many_boxes_for_map(detector):
    low = detector.predict(SAMPLES / "BloodImage_00011.jpg", conf=0.001)
    default = detector.predict(SAMPLES / "BloodImage_00011.jpg")
    assert len(low) > 2 * len(default) > 0


def test_evaluate_detector_reproduces_the_report(detector, bccd_root, tmp_path):
    from smearpipe.evaluate import evaluate_detector

    voc_to_yolo(bccd_root, tmp_path / "yolo", splits=("train", "val", "test"))
    m = evaluate_detector(tmp_path / "yolo" / "data.yaml", detector=detector, split="test", out_dir=tmp_path / "ev")
    recorded = detector.record.metadata["metrics"]["bccd_test"]
    assert m["images"] == 72
    # same weights, same images, same code: equal up to float noise
    assert m["map50"] == pytest.approx(recorded["map50"], abs=2e-3)
    assert m["map50_95"] == pytest.approx(recorded["map50_95"], abs=2e-3)
    for cls in ("WBC", "RBC", "Platelets"):
        assert m["per_class"][cls]["ap50"] == pytest.approx(recorded["per_class"][cls]["ap50"], abs=5e-3)
        assert m["counting"][cls]["exact_fraction"] == pytest.approx(recorded["counting"][cls]["exact_fraction"], abs=1e-9)
