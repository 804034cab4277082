"""Dataset tools: Pascal VOC -> ultralytics YOLO conversion, YOLO label reading, class names.

The source dataset is never modified: conversion writes a new folder (and refuses to write
into a non-empty one unless asked).
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import shutil
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError

__all__ = [
    "DETECTION_CLASSES",
    "WBC_CLASSES",
    "normalize_wbc_class",
    "square_crop",
    "read_bccd_subtype_labels",
    "CropReport",
    "extract_wbc_crops",
    "normalize_detection_class",
    "VocBox",
    "read_voc",
    "ConversionReport",
    "voc_to_yolo",
    "read_yolo_labels",
]

#: Detection classes, in the order of YOLO class ids.
DETECTION_CLASSES: tuple[str, ...] = ("WBC", "RBC", "Platelets")

_DETECTION_ALIASES: dict[str, str] = {
    "wbc": "WBC",
    "wbcs": "WBC",
    "white blood cell": "WBC",
    "white_blood_cell": "WBC",
    "leukocyte": "WBC",
    "rbc": "RBC",
    "rbcs": "RBC",
    "red blood cell": "RBC",
    "red_blood_cell": "RBC",
    "erythrocyte": "RBC",
    "platelets": "Platelets",
    "platelet": "Platelets",
    "platlets": "Platelets",
    "plt": "Platelets",
    "thrombocyte": "Platelets",
}


def normalize_detection_class(name: str) -> str | None:
    """Map a spelling of a detection class to its canonical name, or None if unknown.

    >>> normalize_detection_class("platlets")
    'Platelets'
    """
    return _DETECTION_ALIASES.get(" ".join(str(name).strip().lower().split()))


@dataclass(frozen=True)
class VocBox:
    label: str  # as written in the file
    xmin: float
    ymin: float
    xmax: float
    ymax: float


def _voc_number(xml_path: Path, parent: ET.Element | None, tag: str) -> float:
    """The finite number in ``parent/<tag>``, or :class:`DatasetError` naming the file and the field."""
    text = None if parent is None else parent.findtext(tag)
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise DatasetError(f"malformed VOC annotation {xml_path}: <{tag}> must be a finite number, got {text!r}")
    return value


def read_voc(xml_path: str | os.PathLike) -> tuple[tuple[int, int], list[VocBox]]:
    """Read a Pascal VOC annotation: ((width, height), boxes).

    Raises
    ------
    DatasetError
        If the file is missing, not a file, not XML, or lacks size / box fields, or a size or box
        field is not a finite number (``nan``, ``inf``); the message names the file and the field.
    """
    xml_path = Path(xml_path)
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError:
        raise DatasetError(f"annotation file not found: {xml_path}") from None
    except OSError as exc:
        raise DatasetError(f"cannot read annotation file {xml_path}: {exc}") from None
    except ET.ParseError as exc:
        raise DatasetError(f"cannot parse VOC XML {xml_path}: {exc}") from None
    size = root.find("size")
    width, height = int(_voc_number(xml_path, size, "width")), int(_voc_number(xml_path, size, "height"))
    boxes = []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        boxes.append(
            VocBox(
                label=(obj.findtext("name") or "").strip(),
                xmin=_voc_number(xml_path, bb, "xmin"),
                ymin=_voc_number(xml_path, bb, "ymin"),
                xmax=_voc_number(xml_path, bb, "xmax"),
                ymax=_voc_number(xml_path, bb, "ymax"),
            )
        )
    if width <= 0 or height <= 0:
        raise DatasetError(f"VOC annotation {xml_path} has invalid image size {width}x{height}")
    return (width, height), boxes


@dataclass
class ConversionReport:
    """What :func:`voc_to_yolo` did (also written as ``conversion_report.json``)."""

    images: dict[str, int] = field(default_factory=dict)  # split -> images written
    boxes: dict[str, int] = field(default_factory=dict)  # class -> boxes written
    clipped_boxes: int = 0
    dropped_zero_area: list[str] = field(default_factory=list)  # "image: label (x1,y1,x2,y2)"
    unknown_labels: dict[str, int] = field(default_factory=dict)
    images_without_boxes: list[str] = field(default_factory=list)
    data_yaml: str = ""

    def to_dict(self) -> dict:
        return {
            "images": self.images,
            "boxes": self.boxes,
            "clipped_boxes": self.clipped_boxes,
            "dropped_zero_area": self.dropped_zero_area,
            "unknown_labels": self.unknown_labels,
            "images_without_boxes": self.images_without_boxes,
            "data_yaml": self.data_yaml,
        }


def _read_split_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"split list not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _check_out_dir(voc_root: Path, out_dir: Path, *, overwrite: bool, report_name: str) -> None:
    """Refuse an output folder that overlaps the source or holds files the converter did not write.

    ``out_dir`` must be a folder (or not exist yet), must not be ``voc_root``, lie inside it or contain
    it, and must be empty unless ``overwrite=True``. Even then, a non-empty ``out_dir`` is only
    replaced when it holds ``report_name``, the report that the converter writes there.

    Raises
    ------
    DatasetError
        Naming the folder and what to do.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"output folder {out_dir} is an existing file; pass the path of a folder")
    src, out = voc_root.resolve(), out_dir.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise DatasetError(
            f"out_dir {out_dir} must be outside the source dataset {voc_root} and must not contain it "
            "(the source is never modified)"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise DatasetError(f"output folder {out_dir} exists and is not empty (pass overwrite=True to replace it)")
        if not (out_dir / report_name).is_file():
            raise DatasetError(
                f"output folder {out_dir} is not empty and holds no {report_name}, so it is not an earlier output of "
                "this function; overwrite=True only replaces those (choose a new folder or empty this one yourself)"
            )


@contextmanager
def _staged(out_dir: Path, *, replace_all: bool) -> Iterator[Path]:
    """A fresh hidden folder inside ``out_dir`` to write into; its files replace ``out_dir``'s only on success.

    On an error the earlier content of ``out_dir`` (an earlier output, or nothing) stays as it was and the
    partial output is removed, as is ``out_dir`` itself if this call created it: a failed run neither
    destroys a good output nor leaves a half-written one behind. On success the entries written replace
    those of the same name (and, with ``replace_all``, every other entry of ``out_dir``: no stale files
    mixed in). ``out_dir`` itself (a link, a mount point, its permissions) is kept, and every rename stays
    within it, so on one filesystem.
    """
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    stage, old = out_dir / f".partial-{tag}", out_dir / f".replaced-{tag}"
    stage.mkdir()
    aside: list[str] = []  # earlier entries moved into ``old``
    placed: list[str] = []  # new entries moved from ``stage`` into ``out_dir``
    try:
        yield stage
        names = [p.name for p in stage.iterdir()]
        old.mkdir()
        for p in list(out_dir.iterdir()):
            if p not in (stage, old) and (replace_all or p.name in names):
                os.rename(p, old / p.name)
                aside.append(p.name)
        for name in names:
            os.rename(stage / name, out_dir / name)
            placed.append(name)
    except BaseException:
        for name in placed:  # undo: the new entries out, the earlier ones back
            target = out_dir / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        for name in aside:
            os.rename(old / name, out_dir / name)
        shutil.rmtree(stage, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    shutil.rmtree(old)
    stage.rmdir()


def voc_to_yolo(
    voc_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    splits: Sequence[str] = ("train", "val", "test"),
    classes: Sequence[str] = DETECTION_CLASSES,
    class_map: Mapping[str, str] | None = None,
    wbc_types_as_wbc: bool = False,
    on_unknown: str = "error",
    overwrite: bool = False,
    link_images: bool = True,
    allow_overlap: bool = False,
) -> ConversionReport:
    """Convert a Pascal VOC dataset (BCCD layout) to the ultralytics YOLO layout.

    Expects ``voc_root/Annotations/*.xml``, ``voc_root/JPEGImages/*`` and
    ``voc_root/ImageSets/Main/<split>.txt``. Writes ``out_dir/images/<split>/``,
    ``out_dir/labels/<split>/*.txt`` (``class cx cy w h``, normalised), ``out_dir/data.yaml``
    and ``out_dir/conversion_report.json``. Boxes are clipped to the image; zero-area boxes
    are dropped and listed in the report.

    Parameters
    ----------
    voc_root : path
        Folder holding ``Annotations``, ``JPEGImages`` and ``ImageSets/Main``.
    out_dir : path
        Output folder, outside ``voc_root``; must not exist or be empty unless ``overwrite=True``.
    splits : str or sequence of str
        Split names whose ``ImageSets/Main/<split>.txt`` lists are honoured (a single string is one
        split); at least one.
    classes : sequence of str
        Canonical class names, in class-id order.
    class_map : mapping, optional
        Extra spellings -> canonical name (checked before the built-in aliases).
    wbc_types_as_wbc : bool
        Boxes labelled with a WBC type (``Neutrophil``, ... :func:`normalize_wbc_class`) are ``WBC`` boxes (else
        they are unknown names). The types are not kept in the YOLO labels: cut typed crops from the VOC source
        with :func:`extract_wbc_crops`.
    on_unknown : {"error", "skip"}
        Unknown class names raise :class:`DatasetError` (listing them) or are skipped and
        counted in the report.
    overwrite : bool
        Allow writing into an existing, non-empty ``out_dir`` written by an earlier conversion (it holds
        ``conversion_report.json``); its ``images``/``labels``, ``data.yaml`` and report are replaced,
        and only once the new conversion has succeeded (a failed one leaves them as they were). Other
        non-empty folders are never written into.
    link_images : bool
        Symlink images instead of copying them (falls back to copying where links fail).
    allow_overlap : bool
        Allow an image in several of ``splits`` (e.g. ``trainval`` next to ``val``); by default
        overlapping or duplicated split lists raise :class:`DatasetError` (they leak data).

    Returns
    -------
    ConversionReport

    Raises
    ------
    DatasetError
        Missing or malformed source files, leaking splits, unknown class names, or an ``out_dir``
        that is a file, overlaps ``voc_root`` or holds files of something else.
    ValueError
        If ``splits`` is empty or ``on_unknown`` is not one of the two choices.
    """
    voc_root, out_dir = Path(voc_root), Path(out_dir)
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    if not splits:
        raise ValueError("splits must name at least one split, e.g. ('train', 'val', 'test')")
    if on_unknown not in ("error", "skip"):
        raise ValueError(f"on_unknown must be 'error' or 'skip', got {on_unknown!r}")
    ann_dir, img_dir, set_dir = voc_root / "Annotations", voc_root / "JPEGImages", voc_root / "ImageSets" / "Main"
    for d in (ann_dir, img_dir, set_dir):
        if not d.is_dir():
            raise DatasetError(f"VOC folder not found: {d} (expected Annotations/, JPEGImages/, ImageSets/Main/ under {voc_root})")
    _check_out_dir(voc_root, out_dir, overwrite=overwrite, report_name="conversion_report.json")
    class_ids = {name: i for i, name in enumerate(classes)}
    extra = {" ".join(k.strip().lower().split()): v for k, v in (class_map or {}).items()}

    def canonical(label: str) -> str | None:
        key = " ".join(label.strip().lower().split())
        typed = "WBC" if wbc_types_as_wbc and normalize_wbc_class(label) is not None else None
        for name in (extra.get(key), label if label in class_ids else None, normalize_detection_class(label), typed):
            if name in class_ids:
                return name
        return None

    split_ids = {split: _read_split_file(set_dir / f"{split}.txt") for split in splits}
    for split, ids in split_ids.items():
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise DatasetError(f"split list {split}.txt names images more than once: {dupes[:5]}")
    if not allow_overlap:
        names = list(split_ids)
        for a_i, a in enumerate(names):
            for b in names[a_i + 1:]:
                common = sorted(set(split_ids[a]) & set(split_ids[b]))
                if common:
                    raise DatasetError(
                        f"splits {a!r} and {b!r} share {len(common)} image(s), e.g. {common[:3]}: that leaks data "
                        "(pass allow_overlap=True for e.g. trainval next to val)"
                    )
    # First pass: parse everything and check labels before writing anything.
    parsed: dict[str, tuple[tuple[int, int], list[VocBox]]] = {}
    unknown: dict[str, int] = {}
    for ids in split_ids.values():
        for stem in ids:
            if stem in parsed:
                continue
            parsed[stem] = read_voc(ann_dir / f"{stem}.xml")
            for box in parsed[stem][1]:
                if canonical(box.label) is None:
                    unknown[box.label] = unknown.get(box.label, 0) + 1
    if unknown and on_unknown == "error":
        raise DatasetError(
            f"unknown class name(s) {unknown} (known: {list(classes)}); map them with class_map= or pass on_unknown='skip'"
        )

    missing = [stem for ids in split_ids.values() for stem in ids if not any(img_dir.glob(f"{stem}.*"))]
    if missing:
        raise DatasetError(f"image(s) for {len(missing)} annotation(s) not found in {img_dir}, e.g. {missing[:3]}")
    report = ConversionReport(unknown_labels=unknown)
    with _staged(out_dir, replace_all=False) as stage:  # images/, labels/, data.yaml and the report
        _write_yolo(stage, out_dir, split_ids, parsed, img_dir, canonical, class_ids, classes, splits,
                    link_images, report)
    return report


def _write_yolo(stage: Path, out_dir: Path, split_ids: dict, parsed: dict, img_dir: Path, canonical: Any,
                class_ids: dict, classes: Sequence[str], splits: tuple, link_images: bool, report: ConversionReport) -> None:
    """The files of :func:`voc_to_yolo`, written into ``stage`` (which becomes ``out_dir``)."""
    for split, ids in split_ids.items():
        (stage / "images" / split).mkdir(parents=True, exist_ok=True)
        (stage / "labels" / split).mkdir(parents=True, exist_ok=True)
        for stem in ids:
            matches = sorted(img_dir.glob(f"{stem}.*"))
            if not matches:
                raise DatasetError(f"image for annotation {stem} not found in {img_dir}")
            src = matches[0]
            dst = stage / "images" / split / src.name
            try:
                if link_images:
                    os.symlink(src.resolve(), dst)
                else:
                    shutil.copy2(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            (width, height), boxes = parsed[stem]
            lines = []
            for box in boxes:
                name = canonical(box.label)
                if name is None:
                    continue
                x1, x2 = np.clip([box.xmin, box.xmax], 0, width)
                y1, y2 = np.clip([box.ymin, box.ymax], 0, height)
                if (x1, y1, x2, y2) != (box.xmin, box.ymin, box.xmax, box.ymax):
                    report.clipped_boxes += 1
                if x2 <= x1 or y2 <= y1:
                    report.dropped_zero_area.append(
                        f"{stem}: {box.label} ({box.xmin:g},{box.ymin:g},{box.xmax:g},{box.ymax:g})"
                    )
                    continue
                cx, cy = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
                w, h = (x2 - x1) / width, (y2 - y1) / height
                lines.append(f"{class_ids[name]} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
                report.boxes[name] = report.boxes.get(name, 0) + 1
            if not lines:
                report.images_without_boxes.append(stem)
            (stage / "labels" / split / f"{stem}.txt").write_text("\n".join(lines) + ("\n" if lines else ""))
        report.images[split] = len(ids)

    yaml_lines = [f"path: {out_dir.resolve()}"]
    for split in splits:
        yaml_lines.append(f"{split}: images/{split}")
    yaml_lines.append("names:")
    yaml_lines += [f"  {i}: {name}" for i, name in enumerate(classes)]
    (stage / "data.yaml").write_text("\n".join(yaml_lines) + "\n")
    report.data_yaml = str(out_dir / "data.yaml")
    (stage / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2))


def read_data_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], list[str], Path]:
    """An ultralytics data YAML: its content, class names in id order, and the dataset folder.

    Raises
    ------
    DatasetError
        A missing or unparsable file, or one without ``names``.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"data YAML not found: {path}")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DatasetError(f"cannot parse data YAML {path}: {exc}") from None
    if not isinstance(cfg, dict) or "names" not in cfg:
        raise DatasetError(f"data YAML {path} must be a mapping with 'names' and split entries")
    names = cfg["names"]
    names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
    root = Path(cfg.get("path") or path.parent)
    if not root.is_absolute():
        root = (path.parent / root).resolve()
    return cfg, names, root


def _split_dirs(cfg: Mapping[str, Any], root: Path, split: str) -> tuple[Path, Path]:
    rel = cfg.get(split)
    if rel is None:
        raise DatasetError(f"data YAML has no {split!r} entry")
    if not isinstance(rel, str):  # ultralytics also takes lists of folders and .txt file lists
        raise DatasetError(f"data YAML {split!r} entry is {type(rel).__name__} {rel!r}: smearpipe checks and trains on "
                           "one images folder per split (the layout smearpipe convert-voc writes); merge them into one")
    img_dir = Path(rel) if Path(rel).is_absolute() else root / rel
    if not img_dir.is_dir():
        raise DatasetError(f"{split} image folder not found: {img_dir}")
    parts = list(img_dir.parts)
    if "images" not in parts:
        raise DatasetError(f"{split} image folder {img_dir} is not inside an 'images' folder (YOLO layout)")
    i = len(parts) - 1 - parts[::-1].index("images")
    label_dir = Path(*parts[:i], "labels", *parts[i + 1 :])
    return img_dir, label_dir


def read_yolo_labels(
    path: str | os.PathLike, *, image_size: tuple[int, int] | None = None, num_classes: int | None = None
) -> np.ndarray:
    """Read a YOLO label file into an ``(N, 5)`` float array ``[class, x1, y1, x2, y2]``.

    Coordinates are normalised (0-1) unless ``image_size=(width, height)`` is given, in which
    case they are pixels. Boxes lie within the image: a box that extends past an image edge by
    at most 1e-3 (rounding of the 6-decimal labels that :func:`voc_to_yolo` writes) is clipped to it.
    An empty file gives an ``(0, 5)`` array.

    Raises
    ------
    DatasetError
        Missing or non-text file, wrong number of fields, non-numeric values, class ids out of
        range, coordinates outside [0, 1], zero-size boxes, or boxes (``centre +- size / 2``) that
        extend more than 1e-3 outside the image. The message names the file and line.
    ValueError
        ``image_size`` is not two positive integers.
    """
    if image_size is not None and not (
            isinstance(image_size, (tuple, list)) and len(image_size) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in image_size)):
        raise ValueError(f"image_size must be (width, height) in pixels, two positive integers, got {image_size!r}")
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"label file not found: {path}")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise DatasetError(f"label file {path} is not a text file (expected lines 'class cx cy w h')") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 5:
            raise DatasetError(f"{path}:{lineno}: expected 5 fields 'class cx cy w h', got {len(parts)}")
        try:
            cls, cx, cy, w, h = (float(p) for p in parts)
        except ValueError:
            raise DatasetError(f"{path}:{lineno}: non-numeric value in {line.strip()!r}") from None
        if not all(np.isfinite(v) for v in (cls, cx, cy, w, h)):
            raise DatasetError(f"{path}:{lineno}: non-finite value in {line.strip()!r}")
        if cls != int(cls) or cls < 0 or (num_classes is not None and cls >= num_classes):
            raise DatasetError(f"{path}:{lineno}: invalid class id {parts[0]!r}")
        if not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            raise DatasetError(f"{path}:{lineno}: coordinates must be normalised to [0, 1], got {line.strip()!r}")
        if w == 0 or h == 0:
            raise DatasetError(f"{path}:{lineno}: box has zero width or height: {line.strip()!r}")
        box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        if min(box) < -1e-3 or max(box) > 1 + 1e-3:
            raise DatasetError(
                f"{path}:{lineno}: box extends outside the image (cx +- w/2 or cy +- h/2 outside [0, 1]): {line.strip()!r}"
            )
        rows.append([cls, *np.clip(box, 0.0, 1.0)])
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 5)
    if image_size is not None:
        arr[:, [1, 3]] *= image_size[0]
        arr[:, [2, 4]] *= image_size[1]
    return arr


# ----------------------------------------------------------------------------- WBC crops

#: WBC types of the default classifier, in class-index order.
WBC_CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")

_WBC_ALIASES = {
    "basophil": "basophil", "baso": "basophil", "ba": "basophil",
    "eosinophil": "eosinophil", "eos": "eosinophil", "eo": "eosinophil",
    "lymphocyte": "lymphocyte", "lympho": "lymphocyte", "lym": "lymphocyte", "ly": "lymphocyte",
    "monocyte": "monocyte", "mono": "monocyte", "mo": "monocyte",
    "neutrophil": "neutrophil", "neutro": "neutrophil", "neu": "neutrophil",
    "segmented neutrophil": "neutrophil", "band neutrophil": "neutrophil", "sne": "neutrophil", "bne": "neutrophil",
}


def normalize_wbc_class(name: str) -> str | None:
    """Map a spelling of a WBC type (``NEUTROPHIL``, ``Neutrophils``, ``neutrophil``) to its name, or None.

    >>> normalize_wbc_class("NEUTROPHIL"), normalize_wbc_class("Eosinophils")
    ('neutrophil', 'eosinophil')
    """
    key = " ".join(str(name).strip().lower().replace("_", " ").split())
    if key in _WBC_ALIASES:
        return _WBC_ALIASES[key]
    if key.endswith("s") and key[:-1] in _WBC_ALIASES:
        return _WBC_ALIASES[key[:-1]]
    return None


def square_crop(image: np.ndarray, box: Sequence[float], *, scale: float = 2.0) -> np.ndarray:
    """Square crop centred on ``box`` with side ``scale * max(box width, box height)``.

    Parts outside the image are filled with the image's estimated background colour, so a cell at
    the border keeps its position in the crop.

    Parameters
    ----------
    image : (H, W, 3) uint8 ndarray
        Or anything :func:`~smearpipe.io.to_rgb_uint8` converts (grayscale, RGBA, uint16, float).
    box : (x1, y1, x2, y2)
        Pixel box of the cell.
    scale : float
        Crop side relative to the box's longer side (1.0 = tight).

    Returns
    -------
    crop : (S, S, 3) uint8 ndarray

    Raises
    ------
    InvalidImageError
        ``image`` is not an image (grayscale and RGBA are converted, as by :func:`~smearpipe.io.to_rgb_uint8`).
    ValueError
        ``box`` not 4 finite numbers with positive width and height, or outside the image; ``scale`` not a
        finite number > 0.
    """
    from .io import to_rgb_uint8
    from .preprocess import estimate_background

    image = to_rgb_uint8(image)
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be 4 numbers (x1, y1, x2, y2), got {box!r}") from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box must be 4 finite numbers, got {tuple(box)}")
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"box must have positive width and height, got {tuple(box)}")
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not 0 < scale < math.inf:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    h, w = image.shape[:2]
    if x2 <= 0 or y2 <= 0 or x1 >= w or y1 >= h:
        raise ValueError(f"box {tuple(box)} lies outside the {w}x{h} image")
    side = max(2, int(round(max(x2 - x1, y2 - y1) * scale)))
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    src = image[max(top, 0): max(min(top + side, h), 0), max(left, 0): max(min(left + side, w), 0)]
    if src.shape[:2] == (side, side):
        return src.copy()
    fill = estimate_background(image).round().astype(np.uint8)
    crop = np.empty((side, side, 3), np.uint8)
    crop[:] = fill
    oy, ox = max(-top, 0), max(-left, 0)
    crop[oy: oy + src.shape[0], ox: ox + src.shape[1]] = src
    return crop


def read_bccd_subtype_labels(labels_csv: str | os.PathLike) -> dict[str, list[str]]:
    """BCCD ``labels.csv`` (``,Image,Category``) -> ``{"BloodImage_00010": ["neutrophil", "eosinophil"]}``.

    An ``Image`` made of digits is BCCD's image number (``10`` and ``0010`` are ``BloodImage_00010``); any other
    is an image name, with or without its extension (``field_7.jpg`` is ``field_7``; ``slide.3`` stays
    ``slide.3``). Rows with an empty category are left
    out; unknown names raise :class:`DatasetError`.
    """
    import csv

    from .io import IMAGE_SUFFIXES

    path = Path(labels_csv)
    if not path.is_file():
        raise DatasetError(f"labels file not found: {path}")
    out: dict[str, list[str]] = {}
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel's "CSV UTF-8") is not a column name
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    with StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "Image" not in reader.fieldnames or "Category" not in reader.fieldnames:
            raise DatasetError(f"{path}: expected columns 'Image' and 'Category', got {reader.fieldnames}")
        for row in reader:
            cat = (row["Category"] or "").strip()
            if not cat:
                continue
            labels = []
            for part in cat.split(","):
                name = normalize_wbc_class(part)
                if name is None:
                    raise DatasetError(f"{path}: unknown WBC type {part.strip()!r} for image {row['Image']}")
                labels.append(name)
            image = (row["Image"] or "").strip()
            if not image:
                raise DatasetError(f"{path}: a row with Category {cat!r} names no Image")
            # BCCD numbers its images; other datasets name them (with or without the extension)
            if image.isascii() and image.isdigit():
                key = f"BloodImage_{int(image):05d}"
            else:
                key = Path(image).stem if Path(image).suffix.lower() in IMAGE_SUFFIXES else image
            if key in out and out[key] != labels:
                raise DatasetError(f"{path}: image {image} is labelled twice, {out[key]} and {labels}")
            out[key] = labels
    return out


@dataclass
class CropReport:
    """What :func:`extract_wbc_crops` wrote and skipped."""

    written: dict[str, int] = field(default_factory=dict)  # class -> crops
    skipped: dict[str, str] = field(default_factory=dict)  # image -> reason
    ignored_labels: dict[str, int] = field(default_factory=dict)  # box label that is not a WBC -> boxes

    def to_dict(self) -> dict:
        return {"written": self.written, "skipped": self.skipped, "ignored_labels": self.ignored_labels}


def extract_wbc_crops(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    labels_csv: str | os.PathLike | None = None,
    split: str | None = "train",
    scale: float = 2.0,
    overwrite: bool = False,
) -> CropReport:
    """Cut labelled WBC crops from annotated fields into an ImageFolder tree ``out_dir/<class>/``.

    A box whose label is a WBC type (``Neutrophil``, ``EOSINOPHILS``, ... :func:`normalize_wbc_class`) is cut
    with that type. A box labelled ``WBC`` gets its field's label(s) from ``labels_csv`` when that is
    unambiguous: one WBC box and one label, or n boxes with n identical labels (labels are per image in BCCD,
    not per box). Other fields are skipped and listed in the report, and boxes whose label is neither a WBC
    type nor a detection class (a ``Blast``, say) are counted in it (``ignored_labels``).

    Parameters
    ----------
    source : path
        A VOC folder (``Annotations``, ``JPEGImages``, ``ImageSets/Main``), or an ultralytics data YAML
        (``names`` and one images folder per split, labels beside it in ``labels/``, as
        :func:`voc_to_yolo` writes it).
    out_dir : path
        Output folder, outside the source dataset; must not exist or be empty unless ``overwrite=True``.
    labels_csv : path, optional
        Field labels for fields whose boxes say only ``WBC`` (:func:`read_bccd_subtype_labels`: BCCD's
        ``labels.csv``, or the same columns with image names).
    split : str or None
        Only fields of this split (VOC: ``ImageSets/Main/<split>.txt``; YAML: its ``<split>`` entry). None:
        every annotated field (VOC), or every split the YAML names among train, val and test.
    scale : float
        Crop side relative to the box (see :func:`square_crop`).
    overwrite : bool
        Replace an existing, non-empty ``out_dir`` written by an earlier extraction (it holds
        ``crop_report.json``), once the new extraction has succeeded (a failed one leaves it as it was).
        Other non-empty folders are never deleted.

    Raises
    ------
    DatasetError
        Missing or malformed source files, an image whose size is not its annotation's, two YOLO fields of one
        name, no crop cut at all (an earlier extraction in ``out_dir`` is then kept), or an ``out_dir`` that is
        a file, overlaps the source or holds files of something else.
    """
    source, out_dir = Path(source), Path(out_dir)
    if source.suffix.lower() in (".yaml", ".yml"):
        root, fields = _yolo_fields(source, split)
    else:
        root, fields = source, _voc_fields(source, split)
    _check_out_dir(root, out_dir, overwrite=overwrite, report_name="crop_report.json")
    labels = read_bccd_subtype_labels(labels_csv) if labels_csv is not None else {}
    report = CropReport()
    # written beside out_dir and moved into place at the end: an error leaves an earlier extraction as it was,
    # and a new one never mixes with stale crops
    with _staged(out_dir, replace_all=True) as stage:
        _write_crops(stage, fields, labels, scale, report)
    return report


_Field = tuple[str, Callable[[], tuple[np.ndarray, list[VocBox]]]]  # (image stem, read: image and its boxes)


def _voc_fields(voc_root: Path, split: str | None) -> list[_Field]:
    """The annotated fields of a VOC folder (one split, or all with ``split=None``), read when asked."""
    from .io import read_image

    folders = [voc_root / "Annotations", voc_root / "JPEGImages"] + ([voc_root / "ImageSets" / "Main"] if split else [])
    for d in folders:
        if not d.is_dir():
            raise DatasetError(f"VOC folder not found: {d} (expected Annotations/, JPEGImages/"
                               f"{', ImageSets/Main/' if split else ''} under {voc_root})")
    if split is None:
        stems = sorted(p.stem for p in (voc_root / "Annotations").glob("*.xml"))
        if not stems:
            raise DatasetError(f"no annotations (*.xml) in {voc_root / 'Annotations'}")
    else:
        stems = _read_split_file(voc_root / "ImageSets" / "Main" / f"{split}.txt")

    def read(stem: str) -> tuple[np.ndarray, list[VocBox]]:
        (width, height), boxes = read_voc(voc_root / "Annotations" / f"{stem}.xml")
        matches = sorted((voc_root / "JPEGImages").glob(f"{stem}.*"))
        if not matches:
            raise DatasetError(f"image for annotation {stem} not found in {voc_root / 'JPEGImages'}")
        image = read_image(matches[0])
        if image.shape[:2] != (height, width):
            turned = ""
            if image.shape[:2] == (width, height):
                turned = " (its EXIF orientation turns it; the boxes must be in the upright image's pixels)"
            raise DatasetError(f"image {matches[0]} is {image.shape[1]}x{image.shape[0]} px but its annotation "
                               f"{stem}.xml gives {width}x{height}{turned}")
        return image, boxes

    return [(stem, functools.partial(read, stem)) for stem in stems]


def _yolo_fields(data_yaml: Path, split: str | None) -> tuple[Path, list[_Field]]:
    """The dataset folder of an ultralytics data YAML and its fields (one split, or all it names)."""
    from .io import IMAGE_SUFFIXES, read_image

    cfg, names, root = read_data_yaml(data_yaml)
    splits = [split] if split is not None else [s for s in ("train", "val", "test") if cfg.get(s) is not None]
    if not splits:
        raise DatasetError(f"data YAML {data_yaml} names no train, val or test split")
    fields: list[_Field] = []
    seen: dict[Path, str] = {}
    stems: dict[str, Path] = {}
    for name in splits:
        img_dir, label_dir = _split_dirs(cfg, root, name)
        for f in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")):
            if f.resolve() in seen:  # two splits on one folder
                continue
            seen[f.resolve()] = name
            if f.stem in stems:  # crops are named by the field's stem, and field labels are looked up by it
                raise DatasetError(f"two fields named {f.stem!r}: {stems[f.stem]} and {f}; their crops would have one "
                                   "name (extract one split at a time, or rename one)")
            stems[f.stem] = f

            def read(f: Path = f, label_dir: Path = label_dir) -> tuple[np.ndarray, list[VocBox]]:
                image = read_image(f)
                lf = label_dir / f"{f.stem}.txt"
                rows = read_yolo_labels(lf, image_size=(image.shape[1], image.shape[0]),
                                        num_classes=len(names)) if lf.is_file() else np.zeros((0, 5))
                return image, [VocBox(str(names[int(r[0])]), *map(float, r[1:])) for r in rows]

            fields.append((f.stem, read))
    return root, fields


def _write_crops(stage: Path, fields: list[_Field], labels: Mapping[str, list[str]], scale: float,
                 report: CropReport) -> None:
    """The crops and report of :func:`extract_wbc_crops`, written into ``stage`` (which becomes ``out_dir``).

    Raises DatasetError, before ``stage`` replaces anything, when not one crop could be cut.
    """
    from .io import write_image

    for stem, read in fields:
        image, boxes = read()
        typed: list[tuple[VocBox, str]] = []
        untyped: list[VocBox] = []
        for b in boxes:
            if not (b.xmax > b.xmin and b.ymax > b.ymin):
                continue
            kind = normalize_wbc_class(b.label)
            if kind is not None:
                typed.append((b, kind))
            elif normalize_detection_class(b.label) == "WBC":
                untyped.append(b)
            elif normalize_detection_class(b.label) is None:  # neither a cell type nor RBC / Platelets
                report.ignored_labels[b.label] = report.ignored_labels.get(b.label, 0) + 1
        cut = list(typed)
        field_labels = labels.get(stem)
        if untyped:
            if not field_labels:
                report.skipped[stem] = "no subtype label" + (f" for its {len(untyped)} WBC boxes" if typed else "")
            elif len(field_labels) == len(untyped) and len(set(field_labels)) == 1:
                cut += [(b, field_labels[0]) for b in untyped]
            else:
                report.skipped[stem] = f"{len(untyped)} WBC boxes vs labels {field_labels}: ambiguous"
        elif not typed:
            report.skipped[stem] = "no WBC box"
        for i, (box, cls) in enumerate(cut):
            crop = square_crop(image, (box.xmin, box.ymin, box.xmax, box.ymax), scale=scale)
            write_image(stage / cls / f"{stem}_{i}.png", crop)
            report.written[cls] = report.written.get(cls, 0) + 1
    if not report.written:
        reasons = sorted(set(report.skipped.values()))
        raise DatasetError(f"no crop could be cut from {len(fields)} fields ({'; '.join(reasons[:3]) or 'none'}): "
                           "a field needs WBC boxes labelled with their type, or WBC boxes and a field label in "
                           "labels_csv")
    (stage / "crop_report.json").write_text(json.dumps(report.to_dict(), indent=2))
