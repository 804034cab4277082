"""Train a default detector: ``detector-bccd-yolov8n-v1``'s recipe, optionally on Reinhard-normalised fields.

Usage: python scripts/train_default_detector.py [--epochs 55] [--imgsz 512] [--out runs/detector] [--field-reinhard]
Then:  python scripts/ship_detector.py runs/detector/<run> --name detector-bccd-yolov8n-vN

``--field-reinhard``: every field (training, validation and, through the record, at inference) is
Reinhard-normalised onto the average BCCD trainval field
(``src/smearpipe/data/reinhard_reference_bccd_fields.json``, ``scripts/fit_reinhard_reference.py
--bccd-fields``), so that fields of another lab's stain and camera reach the network looking like BCCD.

YOLOv8n from scratch (no COCO weights) on BCCD trainval (292 fields), monitored on BCCD val (a subset
of trainval: its numbers are optimistic), AdamW (ultralytics 'auto'), cosine LR, mosaic with
close_mosaic=10, batch 16, seed 0, CPU. Measured here: ~88 s per epoch at imgsz 512 on 2 cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from smearpipe.datasets import voc_to_yolo
from smearpipe.preprocess import Preprocessing, field_reinhard_reference
from smearpipe.train import train_detector

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "bccd" / "BCCD"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=55)
    ap.add_argument("--imgsz", type=int, default=512)
    ap.add_argument("--out", default=str(REPO / "runs" / "detector"))
    ap.add_argument("--field-reinhard", action="store_true", help="Reinhard-normalise every field onto the BCCD field reference")
    args = ap.parse_args()
    yolo_dir = REPO / "runs" / "bccd_yolo"
    if not (yolo_dir / "data.yaml").is_file():
        voc_to_yolo(BCCD, yolo_dir, splits=("train", "val", "test", "trainval"), allow_overlap=True)
    data = yaml.safe_load((yolo_dir / "data.yaml").read_text())
    data.update(train="images/trainval", val="images/val")
    trainval_yaml = yolo_dir / "data_trainval.yaml"
    trainval_yaml.write_text(yaml.safe_dump(data))
    prep = Preprocessing()
    if args.field_reinhard:
        prep = Preprocessing(steps=("reinhard",), reinhard_reference=field_reinhard_reference())
    result = train_detector(
        trainval_yaml, model="yolov8n.yaml", epochs=args.epochs, imgsz=args.imgsz, batch=16, out_dir=args.out,
        name=f"v8n_{args.imgsz}_e{args.epochs}" + ("_fieldreinhard" if args.field_reinhard else ""), select="last", seed=0,
        preprocessing=prep,
        train_args={"cos_lr": True, "close_mosaic": 10, "cache": "ram", "patience": 100},
    )
    print(result.to_dict())


if __name__ == "__main__":
    main()
