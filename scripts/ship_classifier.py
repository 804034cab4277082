"""Register a trained classifier run as shipped weights: weights/<name>.safetensors + record + report.

Usage: python scripts/ship_classifier.py RUN_DIR --name classifier-vgg16bn-v1

RUN_DIR holds ``classifier.safetensors`` + ``classifier.json`` from ``train_classifier`` (e.g.
``scripts/train_default_classifier.py``). The script copies them to ``weights/`` (refusing to replace an
existing version), evaluates on the PBC **test** split (2,057 images, centre 70 % as in training) and
on WBC crops cut from the BCCD **test** fields, stores the metrics in the record and writes
``reports/<name>/`` (metrics JSON, confusion matrices, ROC curves, confidence distributions,
training curves).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from smearpipe.datasets import extract_wbc_crops
from smearpipe.evaluate import evaluate_classifier
from smearpipe.train import CropSource
from smearpipe.weights import WeightsRecord, sha256_file

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--name", required=True)
    args = ap.parse_args()
    run = Path(args.run_dir)
    src_rec = json.loads((run / "classifier.json").read_text())
    target = REPO / "weights" / f"{args.name}.safetensors"
    if target.exists() or target.with_suffix(".json").exists():
        raise SystemExit(f"{target} exists: every shipped version stays; pick a new name")
    shutil.copyfile(run / "classifier.safetensors", target)
    src_rec.update(name=args.name, file=target.name, sha256=sha256_file(target))
    target.with_suffix(".json").write_text(json.dumps(src_rec, indent=2) + "\n")

    crop_scale = float(src_rec.get("crop_scale", 1.75))
    bccd_test = REPO / "runs" / "bccd_crops_test"
    if not (bccd_test / "crop_report.json").is_file():
        extract_wbc_crops(SHARED / "bccd" / "BCCD", bccd_test, labels_csv=SHARED / "bccd_wbc_subtypes" / "labels.csv",
                          split="test", scale=crop_scale, overwrite=True)
    pbc = CropSource(str(SHARED / "pbc" / "PBC_dataset_normal_DIB"), split="test", splits_csv=str(SHARED / "pbc" / "splits.csv"),
                     center_fraction=0.7, name="pbc-test")
    report = REPO / "reports" / args.name
    results = {}
    for key, source in (("pbc_test", pbc), ("bccd_test_fields", CropSource(str(bccd_test), name="bccd-test-fields"))):
        m = evaluate_classifier(source, classifier=target, out_dir=report / key, overwrite=True)
        results[key] = {k: m[k] for k in ("n", "accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix", "auc_ovr")}
        print(key, json.dumps({k: m[k] for k in ("n", "accuracy", "macro_f1")}))
    rec = json.loads(target.with_suffix(".json").read_text())
    rec.setdefault("metrics", {}).update(results)
    rec["metrics"]["history"] = rec["metrics"].get("history", [])
    target.with_suffix(".json").write_text(json.dumps(rec, indent=2) + "\n")
    WeightsRecord.from_dict(rec, folder=target.parent).verify()
    (report / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
