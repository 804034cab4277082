"""Classifier inference speed: ms per crop of Classifier.predict_proba (shipped weights by default).

Usage: python benchmarks/bench_classify.py [--weights NAME_OR_PATH] [--batch 32] [--repeats 5]

Crops are real BCCD WBC crops (from the bundled sample fields' annotations, 1.75x box), repeated to
fill the batch. Includes everything predict_proba does: preprocessing (the record's, e.g. Macenko),
resizing, normalisation and the network (in bf16 where the CPU supports it: Classifier._bf16_network).
Target (classifier issue): <= 10 ms per crop on the project machine (2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _machine import describe  # benchmarks/_machine.py, beside this script

from smearpipe.classify import Classifier
from smearpipe.datasets import read_voc, square_crop
from smearpipe.io import read_image

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(describe())
    clf = Classifier.load(args.weights)
    crops = []
    for xml in sorted((REPO / "datasets" / "bccd_samples").glob("*.xml")):
        img = read_image(xml.with_suffix(".jpg"))
        for b in read_voc(xml)[1]:
            if b.label == "WBC":
                crops.append(square_crop(img, (b.xmin, b.ymin, b.xmax, b.ymax), scale=clf.crop_scale))
    batch = (crops * args.batch)[: args.batch]
    print(f"{clf}, bf16={clf.use_bf16}, crops {[c.shape[0] for c in crops]} px")
    for n in (1, args.batch):
        clf.predict_proba(batch[:n])  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            clf.predict_proba(batch[:n])
            times.append((time.perf_counter() - t0) * 1e3 / n)
        print(f"batch {n:3d}: {statistics.median(times):7.2f} ms per crop (median of {args.repeats})  target <= 10")


if __name__ == "__main__":
    main()
