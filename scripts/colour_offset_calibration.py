"""Label-free colour calibration to a new lab: a shift of the Reinhard reference chosen on unlabelled crops.

Usage:
  python scripts/colour_offset_calibration.py WEIGHTS --out reports/cross_lab/colour_offset/<name>.json \
      [--inference-preprocess reinhard,sharpen]

The rule and what counts as a success were fixed before this ran: ``reports/cross_lab/colour_offset/plan.md``.
Every crop's Reinhard-normalised colour is shifted by (da*, db*) (the reference mean moved; L* unchanged), over a
7 x 7 grid. The shift is chosen without labels, by the information-maximisation objective of SHOT (Liang et al.
2020: mean prediction entropy minus the entropy of the mean prediction) on the crops of BCCD train/val fields;
the crops of BCCD test fields are scored with the chosen shift. The same objective over every 4th PBC val crop
shows what the rule picks at home, where no shift should be needed. Labelled accuracies over the whole grid are
written for context; they choose nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

from smearpipe.classify import Classifier
from smearpipe.framing import apply_framing
from smearpipe.io import read_image
from smearpipe.preprocess import Preprocessing
from smearpipe.train import CropSource, center_crop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_lab_protocol import BCCD_CROPS, SHARED, field_split, pbc_only_lineage  # noqa: E402  (sibling script)

GRID = (-9.0, -6.0, -3.0, 0.0, 3.0, 6.0, 9.0)


def entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-1)


def im_objective(proba: np.ndarray) -> float:
    """SHOT's information-maximisation loss: mean entropy of the predictions minus entropy of their mean."""
    return float(entropy(proba).mean() - entropy(proba.mean(axis=0)))


def shifted(clf: Classifier, steps: tuple[str, ...], da: float, db: float) -> Classifier:
    """``clf`` with its Reinhard reference moved by (0, da, db) and framing left to the caller (crops pre-framed)."""
    pre = Preprocessing(steps=steps).resolved() if steps else clf.preprocessing.resolved()
    ref = pre.reinhard_reference
    moved = dataclasses.replace(ref, mean=(ref.mean[0], ref.mean[1] + da, ref.mean[2] + db),
                                source=f"{ref.source}; shifted by da*={da}, db*={db}")
    record = dataclasses.replace(clf.record, preprocessing=dataclasses.replace(pre, reinhard_reference=moved),
                                 metadata={**clf.record.metadata, "framing": {"name": "as_given"}})
    return Classifier(clf.model, record)


def scores(y: np.ndarray, proba: np.ndarray, n_classes: int) -> dict:
    pred = proba.argmax(axis=1)
    return {"n": int(len(y)), "accuracy": round(float((pred == y).mean()), 4),
            "macro_f1": round(float(f1_score(y, pred, labels=list(range(n_classes)), average="macro",
                                             zero_division=0)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("--out", required=True, help="JSON file to write (refused if it exists)")
    ap.add_argument("--inference-preprocess", default="", metavar="STEPS",
                    help="replace the recorded preprocessing at inference (as scripts/cross_lab_protocol.py does)")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists; choose another --out")
    clf = Classifier.load(args.weights)
    steps = tuple(x for x in args.inference_preprocess.split(",") if x)
    if "reinhard" not in (steps or clf.preprocessing.steps):
        sys.exit(f"no 'reinhard' step to shift in the preprocessing, got steps {list(steps or clf.preprocessing.steps)}")
    pbc_only_lineage(clf)  # refuses a model that saw BCCD: the shift is chosen and scored on BCCD crops

    bccd = CropSource(str(BCCD_CROPS), name="bccd-wbc-subtypes-all").samples(clf.classes)
    pbc = CropSource(str(SHARED / "pbc" / "PBC_dataset_normal_DIB"), split="val",
                     splits_csv=str(SHARED / "pbc" / "splits.csv"), center_fraction=0.7).samples(clf.classes)[::4]
    framed_bccd = [apply_framing(read_image(p), clf.framing) for p, _ in bccd]
    framed_pbc = [apply_framing(center_crop(read_image(p), 0.7), clf.framing) for p, _ in pbc]
    y_bccd = np.array([c for _, c in bccd])
    y_pbc = np.array([c for _, c in pbc])
    split = np.array([field_split(Path(p)) for p, _ in bccd])
    dev, test = np.isin(split, ("train", "val")), split == "test"
    k = len(clf.classes)

    grid = []
    t0 = time.time()
    for da in GRID:
        for db in GRID:
            model = shifted(clf, steps, da, db)
            pb, pp = model.predict_proba(framed_bccd), model.predict_proba(framed_pbc)
            grid.append({"da": da, "db": db, "im_dev": im_objective(pb[dev]), "im_pbc_val": im_objective(pp),
                         "context_only": {"dev": scores(y_bccd[dev], pb[dev], k), "test": scores(y_bccd[test], pb[test], k),
                                          "all": scores(y_bccd, pb, k), "pbc_val_quarter": scores(y_pbc, pp, k)}})
            print(f"da={da:+.0f} db={db:+.0f} im_dev={grid[-1]['im_dev']:.4f} im_pbc={grid[-1]['im_pbc_val']:.4f} "
                  f"dev={grid[-1]['context_only']['dev']['accuracy']:.3f} ({time.time() - t0:.0f} s)", flush=True)

    def pick(key: str) -> dict:  # lowest objective (unrounded); ties: the smaller |da*| + |db*|, then grid order
        return min(grid, key=lambda g: (g[key], abs(g["da"]) + abs(g["db"])))

    chosen, at_home = pick("im_dev"), pick("im_pbc_val")
    none = next(g for g in grid if g["da"] == 0 and g["db"] == 0)
    best_labelled = max(grid, key=lambda g: g["context_only"]["dev"]["accuracy"])
    result = {
        "classifier": {"name": clf.name, "sha256": clf.record.sha256, "inference_preprocess": list(steps) or None},
        "plan": "reports/cross_lab/colour_offset/plan.md",
        "grid": list(GRID),
        "n": {"dev": int(dev.sum()), "test": int(test.sum()), "all": len(bccd), "pbc_val_quarter": len(pbc)},
        "chosen_on_dev_unlabelled": {"da": chosen["da"], "db": chosen["db"], **chosen["context_only"]},
        "no_shift": {"da": 0.0, "db": 0.0, **none["context_only"]},
        "rule_at_home_pbc_val": {"da": at_home["da"], "db": at_home["db"]},
        "context_best_labelled_dev": {"da": best_labelled["da"], "db": best_labelled["db"],
                                      **best_labelled["context_only"]},
        "all_settings": grid,
        "seconds": round(time.time() - t0, 1),
    }
    for g in grid:
        g["im_dev"], g["im_pbc_val"] = round(g["im_dev"], 5), round(g["im_pbc_val"], 5)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for key in ("chosen_on_dev_unlabelled", "no_shift", "context_best_labelled_dev"):
        r = result[key]
        print(key, f"da={r['da']} db={r['db']}", {s: r[s]["accuracy"] for s in ("dev", "test", "all", "pbc_val_quarter")})
    print("rule at home (PBC val):", result["rule_at_home_pbc_val"])


if __name__ == "__main__":
    main()
