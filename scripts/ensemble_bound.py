"""What averaging (or distilling) PBC-only networks might give: every network's mean probability, on PBC val and
on the protocol's BCCD dev crops.

Usage:
  python scripts/ensemble_bound.py runs/seed/*/*.safetensors runs/ep24/*/*.safetensors ... \\
      --out reports/cross_lab/ensemble_bound.json

Each model types the 1,030 PBC val images (centre 70 %, as in training) and the 280 ``bccd_wbc_subtypes`` crops of
BCCD train/val fields (the protocol's "dev" crops) with its recorded preprocessing plus ``"sharpen"`` (as the
protocol model is scored, when the record lacks it). Reported per model and for the mean probability of all of
them, with the crops every model types right, the crops at least one types right and those the majority types
right. A knowledge-distilled single network rarely beats the ensemble it learns from, so the ensemble of many
differently trained networks indicates (a rule of thumb, not a bound) what averaging or distillation could add.
Validation data only: no test split is read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
from input_size_sweep import validation_crops

from smearpipe.classify import Classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help=".safetensors files with their records, or registered names (2 or more)")
    ap.add_argument("--out", required=True, help="JSON file to write (refuses to overwrite)")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; pick another name")
    if len(set(args.models)) < 2:
        raise SystemExit("give 2 or more different models")
    data, classes, proba, models = None, None, [], []
    for model in dict.fromkeys(args.models):
        clf = Classifier.load(model)
        if data is None:
            data, classes = validation_crops(clf.classes), clf.classes
        elif clf.classes != classes:
            raise SystemExit(f"{model}: classes {clf.classes} differ from the first model's {classes}")
        steps = tuple(clf.preprocessing.steps)
        steps += () if "sharpen" in steps else ("sharpen",)
        scored = Classifier(clf.model, dataclasses.replace(
            clf.record, preprocessing=dataclasses.replace(clf.preprocessing, steps=steps)))
        p = {key: scored.predict_proba(crops) for key, (crops, _) in data.items()}
        proba.append(p)
        row = {"file": str(model), "name": clf.name, "sha256": clf.record.sha256, "input_size": clf.input_size,
               "preprocessing": list(steps)}
        row.update({key: int((p[key].argmax(1) == y).sum()) for key, (_, y) in data.items()})
        models.append(row)
        print(model, {key: row[key] for key in data}, flush=True)
    result = {"what": __doc__.split("\n\n")[2].replace("\n", " "), "classes": list(classes), "models": models}
    for key, (_, y) in data.items():
        right = np.array([p[key].argmax(1) == y for p in proba])
        mean = np.mean([p[key] for p in proba], axis=0)
        singles = right.sum(1)
        result[key] = {"n": int(len(y)), "ensemble_of_all": int((mean.argmax(1) == y).sum()),
                       "single_models": {"min": int(singles.min()), "mean": float(singles.mean()), "max": int(singles.max())},
                       "right_by_every_model": int(right.all(0).sum()), "right_by_any_model": int(right.any(0).sum()),
                       "right_by_a_majority": int((right.mean(0) > 0.5).sum())}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({key: result[key] for key in data}, indent=1))


if __name__ == "__main__":
    main()
