"""Same weights, another input size at inference: does a classifier see other labs better larger or smaller?

Usage:
  python scripts/input_size_sweep.py classifier-vgg16bn-v8 runs/seed/s1/classifier-vgg16bn-pbconly-cell-seed1.safetensors \\
      --sizes 40 48 56 64 72 80 96 --with-sharpen --out reports/cross_lab/input_size_sweep.json

For each model and input size (the record's ``input_size`` replaced, nothing else): accuracy and macro-F1 on
PBC val (1,030 images, centre 70 % as in training) and on the 280 ``bccd_wbc_subtypes`` crops of BCCD
train/val fields (the protocol's "dev" crops), with the recorded preprocessing and, with ``--with-sharpen``,
also with ``"sharpen"`` added after it (as the protocol model is scored); confusion matrices (rows: true
class, columns: predicted, in the record's class order). Validation data only: no test
split is read. The "train-test resolution discrepancy" (Touvron et al. 2019) says a network trained with
random-resized crops may do better at a somewhat larger test size; this measures it here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from cross_lab_protocol import BCCD_CROPS, SHARED, field_split, score
from sklearn.metrics import confusion_matrix
from train_default_classifier import PBC_CENTER  # the centre of each PBC image that training uses

from smearpipe.classify import Classifier
from smearpipe.io import read_image
from smearpipe.train import CropSource, center_crop


def pbc_val(classes: tuple[str, ...]) -> tuple[list[tuple[Path, int]], list[np.ndarray], np.ndarray]:
    """PBC val as in training: ``(items, crops, labels)``, items ``(path, class index)``, crops the central 70 %."""
    pbc = CropSource(str(SHARED / "pbc" / "PBC_dataset_normal_DIB"), split="val",
                     splits_csv=str(SHARED / "pbc" / "splits.csv"), center_fraction=PBC_CENTER)
    items = pbc.samples(classes)
    return items, [center_crop(read_image(p), PBC_CENTER) for p, _ in items], np.array([c for _, c in items])


def validation_crops(classes: tuple[str, ...]) -> dict[str, tuple[list[np.ndarray], np.ndarray]]:
    """``{"pbc_val": (crops, labels), "bccd_dev": (crops, labels)}``; labels index ``classes``."""
    out = {"pbc_val": pbc_val(classes)[1:]}
    items = [(p, c) for p, c in CropSource(str(BCCD_CROPS)).samples(classes) if field_split(Path(p)) in ("train", "val")]
    out["bccd_dev"] = ([read_image(p) for p, _ in items], np.array([c for _, c in items]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="registered names or .safetensors files with their records")
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 56, 64, 72, 80, 96])
    ap.add_argument("--with-sharpen", action="store_true", help="also score with 'sharpen' added to the preprocessing")
    ap.add_argument("--out", required=True, help="JSON file to write (refuses to overwrite)")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; pick another name")
    if any(s < 16 for s in args.sizes):
        raise SystemExit("--sizes: 16 px or more")
    data, results = None, []
    for model in args.models:
        clf = Classifier.load(model)
        if data is None:
            data, classes = validation_crops(clf.classes), clf.classes
        elif clf.classes != classes:
            raise SystemExit(f"{clf.name}: classes {clf.classes} differ from the first model's {classes}")
        variants = [tuple(clf.preprocessing.steps)]
        if args.with_sharpen and "sharpen" not in variants[0]:
            variants.append(variants[0] + ("sharpen",))
        for steps in variants:
            for size in args.sizes:
                record = dataclasses.replace(clf.record, input_size=size,
                                             preprocessing=dataclasses.replace(clf.preprocessing, steps=steps))
                sized = Classifier(clf.model, record)
                row = {"model": clf.name, "sha256": clf.record.sha256, "trained_at": clf.input_size, "input_size": size,
                       "preprocessing": list(steps), "framing": clf.framing.to_dict()}
                for key, (crops, y) in data.items():
                    pred = sized.predict_proba(crops).argmax(1)
                    s = score(y, pred, classes)
                    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
                    row[key] = {"n": s["n"], "correct": int((pred == y).sum()), "accuracy": s["accuracy"],
                                "macro_f1": s["macro_f1"], "confusion_matrix": cm.tolist()}
                results.append(row)
                print(f"{clf.name} {'+'.join(steps) or 'none'} {size:3d} px: "
                      + "  ".join(f"{k} {v['correct']}/{v['n']} ({100 * v['accuracy']:.2f} %)" for k, v in row.items()
                                  if k in data), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"what": __doc__.split("\n\n")[2].replace("\n", " "), "classes": list(classes),
                               "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
