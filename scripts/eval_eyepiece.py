"""Photos through the eyepiece: BCCD fields inside a lit circle on black, with the default pipeline.

Usage:
  python scripts/eval_eyepiece.py [--split val] [--out reports/eyepiece] [--overwrite]

A phone or camera held to the eyepiece records the field as a lit circle in black. Each BCCD field of ``--split``
is analysed (default pipeline, ``rescale="auto"``) four ways: as it is; inside a circle of 0.55 times its width
(the circle cuts its corners, as an eyepiece's field stop does); that circle inside a black frame (160 px left
and right, 120 px above and below: 960x720 px, 57 % of it black); and as it is, 4x underexposed (every value x
0.25: the darkest nuclei of some fields are then nearly as dark as the black around a circle, but they are the
field). Counted: WBC and RBC boxes in total, and the fields whose WBC count equals the annotated one. The circle loses the cells in the corners, so "circle" rather
than "as it is" is the reference for the framed photo. Each is measured twice: with the colour statistics of the
field normalisation as they are now (black reaching the image's edge left out: ``smearpipe.preprocess._lit_mask``)
and as before 2026-11-28 (every pixel counted; ``smearpipe.preprocess._UNLIT_MAX_SHARE`` set above 1 for that
pass only). Writes ``<out>/<detector>/<split>.json``; an existing report is kept unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np

import smearpipe.preprocess as preprocess
from smearpipe.datasets import read_voc
from smearpipe.io import read_image
from smearpipe.pipeline import analyze_smear, load_pipeline

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "bccd" / "BCCD"
VIEWS = ("as_is", "circle", "framed", "dim")


def eyepiece_views(field: np.ndarray) -> dict[str, np.ndarray]:
    """The field as it is, inside a circle of 0.55 x its width on black, that inside a black frame, and the field
    4x underexposed."""
    h, w = field.shape[:2]
    yy, xx = np.mgrid[:h, :w]
    circle = field.copy()
    circle[(xx - w / 2) ** 2 + (yy - h / 2) ** 2 > (0.55 * w) ** 2] = 0
    framed = np.zeros((h + 240, w + 320, 3), np.uint8)
    framed[120:120 + h, 160:160 + w] = circle
    return {"as_is": field, "circle": circle, "framed": framed, "dim": (field * 0.25).astype(np.uint8)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--split", choices=("val", "test"), default="val", help="BCCD ImageSets split of the fields")
    ap.add_argument("--out", default=str(REPO / "reports" / "eyepiece"), help="reports go to OUT/<detector name>/")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier report of the same split")
    args = ap.parse_args()
    pipe = load_pipeline()
    out = Path(args.out) / pipe.detector.record.name / f"{args.split}.json"
    if out.exists() and not args.overwrite:
        ap.error(f"{out} exists: pass --overwrite to replace it")
    stems = (BCCD / "ImageSets" / "Main" / f"{args.split}.txt").read_text().split()
    now = preprocess._UNLIT_MAX_SHARE
    result = {"what": __doc__.split("\n\n")[2].replace("\n", " "), "split": args.split, "fields": len(stems),
              "models": pipe.models}
    t0 = time.time()
    for key, share in (("now", now), ("before_2026_11_28", 1.1)):
        preprocess._UNLIT_MAX_SHARE = share
        totals = {v: {"WBC": 0, "RBC": 0, "WBC_count_exact": 0} for v in VIEWS}
        try:
            for stem in stems:
                truth = sum(b.label == "WBC" for b in read_voc(BCCD / "Annotations" / f"{stem}.xml")[1])
                for view, image in eyepiece_views(read_image(BCCD / "JPEGImages" / f"{stem}.jpg")).items():
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # e.g. no red cell found in a dark frame: counted as 0
                        counts = analyze_smear(image, pipeline=pipe).counts
                    totals[view]["WBC"] += counts["WBC"]
                    totals[view]["RBC"] += counts["RBC"]
                    totals[view]["WBC_count_exact"] += counts["WBC"] == truth
        finally:
            preprocess._UNLIT_MAX_SHARE = now
        result[key] = totals
        print(key, json.dumps(totals), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
