"""How much would averaging classifiers gain at home? PBC val errors of each model and of every ensemble.

Usage:
  python scripts/ensemble_headroom.py classifier-vgg16bn-v8 classifier-vgg16bn-v6 classifier-vgg16bn-v5 \\
      runs/seed/s1/classifier-vgg16bn-pbconly-cell-seed1.safetensors --out reports/classifier-vgg16bn-v8/ensemble_headroom.json

Each model (its own recorded preprocessing and input size) types the 1,030 PBC val images (centre 70 %, as
in training); every combination of two or more models is scored by its mean class probability. Also lists
the images each model gets wrong, and those all get wrong. Validation data only: no test split is read. An
ensemble costs one network per member at inference, so it is a measure of headroom, not a candidate default.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
from input_size_sweep import pbc_val

from smearpipe.classify import Classifier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="registered names or .safetensors files with their records (2 to 6)")
    ap.add_argument("--out", required=True, help="JSON file to write (refuses to overwrite)")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; pick another name")
    if not 2 <= len(args.models) <= 6:
        raise SystemExit("give 2 to 6 models")
    proba, models, classes, items = {}, [], None, None
    for model in args.models:
        clf = Classifier.load(model)
        key = f"{clf.name}@{clf.record.sha256[:12]}"
        if key in proba:
            raise SystemExit(f"{model}: given twice")
        if classes is None:
            classes = clf.classes
            items, crops, y = pbc_val(classes)
        elif clf.classes != classes:
            raise SystemExit(f"{clf.name}: classes {clf.classes} differ from the first model's {classes}")
        proba[key] = clf.predict_proba(crops)
        models.append({"key": key, "file": str(model), "input_size": clf.input_size,
                       "preprocessing": list(clf.preprocessing.steps)})
        print(key, int((proba[key].argmax(1) == y).sum()), "/", len(y), flush=True)
    wrong = {k: set(np.flatnonzero(p.argmax(1) != y).tolist()) for k, p in proba.items()}
    shared = set.intersection(*wrong.values())
    combos = []
    for r in range(1, len(proba) + 1):
        for combo in itertools.combinations(proba, r):
            pred = np.mean([proba[k] for k in combo], axis=0).argmax(1)
            combos.append({"members": list(combo), "correct": int((pred == y).sum()), "n": int(len(y)),
                           "accuracy": float((pred == y).mean())})

    def names(indices: set[int]) -> list[str]:  # class folder/file name, independent of where PBC lives
        return sorted(str(Path(*Path(items[i][0]).parts[-2:])) for i in indices)

    result = {"what": __doc__.split("\n\n")[2].replace("\n", " "), "classes": list(classes), "models": models,
              "ensembles": combos, "errors": {k: names(v) for k, v in wrong.items()},
              "errors_of_any_model": len(set.union(*wrong.values())), "errors_of_every_model": names(shared)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for c in combos:
        print(" + ".join(c["members"]), f"{c['correct']}/{c['n']}")
    print(f"images any model gets wrong: {result['errors_of_any_model']}; every model: {len(shared)}")


if __name__ == "__main__":
    main()
