"""Leave-one-lab-out protocol: a classifier trained on PBC only, tested on all 351 BCCD WBC crops.

Usage:
  # 1. train on PBC train only (PBC val for early stopping; no BCCD image is seen):
  python scripts/train_default_classifier.py --pbc-only --out runs/cls --name protocol \\
      --record-name classifier-vgg16bn-pbconly-v2
  # 2. evaluate it:
  python scripts/cross_lab_protocol.py runs/cls/protocol/classifier-vgg16bn-pbconly-v2.safetensors \\
      --out reports/cross_lab/classifier-vgg16bn-pbconly-v2 [--adabn]

PBC (Hospital Clinic Barcelona, CellaVision DM96, 360x363 px) and BCCD (another lab, microscope and
camera, 640x480 JPEG fields, crops of ~170-260 px cut tightly around the cell) differ in stain,
optics, resolution and framing: BCCD is the development proxy for "another lab". Writes
``summary.json`` (accuracy, macro-F1, per-class recall with support, for BCCD and PBC test) and the
full :func:`~smearpipe.evaluate.evaluate_classifier` reports (confusion matrix, ROC, confidence) in
``bccd_all_crops/`` and ``pbc_test/``. ``bccd_by_field_split`` splits the BCCD result by the official split
of each crop's field: recipe choices are made on "dev" (train/val fields), "test" stays held out.

``--adabn`` also measures calibration to the new lab by test-time adaptation of the batch-norm
statistics (Li et al. 2016, "AdaBN"; :func:`smearpipe.classify.adapt_batchnorm`, CLI
``smearpipe adapt-classifier``): the BN running means/variances are re-estimated on unlabelled BCCD
crops. Reported twice: transductively on all crops, and adapted on the crops of BCCD train/val fields
and scored on those of test fields (``dev_to_test``), the way a lab would calibrate on earlier slides.
``--entropy`` measures :func:`smearpipe.classify.adapt_entropy` (TENT with the running statistics kept;
its default settings) the same way, and also adapted on PBC val and scored there (``home``: does
calibrating on the lab a model was trained in cost anything?).

``--inference-preprocess STEPS`` is a control: the model's recorded preprocessing is replaced at inference
only (e.g. ``reinhard`` on a model trained without it), to separate a preprocessing step's effect from that
of retraining.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from smearpipe.classify import Classifier
from smearpipe.evaluate import evaluate_classifier
from smearpipe.preprocess import Preprocessing
from smearpipe.train import CropSource

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
BCCD_CROPS = SHARED / "bccd_wbc_subtypes" / "BCCD_cropped"


def summarize(m: dict) -> dict:
    return {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "recall": {c: {"recall": v["recall"], "support": v["support"]} for c, v in m["per_class"].items()},
            "confusion_matrix": m["confusion_matrix"]}


def score(y: np.ndarray, pred: np.ndarray, classes: tuple[str, ...]) -> dict:
    """n, accuracy, macro-F1 over all ``classes`` (absent ones count 0, as in evaluate_classifier), recall with support."""
    from sklearn.metrics import f1_score

    return {"n": int(len(y)), "accuracy": float((pred == y).mean()),
            "macro_f1": float(f1_score(y, pred, labels=list(range(len(classes))), average="macro", zero_division=0)),
            "recall": {c: {"recall": float((pred[y == k] == k).mean()) if (y == k).any() else None,
                           "support": int((y == k).sum())} for k, c in enumerate(classes)}}


def by_bccd_split(predictions_csv: Path, classes: tuple[str, ...]) -> dict:
    """Scores of the BCCD crops grouped by the official split of the field they come from.

    Choices between recipes are made on the crops of BCCD train/val fields ("dev"); the crops of BCCD
    test fields stay a held-out check, and are the same fields the end-to-end evaluation uses.
    """
    import csv

    index = {c: k for k, c in enumerate(classes)}
    with open(predictions_csv, newline="") as f:
        rows = [(field_split(Path(r["path"])), index[r["true"]], index[r["pred"]]) for r in csv.DictReader(f)]
    split = np.array([r[0] for r in rows])
    y, pred = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    groups = {"dev": np.isin(split, ("train", "val")), **{s: split == s for s in ("train", "val", "test", "not_in_bccd")}}
    return {name: score(y[keep], pred[keep], classes) for name, keep in groups.items() if keep.any()}


@lru_cache(maxsize=1)
def _bccd_split_of() -> dict[str, str]:
    main = SHARED / "bccd" / "BCCD" / "ImageSets" / "Main"
    return {line.strip(): split for split in ("train", "val", "test")
            for line in (main / f"{split}.txt").read_text().splitlines() if line.strip()}


def field_split(path: Path) -> str:
    """Official BCCD split of the field a ``bccd_wbc_subtypes`` crop was cut from."""
    return _bccd_split_of().get(Path(path).stem.rsplit("_", 1)[0], "not_in_bccd")


def adapted(clf: Classifier, source: CropSource, method: str) -> dict:
    """Test-time adaptation on unlabelled BCCD crops: ``method`` "adabn" (:func:`smearpipe.classify.adapt_batchnorm`)
    or "entropy" (:func:`smearpipe.classify.adapt_entropy`, its default settings).

    ``all_crops``: adapted on all 351 crops, scored on the same crops (transductive).
    ``dev_to_test``: adapted on the crops of BCCD train/val fields only, scored on the crops of
    test fields, which the adaptation never saw: what a lab gets by calibrating on earlier slides.
    ``dev_field_crops``: that adaptation scored on the crops it was adapted on. ``home`` ("entropy" only): adapted on PBC val (1,030 crops, central 70 %), scored there, with the score
    without adaptation beside it.
    """
    import tempfile

    from smearpipe.classify import adapt_batchnorm, adapt_entropy
    from smearpipe.io import read_image

    adapt = {"adabn": adapt_batchnorm, "entropy": adapt_entropy}[method]
    items = source.samples(clf.classes)
    crops = [read_image(p) for p, _ in items]
    y = np.array([c for _, c in items])
    split = np.array([field_split(p) for p, _ in items])
    dev, test = np.isin(split, ("train", "val")), split == "test"

    def scores(model: Classifier, keep: np.ndarray) -> dict:
        pred = model.predict_proba([c for c, k in zip(crops, keep, strict=True) if k]).argmax(1)
        return score(y[keep], pred, clf.classes)

    with tempfile.TemporaryDirectory() as tmp:
        every = adapt(clf, crops, out_dir=tmp, name=f"{method}-all")
        on_dev = adapt(clf, [c for c, k in zip(crops, dev, strict=True) if k], out_dir=tmp, name=f"{method}-dev")
        out = {"all_crops": scores(every, np.ones(len(y), bool)),
               "dev_field_crops": {"adapted_on": int(dev.sum()), **scores(on_dev, dev)},
               "dev_to_test": {"adapted_on": int(dev.sum()), **scores(on_dev, test)},
               "test_without_adaptation": scores(clf, test)}
        if method == "entropy":
            from input_size_sweep import pbc_val

            _, val_crops, val_y = pbc_val(clf.classes)
            at_home = adapt(clf, val_crops, out_dir=tmp, name=f"{method}-pbc-val")
            out["home"] = {"adapted_on": "pbc_val",
                           **score(val_y, at_home.predict_proba(val_crops).argmax(1), clf.classes),
                           "without_adaptation": score(val_y, clf.predict_proba(val_crops).argmax(1), clf.classes)}
        return out


def pbc_only_lineage(clf: Classifier) -> list[str]:
    """Names of the model and of the models it was initialised from, each checked to be trained on PBC only.

    A model fine-tuned from another (``--init``) is a leave-one-lab-out model only if every model in
    its chain saw no BCCD image; ImageNet or an unknown start is refused.
    """
    chain, current = [], clf
    while True:
        training = current.record.metadata.get("training", {})
        seen = [s.get("root", "") for s in training.get("train", []) + training.get("val", [])]
        if not seen or any("bccd" in s.lower() for s in seen):
            raise SystemExit(f"{current.name} was trained or validated on {seen}: not a leave-one-lab-out model "
                             "(train on PBC only)")
        chain.append(current.name)
        start = training.get("pretrained")
        if not start:
            return chain
        if not str(start).endswith(".safetensors") or not Path(start).is_file():
            raise SystemExit(f"{current.name} was initialised from {start}, which is not a smearpipe classifier file here: "
                             "cannot check that it saw no BCCD image")
        current = Classifier.load(start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", help="classifier .safetensors with its record beside it (or a registered name)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--adabn", action="store_true", help="also measure AdaBN calibration (adapt_batchnorm)")
    ap.add_argument("--entropy", action="store_true", help="also measure entropy calibration (adapt_entropy)")
    ap.add_argument("--inference-preprocess", default=None, metavar="STEPS",
                    help="control experiment: replace the model's recorded preprocessing by these comma-separated steps "
                         "at inference only (e.g. 'reinhard' on a model trained without it)")
    args = ap.parse_args()
    clf = Classifier.load(args.weights)
    training = clf.record.metadata.get("training", {})
    lineage = pbc_only_lineage(clf)
    if args.inference_preprocess is not None:
        steps = tuple(x for x in args.inference_preprocess.split(",") if x)
        clf = Classifier(clf.model, dataclasses.replace(clf.record, preprocessing=Preprocessing(steps=steps).resolved()))
    out = Path(args.out)
    bccd = CropSource(str(BCCD_CROPS), name="bccd-wbc-subtypes-all")
    pbc = CropSource(str(SHARED / "pbc" / "PBC_dataset_normal_DIB"), split="test", splits_csv=str(SHARED / "pbc" / "splits.csv"),
                     center_fraction=0.7, name="pbc-test")
    summary = {"classifier": {"name": clf.name, "sha256": clf.record.sha256, "input_size": clf.input_size,
                              "initialised_from": lineage[1:],
                              "inference_preprocess_replaced": args.inference_preprocess is not None,
                              "preprocessing": clf.preprocessing.to_dict(), "framing": clf.framing.to_dict(), "training": {k: training.get(k) for k in (
                                  "train", "val", "epochs_run", "best_epoch", "augment", "normalize_after_augment",
                                  "wall_minutes")}},
               "protocol": f"train: {[s.get('name') for s in training.get('train', [])]} (val: "
                           f"{[s.get('name') for s in training.get('val', [])]}); test: all crops of bccd_wbc_subtypes "
                           "(another lab) and PBC test"}
    summary["bccd_all_crops"] = summarize(evaluate_classifier(bccd, classifier=clf, out_dir=out / "bccd_all_crops", overwrite=True))
    summary["bccd_by_field_split"] = by_bccd_split(out / "bccd_all_crops" / "predictions.csv", clf.classes)
    summary["pbc_test"] = summarize(evaluate_classifier(pbc, classifier=clf, out_dir=out / "pbc_test", overwrite=True))
    for method in ("adabn", "entropy"):
        if getattr(args, method):
            summary[f"bccd_{method}"] = adapted(clf, bccd, method)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for k in ("bccd_all_crops", "pbc_test"):
        print(k, json.dumps({m: summary[k][m] for m in ("n", "accuracy", "macro_f1")}))
    for method in ("adabn", "entropy"):
        for k, m in summary.get(f"bccd_{method}", {}).items():
            print(f"{method} {k}", json.dumps({x: m[x] for x in ("n", "accuracy", "macro_f1")}))
    for split, m in summary["bccd_by_field_split"].items():
        print(f"bccd crops of {split} fields", json.dumps({k: m[k] for k in ("n", "accuracy", "macro_f1")}))


if __name__ == "__main__":
    main()
