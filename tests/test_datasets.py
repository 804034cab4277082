from __future__ import annotations

import json

import numpy as np
import pytest

from smearpipe.datasets import normalize_detection_class, read_voc, read_yolo_labels, voc_to_yolo
from smearpipe.errors import DatasetError

from .conftest import SAMPLES, make_voc


@pytest.mark.parametrize(
    "name, expected",
    [("WBC", "WBC"), ("wbc", "WBC"), ("RBC", "RBC"), ("Platelets", "Platelets"), ("platelets", "Platelets"),
     ("Platlets", "Platelets"), (" platelet ", "Platelets"), ("neutrophil", None), ("", None)],
)
def test_class_name_normalisation(name, expected):
    assert normalize_detection_class(name) == expected


def test_bccd_conversion_full(bccd_root, tmp_path):
    report = voc_to_yolo(bccd_root, tmp_path / "yolo")
    assert report.images == {"train": 205, "val": 87, "test": 72}
    # the two degenerate zero-size RBC boxes of BCCD are dropped and reported
    assert sorted(d.split(":")[0] for d in report.dropped_zero_area) == ["BloodImage_00338", "BloodImage_00343"]
    assert sum(report.boxes.values()) == 4888 - 2
    assert report.boxes["WBC"] == 372 and report.boxes["Platelets"] == 361
    assert report.unknown_labels == {}
    saved = json.loads((tmp_path / "yolo" / "conversion_report.json").read_text())
    assert saved["boxes"] == report.boxes
    # round trip of one file against the XML
    (w, h), boxes = read_voc(bccd_root / "Annotations" / "BloodImage_00000.xml")
    labels = read_yolo_labels(tmp_path / "yolo" / "labels" / "val" / "BloodImage_00000.txt", image_size=(w, h))
    src = np.array([[b.xmin, b.ymin, b.xmax, b.ymax] for b in boxes])
    got = labels[:, 1:]
    # compare whole boxes (rows), in the same order
    np.testing.assert_allclose(got[np.lexsort(got.T[::-1])], src[np.lexsort(src.T[::-1])], atol=0.01)


def test_conversion_never_modifies_source_nor_overwrites(bccd_root, tmp_path):
    voc = make_voc(tmp_path, bccd_root, {"train": ["BloodImage_00000", "BloodImage_00001"]})
    before = sorted((p.name, p.stat().st_size) for p in voc.rglob("*"))
    out = tmp_path / "out"
    voc_to_yolo(voc, out, splits=("train",))
    assert sorted((p.name, p.stat().st_size) for p in voc.rglob("*")) == before
    with pytest.raises(DatasetError, match="not empty"):
        voc_to_yolo(voc, out, splits=("train",))
    voc_to_yolo(voc, out, splits=("train",), overwrite=True)
    with pytest.raises(DatasetError, match="outside the source"):
        voc_to_yolo(voc, voc / "yolo", splits=("train",))


def test_unknown_class_names_reported(bccd_root, tmp_path):
    voc = make_voc(tmp_path, bccd_root, {"train": ["BloodImage_00000"]})
    xml = voc / "Annotations" / "BloodImage_00000.xml"
    xml.write_text(xml.read_text().replace("<name>WBC</name>", "<name>Leukocyte-X</name>", 1).replace(
        "<name>RBC</name>", "<name>platlets</name>", 1))
    with pytest.raises(DatasetError, match="Leukocyte-X"):
        voc_to_yolo(voc, tmp_path / "o1", splits=("train",))
    report = voc_to_yolo(voc, tmp_path / "o2", splits=("train",), on_unknown="skip")
    assert report.unknown_labels == {"Leukocyte-X": 1}
    assert report.boxes.get("Platelets", 0) >= 1  # misspelling mapped, not dropped
    report = voc_to_yolo(voc, tmp_path / "o3", splits=("train",), class_map={"Leukocyte-X": "WBC"})
    assert report.unknown_labels == {}


def test_boxes_clipped_to_image(bccd_root, tmp_path):
    voc = make_voc(tmp_path, bccd_root, {"train": ["BloodImage_00000"]})
    xml = voc / "Annotations" / "BloodImage_00000.xml"
    xml.write_text(xml.read_text().replace("<xmax>491</xmax>", "<xmax>700</xmax>", 1))
    report = voc_to_yolo(voc, tmp_path / "o", splits=("train",))
    assert report.clipped_boxes == 1
    labels = read_yolo_labels(tmp_path / "o" / "labels" / "train" / "BloodImage_00000.txt")
    assert labels[:, 1:].max() <= 1.0 + 1e-5  # 6-decimal rounding of cx +- w/2


@pytest.mark.parametrize(
    "content, fragment",
    [("0 0.5 0.5 0.1", "expected 5 fields"), ("0 0.5 a 0.1 0.1", "non-numeric"), ("7 0.5 0.5 0.1 0.1", "invalid class id"),
     ("0 1.5 0.5 0.1 0.1", "normalised"), ("-1 0.5 0.5 0.1 0.1", "invalid class id")],
)
def test_bad_yolo_labels(tmp_path, content, fragment):
    f = tmp_path / "x.txt"
    f.write_text(content + "\n")
    with pytest.raises(DatasetError, match=fragment):
        read_yolo_labels(f, num_classes=3)


def test_empty_label_file_and_missing(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("")
    assert read_yolo_labels(f).shape == (0, 5)
    with pytest.raises(DatasetError, match="not found"):
        read_yolo_labels(tmp_path / "nope.txt")


def test_bad_voc_inputs(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_voc(tmp_path / "missing.xml")
    bad = tmp_path / "bad.xml"
    bad.write_text("<annotation><size>")
    with pytest.raises(DatasetError, match="cannot parse"):
        read_voc(bad)
    with pytest.raises(DatasetError, match="VOC folder not found"):
        voc_to_yolo(tmp_path, tmp_path / "out")


def test_sample_annotations_parse():
    xmls = sorted(SAMPLES.glob("*.xml"))
    assert len(xmls) == 6
    for xml in xmls:
        (w, h), boxes = read_voc(xml)
        assert (w, h) == (640, 480) and boxes


def test_overlapping_splits_refused(bccd_root, tmp_path):
    voc = make_voc(tmp_path, bccd_root, {"train": ["BloodImage_00000", "BloodImage_00001"], "val": ["BloodImage_00001"]})
    with pytest.raises(DatasetError, match="share 1 image"):
        voc_to_yolo(voc, tmp_path / "o", splits=("train", "val"))
    report = voc_to_yolo(voc, tmp_path / "o2", splits=("train", "val"), allow_overlap=True)
    assert report.images == {"train": 2, "val": 1}


def test_exact_custom_class_names(bccd_root, tmp_path):
    voc = make_voc(tmp_path, bccd_root, {"train": ["BloodImage_00000"]})
    xml = voc / "Annotations" / "BloodImage_00000.xml"
    xml.write_text(xml.read_text().replace("<name>WBC</name>", "<name>wbc</name>"))
    report = voc_to_yolo(voc, tmp_path / "o", splits=("train",), classes=("wbc", "RBC", "Platelets"))
    assert report.boxes.get("wbc") == 1 and report.unknown_labels == {}
