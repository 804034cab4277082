"""Which robustness idea helps across labs? Pilot ablations measured with the leave-one-lab-out protocol.

Usage: python scripts/ablate_cross_lab.py [--every 3] [--epochs 6] [--out runs/ablation] [--report reports/cross_lab/ablation.json]

Each variant trains the classifier of ``scripts/train_default_classifier.py`` (64 px, VGG16-BN from
scratch) on every ``--every``-th PBC train image for ``--epochs`` epochs (PBC val for early stopping;
no BCCD image), then is tested on all 351 BCCD crops (another lab) and PBC test. Pilots are short,
so compare variants with each other, not with the shipped model. Variants:

* ``recipe``: the v2 recipe these pilots were run for (Macenko-normalised crops, stain/colour augmentation,
  random resized crops down to 25 % of the area);
* ``no_macenko``: the same without Macenko normalisation (train and test);
* ``no_colour_aug``: without HED stain jitter, brightness/contrast/saturation/gamma/white-balance jitter;
* ``no_scale_aug``: random resized crops only down to 60 % of the area (the first shipped recipe).

``framed_no_macenko`` in the report (crops re-cut around the nucleus, 1.6 x its extent, in training and at
test, so that cell size no longer depends on magnification and crop framing) was measured with the code of
commit 4bc5600 and removed because it hurt: every BCCD cell became a monocyte.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
from pathlib import Path

from smearpipe.augment import AugmentConfig
from smearpipe.classify import Classifier
from smearpipe.evaluate import evaluate_classifier
from smearpipe.preprocess import Preprocessing
from smearpipe.train import CropSource, train_classifier

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
PBC = SHARED / "pbc"
RECIPE = AugmentConfig(crop_scale_min=0.25)
MACENKO = Preprocessing(steps=("macenko",), macenko_on_failure="passthrough")  # explicit: train_classifier's default moved on
VARIANTS = {
    "recipe": {"preprocessing": MACENKO},
    "no_macenko": {"preprocessing": Preprocessing()},
    "no_colour_aug": {"preprocessing": MACENKO,
                      "augment": dataclasses.replace(RECIPE, stain_alpha=0.0, stain_beta=0.0, brightness=0.0, contrast=0.0,
                                                     saturation=0.0, gamma=0.0, white_balance=0.0)},
    "no_scale_aug": {"preprocessing": MACENKO, "augment": dataclasses.replace(RECIPE, crop_scale_min=0.6)},
}


def evaluate(clf: Classifier, source: CropSource, out_dir: Path) -> dict:
    m = evaluate_classifier(source, classifier=clf, out_dir=out_dir, overwrite=True)
    return {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "recall": {c: v["recall"] for c, v in m["per_class"].items() if v["support"] > 0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--out", default=str(REPO / "runs" / "ablation"))
    ap.add_argument("--report", default=str(REPO / "reports" / "cross_lab" / "ablation.json"))
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seed", type=int, default=0, help="training seed (results are stored as <variant>-seed<N> if N != 0)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(PBC / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    subset = out / f"splits_every{args.every}.csv"
    train_rows = [r for r in rows if r["split"] == "train"][:: args.every]
    with subset.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(train_rows + [r for r in rows if r["split"] == "val"])
    root = str(PBC / "PBC_dataset_normal_DIB")
    train = [CropSource(root, split="train", splits_csv=str(subset), center_fraction=0.7, name=f"pbc-train-every{args.every}")]
    val = [CropSource(root, split="val", splits_csv=str(subset), center_fraction=0.7, name="pbc-val")]
    bccd = CropSource(str(SHARED / "bccd_wbc_subtypes" / "BCCD_cropped"), name="bccd-wbc-subtypes-all")
    pbc_test = CropSource(root, split="test", splits_csv=str(PBC / "splits.csv"), center_fraction=0.7, name="pbc-test")
    report_path = Path(args.report)
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    protocol = (f"pilot: every {args.every}th PBC train image ({len(train_rows)}), {args.epochs} epochs, 64 px, "
                "then all 351 BCCD crops and PBC test")
    for variant in args.variants:
        name = variant if args.seed == 0 else f"{variant}-seed{args.seed}"
        opts = {"augment": RECIPE, **VARIANTS[variant]}
        res = train_classifier(train, val, input_size=64, epochs=args.epochs, out_dir=out, name=name, crop_scale=1.75,
                               cache_scale=1.5, num_workers=1, patience=args.epochs, seed=args.seed, **opts)
        clf = Classifier.load(res.weights)
        report.setdefault("variants", {})[name] = {
            "protocol": protocol, "bccd_all_crops": evaluate(clf, bccd, res.run_dir / "eval_bccd_all_crops"),
            "pbc_test": evaluate(clf, pbc_test, res.run_dir / "eval_pbc_test"),
            "best_val_macro_f1": res.best_val_macro_f1, "minutes": res.history[-1]["minutes"]}
        print(name, json.dumps({k: report["variants"][name][k]["accuracy"] for k in ("bccd_all_crops", "pbc_test")}), flush=True)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
