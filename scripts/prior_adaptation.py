"""Label-shift adaptation on the leave-one-lab-out protocol: class priors re-estimated by EM on unlabelled crops.

Usage:
  python scripts/prior_adaptation.py reports/cross_lab/<model>/bccd_all_crops/predictions.csv [--out FILE.json]

The protocol model was trained with class rebalancing (as if every class were equally common); BCCD is
60 % neutrophils. "all_crops" has 351 crops: the 348 of BCCD train/val/test fields and 3 from Kaggle images
that are not in BCCD. Saerens et al. (Neural Computation 2002) re-estimate the new lab's class priors from the
model's own probabilities on unlabelled crops (EM) and re-weight each crop's probabilities by
new prior / training prior. Estimated on the crops of BCCD train/val fields ("dev", labels unused) and
applied to those of test fields, as a lab would calibrate on earlier slides; transductive numbers
(priors estimated on the very crops scored) are given too. Reads the probabilities that
``scripts/cross_lab_protocol.py`` wrote; runs no network.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_lab_protocol import field_split  # noqa: E402  (sibling script)


def em_priors(proba: np.ndarray, *, iterations: int = 100) -> np.ndarray:
    """Class priors of unlabelled data by EM (Saerens et al. 2002), for a model trained with equal priors."""
    uniform = np.full(proba.shape[1], 1.0 / proba.shape[1])
    prior = uniform.copy()
    for _ in range(iterations):
        prior = reweight(proba, prior).mean(axis=0)
    return prior


def reweight(proba: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Posteriors under ``prior`` instead of the training's equal priors."""
    out = proba * (prior * proba.shape[1])
    return out / out.sum(axis=1, keepdims=True)


def scores(y: np.ndarray, proba: np.ndarray, n_classes: int) -> dict:
    pred = proba.argmax(axis=1)
    return {"n": int(len(y)), "accuracy": round(float((pred == y).mean()), 4),
            "macro_f1": round(float(f1_score(y, pred, labels=list(range(n_classes)), average="macro", zero_division=0)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("predictions", help="bccd_all_crops/predictions.csv of scripts/cross_lab_protocol.py")
    ap.add_argument("--out", default=None, help="JSON file (default: prior_adaptation.json beside the CSV's folder)")
    args = ap.parse_args()
    path = Path(args.predictions)
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    proba = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    y = np.array([classes.index(r["true"]) for r in rows])
    split = np.array([field_split(Path(r["path"])) for r in rows])
    dev, test = np.isin(split, ["train", "val"]), split == "test"
    k = len(classes)
    prior_dev = em_priors(proba[dev])
    prior_test = em_priors(proba[test])
    prior_all = em_priors(proba)
    report = {
        "predictions": str(path), "classes": classes,
        "true_priors_dev": dict(zip(classes, np.round(np.bincount(y[dev], minlength=k) / dev.sum(), 3).tolist(), strict=True)),
        "em_priors_dev": dict(zip(classes, np.round(prior_dev, 3).tolist(), strict=True)),
        "dev": {"as_is": scores(y[dev], proba[dev], k),
                "priors_from_dev_transductive": scores(y[dev], reweight(proba[dev], prior_dev), k)},
        "test_fields": {"as_is": scores(y[test], proba[test], k),
                        "priors_from_dev": scores(y[test], reweight(proba[test], prior_dev), k),
                        "priors_from_test_transductive": scores(y[test], reweight(proba[test], prior_test), k)},
        "all_crops": {"as_is": scores(y, proba, k), "priors_from_all_transductive": scores(y, reweight(proba, prior_all), k)},
    }
    out = Path(args.out) if args.out else path.parent.parent / "prior_adaptation.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
