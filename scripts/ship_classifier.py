"""Register a trained classifier run as shipped weights: weights/<name>.safetensors + record + report.

Usage: python scripts/ship_classifier.py RUN_DIR --name classifier-vgg16bn-v2 [--record-stem classifier]
       [--protocol reports/cross_lab/<protocol model>/summary.json]

RUN_DIR holds ``classifier.safetensors`` + ``classifier.json`` from ``train_classifier`` (e.g.
``scripts/train_default_classifier.py``). The script copies them to ``weights/`` (refusing to replace an
existing version), evaluates on the PBC **test** split (2,057 images, centre 70 % as in training) and
on WBC crops cut from the BCCD **test** fields, stores the metrics in the record and writes
``reports/<name>/`` (metrics JSON, confusion matrices, ROC curves, confidence distributions,
training curves). ``--protocol`` adds the leave-one-lab-out numbers of the PBC-only model trained with
the same recipe (``scripts/cross_lab_protocol.py``) to the record and the report.
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


def run_minutes(history: list[dict], recorded: float) -> float:
    """Wall minutes of a run from its epoch history, or ``recorded`` if that is larger.

    Before ``train_classifier`` carried its clock over a resume, a resumed run's ``minutes`` started
    again from zero: the last value of each such segment is added.
    """
    total, last = 0.0, 0.0
    for h in history:
        if h["minutes"] < last:  # a resume restarted the clock
            total += last
        last = h["minutes"]
    return max(total + last, recorded)


def earlier_stage(init: str) -> dict:
    """What the run was initialised from, as a record entry: name, sha256, training, history, and its own start."""
    if not Path(init).with_suffix(".json").is_file():
        raise SystemExit(f"the run started from {init}, whose record is not there: its training cannot be recorded")
    rec = json.loads(Path(init).with_suffix(".json").read_text())
    training = rec["training"]
    history = rec.get("metrics", {}).get("history")
    stage = {"name": rec["name"], "sha256": rec["sha256"],
             "training": {k: training.get(k) for k in ("train", "val", "epochs_run", "best_epoch", "stopped", "optimizer",
                                                       "augment", "wall_minutes")},
             "preprocessing": rec.get("preprocessing"), "history": history}
    stage["training"]["wall_minutes"] = round(run_minutes(history or [], training["wall_minutes"]), 1)
    start = training.get("pretrained")
    if isinstance(start, dict):  # a shipped record: its chain is already resolved
        stage["pretrained"] = start
    elif start and start != "imagenet":
        stage["pretrained"] = earlier_stage(start)
    else:
        stage["pretrained"] = start
    return stage


def stages(stage: dict | None) -> list[dict]:
    """The chain of earlier stages, nearest first."""
    out = []
    while isinstance(stage, dict):
        out.append(stage)
        stage = stage.get("pretrained")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--name", required=True)
    ap.add_argument("--record-stem", default="classifier", help="RUN_DIR/<stem>.safetensors + .json")
    ap.add_argument("--protocol", default=None, help="summary.json of scripts/cross_lab_protocol.py")
    args = ap.parse_args()
    run = Path(args.run_dir)
    src_rec = json.loads((run / f"{args.record_stem}.json").read_text())
    target = REPO / "weights" / f"{args.name}.safetensors"
    if target.exists() or target.with_suffix(".json").exists():
        raise SystemExit(f"{target} exists: every shipped version stays; pick a new name")
    shutil.copyfile(run / f"{args.record_stem}.safetensors", target)
    src_rec.update(name=args.name, file=target.name, sha256=sha256_file(target))
    init = (src_rec.get("training") or {}).get("pretrained")
    first = None
    if init and init != "imagenet":  # fine-tuned from another run: record that stage (and the ones before it) too
        first = src_rec["training"]["pretrained"] = earlier_stage(init)
        src_rec["training"]["wall_minutes_total"] = round(
            sum(st["training"]["wall_minutes"] for st in stages(src_rec["training"]["pretrained"]))
            + src_rec["training"]["wall_minutes"], 1)
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
    if args.protocol:
        proto = json.loads(Path(args.protocol).read_text())
        if first is None or proto["classifier"]["sha256"] != first["sha256"]:
            raise SystemExit(f"{args.protocol} evaluates {proto['classifier']['name']}, not this run's first stage")
        results["leave_one_lab_out_protocol"] = {
            "model": proto["classifier"]["name"], "sha256": proto["classifier"]["sha256"],
            "protocol": proto["protocol"], "summary": str(Path(args.protocol).resolve().relative_to(REPO)),
            # the protocol model's preprocessing at inference (a control may replace the recorded one)
            "inference_preprocessing": proto["classifier"].get("preprocessing", {}).get("steps"),
            "inference_preprocess_replaced": proto["classifier"].get("inference_preprocess_replaced", False),
            **{k: {m: proto[k][m] for m in ("n", "accuracy", "macro_f1", "recall")} for k in ("bccd_all_crops", "pbc_test")}}
        rec["metrics"]["leave_one_lab_out_protocol"] = results["leave_one_lab_out_protocol"]
    target.with_suffix(".json").write_text(json.dumps(rec, indent=2) + "\n")
    WeightsRecord.from_dict(rec, folder=target.parent).verify()
    (report / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    earlier = (rec.get("training") or {}).get("pretrained")
    if isinstance(earlier, dict):  # all training stages on one epoch axis
        from smearpipe.report import plot_training_curves

        every: list[dict] = []
        for history in [st.get("history") or [] for st in reversed(stages(earlier))] + [rec["metrics"]["history"]]:
            every += [{**h, "epoch": h["epoch"] + len(every)} for h in history]
        plot_training_curves(every, report / "training_curves_all_stages.png")


if __name__ == "__main__":
    main()
