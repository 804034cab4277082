from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from smearpipe.datasets import (
    extract_wbc_crops,
    normalize_detection_class,
    read_bccd_subtype_labels,
    read_voc,
    read_yolo_labels,
    voc_to_yolo,
)
from smearpipe.errors import DatasetError
from smearpipe.io import read_image
from smearpipe.train import CropSource, center_crop

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
    # every converted label file reads back: real boxes pass the within-image and non-zero-size checks
    label_files = sorted((tmp_path / "yolo" / "labels").rglob("*.txt"))
    assert len(label_files) == 205 + 87 + 72
    read_back = [read_yolo_labels(f, num_classes=3, image_size=(640, 480)) for f in label_files]
    assert sum(len(b) for b in read_back) == 4888 - 2
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


def _files(root: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def sample_voc(tmp_path) -> Path:
    """The six sample fields as a VOC dataset with one split, ``train``."""
    voc = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    for xml in SAMPLES.glob("*.xml"):
        shutil.copy(xml, voc / "Annotations")
        shutil.copy(xml.with_suffix(".jpg"), voc / "JPEGImages")
    (voc / "ImageSets" / "Main" / "train.txt").write_text("\n".join(p.stem for p in SAMPLES.glob("*.xml")) + "\n")
    return voc


@pytest.mark.parametrize("where", ["source", "inside", "parent"])
@pytest.mark.parametrize("convert", ["crops", "yolo"])
def test_out_dir_overlapping_source_refused_and_source_kept(sample_voc, where, convert):
    out = {"source": sample_voc, "inside": sample_voc / "JPEGImages" / "out", "parent": sample_voc.parent}[where]
    before = _files(sample_voc)
    with pytest.raises(DatasetError, match="outside the source"):
        if convert == "crops":
            extract_wbc_crops(sample_voc, out, labels_csv=SAMPLES / "labels.csv", split=None, overwrite=True)
        else:
            voc_to_yolo(sample_voc, out, splits=("train",), overwrite=True)
    assert _files(sample_voc) == before


def test_overwrite_only_replaces_own_output(sample_voc, tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "images").mkdir(parents=True)
    (foreign / "images" / "keep.jpg").write_bytes(b"x")
    (foreign / "labels").mkdir()
    (foreign / "notes.txt").write_text("mine")
    before = _files(foreign)
    with pytest.raises(DatasetError, match="not an earlier output"):
        extract_wbc_crops(sample_voc, foreign, labels_csv=SAMPLES / "labels.csv", split=None, overwrite=True)
    with pytest.raises(DatasetError, match="not an earlier output"):
        voc_to_yolo(sample_voc, foreign, splits=("train",), overwrite=True)
    assert _files(foreign) == before
    # a folder written earlier by the same function is replaced, stale files included
    crops = tmp_path / "crops"
    first = extract_wbc_crops(sample_voc, crops, labels_csv=SAMPLES / "labels.csv", split=None)
    (crops / "neutrophil" / "stale.png").write_bytes(b"x")
    again = extract_wbc_crops(sample_voc, crops, labels_csv=SAMPLES / "labels.csv", split=None, overwrite=True)
    assert again.written == first.written and sum(first.written.values()) > 0
    assert not (crops / "neutrophil" / "stale.png").exists()
    yolo = tmp_path / "yolo"
    voc_to_yolo(sample_voc, yolo, splits=("train",))
    voc_to_yolo(sample_voc, yolo, splits=("train",), overwrite=True)
    assert len(list((yolo / "labels" / "train").glob("*.txt"))) == 6


def test_out_dir_that_is_a_file_refused(sample_voc, tmp_path):
    file = tmp_path / "out.txt"
    file.write_text("x")
    with pytest.raises(DatasetError, match="is an existing file"):
        extract_wbc_crops(sample_voc, file, labels_csv=SAMPLES / "labels.csv", split=None)
    with pytest.raises(DatasetError, match="is an existing file"):
        voc_to_yolo(sample_voc, file, splits=("train",))
    assert file.read_text() == "x"


def test_splits_argument(sample_voc, tmp_path):
    with pytest.raises(ValueError, match="at least one split"):
        voc_to_yolo(sample_voc, tmp_path / "o1", splits=())
    report = voc_to_yolo(sample_voc, tmp_path / "o2", splits="train")  # a single name is one split
    assert report.images == {"train": 6}
    assert "train: images/train" in (tmp_path / "o2" / "data.yaml").read_text()


@pytest.mark.parametrize(
    "tag, value, fragment",
    [("width", "inf", "<width> must be a finite number, got 'inf'"), ("height", "nan", "<height> must be a finite number"),
     ("xmin", "nan", "<xmin> must be a finite number, got 'nan'"), ("ymax", "-inf", "<ymax> must be a finite number"),
     ("ymax", "abc", "<ymax> must be a finite number"), ("width", None, "<width> must be a finite number, got None")],
)
def test_non_finite_voc_numbers_refused(sample_voc, tmp_path, tag, value, fragment):
    xml = sample_voc / "Annotations" / "BloodImage_00007.xml"
    field = "" if value is None else f"<{tag}>{value}</{tag}>"  # None: the field is left out
    xml.write_text(re.sub(f"<{tag}>[^<]*</{tag}>", field, xml.read_text(), count=1))
    with pytest.raises(DatasetError, match="BloodImage_00007.xml") as info:
        read_voc(xml)
    assert fragment in str(info.value)
    with pytest.raises(DatasetError, match=f"<{tag}> must be a finite number"):
        voc_to_yolo(sample_voc, tmp_path / "out", splits=("train",))
    assert not (tmp_path / "out").exists()  # nothing written, no `nan` in a label file


def test_voc_path_that_is_a_folder(tmp_path):
    with pytest.raises(DatasetError, match="cannot read annotation file"):
        read_voc(tmp_path)


def test_binary_yolo_label_file(tmp_path):
    f = tmp_path / "x.txt"
    f.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    with pytest.raises(DatasetError, match="not a text file"):
        read_yolo_labels(f)


@pytest.mark.parametrize(
    "content, fragment",
    [("0 0.99 0.5 0.5 0.5", "box extends outside the image"), ("0 0.01 0.5 0.1 0.1", "box extends outside the image"),
     ("0 0.5 0.9 0.1 0.4", "box extends outside the image"), ("0 0.5 0.5 0 0.1", "box has zero width or height"),
     ("0 0.5 0.5 0.1 0.0", "box has zero width or height")],
)
def test_yolo_boxes_outside_image_or_empty_refused(tmp_path, content, fragment):
    f = tmp_path / "x.txt"
    f.write_text("0 0.5 0.5 0.1 0.1\n" + content + "\n")
    with pytest.raises(DatasetError, match=f"x.txt:2: {fragment}"):
        read_yolo_labels(f, image_size=(640, 480))


def test_yolo_box_rounding_overshoot_clipped(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("1 0.9 0.5 0.2005 0.5\n")  # right edge 1.00025: 6-decimal rounding, within 1e-3
    boxes = read_yolo_labels(f, image_size=(640, 480))
    np.testing.assert_allclose(boxes, [[1, 0.79975 * 640, 0.25 * 480, 640, 0.75 * 480]], rtol=1e-12)


def test_crop_source_missing_splits_file(tmp_path):
    (tmp_path / "neutrophil").mkdir()
    src = CropSource(str(tmp_path), splits_csv=str(tmp_path / "missing.csv"), split="test")
    with pytest.raises(DatasetError, match="splits file not found: .*missing.csv"):
        src.samples(("neutrophil",))


@pytest.mark.parametrize("fraction", [float("nan"), float("inf"), 0.0, -0.5, 1.5])
def test_center_fraction_out_of_range_refused(fraction):
    with pytest.raises(ValueError, match=r"center_fraction must be in \(0, 1\]"):
        CropSource("crops", center_fraction=fraction)
    with pytest.raises(ValueError, match=r"center fraction must be in \(0, 1\]"):
        center_crop(np.zeros((10, 10, 3), np.uint8), fraction)


def test_center_crop_fractions():
    img = np.arange(100, dtype=np.uint8).reshape(10, 10, 1).repeat(3, axis=2)
    assert center_crop(img, 1.0) is img
    np.testing.assert_array_equal(center_crop(img, 0.5), img[2:7, 2:7])


def test_crops_refused_when_the_image_is_not_the_annotated_size(sample_voc, tmp_path):
    """An image turned by its EXIF orientation (read upright) no longer matches its annotation's size: refused, named."""
    from PIL import Image

    stem = sorted(SAMPLES.glob("*.xml"))[0].stem
    jpg = sample_voc / "JPEGImages" / f"{stem}.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    with Image.open(jpg) as im:
        im.save(jpg, exif=exif.tobytes())
    with pytest.raises(DatasetError, match=rf"{stem}\.jpg is 480x640 px but its annotation {stem}\.xml gives 640x480 .*EXIF"):
        extract_wbc_crops(sample_voc, tmp_path / "crops", labels_csv=SAMPLES / "labels.csv", split=None)


@pytest.mark.parametrize("convert", ["crops", "yolo"])
def test_a_failed_rerun_keeps_the_earlier_output(sample_voc, tmp_path, convert, monkeypatch):
    out = tmp_path / "out"

    def run(**kw):
        if convert == "crops":
            return extract_wbc_crops(sample_voc, out, labels_csv=SAMPLES / "labels.csv", split=None, overwrite=True)
        return voc_to_yolo(sample_voc, out, splits=("train",), overwrite=True, **kw)

    run()
    (out / "notes.txt").write_text("mine")  # kept by voc_to_yolo (it replaces its own entries), not by crops
    before = _files(out)
    if convert == "crops":  # the last field's annotation breaks, after the others were cut
        stems = sorted(p.stem for p in (sample_voc / "Annotations").glob("*.xml"))
        (sample_voc / "Annotations" / f"{stems[-1]}.xml").write_text("<annotation><size>")
    else:  # the disk fills up while images are copied
        calls = []

        def copy_fails(src, dst, **kw):
            calls.append(src)
            if len(calls) >= 3:
                raise OSError(28, "No space left on device")
            return shutil.copyfile(src, dst)

        monkeypatch.setattr("smearpipe.datasets.shutil.copy2", copy_fails)
    with pytest.raises((DatasetError, OSError)):
        run(link_images=False) if convert == "yolo" else run()
    assert convert == "crops" or len(calls) >= 3  # the failure came from inside the conversion
    assert _files(out) == before  # the earlier output, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "voc"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial or replaced folder left


@pytest.mark.parametrize("convert", ["crops", "yolo"])
def test_overwrite_into_a_linked_folder_keeps_the_link(sample_voc, tmp_path, convert):
    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    for _ in range(2):  # a first run, then a rerun that replaces it
        if convert == "crops":
            extract_wbc_crops(sample_voc, link, labels_csv=SAMPLES / "labels.csv", split=None, overwrite=True)
        else:
            report = voc_to_yolo(sample_voc, link, splits=("train",), overwrite=True)
    assert link.is_symlink() and any(real.iterdir())
    assert not [p.name for p in real.iterdir() if p.name.startswith(".")]
    if convert == "yolo":
        assert Path(report.data_yaml) == link / "data.yaml"
        assert f"path: {real.resolve()}" in (real / "data.yaml").read_text()  # the folder the files are in
        assert len(list((real / "labels" / "train").glob("*.txt"))) == 6


def test_a_failed_first_run_leaves_nothing(sample_voc, tmp_path):
    stem = sorted(p.stem for p in (sample_voc / "Annotations").glob("*.xml"))[-1]
    (sample_voc / "Annotations" / f"{stem}.xml").write_text("<annotation><size>")
    with pytest.raises(DatasetError):
        extract_wbc_crops(sample_voc, tmp_path / "crops", labels_csv=SAMPLES / "labels.csv", split=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["voc"]  # and a rerun is not refused as a foreign folder


@pytest.mark.parametrize("split", [None, "train"])
def test_crops_from_a_folder_that_is_not_voc(tmp_path, split):
    (tmp_path / "not_voc").mkdir()
    with pytest.raises(DatasetError, match="VOC folder not found"):
        extract_wbc_crops(tmp_path / "not_voc", tmp_path / "crops", labels_csv=SAMPLES / "labels.csv", split=split)
    assert not (tmp_path / "crops").exists()


@pytest.mark.parametrize("box, scale, message", [
    ((-40, 10, -30, 40), 2.0, "outside the 120x100 image"), ((130, 10, 140, 40), 2.0, "outside"),
    ((10, 10, float("inf"), 40), 2.0, "finite"), ((10, 10, 30, 40), float("nan"), "scale"),
    ((10, 10, 30), 2.0, "4 numbers"), ((30, 10, 10, 40), 2.0, "positive width"),
])
def test_square_crop_refuses_bad_boxes(box, scale, message):
    from smearpipe.datasets import square_crop

    with pytest.raises(ValueError, match=message):
        square_crop(np.full((100, 120, 3), 200, np.uint8), box, scale=scale)


def test_square_crop_of_grayscale_and_rgba_at_the_border():
    from smearpipe.datasets import square_crop

    for image in (np.full((100, 120), 90, np.uint8), np.full((100, 120, 4), 90, np.uint8)):
        crop = square_crop(image, (0, 0, 10, 10), scale=2.0)  # half of it outside the image
        assert crop.shape == (20, 20, 3) and crop.dtype == np.uint8


def test_labels_csv_with_a_bom_latin1_or_conflicting_rows(tmp_path):
    from smearpipe.datasets import read_bccd_subtype_labels

    f = tmp_path / "labels.csv"
    f.write_bytes("\ufeffImage,Category\n3,NEUTROPHIL\n3,NEUTROPHIL\n".encode())  # Excel's "CSV UTF-8"; a repeat agreeing
    assert read_bccd_subtype_labels(f) == {"BloodImage_00003": ["neutrophil"]}
    f.write_bytes("Image,Category,Note\n3,NEUTROPHIL,d\xe9j\xe0 vu\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_bccd_subtype_labels(f)
    f.write_text("Image,Category\n3,NEUTROPHIL\n3,EOSINOPHIL\n")
    with pytest.raises(DatasetError, match="labelled twice"):
        read_bccd_subtype_labels(f)


@pytest.mark.parametrize("size", [("640", "480"), 640, (640, -480), (640.0, 480), (640, 480, 3)])
def test_yolo_image_size_must_be_two_positive_integers(tmp_path, size):
    f = tmp_path / "a.txt"
    f.write_text("0 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match="image_size"):
        read_yolo_labels(f, image_size=size)


def test_crops_from_a_yolo_dataset_are_those_from_its_voc_source(sample_voc, tmp_path):
    voc_to_yolo(sample_voc, tmp_path / "yolo", splits=("train",))
    from_voc = extract_wbc_crops(sample_voc, tmp_path / "a", labels_csv=SAMPLES / "labels.csv", split="train")
    from_yolo = extract_wbc_crops(tmp_path / "yolo" / "data.yaml", tmp_path / "b", labels_csv=SAMPLES / "labels.csv",
                                  split="train")
    assert from_yolo.written == from_voc.written == {"neutrophil": 4, "monocyte": 1, "lymphocyte": 1}
    assert from_yolo.skipped == from_voc.skipped == {"BloodImage_00135": "no WBC box"}
    files = sorted(p.relative_to(tmp_path / "a").as_posix() for p in (tmp_path / "a").rglob("*.png"))
    assert files == sorted(p.relative_to(tmp_path / "b").as_posix() for p in (tmp_path / "b").rglob("*.png"))
    for f in files:  # the same cut, within the pixel voc_to_yolo moves VOC's 1-based corners by
        a, b = read_image(tmp_path / "a" / f), read_image(tmp_path / "b" / f)
        assert a.shape == b.shape and np.abs(a.astype(int) - b.astype(int)).mean() < 4


def test_crops_of_boxes_labelled_with_their_type(sample_voc, tmp_path):
    """A lab that boxes each white cell with its type needs no labels file; field labels may name images."""
    crops = tmp_path / "typed"
    extract_wbc_crops(sample_voc, crops, labels_csv=SAMPLES / "labels.csv", split=None)
    before = _files(crops)
    with pytest.raises(DatasetError, match="no crop could be cut from 6 fields"):  # WBC boxes and no labels
        extract_wbc_crops(sample_voc, crops, split=None, overwrite=True)
    assert _files(crops) == before  # the earlier extraction is kept
    for xml in (sample_voc / "Annotations").glob("*.xml"):
        xml.write_text(xml.read_text().replace("<name>WBC</name>", "<name>Lymphocytes</name>", 1)
                       .replace("<name>WBC</name>", "<name>Blast</name>"))  # 00031's second box
    report = extract_wbc_crops(sample_voc, crops, split=None, overwrite=True)
    assert report.written == {"lymphocyte": 5} and report.skipped == {"BloodImage_00135": "no WBC box"}
    assert report.ignored_labels == {"Blast": 1}  # not RBC / Platelets
    with pytest.raises(DatasetError, match="unknown class"):  # the detector's conversion refuses the types...
        voc_to_yolo(sample_voc, tmp_path / "yolo", splits=("train",))
    converted = voc_to_yolo(sample_voc, tmp_path / "yolo", splits=("train",), wbc_types_as_wbc=True, on_unknown="skip")
    assert converted.boxes["WBC"] == 5 and converted.unknown_labels == {"Blast": 1}  # ...unless told they are WBCs
    table = tmp_path / "labels.csv"
    table.write_text("Image,Category\nBloodImage_00007.jpg,Eosinophil\nBloodImage_00011,basophils\n")
    assert read_bccd_subtype_labels(table) == {"BloodImage_00007": ["eosinophil"], "BloodImage_00011": ["basophil"]}
    for xml in (sample_voc / "Annotations").glob("BloodImage_0000[7]*.xml"):
        xml.write_text(xml.read_text().replace("<name>Lymphocytes</name>", "<name>WBC</name>"))
    report = extract_wbc_crops(sample_voc, tmp_path / "mixed", labels_csv=table, split=None)
    assert report.written == {"lymphocyte": 4, "eosinophil": 1}


def test_crops_from_yolo_fields_of_one_name_are_refused(sample_voc, tmp_path):
    voc_to_yolo(sample_voc, tmp_path / "yolo", splits=("train",))
    shutil.copytree(tmp_path / "yolo" / "images" / "train", tmp_path / "yolo" / "images" / "val")
    shutil.copytree(tmp_path / "yolo" / "labels" / "train", tmp_path / "yolo" / "labels" / "val")
    data = tmp_path / "yolo" / "data.yaml"
    data.write_text(data.read_text() + "val: images/val\n")
    with pytest.raises(DatasetError, match="two fields named 'BloodImage_00007'"):
        extract_wbc_crops(data, tmp_path / "crops", labels_csv=SAMPLES / "labels.csv", split=None)
    assert extract_wbc_crops(data, tmp_path / "crops", labels_csv=SAMPLES / "labels.csv", split="val").written
