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
``bccd_all_crops/`` and ``pbc_test/``.

``--adabn`` also measures test-time adaptation of the batch-norm statistics (Li et al. 2016,
"AdaBN"): the BN running means/variances are re-estimated on the unlabelled BCCD crops before
predicting them. It uses the test images (not their labels), so it is reported separately and is
not part of the shipped pipeline.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from smearpipe.classify import Classifier, prepare_crops
from smearpipe.evaluate import evaluate_classifier
from smearpipe.train import CropSource

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
BCCD_CROPS = SHARED / "bccd_wbc_subtypes" / "BCCD_cropped"


def summarize(m: dict) -> dict:
    return {"n": m["n"], "accuracy": m["accuracy"], "macro_f1": m["macro_f1"],
            "recall": {c: {"recall": v["recall"], "support": v["support"]} for c, v in m["per_class"].items()},
            "confusion_matrix": m["confusion_matrix"]}


def adabn_accuracy(clf: Classifier, source: CropSource) -> dict:
    """Accuracy and macro-F1 after re-estimating BN statistics on the (unlabelled) test crops."""
    import copy

    import torch
    from sklearn.metrics import f1_score

    from smearpipe.io import read_image

    items = source.samples(clf.classes)
    crops = [read_image(p) for p, _ in items]
    y = np.array([c for _, c in items])
    x = torch.from_numpy(prepare_crops(crops, size=clf.input_size, preprocessing=clf.preprocessing, mean=clf.mean,
                                       std=clf.std, preprocess_resized=clf.preprocess_resized))
    model = copy.deepcopy(clf.model).float()
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average over all batches
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), 64):
            model.features(x[i:i + 64])
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(x[i:i + 64]).argmax(1) for i in range(0, len(x), 64)]).numpy()
    return {"n": int(len(y)), "accuracy": float((pred == y).mean()), "macro_f1": float(f1_score(y, pred, average="macro")),
            "recall": {c: {"recall": float((pred[y == k] == k).mean()) if (y == k).any() else None, "support": int((y == k).sum())}
                       for k, c in enumerate(clf.classes)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", help="classifier .safetensors with its record beside it (or a registered name)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--adabn", action="store_true")
    args = ap.parse_args()
    clf = Classifier.load(args.weights)
    training = clf.record.metadata.get("training", {})
    seen = [s.get("root", "") for s in training.get("train", []) + training.get("val", [])]
    if any("bccd" in s.lower() for s in seen) or training.get("pretrained"):
        raise SystemExit(f"{clf.name} was trained or validated on {seen} (initialised from {training.get('pretrained')}): "
                         "not a leave-one-lab-out model (train from scratch on PBC only)")
    out = Path(args.out)
    bccd = CropSource(str(BCCD_CROPS), name="bccd-wbc-subtypes-all")
    pbc = CropSource(str(SHARED / "pbc" / "PBC_dataset_normal_DIB"), split="test", splits_csv=str(SHARED / "pbc" / "splits.csv"),
                     center_fraction=0.7, name="pbc-test")
    summary = {"classifier": {"name": clf.name, "sha256": clf.record.sha256, "input_size": clf.input_size,
                              "preprocessing": clf.preprocessing.to_dict(), "training": {k: training.get(k) for k in (
                                  "train", "val", "epochs_run", "best_epoch", "augment", "wall_minutes")}},
               "protocol": f"train: {[s.get('name') for s in training.get('train', [])]} (val: "
                           f"{[s.get('name') for s in training.get('val', [])]}); test: all crops of bccd_wbc_subtypes "
                           "(another lab) and PBC test"}
    summary["bccd_all_crops"] = summarize(evaluate_classifier(bccd, classifier=clf, out_dir=out / "bccd_all_crops", overwrite=True))
    summary["pbc_test"] = summarize(evaluate_classifier(pbc, classifier=clf, out_dir=out / "pbc_test", overwrite=True))
    if args.adabn:
        summary["bccd_all_crops_adabn"] = adabn_accuracy(clf, bccd)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for k in ("bccd_all_crops", "pbc_test", "bccd_all_crops_adabn"):
        if k in summary:
            print(k, json.dumps({m: summary[k][m] for m in ("n", "accuracy", "macro_f1")}))


if __name__ == "__main__":
    main()
