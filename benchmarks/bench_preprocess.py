"""Preprocessing speed: smearpipe vs torchstain and vs bare OpenCV, in one run.

Usage: python benchmarks/bench_preprocess.py [--field PATH] [--repeats 30]

Prints the median time of each and the ratios the foundation issue targets:
  * smearpipe MacenkoNormalizer.transform vs torchstain numpy MacenkoNormalizer.normalize
    (both fitted to the same PBC reference crop, applied to the same 640x480 BCCD field): <= 0.2x
  * smearpipe median_filter + clahe vs the bare OpenCV calls they wrap: <= 1.2x
and, without a target, the shipped detector's field normalisation (reinhard_normalize with the Reinhard reference of
its record, which analyze_smear runs on every field) against the float L*a*b* round trip any Reinhard
implementation needs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
from _machine import describe  # benchmarks/_machine.py, beside this script

from smearpipe.io import read_image
from smearpipe.preprocess import MacenkoNormalizer, clahe, median_filter, reinhard_normalize
from smearpipe.weights import DEFAULT_DETECTOR, resolve

REPO = Path(__file__).resolve().parents[1]


def median_ms(*fns, repeats: int) -> list[float]:
    """Median wall time (ms) of each function, calls interleaved so load changes hit all alike."""
    for fn in fns:
        fn()  # warm-up
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[i].append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--field", default=str(REPO / "datasets" / "bccd_samples" / "BloodImage_00007.jpg"))
    ap.add_argument("--reference", default=None, help="PBC crop to fit both normalisers on (default: first PBC train neutrophil)")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    print(describe())

    field = read_image(args.field)
    if args.reference:
        ref_img = read_image(args.reference)
    else:
        pbc = REPO.parent / "shared" / "datasets" / "pbc" / "PBC_dataset_normal_DIB" / "neutrophil"
        ref_img = read_image(sorted(pbc.glob("*.jpg"))[0])
    print(f"field {args.field} {field.shape}, repeats {args.repeats}")

    ours = MacenkoNormalizer().fit(ref_img)
    try:
        import torchstain

        ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        ts.fit(ref_img)
        t_ours, t_ts = median_ms(lambda: ours.transform(field), lambda: ts.normalize(field), repeats=args.repeats)
    except ImportError:
        (t_ours,) = median_ms(lambda: ours.transform(field), repeats=args.repeats)
        t_ts = float("nan")
        print("torchstain not installed (pip install torchstain): Macenko ratio not measured")
    print(f"macenko  smearpipe {t_ours:8.2f} ms   torchstain(numpy) {t_ts:8.2f} ms   ratio {t_ours / t_ts:.3f}  (target <= 0.2)")

    op = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))

    def bare() -> np.ndarray:
        m = cv2.medianBlur(field, 3)
        lab = cv2.cvtColor(m, cv2.COLOR_RGB2LAB)
        lab[:, :, 0] = op.apply(lab[:, :, 0])
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)

    def wrapped() -> np.ndarray:
        return clahe(median_filter(field, ksize=3), clip_limit=2.0, tile_grid=(8, 8))

    np.testing.assert_array_equal(bare(), wrapped())  # same work, same result
    t_bare, t_wrap = median_ms(bare, wrapped, repeats=args.repeats * 5)
    print(f"median+clahe  smearpipe {t_wrap:8.2f} ms   bare OpenCV {t_bare:8.2f} ms   ratio {t_wrap / t_bare:.3f}  (target <= 1.2)")

    ref = resolve(DEFAULT_DETECTOR, kind="detector").preprocessing.reinhard_reference

    def lab_round_trip() -> np.ndarray:
        lab = cv2.cvtColor(field.astype(np.float32) / 255, cv2.COLOR_RGB2LAB)
        return cv2.convertScaleAbs(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB), alpha=255.0)

    t_trip, t_rein = median_ms(lab_round_trip, lambda: reinhard_normalize(field, reference=ref), repeats=args.repeats * 5)
    print(f"field reinhard ({DEFAULT_DETECTOR})  smearpipe {t_rein:8.2f} ms   L*a*b* round trip {t_trip:8.2f} ms   "
          f"ratio {t_rein / t_trip:.3f}")
    # one call per field over different fields, as analyze_fields meets them (no warm caches of one image)
    bccd = REPO.parent / "shared" / "datasets" / "bccd" / "BCCD" / "JPEGImages"
    paths = sorted(bccd.glob("*.jpg"))[:30] or sorted((REPO / "datasets" / "bccd_samples").glob("*.jpg"))
    fields = [read_image(p) for p in paths]
    times = []
    for f in fields * 3:
        t0 = time.perf_counter()
        reinhard_normalize(f, reference=ref)
        times.append((time.perf_counter() - t0) * 1e3)
    print(f"field reinhard over {len(fields)} different fields x 3: median {statistics.median(times):.2f} ms")


if __name__ == "__main__":
    main()
