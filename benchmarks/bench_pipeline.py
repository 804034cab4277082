"""End-to-end speed and memory: analyze_smear vs the bare ultralytics predict of the same detector.

Usage: python benchmarks/bench_pipeline.py [--fields N] [--memory-fields 1000]

1. Latency on BCCD test fields (640x480): median of analyze_smear (read -> detect -> crop -> classify ->
   result) vs ultralytics ``YOLO(weights).predict`` on the same decoded images with the same imgsz/conf,
   interleaved in one run; prints both and the ratio (target <= 1.3).
   Then the default ``rescale="auto"`` vs ``rescale=False``: on the same fields (where "auto" keeps the first
   detection) and on central 320x240 cuts of them (cells at the training size in a smaller image: rescaled).
2. Throughput: analyze_fields over the BCCD test fields (fields/second).
3. Memory: RSS before/after streaming ``--memory-fields`` fields through iter_fields (cycling the test
   fields): it should stay flat.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from itertools import cycle, islice
from pathlib import Path

import cv2
from _machine import describe  # benchmarks/_machine.py, beside this script

from smearpipe.io import read_image
from smearpipe.pipeline import PipelineConfig, analyze_fields, analyze_smear, iter_fields, load_pipeline

REPO = Path(__file__).resolve().parents[1]
BCCD = REPO.parent / "shared" / "datasets" / "bccd" / "BCCD"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fields", type=int, default=72)
    ap.add_argument("--memory-fields", type=int, default=1000)
    args = ap.parse_args()
    print(describe())
    stems = (BCCD / "ImageSets" / "Main" / "test.txt").read_text().split()[: args.fields]
    paths = [BCCD / "JPEGImages" / f"{s}.jpg" for s in stems]
    pipe = load_pipeline()
    det = pipe.detector
    print(f"detector {det.record.name} (imgsz {det.record.input_size}), classifier {pipe.classifier.record.name}; {len(paths)} fields")

    images = [read_image(p) for p in paths]
    bgrs = [cv2.cvtColor(im, cv2.COLOR_RGB2BGR) for im in images]

    def bare(i: int) -> None:
        det.model.predict(source=bgrs[i], imgsz=det.record.input_size, conf=det.conf, iou=det.iou, device="cpu", verbose=False)

    def ours(i: int) -> None:
        analyze_smear(images[i], pipeline=pipe)

    for i in range(3):
        bare(i)
        ours(i)
    t_bare, t_ours = [], []
    for i in range(len(images)):
        t0 = time.perf_counter()
        bare(i)
        t1 = time.perf_counter()
        ours(i)
        t2 = time.perf_counter()
        t_bare.append((t1 - t0) * 1e3)
        t_ours.append((t2 - t1) * 1e3)
    mb, mo = statistics.median(t_bare), statistics.median(t_ours)
    print(f"latency  bare ultralytics predict {mb:7.1f} ms   analyze_smear {mo:7.1f} ms   ratio {mo / mb:.2f}  (target <= 1.3)")

    # the default rescale="auto" vs rescale=False, interleaved: on the fields themselves (the training scale, where
    # "auto" keeps the first detection) and on a central 320x240 cut of each, where the cells keep their size in an
    # image half as wide: letterboxed to the input size they would be seen 2x too large, so "auto" detects again.
    off = PipelineConfig(rescale=False)
    for label, fields in (("640x480 fields", images), ("320x240 cuts", [im[120:360, 160:480].copy() for im in images])):
        t_off, t_auto, rescaled = [], [], 0
        for im in fields:
            t0 = time.perf_counter()
            analyze_smear(im, pipeline=pipe, config=off)
            t1 = time.perf_counter()
            rescaled += analyze_smear(im, pipeline=pipe).detector_imgsz is not None
            t2 = time.perf_counter()
            t_off.append((t1 - t0) * 1e3)
            t_auto.append((t2 - t1) * 1e3)
        mf, ma = statistics.median(t_off), statistics.median(t_auto)
        print(f"{label}: analyze_smear rescale=False {mf:7.1f} ms   rescale='auto' {ma:7.1f} ms   ratio {ma / mf:.2f}"
              f"  (means {statistics.mean(t_off):.1f} / {statistics.mean(t_auto):.1f} ms; {rescaled} of {len(fields)} rescaled)")

    t0 = time.perf_counter()
    slide = analyze_fields(paths, pipeline=pipe, progress=False)
    dt = time.perf_counter() - t0
    print(f"analyze_fields: {len(slide.fields)} fields in {dt:.1f} s = {len(slide.fields) / dt:.2f} fields/s (from files)")

    n = args.memory_fields
    before = rss_mb()
    marks = {}
    for k, (_, _) in enumerate(iter_fields(islice(cycle(paths), n), pipeline=pipe, progress=False), 1):
        if k in (max(1, n // 10), n // 2, n):
            marks[k] = rss_mb()
    print(f"memory over {n} fields (RSS MiB): start {before:.0f}, " + ", ".join(f"after {k}: {v:.0f}" for k, v in marks.items()))


if __name__ == "__main__":
    main()
