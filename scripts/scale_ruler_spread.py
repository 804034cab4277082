"""How well each red-cell ruler measures a field's magnification: the spread of its scale factor over fields of one scale.

Usage: python scripts/scale_ruler_spread.py [--detector NAME] [--out reports/scale/ruler_spread.json]

For fields that all share one magnification, a good ruler gives nearly the same factor on every field. Per
field, at its native scale:
- ``box``: the detector's own red-cell boxes, ``rbc_box_px / rbc_box_diameter`` (what ``rescale="auto"``
  measures first), or none when fewer than 3 usable boxes;
- ``image``: granulometry of the image alone, ``rbc_diameter_px / estimate_rbc_diameter`` (``rescale=True``).
Sets: BCCD val fields (87; the detector's training fields, its own scale: ideal factor 1), BCCD test fields (72),
PBC val images (1,030; another lab, whose images the detector's input size shows ~1.4x too large), and BCCD val
fields shrunk 2.5x in 2x2 mosaics (21; ideal factor 2.5; the first detection only, before ``auto`` measures
again). Reported: percentiles of each factor, fields it could not measure, and for ``box`` the share of fields
measured within ``AUTO_RESCALE_TOLERANCE`` of the scale the detector's input size shows them at (the fields
``auto`` keeps after one detection; fields not measured count as outside).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from smearpipe.detect import Detector
from smearpipe.io import read_image
from smearpipe.pipeline import AUTO_RESCALE_TOLERANCE
from smearpipe.scale import ScaleEstimationError, estimate_rbc_diameter, rbc_box_diameter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_scale import BCCD, mosaic  # noqa: E402  (a sibling script)

REPO = Path(__file__).resolve().parents[1]
PBC = REPO.parent / "shared" / "datasets" / "pbc"


def summary(values: list[float | None], seen: list[float] | None = None) -> dict:
    ok = np.array([v for v in values if v is not None], float)
    out = {"fields": len(values), "not_measured": int(sum(v is None for v in values))}
    if ok.size:
        q = np.percentile(ok, [0, 5, 25, 50, 75, 95, 100])
        out["factor_percentiles_0_5_25_50_75_95_100"] = [round(float(x), 3) for x in q]
    if seen is not None:
        kept = [v is not None and abs(np.log(v / s)) <= np.log(AUTO_RESCALE_TOLERANCE) for v, s in zip(values, seen, strict=True)]
        out["within_tolerance_of_input_scale"] = round(float(np.mean(kept)), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--detector", default=None)
    ap.add_argument("--out", default=str(REPO / "reports" / "scale" / "ruler_spread.json"))
    args = ap.parse_args()
    det = Detector.load(args.detector)
    meta = det.record.metadata
    box_ref, ruler_ref, long_side = float(meta["rbc_box_px"]), float(meta["rbc_diameter_px"]), float(meta["train_long_side_px"])

    def factors(image: np.ndarray) -> tuple[float | None, float | None, float]:
        d = rbc_box_diameter(det.predict(image), image.shape)
        try:
            g = ruler_ref / estimate_rbc_diameter(image)
        except ScaleEstimationError:
            g = None
        return (box_ref / d if d else None), g, long_side / max(image.shape[:2])

    sets: dict[str, Iterator[np.ndarray]] = {}  # images read one at a time
    for split in ("val", "test"):
        stems = (BCCD / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        sets[f"bccd_{split}_native"] = (read_image(BCCD / "JPEGImages" / f"{s}.jpg") for s in stems)
    with (PBC / "splits.csv").open() as f:
        pbc_val = [r["path"] for r in csv.DictReader(f) if r["split"] == "val"]
    sets["pbc_val"] = (read_image(PBC / "PBC_dataset_normal_DIB" / p) for p in pbc_val)
    val = (BCCD / "ImageSets" / "Main" / "val.txt").read_text().split()
    sets["bccd_val_x2.5_mosaics_first_detection"] = (mosaic(val[i:i + 4], 2.5)[0] for i in range(0, len(val) - 3, 4))
    report = {"detector": {"name": det.record.name, "rbc_box_px": box_ref, "rbc_diameter_px": ruler_ref},
              "tolerance": AUTO_RESCALE_TOLERANCE, "note": __doc__.split("\n\n", 2)[2].strip()}
    for name, images in sets.items():
        rows = [factors(im) for im in images]
        report[name] = {"box": summary([r[0] for r in rows], [r[2] for r in rows]), "image": summary([r[1] for r in rows])}
        print(name, json.dumps(report[name]))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
