"""Do the protocol's eosinophil/neutrophil errors follow the cells' colour or the stain of their field?

Usage: python scripts/eos_neut_colour.py PREDICTIONS_CSV --out reports/cross_lab/eos_neut_colour.json

PREDICTIONS_CSV is the ``predictions.csv`` of ``scripts/cross_lab_protocol.py`` on the 351 BCCD crops. The
crops are grouped by (label, prediction): eosinophils typed right, eosinophils called neutrophils,
neutrophils called eosinophils, neutrophils typed right. For each crop it measures, in CIE L*a*b* and
relative to the "glass" (the pixels within 3 L* of the crop's 95th lightness percentile: the bare slide where
the crop shows any, else its lightest cell pixels), so that white balance and lamp colour drop out:

* ``cytoplasm_b``: median b* (more negative: bluer) of the pixels inside a centred disc of 0.84 crop sides
  that are neither nucleus (blue minus green above its Otsu threshold, the cue :mod:`smearpipe.framing` finds
  the nucleus with, here without its floor) nor glass: the WBC's cytoplasm, with whatever red cell overlaps
  the disc. Eosinophil granules are orange-red; neutrophil cytoplasm is pale lilac.
* ``rbc_b``: median b* of the centres of the field's annotated red cells (VOC boxes of the BCCD field the
  crop was cut from), the field's own eosin reference.
* ``cytoplasm_minus_rbc_b``: the first relative to the second, free of the field's stain strength.

Groups are compared with two-sided Mann-Whitney tests; the p-values are also given Holm-corrected over all
tests made. If the crops called the other type have the other type's colour also relative to their own
field's red cells, the network follows what the cells look like. Reading the JPEGs only: no network, no
training.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "bccd" / "BCCD"
GROUPS = {("eosinophil", "eosinophil"): "eosinophil typed right", ("eosinophil", "neutrophil"): "eosinophil called neutrophil",
          ("neutrophil", "eosinophil"): "neutrophil called eosinophil", ("neutrophil", "neutrophil"): "neutrophil typed right"}


def _lab(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rgb = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    return rgb, cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)


def _glass(lab: np.ndarray) -> np.ndarray:
    return lab[..., 0] > np.percentile(lab[..., 0], 95) - 3


def cytoplasm_b(path: Path) -> float:
    rgb, lab = _lab(path)
    h, w = lab.shape[:2]
    blue = np.clip(rgb[..., 2].astype(int) - rgb[..., 1], 0, 255).astype(np.uint8)
    t, _ = cv2.threshold(blue, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.42 * min(h, w)) ** 2
    glass = _glass(lab)
    cell = disc & (blue <= t) & ~glass
    if not cell.any():
        raise SystemExit(f"{path}: no cytoplasm pixels found (all nucleus or glass)")
    return float(np.median(lab[..., 2][cell]) - np.median(lab[..., 2][glass]))


def red_cell_colour(stem: str) -> tuple[np.ndarray, np.ndarray] | None:
    """L*a*b* of the BCCD field ``stem`` and the median L*a*b* of its annotated red cells' centres (None: no boxes)."""
    xml = BCCD / "Annotations" / f"{stem}.xml"
    if not xml.is_file():
        return None
    _, lab = _lab(BCCD / "JPEGImages" / f"{stem}.jpg")
    values = []
    for obj in ET.parse(xml).findall("object"):
        if (obj.findtext("name") or "").strip() != "RBC":
            continue
        bb = obj.find("bndbox")
        x0, y0, x1, y1 = (int(float(bb.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
        cx, cy, r = (x0 + x1) // 2, (y0 + y1) // 2, max(2, (x1 - x0) // 5)
        values.append(lab[max(cy - r, 0):cy + r, max(cx - r, 0):cx + r].reshape(-1, 3))
    return (lab, np.median(np.concatenate(values), axis=0)) if values else None


def rbc_b(stem: str) -> float | None:
    found = red_cell_colour(stem)
    if found is None:
        return None
    lab, red = found
    return float(red[2] - np.median(lab[..., 2][_glass(lab)]))


def describe(v: list[float]) -> dict:
    a = np.asarray(v, float)
    return {"median": round(float(np.median(a)), 2), "q25": round(float(np.percentile(a, 25)), 2),
            "q75": round(float(np.percentile(a, 75)), 2)}


def main() -> None:
    from scipy.stats import mannwhitneyu

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions")
    ap.add_argument("--out", required=True, help="JSON file to write (refuses to overwrite)")
    args = ap.parse_args()
    if Path(args.out).exists():
        raise SystemExit(f"{args.out} exists")
    found: dict[str, dict[str, list[float]]] = {g: {"cytoplasm_b": [], "rbc_b": [], "cytoplasm_minus_rbc_b": []}
                                                for g in GROUPS.values()}
    with open(args.predictions, newline="") as f:
        for row in csv.DictReader(f):
            group = GROUPS.get((row["true"], row["pred"]))
            if group is None:
                continue
            c = cytoplasm_b(Path(row["path"]))
            found[group]["cytoplasm_b"].append(c)
            r = rbc_b(re.sub(r"_\d+$", "", Path(row["path"]).stem))
            if r is not None:  # a few crops come from images that are not in BCCD (n per measure below)
                found[group]["rbc_b"].append(r)
                found[group]["cytoplasm_minus_rbc_b"].append(c - r)
    result = {"predictions": args.predictions, "measure": "CIE b* relative to the glass; see the script's docstring",
              "groups": {g: {k: {"n": len(x), **describe(x)} for k, x in v.items()} for g, v in found.items()}}
    pairs = (("eosinophil called neutrophil", "eosinophil typed right"),
             ("eosinophil called neutrophil", "neutrophil typed right"),
             ("neutrophil called eosinophil", "neutrophil typed right"),
             ("neutrophil called eosinophil", "eosinophil typed right"))
    raw = {(m, f"{a} vs {b}"): float(mannwhitneyu(found[a][m], found[b][m]).pvalue)
           for m in ("cytoplasm_minus_rbc_b", "rbc_b") for a, b in pairs}
    order = sorted(raw, key=raw.get)  # Holm: the k-th smallest p times (tests - k), kept monotone
    holm, running = {}, 0.0
    for k, key in enumerate(order):
        running = max(running, min(1.0, raw[key] * (len(order) - k)))
        holm[key] = running
    result["mann_whitney_p"] = {m: {pair: {"p": round(raw[(m, pair)], 4), "p_holm": round(holm[(m, pair)], 4)}
                                    for (mm, pair) in raw if mm == m} for m in ("cytoplasm_minus_rbc_b", "rbc_b")}
    tests = result["mann_whitney_p"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for g, v in result["groups"].items():
        print(f"{g:30s} n={v['cytoplasm_b']['n']:3d}/{v['rbc_b']['n']:3d}  cytoplasm b* {v['cytoplasm_b']['median']:6.1f}  "
              f"red cells b* {v['rbc_b']['median']:5.1f}  "
              f"cytoplasm - red cells {v['cytoplasm_minus_rbc_b']['median']:6.1f} "
              f"({v['cytoplasm_minus_rbc_b']['q25']}..{v['cytoplasm_minus_rbc_b']['q75']})")
    print(json.dumps(tests, indent=1))


if __name__ == "__main__":
    main()
