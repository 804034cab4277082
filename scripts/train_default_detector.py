"""Train a default detector: ``detector-bccd-yolov8n-v1``'s recipe, optionally on Reinhard-normalised fields.

Usage: python scripts/train_default_detector.py [--epochs 55] [--imgsz 512] [--out runs/detector] [--field-reinhard]
                                               [--reinhard-region {all,stained}] [--init WEIGHTS.pt]
                                               [--lowres-copies MIN MAX] [--lr0 LR] [--close-mosaic 10]
Then:  python scripts/ship_detector.py runs/detector/<run> --name detector-bccd-yolov8n-vN

``--field-reinhard``: every field (training, validation and, through the record, at inference) is
Reinhard-normalised onto the average BCCD trainval field
(``src/smearpipe/data/reinhard_reference_bccd_fields.json``, ``scripts/fit_reinhard_reference.py
--bccd-fields``), so that fields of another lab's stain and camera reach the network looking like BCCD.

YOLOv8n from scratch (no COCO weights) on BCCD trainval (292 fields), monitored on BCCD val (a subset
of trainval: its numbers are optimistic), AdamW (ultralytics 'auto'), cosine LR, mosaic with
close_mosaic=10, batch 16, seed 0, CPU. Measured here: ~88 s per epoch at imgsz 512 on 2 cores.

``--lowres-copies MIN MAX``: low-resolution augmentation for fields from a lower magnification. The
pipeline's rescaling (``PipelineConfig.rescale``, "auto" by default) enlarges such a field so that its cells
reach the detector at the training size, but with less detail. One extra copy of each BCCD *train*
field (not val: val stays a check of the original network's fields) is shrunk by a factor drawn
uniformly from [MIN, MAX] (seed 0, INTER_AREA) and enlarged back (INTER_LINEAR) to its own size, with
the same boxes. ``--init`` fine-tunes a local detector (e.g. ``weights/detector-bccd-yolov8n-v1.pt``)
instead of training from scratch; ``--lr0`` sets AdamW's learning rate, with one warm-up epoch instead of
ultralytics' three.
"""

from __future__ import annotations

import argparse
import random
import shutil
from pathlib import Path

import cv2
import yaml

from smearpipe.datasets import voc_to_yolo
from smearpipe.io import read_image, write_image
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
    ap.add_argument("--reinhard-region", choices=("all", "stained"), default="all",
                    help="with --field-reinhard: statistics of all pixels or of stained ones (ReinhardReference.region)")
    ap.add_argument("--init", default=None, help="local detector .pt to fine-tune (default: YOLOv8n from scratch)")
    ap.add_argument("--lowres-copies", type=float, nargs=2, metavar=("MIN", "MAX"), default=None,
                    help="add one copy of each train field shrunk by a factor in [MIN, MAX] and enlarged back")
    ap.add_argument("--lr0", type=float, default=None, help="AdamW learning rate (default: ultralytics 'auto')")
    ap.add_argument("--close-mosaic", type=int, default=10)
    args = ap.parse_args()
    if args.lowres_copies and not 1 < args.lowres_copies[0] <= args.lowres_copies[1]:
        ap.error("--lowres-copies needs 1 < MIN <= MAX")
    yolo_dir = REPO / "runs" / "bccd_yolo"
    if not (yolo_dir / "data.yaml").is_file():
        voc_to_yolo(BCCD, yolo_dir, splits=("train", "val", "test", "trainval"), allow_overlap=True)
    data = yaml.safe_load((yolo_dir / "data.yaml").read_text())
    data.update(train="images/trainval", val="images/val")
    trainval_yaml = yolo_dir / "data_trainval.yaml"
    if args.lowres_copies:
        low, high = args.lowres_copies
        split = f"trainval_lowres{low:g}-{high:g}"
        add_lowres_copies(yolo_dir, split, low, high)
        data.update(train=f"images/{split}")
        trainval_yaml = yolo_dir / f"data_{split}.yaml"
    trainval_yaml.write_text(yaml.safe_dump(data))
    prep = Preprocessing()
    if args.field_reinhard:
        prep = Preprocessing(steps=("reinhard",), reinhard_reference=field_reinhard_reference(args.reinhard_region))
    train_args = {"cos_lr": True, "close_mosaic": args.close_mosaic, "cache": "ram", "patience": 100}
    if args.lr0 is not None:
        train_args.update(optimizer="AdamW", lr0=args.lr0, warmup_epochs=1)
    name = (f"v8n_{args.imgsz}_e{args.epochs}"
            + (f"_fieldreinhard{'' if args.reinhard_region == 'all' else '-' + args.reinhard_region}" if args.field_reinhard else "")
            + ("_init" if args.init else "") + (f"_lowres{args.lowres_copies[0]:g}-{args.lowres_copies[1]:g}" if args.lowres_copies else ""))
    result = train_detector(
        trainval_yaml, model=args.init or "yolov8n.yaml", epochs=args.epochs, imgsz=args.imgsz, batch=16, out_dir=args.out,
        name=name, select="last", seed=0, preprocessing=prep, train_args=train_args,
    )
    print(result.to_dict())


def add_lowres_copies(yolo_dir: Path, split: str, low: float, high: float) -> None:
    """``images/<split>``: trainval's fields plus a low-resolution copy of each train field (same labels).

    Built in temporary folders and renamed at the end, so an interrupted build is never reused.
    """
    final = {sub: yolo_dir / sub / split for sub in ("images", "labels")}
    if all(d.is_dir() for d in final.values()):
        return
    tmp = {sub: d.with_name(d.name + ".partial") for sub, d in final.items()}
    for sub, d in tmp.items():
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        for f in sorted((yolo_dir / sub / "trainval").iterdir()):
            if f.suffix != ".cache":
                shutil.copyfile(f, d / f.name)
    rng = random.Random(0)
    for f in sorted((yolo_dir / "images" / "train").iterdir()):
        if f.suffix == ".cache":
            continue
        img = read_image(f)
        h, w = img.shape[:2]
        factor = rng.uniform(low, high)
        small = cv2.resize(img, (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA)
        write_image(tmp["images"] / f"{f.stem}_lowres.png", cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR))
        shutil.copyfile(yolo_dir / "labels" / "train" / f"{f.stem}.txt", tmp["labels"] / f"{f.stem}_lowres.txt")
    for sub, d in tmp.items():
        shutil.rmtree(final[sub], ignore_errors=True)
        d.rename(final[sub])


if __name__ == "__main__":
    main()
