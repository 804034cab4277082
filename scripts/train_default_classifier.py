"""Train the shipped default WBC classifier (and the leave-one-lab-out protocol model).

Usage:
  python scripts/train_default_classifier.py --out runs/classifier [--epochs 18] [--max-minutes 60]
  python scripts/train_default_classifier.py --pbc-only ...   # PBC train only (cross-lab protocol)

Data (never a test split):
  * PBC train (``splits.csv``), centre 70 % of each image (PBC frames cells wider than detector crops);
  * BCCD WBC crops cut from BCCD *train* fields (VOC boxes + ``labels.csv`` subtypes) with
    ``extract_wbc_crops(scale=CROP_SCALE)``, oversampled x3;
  * validation (early stopping on macro-F1): PBC val + BCCD crops from BCCD *val* fields.

The shipped default ``classifier-vgg16bn-v8`` is v6 (below) with crops sharpened when softer than PBC's (the
``"sharpen"`` preprocessing step after Reinhard, ``smearpipe.preprocess.match_sharpness``) in the second run, where
each batch is colour- and blur-augmented, then normalised and sharpened (57.8 min: 40.4 + 17.4)::

  python scripts/train_default_classifier.py --epochs 6 --lr 2e-4 --out runs/cls --name s2 --normalize-after-augment \
      --preprocess reinhard,sharpen --init runs/cls/s1/classifier-vgg16bn-pbconly-cell.safetensors \
      --record-name classifier-vgg16bn-v8

(s1: the first command below.) A PBC-only run from scratch with the step (``classifier-vgg16bn-pbconly-sharp``,
without ``--normalize-after-augment``, which ``train_classifier`` now refuses: its crops were sharpened at the cache
size, not the input size) was no better on validation than the first run with the step added at inference (README).

The shipped ``classifier-vgg16bn-v6`` took two runs (20 epochs, 59.6 min), with cell framing (every crop recut
around its nucleus, ``smearpipe.framing``) and Reinhard normalisation: 14 epochs from scratch on PBC only (the
leave-one-lab-out model), then 6 epochs with BCCD crops added, keeping the head, with every training batch
normalised *after* its colour augmentation (``--normalize-after-augment``)::

  python scripts/train_default_classifier.py --pbc-only --epochs 14 --out runs/cls --name s1 \
      --record-name classifier-vgg16bn-pbconly-cell
  python scripts/train_default_classifier.py --epochs 6 --lr 2e-4 --out runs/cls --name s2 --normalize-after-augment \
      --init runs/cls/s1/classifier-vgg16bn-pbconly-cell.safetensors --record-name classifier-vgg16bn-v6

``classifier-vgg16bn-v5`` is the same without ``--normalize-after-augment`` in the second run.

The earlier ``classifier-vgg16bn-v4`` used the crops as given and took three runs (30 epochs): the v3 stage 1
without preprocessing, 6 epochs on Reinhard-normalised crops (still PBC only: the leave-one-lab-out model), then
BCCD added::

  python scripts/train_default_classifier.py --framing as_given --pbc-only --preprocess '' --out runs/cls --name s1 \
      --record-name classifier-vgg16bn-pbconly-nomacenko
  python scripts/train_default_classifier.py --framing as_given --pbc-only --epochs 6 --lr 5e-4 --out runs/cls \
      --name s2 --init runs/cls/s1/classifier-vgg16bn-pbconly-nomacenko.safetensors \
      --record-name classifier-vgg16bn-pbconly-reinhard
  python scripts/train_default_classifier.py --framing as_given --epochs 6 --lr 2e-4 --out runs/cls --name s3 \
      --init runs/cls/s2/classifier-vgg16bn-pbconly-reinhard.safetensors --record-name classifier-vgg16bn-v4

v4's s2 started with a new random head (``--init`` kept only the conv weights then); s3 kept s2's head.
A first s3 at lr 5e-4 with a new head early-stopped at its first epoch (val macro-F1 0.971) and was not shipped.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from smearpipe.augment import AugmentConfig
from smearpipe.cli import add_training_options
from smearpipe.datasets import extract_wbc_crops
from smearpipe.framing import FRAMINGS, Framing
from smearpipe.preprocess import Preprocessing
from smearpipe.train import CropSource, train_classifier

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
CROP_SCALE = 1.75
PBC_CENTER = 0.7
# Training crops are cached at 1.5x the input size, so that random resized crops keep some detail.
CACHE_SCALE = 1.5
# Random resized crops down to 25 % of the area: a cell then fills the whole crop, as in tightly cut crops
# from other labs or at higher magnification (PBC frames show the cell at ~50 % of the width).
AUGMENT = AugmentConfig(crop_scale_min=0.25)
# With cell framing every crop already shows the cell at one size: random crops keep at least half the area.
AUGMENT_FRAMED = AugmentConfig(crop_scale_min=0.5)


def bccd_crops(out: Path, split: str) -> Path:
    dest = out / "bccd_crops" / split
    if not (dest / "crop_report.json").is_file():
        report = extract_wbc_crops(SHARED / "bccd" / "BCCD", dest, labels_csv=SHARED / "bccd_wbc_subtypes" / "labels.csv",
                                   split=split, scale=CROP_SCALE, overwrite=True)
        print(split, json.dumps(report.written))
    return dest


def preprocessing(args: argparse.Namespace) -> dict:
    """``train_classifier``'s preprocessing argument."""
    steps = () if args.no_macenko else tuple(x for x in args.preprocess.split(",") if x)
    return {"preprocessing": Preprocessing(steps=steps, macenko_on_failure="passthrough").resolved()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "runs" / "classifier"))
    ap.add_argument("--name", default="default")
    ap.add_argument("--epochs", type=int, default=18)
    ap.add_argument("--max-minutes", type=float, default=None)
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--init", default=None, help="start from this classifier (.safetensors): its conv weights, and its head if the classes match")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pbc-only", action="store_true", help="train on PBC only (leave-one-lab-out protocol)")
    ap.add_argument("--record-name", default="classifier")
    ap.add_argument("--preprocess", default="reinhard",
                    help="comma-separated preprocessing steps of every crop: 'reinhard' (v4-v6, default), "
                         "'reinhard,sharpen' (v8), 'macenko' (v2), '' (none, v3)")
    ap.add_argument("--no-macenko", action="store_true", help="same as --preprocess '' (the v3 commands used it)")
    ap.add_argument("--framing", default="cell", choices=FRAMINGS,
                    help="recut every crop around its nucleus ('cell', default) or use crops as given (v1-v4)")
    ap.add_argument("--mask-radius", type=float, default=None,
                    help="with cell framing: show only a disk of this many half-sides of the square around the nucleus, "
                         "background colour outside (Framing.mask_radius; default: the whole square)")
    ap.add_argument("--lowres", type=float, default=0.0,
                    help="share of training crops seen through a coarser camera (AugmentConfig.lowres_p)")
    ap.add_argument("--normalize-after-augment", action="store_true",
                    help="normalise each training batch after colour augmentation, as inference normalises a shifted crop "
                         "(train_classifier(normalize_after_augment=True))")
    ap.add_argument("--blur", type=float, nargs=2, default=(AugmentConfig.blur_p, AugmentConfig.blur_sigma_max),
                    metavar=("P", "SIGMA"), help="blur augmentation: share of crops and largest sigma in px at the input size "
                                                 "(AugmentConfig.blur_p, blur_sigma_max)")
    add_training_options(ap)  # --ema, --consistency, --mixup, --sam-rho, as smearpipe train-classifier
    ap.add_argument("--gamma", type=float, default=AugmentConfig.gamma,
                    help="gamma augmentation: exponent exp(U(-g, g)) (AugmentConfig.gamma)")
    ap.add_argument("--stain-vector", type=float, default=0.0,
                    help="stain colour augmentation: move each H and E absorbance vector component by up to this "
                         "(AugmentConfig.stain_vector; 0: off)")
    ap.add_argument("--gray", type=float, default=0.0,
                    help="share of training crops shown in grey, after normalisation (AugmentConfig.gray_p; 0: off)")
    ap.add_argument("--randconv", type=float, default=0.0,
                    help="share of training crops seen through a random convolution (AugmentConfig.randconv_p)")
    ap.add_argument("--mixstyle", type=float, default=0.0,
                    help="chance per batch that each of the first three VGG stages mixes feature statistics between "
                         "crops (MixStyle, AugmentConfig.mixstyle_p)")
    ap.add_argument("--crop-scale-min", type=float, default=None,
                    help="random resized crops keep at least this share of the area (AugmentConfig.crop_scale_min; "
                         "default 0.5 with cell framing, 0.25 without)")
    ap.add_argument("--patience", type=int, default=5,
                    help="early stopping: epochs without a better val macro-F1 (train_classifier(patience=...)); "
                         "a long one-cycle schedule needs more than the default, its val dips at the peak lr")
    ap.add_argument("--seed", type=int, default=0, help="random seed of initialisation, sampling and augmentation")
    ap.add_argument("--resume", action="store_true", help="continue the run OUT/NAME from its checkpoint")
    ap.add_argument("--device", default="cpu", help="where the network trains: cpu (the shipped weights), cuda, cuda:N")
    ap.add_argument("--workers", type=int, default=1, help="data-loading processes (1 on the 2-core project machine)")
    args = ap.parse_args()
    try:
        framing = Framing(args.framing, mask_radius=args.mask_radius)
    except ValueError as exc:
        ap.error(str(exc))
    out = Path(args.out)
    pbc_root = str(SHARED / "pbc" / "PBC_dataset_normal_DIB")
    splits = str(SHARED / "pbc" / "splits.csv")

    def pbc(split: str) -> CropSource:
        return CropSource(pbc_root, split=split, splits_csv=splits, center_fraction=PBC_CENTER, name=f"pbc-{split}")

    train = [pbc("train")]
    val = [pbc("val")]
    if not args.pbc_only:
        train.append(CropSource(str(bccd_crops(out, "train")), weight=3.0, name="bccd-train-fields"))
        val.append(CropSource(str(bccd_crops(out, "val")), name="bccd-val-fields"))
    result = train_classifier(train, val, input_size=args.input_size, epochs=args.epochs, lr=args.lr, out_dir=out,
                              name=args.name, max_minutes=args.max_minutes, crop_scale=CROP_SCALE,
                              framing=framing,
                              augment=dataclasses.replace(AUGMENT_FRAMED if framing.name == "cell" else AUGMENT,
                                                          lowres_p=args.lowres, gamma=args.gamma,
                                                          blur_p=args.blur[0], blur_sigma_max=args.blur[1],
                                                          randconv_p=args.randconv, mixstyle_p=args.mixstyle,
                                                          stain_vector=args.stain_vector, gray_p=args.gray,
                                                          **({} if args.crop_scale_min is None
                                                             else {"crop_scale_min": args.crop_scale_min})),
                              normalize_after_augment=args.normalize_after_augment,
                              ema=args.ema, consistency=args.consistency, sam_rho=args.sam_rho, mixup=args.mixup, patience=args.patience,
                              cache_scale=CACHE_SCALE, pretrained=args.init, record_name=args.record_name,
                              num_workers=args.workers, device=args.device, resume=args.resume, seed=args.seed,
                              **preprocessing(args))
    print(json.dumps({k: v for k, v in result.to_dict().items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
