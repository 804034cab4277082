"""Register a shipped detector network under a new name with new inference settings (no retraining).

Usage:
  python scripts/ship_detector_variant.py --base detector-bccd-yolov8n-v1 --name detector-bccd-yolov8n-v2 \\
      --field-reinhard --class-conf '{"WBC": 0.4, "RBC": 0.55, "Platelets": 0.45}'
  python scripts/ship_detector_variant.py --base detector-bccd-yolov8n-v2 --name detector-bccd-yolov8n-v4 \\
      --class-conf '{"WBC": 0.4, "RBC": 0.5, "Platelets": 0.45}'

The new record points at the base's weight file (same file, same sha256: nothing is copied) and
differs in what is applied around the network: ``--field-reinhard`` Reinhard-normalises every field onto
the average BCCD training field (``preprocess.field_reinhard_reference``) before detection, so that a
field from another lab's stain and camera reaches the network with BCCD's colour statistics;
``--class-conf`` sets the per-class counting thresholds (choose them with
``scripts/choose_count_thresholds.py`` on BCCD val). The record keeps the base's training description,
says what changed, and gets fresh metrics: BCCD test (``evaluate_detector``) and, with the shipped
default classifier, the other-lab field check on PBC val and test (``scripts/eval_other_lab_fields.py``,
whose reports go to ``reports/cross_lab/fields_pbc/<name>/``). Refuses to replace an existing record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from smearpipe.evaluate import evaluate_detector
from smearpipe.pipeline import load_pipeline
from smearpipe.preprocess import Preprocessing, field_reinhard_reference
from smearpipe.weights import WeightsRecord, resolve, weights_dir

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_other_lab_fields  # noqa: E402  (sibling scripts)
from ship_detector import bccd_yolo_data, copy_test_report, rbc_box_keys  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="registered detector whose weight file is reused")
    ap.add_argument("--name", required=True)
    ap.add_argument("--field-reinhard", action="store_true")
    ap.add_argument("--field-reinhard-min-stained", type=float, default=None, metavar="F",
                    help="cap the weight of bare background in the field statistics (ReinhardReference."
                         "min_stained_fraction) of the Reinhard step (the base's or --field-reinhard's)")
    ap.add_argument("--class-conf", default=None, help="per-class counting thresholds as JSON")
    args = ap.parse_args()
    base = resolve(args.base, kind="detector")
    target = weights_dir() / f"{args.name}.json"
    if target.exists():
        raise SystemExit(f"{target} exists: every shipped version stays; pick a new name")
    if Path(base.folder).resolve() != weights_dir().resolve():
        raise SystemExit(f"the base's file must be in the registry folder {weights_dir()}, not {base.folder}")
    prep = Preprocessing(steps=("reinhard",), reinhard_reference=field_reinhard_reference()) if args.field_reinhard else base.preprocessing
    if args.field_reinhard_min_stained is not None:
        if prep.reinhard_reference is None or "reinhard" not in prep.steps:
            raise SystemExit("--field-reinhard-min-stained needs a Reinhard step (the base's or --field-reinhard)")
        ref = dataclasses.replace(prep.reinhard_reference, min_stained_fraction=args.field_reinhard_min_stained)
        prep = dataclasses.replace(prep, reinhard_reference=ref)
    # the box ruler depends on the preprocessing and thresholds: measured again below, not inherited
    meta = {k: v for k, v in base.metadata.items() if k not in ("metrics", "rbc_box_px", "rbc_box_note")}
    changes = [f"network: the weight file of {base.name} ({base.file}), unchanged (not retrained)"]
    if args.field_reinhard:
        changes.append("every field is Reinhard-normalised onto the average BCCD trainval field before detection "
                       "(preprocessing.reinhard_reference; scripts/fit_reinhard_reference.py --bccd-fields)")
    elif args.field_reinhard_min_stained is None:
        changes.append(f"preprocessing: {base.name}'s, unchanged")
    if args.field_reinhard_min_stained is not None:
        changes.append(f"field Reinhard statistics with bare background capped: stained pixels weigh at least "
                       f"{args.field_reinhard_min_stained:g} of a field (ReinhardReference.min_stained_fraction)")
    if args.class_conf:
        meta["class_conf"] = json.loads(args.class_conf)
        meta["class_conf_note"] = ("per-class counting thresholds chosen on BCCD val (part of the training data) by "
                                   "scripts/choose_count_thresholds.py: WBC and platelets by the fraction of fields "
                                   "counted exactly, RBC by the total count closest to the annotated total")
        changes.append(f"counting thresholds {meta['class_conf']} (were {base.metadata.get('class_conf')})")
    meta["variant_of"] = {"name": base.name, "changes": changes}
    record = WeightsRecord(name=args.name, kind="detector", file=base.file, sha256=base.sha256, classes=base.classes,
                           input_size=base.input_size, preprocessing=prep, metadata={**meta, "metrics": {}},
                           folder=str(weights_dir()))
    record.write(target)
    ev = REPO / "runs" / f"eval_{args.name}"
    m = evaluate_detector(bccd_yolo_data(), detector=args.name, split="test", out_dir=ev, overwrite=True)
    metrics = {"bccd_test": {k: m[k] for k in ("images", "map50", "map50_95", "per_class", "counting_thresholds", "counting")}}
    pipe = load_pipeline(detector=args.name)
    for split in ("val", "test"):
        om, rows = eval_other_lab_fields.evaluate(pipe, split)
        eval_other_lab_fields.write(REPO / "reports" / "cross_lab" / "fields_pbc" / args.name / split, om, rows)
        metrics[f"pbc_fields_{split}"] = {k: om[k] for k in ("images", "centre_wbc_found", "type_accuracy",
                                                             "images_without_wbc_box", "extra_wbc_boxes", "per_class")}
    metrics["pbc_fields_note"] = ("PBC images (another lab) analysed as fields with the default classifier "
                                  f"{pipe.classifier.record.name}: centre WBC found and typed as labelled "
                                  "(scripts/eval_other_lab_fields.py)")
    final = WeightsRecord(**{**record.__dict__, "metadata": {**record.metadata, **rbc_box_keys(args.name), "metrics": metrics}})
    final.write(target, overwrite=True)
    report = REPO / "reports" / args.name
    report.mkdir(parents=True, exist_ok=True)
    (report / "metrics_test.json").write_text(json.dumps(m, indent=2) + "\n")
    copy_test_report(ev, report)
    print(json.dumps(final.to_dict(), indent=2))


if __name__ == "__main__":
    main()
