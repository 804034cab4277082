"""Compare classifiers on validation data only: the numbers a default is chosen on.

Usage: python scripts/compare_classifiers.py MODEL [MODEL ...] --out reports/cross_lab/selection_v6.json

For each model (a registered name or a ``.safetensors`` file with its record): accuracy, macro-F1 and
recall per class on PBC val (1,030 images, centre 70 % as in training) and on the WBC crops of BCCD
*val* fields (``extract_wbc_crops(scale=1.75)``, as ``scripts/train_default_classifier.py`` cuts them);
with ``--shifts``, accuracy under the tone-curve shifts of ``scripts/eval_shift_panel.py`` on its 400 PBC
val images (whole frames, same sample).
Models are keyed by record name and the first 12 hex digits of their sha256, so that two runs with the
same record name stay apart. No test split is read.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from smearpipe.classify import Classifier
from smearpipe.evaluate import evaluate_classifier
from smearpipe.train import CropSource

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def main() -> None:
    import numpy as np
    from eval_shift_panel import SHIFTS, panel_sample
    from train_default_classifier import bccd_crops  # same crops as the training runs' validation

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--out", required=True, help="JSON file to write (refuses to overwrite)")
    ap.add_argument("--shifts", nargs="*", default=[], metavar="SHIFT",
                    help="shift-panel conditions to add, e.g. none 'gamma 1.6' 'gamma 2.2'")
    ap.add_argument("--crops", default=str(REPO / "runs" / "classifier"), help="where BCCD val-field crops are cut")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; pick another name")
    pbc = CropSource(str(SHARED / "pbc" / "PBC_dataset_normal_DIB"), split="val", splits_csv=str(SHARED / "pbc" / "splits.csv"),
                     center_fraction=0.7, name="pbc-val")
    bccd = CropSource(str(bccd_crops(Path(args.crops), "val")), name="bccd-val-fields")
    unknown = [k for k in args.shifts if k not in SHIFTS]
    if unknown:
        raise SystemExit(f"unknown shift(s) {unknown}; known: {list(SHIFTS)}")
    if args.shifts:
        items, images = panel_sample("val", 400)
    results = {}
    for model in args.models:
        clf = Classifier.load(model)
        row = {"name": clf.name, "file": str(model), "sha256": clf.record.sha256}
        for key, source in (("pbc_val", pbc), ("bccd_val_fields", bccd)):
            with tempfile.TemporaryDirectory() as tmp:
                m = evaluate_classifier(source, classifier=clf, out_dir=Path(tmp) / "report")
            row[key] = {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
                        "recall": {c: v["recall"] for c, v in m["per_class"].items()}}
        if args.shifts:
            y = np.array([clf.classes.index(r["class"]) for r in items])
            row["shift_panel_val_400"] = {
                k: float(np.mean(clf.predict_proba([SHIFTS[k](im) for im in images]).argmax(1) == y)) for k in args.shifts}
            print(clf.name, {k: round(100 * v, 1) for k, v in row["shift_panel_val_400"].items()}, flush=True)
        results[f"{clf.name}@{clf.record.sha256[:12]}"] = row
        print(clf.name, clf.record.sha256[:12], *(f"{k} {100 * row[k]['accuracy']:.2f} % F1 {row[k]['macro_f1']:.4f}"
                                                  for k in ("pbc_val", "bccd_val_fields")), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
