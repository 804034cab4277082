"""How many labelled cells of a new lab does a PBC-only classifier need? A learning curve on BCCD.

Usage:
  python scripts/few_shot_curve.py BASE_SAFETENSORS --out reports/cross_lab/few_shot [--sizes 0 10 25 50 100 all]
      [--draws 3] [--epochs 4] [--lr 2e-4] [--work runs/few_shot]

A lab that has labelled N of its own white cells fine-tunes the network it was given on them. Here the "new lab"
is BCCD: the pool is the ``bccd_wbc_subtypes`` crops of BCCD **train** fields; N of them are drawn at random
(``--draws`` times, seeds 0, 1, ...; "all" takes the whole pool, and the draws then differ only in training
randomness). Each draw fine-tunes ``BASE_SAFETENSORS`` (a PBC-only network) with the second run of the shipped
v8's recipe: the N crops (weight 3 in the class-balanced sampler, as v8's BCCD crops) plus 100 PBC train images
per class replayed so that PBC is not forgotten, ``--epochs`` epochs at peak lr ``--lr``, colour augmentation
before normalisation, Reinhard and sharpening; early stopping on 60 PBC val images per class (no BCCD crop is used
to choose anything). N = 0 is the control: the same fine-tune on the PBC replay alone. Every network is scored on
the crops of BCCD val fields and of BCCD test fields (never in the pool; the curve chooses nothing, so reading test
fields here only reports) and on all of PBC val. The base itself is scored with sharpening added at inference, as
the protocol scores it. Writes ``OUT/curve.json`` and ``OUT/curve.png``; an existing report is kept.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
from cross_lab_protocol import BCCD_CROPS, SHARED, field_split
from input_size_sweep import pbc_val

from smearpipe.augment import AugmentConfig
from smearpipe.classify import Classifier
from smearpipe.io import read_image
from smearpipe.preprocess import Preprocessing
from smearpipe.train import CropSource, train_classifier

REPLAY_PER_CLASS = 100
VAL_PER_CLASS = 60
BCCD_WEIGHT = 3.0  # as the BCCD crops in v8's second run
PBC_CENTER = 0.7


def _linked_folder(root: Path, items: list[tuple[Path, str]]) -> Path:
    """An ImageFolder tree of symbolic links: ``root/<class>/<file>``."""
    for path, cls in items:
        (root / cls).mkdir(parents=True, exist_ok=True)
        os.symlink(Path(path).resolve(), root / cls / Path(path).name)
    return root


def _pbc_items(split: str, classes: tuple[str, ...], per_class: int, seed: int) -> list[tuple[Path, str]]:
    src = CropSource(str(SHARED / "pbc" / "PBC_dataset_normal_DIB"), split=split,
                     splits_csv=str(SHARED / "pbc" / "splits.csv"))
    by_class: dict[str, list[Path]] = {}
    for p, c in src.samples(classes):
        by_class.setdefault(classes[c], []).append(Path(p))
    rng = random.Random(seed)
    return [(p, c) for c in classes for p in rng.sample(sorted(by_class[c]), per_class)]


def _score(clf: Classifier, crops: list[np.ndarray], y: np.ndarray) -> dict:
    pred = clf.predict_proba(crops).argmax(1)
    recall = {c: round(float((pred[y == i] == i).mean()), 3) if (y == i).any() else None for i, c in enumerate(clf.classes)}
    return {"correct": int((pred == y).sum()), "n": len(y), "accuracy": round(float((pred == y).mean()), 4), "recall": recall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", nargs="+", default=["0", "10", "25", "50", "100", "all"])
    ap.add_argument("--draws", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", default="runs/few_shot", help="training runs go here (replaced)")
    args = ap.parse_args()
    out = Path(args.out)
    if (out / "curve.json").exists():
        raise SystemExit(f"{out / 'curve.json'} exists; pick another --out")
    base = Classifier.load(args.base)
    classes = base.classes
    sizes = [s if s == "all" else int(s) for s in args.sizes]
    if any(s != "all" and s < 0 for s in sizes):
        raise SystemExit("--sizes: numbers >= 0 or 'all'")

    pool, evals = [], {"bccd_val_fields": ([], []), "bccd_test_fields": ([], [])}
    for p, c in CropSource(str(BCCD_CROPS)).samples(classes):
        split = field_split(Path(p))
        if split == "train":
            pool.append((Path(p), classes[c]))
        elif split in ("val", "test"):
            evals[f"bccd_{split}_fields"][0].append(read_image(p))
            evals[f"bccd_{split}_fields"][1].append(c)
    data = {k: (v[0], np.array(v[1])) for k, v in evals.items()}
    data["pbc_val"] = pbc_val(classes)[1:]

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    val_dir = _linked_folder(work / "pbc_val_subset", _pbc_items("val", classes, VAL_PER_CLASS, 0))
    sharpened = dataclasses.replace(base.record, preprocessing=dataclasses.replace(base.preprocessing,
                                    steps=tuple(base.preprocessing.steps) + ("sharpen",)))
    base_scored = Classifier(base.model, sharpened)
    rows = [{"n_labelled": "base", "draw": None, **{k: _score(base_scored, *v) for k, v in data.items()}}]
    print("base", {k: rows[0][k]["correct"] for k in data}, flush=True)
    prep = Preprocessing(steps=("reinhard", "sharpen")).resolved()
    for size in sizes:
        n = len(pool) if size == "all" else size
        if n > len(pool):
            raise SystemExit(f"--sizes {size}: the pool has {len(pool)} crops")
        for draw in range(args.draws):
            rng = random.Random(draw)
            chosen = sorted(pool) if n == len(pool) else rng.sample(sorted(pool), n)
            run = work / f"n{n}_d{draw}"
            train = [CropSource(str(_linked_folder(run / "replay", _pbc_items("train", classes, REPLAY_PER_CLASS, draw))),
                                center_fraction=PBC_CENTER, name="pbc-train-replay")]
            if chosen:
                train.append(CropSource(str(_linked_folder(run / "labelled", chosen)), weight=BCCD_WEIGHT,
                                        name="bccd-train-fields-labelled"))
            t0 = time.time()
            res = train_classifier(train, [CropSource(str(val_dir), center_fraction=PBC_CENTER, name="pbc-val-subset")],
                                   pretrained=args.base, epochs=args.epochs, lr=args.lr, input_size=base.input_size,
                                   framing=base.framing, preprocessing=prep, normalize_after_augment=True,
                                   augment=AugmentConfig(crop_scale_min=0.5),
                                   crop_scale=1.75, cache_scale=1.5, seed=draw, num_workers=1, out_dir=run,
                                   name="train", record_name=f"few-shot-n{n}-d{draw}", classes=classes)
            clf = Classifier.load(res.weights)
            row = {"n_labelled": n, "draw": draw, "labelled_per_class": {c: sum(1 for _, k in chosen if k == c) for c in classes},
                   "minutes": round((time.time() - t0) / 60, 2), **{k: _score(clf, *v) for k, v in data.items()}}
            rows.append(row)
            print(n, draw, {k: row[k]["correct"] for k in data}, row["minutes"], "min", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    result = {"what": " ".join(__doc__.split("\n\n")[1].split()), "base": base.name, "base_sha256": base.record.sha256,
              "pool": len(pool), "epochs": args.epochs, "lr": args.lr, "classes": list(classes), "rows": rows}
    (out / "curve.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(rows, out / "curve.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, colour in (("bccd_val_fields", "tab:blue"), ("bccd_test_fields", "tab:orange"), ("pbc_val", "tab:green")):
        runs = [r for r in rows if r["n_labelled"] != "base"]
        xs = sorted({r["n_labelled"] for r in runs})
        means = [np.mean([r[key]["accuracy"] for r in runs if r["n_labelled"] == x]) for x in xs]
        ax.plot(xs, means, "o-", color=colour, label=key.replace("_", " "))
        ax.scatter([r["n_labelled"] for r in runs], [r[key]["accuracy"] for r in runs], color=colour, s=8, alpha=0.5)
        ax.axhline(rows[0][key]["accuracy"], color=colour, ls=":", lw=1)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("labelled BCCD crops used in fine-tuning (N)")
    ax.set_ylabel("accuracy")
    ax.set_title("Fine-tuning a PBC-only network on N cells of another lab\n(dotted: the network before)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
