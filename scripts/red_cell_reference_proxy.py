"""Would normalising WBC crops against their field's red cells carry colour across labs better than Reinhard?

Usage: python scripts/red_cell_reference_proxy.py --out reports/cross_lab/red_cell_reference_proxy.json

A cheap proxy, before any training run: a colour-only classifier of eosinophils vs neutrophils. Each crop is
framed as the classifier frames it (:func:`smearpipe.framing.frame_cell`, resized to 96 px) and described by the
median a*, b* of its cytoplasm (pixels in a centred disc of 0.84 sides that are neither nucleus nor glass, as in
``scripts/eos_neut_colour.py``), either

* after per-crop Reinhard normalisation (:func:`smearpipe.preprocess.reinhard_normalize`, what the shipped
  classifiers see), or
* relative to the median colour of the red cells of its own field (PBC: the darker stained, non-nucleus pixels
  outside the central third of the image; BCCD: the centres of the field's annotated red-cell boxes).

Class centroids are the medians on PBC val (no test split), and every crop is given the nearer one (distances
scaled by PBC's spread). Accuracy on PBC val shows how well the feature separates the two types at home; on all
BCCD eosinophil/neutrophil crops, how well that carries over to another lab. Pixels only, no network: a weak
proxy for what a trained network would do with either normalisation.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import cv2
import numpy as np

from smearpipe.framing import frame_cell
from smearpipe.preprocess import reinhard_normalize

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
TYPES = ("eosinophil", "neutrophil")


def lab_of(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)


def nucleus(rgb: np.ndarray) -> np.ndarray:
    blue = np.clip(rgb[..., 2].astype(int) - rgb[..., 1], 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(blue, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return blue > t


def glass(lab: np.ndarray) -> np.ndarray:
    return lab[..., 0] > np.percentile(lab[..., 0], 95) - 3


def disc(shape: tuple[int, ...], radius: float) -> np.ndarray:
    h, w = shape[:2]
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (radius * min(h, w)) ** 2


def pbc_red_cells(rgb: np.ndarray) -> np.ndarray | None:
    lab = lab_of(rgb)
    m = ~disc(rgb.shape, 0.33) & ~nucleus(rgb) & ~glass(lab) & (lab[..., 0] < np.percentile(lab[..., 0], 80))
    return np.median(lab[m], axis=0) if m.sum() > 200 else None


def bccd_red_cells(stem: str) -> np.ndarray | None:
    from eos_neut_colour import red_cell_colour  # scripts/, on the path when a script is run

    found = red_cell_colour(stem)
    return None if found is None else found[1]


def features(raw: np.ndarray, red_cells: np.ndarray) -> dict[str, np.ndarray] | None:
    """Cytoplasm (a*, b*) after per-crop Reinhard, and relative to the field's red cells."""
    framed = cv2.resize(frame_cell(raw), (96, 96), interpolation=cv2.INTER_AREA)
    lab = lab_of(framed)
    m = disc(framed.shape, 0.42) & ~nucleus(framed) & ~glass(lab)
    if m.sum() < 20:
        return None
    return {"per-crop Reinhard": np.median(lab_of(reinhard_normalize(framed))[m], axis=0)[1:],
            "relative to the field's red cells": (np.median(lab[m], axis=0) - red_cells)[1:]}


def crops() -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """(lab, type, crop, red-cell colour) of PBC val and all BCCD eosinophils and neutrophils."""
    out = []
    with open(SHARED / "pbc" / "splits.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["split"] != "val" or r["class"] not in TYPES:
                continue
            rgb = cv2.cvtColor(cv2.imread(str(SHARED / "pbc" / "PBC_dataset_normal_DIB" / r["path"])), cv2.COLOR_BGR2RGB)
            h, w = rgb.shape[:2]  # the centre 70 %, as the classifier is trained on PBC
            raw = rgb[round(h * 0.15): round(h * 0.85), round(w * 0.15): round(w * 0.85)]
            out.append(("pbc", r["class"], raw, pbc_red_cells(rgb)))
    for t in TYPES:
        for p in sorted((SHARED / "bccd_wbc_subtypes" / "BCCD_cropped" / t.capitalize()).glob("*.jpg")):
            out.append(("bccd", t, cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB),
                        bccd_red_cells(re.sub(r"_\d+$", "", p.stem))))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write (refuses to overwrite)")
    args = ap.parse_args()
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists")
    found: dict[str, dict[tuple[str, str], list[np.ndarray]]] = {}
    skipped = 0
    for lab_name, t, raw, red in crops():
        f = None if red is None else features(raw, red)
        if f is None:
            skipped += 1
            continue
        for space, v in f.items():
            found.setdefault(space, {}).setdefault((lab_name, t), []).append(v)
    result = {"skipped (no red cells or no cytoplasm found)": skipped, "spaces": {}}
    for space, groups in found.items():
        x = {k: np.array(v) for k, v in groups.items()}
        pbc = np.concatenate([x[("pbc", t)] for t in TYPES])
        centre = {t: np.median(x[("pbc", t)], axis=0) for t in TYPES}
        spread = pbc.std(axis=0)
        entry = {}
        for lab_name in ("pbc", "bccd"):
            right = n = 0
            recall = {}
            for t in TYPES:
                d = {c: np.linalg.norm((x[(lab_name, t)] - centre[c]) / spread, axis=1) for c in TYPES}
                hit = d[t] < d[TYPES[1 - TYPES.index(t)]]
                recall[t] = {"recall": round(float(hit.mean()), 3), "n": int(hit.size),
                             "median_a_b": [round(float(v), 2) for v in np.median(x[(lab_name, t)], axis=0)]}
                right, n = right + int(hit.sum()), n + int(hit.size)
            entry[lab_name] = {"accuracy": round(right / n, 3), "per_type": recall}
        result["spaces"][space] = entry
        print(f"{space:36s} PBC val {entry['pbc']['accuracy']:.3f}  BCCD {entry['bccd']['accuracy']:.3f}  "
              + "  ".join(f"{lab_name} {t} {entry[lab_name]['per_type'][t]['median_a_b']}"
                          for lab_name in ("pbc", "bccd") for t in TYPES))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
