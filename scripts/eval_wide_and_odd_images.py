"""Images unlike a microscope field: a wide camera image, pictures that are no smear, and how dark smears are.

Usage:
  python scripts/eval_wide_and_odd_images.py [--out reports/unlit/wide_and_odd_images.json]

Three checks of the default pipeline, each a number the README quotes:

- ``wide``: the first 36 BCCD fields (sorted by name, all splits) tiled 6 x 6 into one 3840x2880 image, red cells
  of the training size on an image 6x as wide as the training fields (a wide camera at BCCD's magnification), and
  the same fields analysed one by one: WBC / RBC / platelet counts, scale factor, detector input size, seconds.
- ``non_smear``: eleven scikit-image sample pictures (astronaut, cat, chelsea, coffee, colorwheel,
  hubble_deep_field, immunohistochemistry, retina, rocket, logo without its alpha channel, the left
  stereo_motorcycle image): WBC and RBC counts, and whether the "no red cells found" warning was given; also
  with the black around an image counted in the Reinhard statistics as before 2026-11-28
  (``smearpipe.preprocess._UNLIT_MAX_SHARE`` set above 1 for that pass only).
- ``dark_pixels``: the share of pixels darker than L* 10 (the threshold of the black left out of Reinhard
  statistics) in every BCCD field, every ``bccd_wbc_subtypes`` crop and every fifth PBC image: the maximum, and how
  many images exceed 0.001 % and 1 %.

Reads BCCD and PBC images of every split (no model is chosen or tuned here). Refuses to overwrite ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
import warnings
from pathlib import Path

import numpy as np

import smearpipe.preprocess as preprocess
from smearpipe.io import read_image
from smearpipe.pipeline import analyze_smear, load_pipeline
from smearpipe.preprocess import _UNLIT_MAX_L, _to_lab

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
BCCD = SHARED / "bccd" / "BCCD"
PICTURES = ("astronaut", "cat", "chelsea", "coffee", "colorwheel", "hubble_deep_field", "immunohistochemistry",
            "retina", "rocket")


def counts(image: np.ndarray, pipe) -> dict:
    t0 = time.time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = analyze_smear(image, pipeline=pipe)
    return {**r.counts, "scale_factor": round(r.scale_factor, 3), "detector_imgsz": r.detector_imgsz,
            "seconds": round(time.time() - t0, 2), "warnings": [str(w.message) for w in caught]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "reports" / "unlit" / "wide_and_odd_images.json"))
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    pipe = load_pipeline()
    result = {"what": " ".join(__doc__.split("\n\n")[2:4]).replace("\n", " "), "models": pipe.models}

    stems = sorted(p.stem for p in (BCCD / "JPEGImages").glob("*.jpg"))[:36]
    fields = [read_image(BCCD / "JPEGImages" / f"{s}.jpg") for s in stems]
    one_by_one = [counts(f, pipe) for f in fields]
    wide = np.concatenate([np.concatenate(fields[r * 6:(r + 1) * 6], axis=1) for r in range(6)], axis=0)
    result["wide"] = {"fields": stems, "shape": list(wide.shape), "tiled": counts(wide, pipe),
                      "one_by_one": {k: sum(c[k] for c in one_by_one) for k in ("WBC", "RBC", "Platelets")}}
    print("wide", {k: v for k, v in result["wide"].items() if k != "fields"}, flush=True)

    from skimage import data

    pictures = {name: getattr(data, name)() for name in PICTURES}
    pictures["logo"] = np.ascontiguousarray(data.logo()[..., :3])
    pictures["stereo_motorcycle"] = data.stereo_motorcycle()[0]
    now = preprocess._UNLIT_MAX_SHARE
    for key, share in (("non_smear", now), ("non_smear_black_counted", 1.1)):
        preprocess._UNLIT_MAX_SHARE = share
        try:
            rows = {}
            for name, picture in pictures.items():
                c = counts(np.ascontiguousarray(picture), pipe)
                rows[name] = {"WBC": c["WBC"], "RBC": c["RBC"],
                              "no_red_cells_warning": any("no red cells found" in w for w in c["warnings"])}
        finally:
            preprocess._UNLIT_MAX_SHARE = now
        result[key] = {"pictures": rows, "with_a_wbc": sum(r["WBC"] > 0 for r in rows.values()),
                       "with_a_red_cell": sum(r["RBC"] > 0 for r in rows.values()),
                       "warned": sum(r["no_red_cells_warning"] for r in rows.values()), "n": len(rows)}
        print(key, {k: v for k, v in result[key].items() if k != "pictures"}, flush=True)

    pbc = [SHARED / "pbc" / "PBC_dataset_normal_DIB" / r["path"]
           for r in csv.DictReader(open(SHARED / "pbc" / "splits.csv", newline=""))][::5]
    crops = sorted(p for p in (SHARED / "bccd_wbc_subtypes").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    sets = {"bccd_fields": sorted((BCCD / "JPEGImages").glob("*.jpg")), "bccd_wbc_subtypes": crops, "pbc_every_fifth": pbc}
    result["dark_pixels"] = {}
    for name, files in sets.items():
        share = np.array([float((_to_lab(read_image(f))[..., 0] < _UNLIT_MAX_L).mean()) for f in files])
        result["dark_pixels"][name] = {"images": int(share.size), "max_share": float(share.max()),
                                       "over_0.001_percent": int((share > 1e-5).sum()), "over_1_percent": int((share > 0.01).sum())}
    print("dark_pixels", result["dark_pixels"], flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
