"""Contact sheet of the "sharpen" step: BCCD crops before and after it, beside PBC crops of the same type.

Usage: python scripts/sharpness_sheet.py [--weights NAME_OR_PATH] [--n 6] [--out reports/cross_lab/sharpness/crops.jpg]

Every crop is shown as the classifier sees it (its recorded framing, resized to its input size, Reinhard-normalised),
with its sharpness (:func:`smearpipe.preprocess.sharpness`) underneath. BCCD crops come from train/val fields
(``bccd_wbc_subtypes``), PBC crops from PBC val (centre 70 %): no test image is shown.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

import cv2
import numpy as np
from cross_lab_protocol import BCCD_CROPS, SHARED, field_split

from smearpipe.classify import Classifier, resize_preprocessed
from smearpipe.io import read_image
from smearpipe.preprocess import sharpness
from smearpipe.train import center_crop

ZOOM = 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="classifier whose framing and preprocessing are shown (default: shipped)")
    ap.add_argument("--n", type=int, default=6, help="crops per row")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "reports" / "cross_lab" / "sharpness" / "crops.jpg"))
    args = ap.parse_args()
    clf = Classifier.load(args.weights)
    prep = clf.preprocessing
    sharpen = dataclasses.replace(prep, steps=tuple(s for s in prep.steps if s != "sharpen") + ("sharpen",))
    without = dataclasses.replace(prep, steps=tuple(s for s in prep.steps if s != "sharpen"))

    def show(image: np.ndarray, p) -> np.ndarray:
        return resize_preprocessed(image, size=clf.input_size, preprocessing=p, preprocess_resized=clf.preprocess_resized,
                                   framing=clf.framing)

    with (SHARED / "pbc" / "splits.csv").open() as f:
        pbc_val = [r for r in csv.DictReader(f) if r["split"] == "val"]
    side = clf.input_size * ZOOM
    rows = []
    for cls in ("lymphocyte", "monocyte", "eosinophil", "neutrophil"):
        bccd = [read_image(p) for p in sorted((BCCD_CROPS / cls.capitalize()).glob("*"))
                if field_split(p) in ("train", "val")][: args.n]
        pbc = [center_crop(read_image(SHARED / "pbc" / "PBC_dataset_normal_DIB" / r["path"]), 0.7)
               for r in pbc_val if r["class"] == cls][: args.n]
        for label, crops in ((f"BCCD {cls}", [show(c, without) for c in bccd]),
                             ("  + sharpen step", [show(c, sharpen) for c in bccd]),
                             (f"PBC {cls}", [show(c, without) for c in pbc])):
            row = np.full((side + 24, 200 + len(crops) * (side + 4), 3), 255, np.uint8)
            cv2.putText(row, label, (4, side // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
            for i, crop in enumerate(crops):
                x0 = 200 + i * (side + 4)
                row[4:4 + side, x0:x0 + side] = cv2.resize(crop, (side, side), interpolation=cv2.INTER_NEAREST)
                cv2.putText(row, f"{sharpness(crop):.2f}", (x0 + 2, side + 20), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1)
            rows.append(row)
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 80])
    print(out, sheet.shape)


if __name__ == "__main__":
    main()
