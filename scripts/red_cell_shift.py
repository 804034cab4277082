"""Per-crop colour shift referenced to the red cells around each WBC, on a PBC-only protocol network.

Usage:
  python scripts/red_cell_shift.py WEIGHTS --out reports/cross_lab/red_cell_shift/<name>.json

The step, its reference and the rule that decides whether the held-out crops are read were fixed before this ran:
``reports/cross_lab/red_cell_shift/plan.md``. After the record's framing and Reinhard normalisation, each crop is
shifted in a*, b* so that the red cells it shows (outside its centre, before framing) land on PBC's red-cell colour,
then sharpened as the protocol does (``reinhard,sharpen``). The network is unchanged. Dev-field crops and PBC val
are scored with and without the step; BCCD test-field crops and PBC test only if the plan's rule is met.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from smearpipe.classify import Classifier, resize_preprocessed
from smearpipe.io import read_image
from smearpipe.preprocess import _REINHARD_MIN_STD, Preprocessing, _lab_with_statistics, reinhard_normalize
from smearpipe.train import CropSource, center_crop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_lab_protocol import BCCD_CROPS, SHARED, field_split, pbc_only_lineage  # noqa: E402  (sibling script)
from red_cell_reference_proxy import disc, glass, lab_of, nucleus  # noqa: E402

PBC = SHARED / "pbc" / "PBC_dataset_normal_DIB"
SPLITS = SHARED / "pbc" / "splits.csv"
WORK_SIDE = 128
MIN_PIXELS = 50
MAX_SHIFT = 15.0


def red_cell_lab(raw: np.ndarray) -> np.ndarray | None:
    """Median L*a*b* of the red-cell pixels around a crop's centre (plan, step 2), or None when too few."""
    scale = WORK_SIDE / max(raw.shape[:2])
    small = cv2.resize(raw, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else raw
    lab = lab_of(small)
    m = ~disc(small.shape, 0.33) & ~nucleus(small) & ~glass(lab) & (lab[..., 0] < np.percentile(lab[..., 0], 80))
    return np.median(lab[m], axis=0) if m.sum() >= MIN_PIXELS else None


def normalised_red_cells(raw: np.ndarray, framed: np.ndarray, ref) -> np.ndarray | None:
    """Red-cell a*, b* after the framed crop's own Reinhard transform (plan, step 3), or None without red cells."""
    rbc = red_cell_lab(raw)
    if rbc is None:
        return None
    _, mean, std = _lab_with_statistics(framed, region=ref.region, min_stained_fraction=ref.min_stained_fraction)
    scale = np.asarray(ref.std) / np.maximum(std, _REINHARD_MIN_STD)
    return ((rbc - mean) * scale + np.asarray(ref.mean))[1:]


def reinhard_shifted(framed: np.ndarray, ref, shift_ab: np.ndarray) -> np.ndarray:
    """Reinhard normalisation of ``framed`` with (0, a*, b*) added: the same as a reference mean moved by it."""
    moved = dataclasses.replace(ref, mean=(ref.mean[0], ref.mean[1] + float(shift_ab[0]), ref.mean[2] + float(shift_ab[1])))
    return reinhard_normalize(framed, reference=moved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--out", required=True, help="JSON file to write (refused if it exists)")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists; choose another --out")
    clf = Classifier.load(args.weights)
    pbc_only_lineage(clf)
    if not clf.preprocess_resized:
        sys.exit(f"{clf.name}: written for networks whose preprocessing runs after resizing (preprocess_resized)")
    ref = Preprocessing(steps=("reinhard",)).resolved().reinhard_reference
    # the network with only the sharpen step: crops come framed and (shifted-)Reinhard-normalised from here
    sharpen_only = Classifier(clf.model, dataclasses.replace(
        clf.record, preprocessing=Preprocessing(steps=("sharpen",)).resolved(),
        metadata={**clf.record.metadata, "framing": {"name": "as_given"}}))
    t0 = time.time()

    def load(items, fraction):
        raws = [center_crop(read_image(p), fraction) if fraction < 1 else read_image(p) for p, _ in items]
        # framed and resized to the input size, where this network's recorded preprocessing runs
        framed = [resize_preprocessed(r, size=clf.input_size, preprocessing=Preprocessing(steps=()),
                                      preprocess_resized=True, framing=clf.framing) for r in raws]
        return raws, framed, np.array([c for _, c in items])

    train = CropSource(str(PBC), split="train", splits_csv=str(SPLITS), center_fraction=0.7).samples(clf.classes)[::10]
    raws, framed, _ = load(train, 0.7)
    found = [normalised_red_cells(r, f, ref) for r, f in zip(raws, framed, strict=True)]
    target = np.median(np.array([x for x in found if x is not None]), axis=0)
    reference = {"a_b": [round(float(v), 3) for v in target], "images": len(train),
                 "with_red_cells": sum(x is not None for x in found)}
    print("reference", reference, f"({time.time() - t0:.0f} s)", flush=True)

    def score(raws, framed, y):
        plain, shifted, shifts = [], [], []
        for r, f in zip(raws, framed, strict=True):
            plain.append(reinhard_shifted(f, ref, np.zeros(2)))
            found = normalised_red_cells(r, f, ref)
            shift = np.zeros(2) if found is None else np.clip(target - found, -MAX_SHIFT, MAX_SHIFT)
            shifts.append(shift)
            shifted.append(reinhard_shifted(f, ref, shift))
        res = {}
        for name, crops in (("without", plain), ("with", shifted)):
            pred = sharpen_only.predict_proba(crops).argmax(1)
            res[name] = {"n": int(len(y)), "correct": int((pred == y).sum()), "accuracy": round(float((pred == y).mean()), 4)}
        s = np.array(shifts)
        res["shift"] = {"median_a_b": [round(float(v), 2) for v in np.median(s, axis=0)],
                        "median_abs_a_b": [round(float(v), 2) for v in np.median(np.abs(s), axis=0)],
                        "no_red_cells": int((s == 0).all(axis=1).sum())}
        return res

    bccd = CropSource(str(BCCD_CROPS)).samples(clf.classes)
    split = np.array([field_split(Path(p)) for p, _ in bccd])
    dev = [x for x, s in zip(bccd, split, strict=True) if s in ("train", "val")]
    result = {"classifier": {"name": clf.name, "sha256": clf.record.sha256}, "plan": "reports/cross_lab/red_cell_shift/plan.md",
              "reference": reference, "dev_fields": score(*load(dev, 1.0))}
    print("dev", result["dev_fields"], f"({time.time() - t0:.0f} s)", flush=True)
    pbc_val = CropSource(str(PBC), split="val", splits_csv=str(SPLITS), center_fraction=0.7).samples(clf.classes)
    result["pbc_val"] = score(*load(pbc_val, 0.7))
    print("pbc val", result["pbc_val"], f"({time.time() - t0:.0f} s)", flush=True)
    gain = result["dev_fields"]["with"]["correct"] - result["dev_fields"]["without"]["correct"]
    loss = result["pbc_val"]["without"]["correct"] - result["pbc_val"]["with"]["correct"]
    result["rule"] = {"dev_gain_crops": gain, "pbc_val_loss_images": loss, "met": bool(gain >= 3 and loss <= 2)}
    if result["rule"]["met"]:
        test = [x for x, s in zip(bccd, split, strict=True) if s == "test"]
        result["test_fields"] = score(*load(test, 1.0))
        pbc_test = CropSource(str(PBC), split="test", splits_csv=str(SPLITS), center_fraction=0.7).samples(clf.classes)
        result["pbc_test"] = score(*load(pbc_test, 0.7))
    result["seconds"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["rule"]), {k: result[k] for k in ("test_fields", "pbc_test") if k in result})


if __name__ == "__main__":
    main()
