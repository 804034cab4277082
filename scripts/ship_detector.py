"""Register a trained detector run as shipped weights: weights/<name>.pt + record + training report.

Usage:
  python scripts/ship_detector.py RUN_DIR --name detector-bccd-yolov8n-v1 [--checkpoint last] [--class-conf JSON]
      [--field-reinhard {all,stained}]

RUN_DIR is an ultralytics run folder (``weights/last.pt``, ``args.yaml``, ``results.csv``), as written by
``smearpipe.train.train_detector`` or ``scripts/train_default_detector.py``. The script
  1. converts BCCD to the YOLO layout (official split) under runs/bccd_yolo if needed,
  2. copies the checkpoint to ``weights/<name>.pt`` (refuses to replace an existing file),
  3. evaluates it on the BCCD **test** split with ``evaluate_detector`` (mAP via ultralytics, counting),
  4. writes the record ``weights/<name>.json`` (sha256, classes, imgsz, preprocessing from the run's
     ``run_config.json`` (or, with ``--field-reinhard``, field Reinhard normalisation at inference for a
     network trained on unnormalised fields, as detector v2 does), data, split, the weights it was
     fine-tuned from,
     training arguments, test metrics) and ``reports/<name>/`` (metrics JSON, training curves, PR curve,
     confusion matrix, per-image counts).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import yaml

from smearpipe.datasets import voc_to_yolo
from smearpipe.evaluate import evaluate_detector
from smearpipe.preprocess import Preprocessing, field_reinhard_reference
from smearpipe.weights import WeightsRecord, sha256_file

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "bccd" / "BCCD"


def bccd_yolo_data() -> Path:
    """BCCD in the YOLO layout (official split) under runs/bccd_yolo, converted on first use: its data.yaml."""
    yolo_dir = REPO / "runs" / "bccd_yolo"
    if not (yolo_dir / "data.yaml").is_file():
        voc_to_yolo(BCCD, yolo_dir, splits=("train", "val", "test", "trainval"), allow_overlap=True)
    return yolo_dir / "data.yaml"


def copy_test_report(eval_dir: Path, report: Path) -> None:
    """The test split's PR curve, normalised confusion matrix and per-field counts from evaluate_detector's folder."""
    for f in eval_dir.glob("ultralytics_val/*.png"):
        if any(key in f.name for key in ("BoxPR", "PR_curve", "confusion_matrix_normalized")):
            shutil.copyfile(f, report / f.name)
    shutil.copyfile(eval_dir / "counts.csv", report / "counts_test.csv")


def rbc_box_keys(detector_name_or_path: str | Path) -> dict[str, object]:
    """``rbc_box_px`` (what ``PipelineConfig(rescale="auto")`` needs) for a shipped record: the detector, with the
    preprocessing and thresholds its record applies, measured on the BCCD trainval fields at their native scale."""
    from smearpipe.detect import Detector
    from smearpipe.scale import measure_rbc_box_px

    trainval = (BCCD / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    fields = [BCCD / "JPEGImages" / f"{s}.jpg" for s in trainval]  # read one at a time
    return {"rbc_box_px": round(measure_rbc_box_px(Detector.load(detector_name_or_path), fields), 1),
            "rbc_box_note": f"median over the {len(fields)} training fields at their native scale of "
                            "smearpipe.scale.rbc_box_diameter of this detector's own red-cell boxes "
                            "(smearpipe.scale.measure_rbc_box_px, default thresholds); used by rescale='auto'"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--name", required=True)
    ap.add_argument("--checkpoint", choices=("last", "best"), default="last")
    ap.add_argument("--conf", type=float, default=0.25, help="default score threshold stored in the record")
    ap.add_argument("--iou", type=float, default=0.7, help="default NMS IoU stored in the record")
    ap.add_argument("--class-conf", default=None,
                    help='per-class counting thresholds as JSON, e.g. \'{"WBC": 0.4, "RBC": 0.5, "Platelets": 0.3}\' '
                         "(choose them on training/validation data, never on test)")
    ap.add_argument("--field-reinhard", choices=("all", "stained"), default=None,
                    help="Reinhard-normalise fields onto the BCCD field reference at inference (ReinhardReference.region); "
                         "for a run trained without normalisation")
    args = ap.parse_args()
    run = Path(args.run_dir)
    data_yaml = bccd_yolo_data()

    target = REPO / "weights" / f"{args.name}.pt"
    if target.exists():
        raise SystemExit(f"{target} exists: every shipped version stays; pick a new name")
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(run / "weights" / f"{args.checkpoint}.pt", target)
    train_args = yaml.safe_load((run / "args.yaml").read_text())
    # what train_detector applied to every training field is applied at inference: never guessed
    run_config = run / "run_config.json"
    if not run_config.is_file():
        raise SystemExit(f"{run_config} not found: without it the run's preprocessing is unknown "
                         "(runs of smearpipe.train.train_detector write it)")
    config = json.loads(run_config.read_text())
    preprocessing = Preprocessing.from_dict(config["preprocessing"])
    if args.field_reinhard and preprocessing.steps:
        raise SystemExit(f"the run was trained with {preprocessing.steps}: --field-reinhard is for runs trained without")
    if args.field_reinhard:
        preprocessing = Preprocessing(steps=("reinhard",), reinhard_reference=field_reinhard_reference(args.field_reinhard))
    init = Path(config["model"])
    from_scratch = init.suffix in (".yaml", ".yml")
    train_folder = yaml.safe_load(Path(config["data"]).read_text())["train"]
    lowres = "lowres" in Path(train_folder).name  # scripts/train_default_detector.py --lowres-copies names it so
    n_train = sum(1 for f in (Path(config["data"]).parent / train_folder).iterdir() if f.suffix != ".cache")
    init_path = init if init.is_absolute() else REPO / init  # train_default_detector runs from the repository root
    # red-cell ruler at the training scale: median field estimate over the training fields
    import numpy as np

    from smearpipe.io import read_image
    from smearpipe.scale import estimate_rbc_diameter

    trainval = (BCCD / "ImageSets" / "Main" / "trainval.txt").read_text().split()
    fields = [read_image(BCCD / "JPEGImages" / f"{s}.jpg") for s in trainval]
    rbc = float(np.median([estimate_rbc_diameter(f) for f in fields]))
    long_side = float(np.median([max(f.shape[:2]) for f in fields]))
    rows = list(csv.DictReader((run / "results.csv").open()))
    last_row = {k.strip(): float(v) for k, v in rows[-1].items() if k.strip()}

    record = WeightsRecord(
        name=args.name, kind="detector", file=target.name, sha256=sha256_file(target),
        classes=("WBC", "RBC", "Platelets"), input_size=int(train_args["imgsz"]), preprocessing=preprocessing,
        metadata={
            "architecture": str(train_args["model"]),
            "default_conf": args.conf,
            "default_iou": args.iou,
            **({"class_conf": json.loads(args.class_conf),
                "class_conf_note": "per-class counting thresholds chosen on BCCD val (part of the training data) "
                                   "by count exactness (WBC, platelets) and mean abs % error (RBC)"} if args.class_conf else {}),
            "rbc_diameter_px": round(rbc, 1),
            "rbc_diameter_note": "median of smearpipe.scale.estimate_rbc_diameter over the 292 training fields at their native scale",
            "train_long_side_px": round(long_side),
            "train_long_side_note": f"median long side of the training fields ({round(long_side)} px), letterboxed to "
                                    f"input_size ({int(train_args['imgsz'])}) in training",
            "training": {
                "data": "BCCD (Shenggan/BCCD_Dataset d272fb1), VOC converted by smearpipe.datasets.voc_to_yolo",
                "train_split": "ImageSets/Main/trainval.txt (292 fields)" + (
                    "" if not lowres else f" and low-resolution copies of the train fields ({train_folder}: {n_train} "
                                              "images; scripts/train_default_detector.py --lowres-copies)"),
                **({"inference_only_preprocessing": "the network was trained on unnormalised fields; the record's "
                                                    "field Reinhard normalisation is applied at inference only"}
                   if args.field_reinhard else {}),
                "val_split_for_monitoring": "ImageSets/Main/val.txt (87 fields; part of trainval, so val numbers are optimistic)",
                "test_split": "ImageSets/Main/test.txt (72 fields; never used for training or selection)",
                "from_scratch": from_scratch,
                **({} if from_scratch else {"fine_tuned_from": {
                    "file": init.name, **({"sha256": sha256_file(init_path)} if init_path.is_file() else {})}}),
                "checkpoint": f"{args.checkpoint}.pt (chosen before looking at test)",
                "epochs": len(rows),
                "ultralytics_args": {k: train_args[k] for k in ("epochs", "imgsz", "batch", "optimizer", "cos_lr", "close_mosaic",
                                                                 "mosaic", "scale", "fliplr", "flipud", "hsv_h", "hsv_s", "hsv_v",
                                                                 "seed", "lr0", "lrf") if k in train_args},
                "wall_minutes": round(last_row.get("time", 0.0) / 60, 1),
            },
            "metrics": {},
        },
        folder=str(target.parent),
    )
    report = REPO / "reports" / args.name
    report.mkdir(parents=True, exist_ok=True)
    # evaluation reads the weights through the registry (sha256-checked) via a temporary record
    tmp_record = target.with_suffix(".json")
    record.write(tmp_record)
    metrics = evaluate_detector(data_yaml, detector=target, split="test", out_dir=REPO / "runs" / f"eval_{args.name}", overwrite=True)
    val_metrics = {k: last_row[k] for k in last_row if k.startswith("metrics/")}
    final = WeightsRecord(**{**record.__dict__, "metadata": {**record.metadata, **rbc_box_keys(target), "metrics": {
        "bccd_test": {k: metrics[k] for k in ("images", "map50", "map50_95", "per_class", "counting_thresholds", "counting")},
        "bccd_val_last_epoch_optimistic": val_metrics,
    }}})
    final.write(tmp_record, overwrite=True)
    (report / "metrics_test.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.copyfile(run / "results.csv", report / "results.csv")
    for fig in ("results.png",):
        if (run / fig).is_file():
            shutil.copyfile(run / fig, report / "training_curves.png")
    copy_test_report(REPO / "runs" / f"eval_{args.name}", report)
    print(json.dumps(final.to_dict(), indent=2))


if __name__ == "__main__":
    main()
