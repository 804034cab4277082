"""Sweep training recipes of the PBC-only classifier on a lent GPU, from a portable pack of cached crops.

Usage:
  python scripts/recipe_sweep.py pack --out .pack          # here: build the pack (no test split is read)
  python scripts/recipe_sweep.py run --pack .pack --out $OUT --device cuda --parallel 6 --workers 2 --deadline 330
  python scripts/recipe_sweep.py summarize CALL.json [CALL.json ...] --pack .pack --out reports/recipe_sweep

The GPU machine gets a copy of the repository (at most 64 MiB), not ``../shared``: ``pack`` stores what the runs
need,

* the PBC train crops exactly as the base recipe caches them (cell framing, Reinhard, 96 px), JPEG quality 95
  with full-resolution colour (about 6.3 kB each; the lossless cache would be 200 MB);
* the PBC val crops (1,030) and the BCCD "dev" crops (280, from BCCD train/val fields) at 64 px, preprocessed as a
  classifier applies its record at inference (Reinhard), losslessly; ``run`` scores them as they are and with
  ``"sharpen"`` added (as the protocol model is scored).

``run`` trains each arm of :data:`ARMS` with :func:`smearpipe.train.train_classifier` (its own loop, loader,
augmentation and early stopping; only the crop loading is replaced by the pack's arrays) and scores each run's
kept weights on PBC val and BCCD dev (bf16 autocast, as :class:`~smearpipe.classify.Classifier` on a CPU with
bf16). Each run is its own process (``one``), which swaps the loading for the pack and exits. Runs go ``--parallel``
at a time, in the order of :data:`ARMS`; none starts after ``--deadline`` seconds, but one started just before goes on
for up to ``--max-minutes`` plus an epoch and its scoring, so the call's own time limit must allow for that.
``OUT/sweep.json`` is rewritten after every run and names the runs still going, so a call cut short keeps what
finished. Validation data only: a sweep chooses what to retrain here, on the CPU, under a rule committed before; its
own numbers are not a result of the shipped weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# The sibling scripts (train_default_classifier, input_size_sweep) are imported where needed; run as a script, this
# folder is on sys.path.

# (name, train_classifier overrides of the base recipe, seed), in launch order: the first seed of every arm, then the
# second, and so on as time allows. Base: scripts/train_default_classifier.py --pbc-only --epochs 14. Seeds 4-6 were
# added for a second call after the first (which had seeds 1-3).
_ARMS = {
    "ctrl": {},
    "nobal": {"rebalance": "none"},
    "lossbal": {"rebalance": "loss"},
    "ep24": {"epochs": 24},
    "ls0": {"label_smoothing": 0.0},
    "crop08": {"augment": {"crop_scale_min": 0.8}},
}
ARMS = [(f"{a}-s{seed}", o, seed) for seed in (1, 2, 3, 4, 5, 6) for a, o in _ARMS.items()]
BASE_EPOCHS = 14
RUN_WHAT = ("Runs of the PBC-only base recipe with one training setting changed (arms), trained on CUDA from the pack; "
            "each scored on PBC val (1,030) and BCCD dev (280) crops, as recorded (plain) and with 'sharpen' added.")


def _encode_jpeg(rgb: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, 95,
                            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return buf.tobytes()


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    import cv2

    out = [cv2.cvtColor(cv2.imdecode(blob[a:b], cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
           for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return np.stack(out)


def base_sources() -> tuple[list, list]:
    from train_default_classifier import PBC_CENTER, SHARED

    from smearpipe.train import CropSource

    root, splits = str(SHARED / "pbc" / "PBC_dataset_normal_DIB"), str(SHARED / "pbc" / "splits.csv")
    return ([CropSource(root, split="train", splits_csv=splits, center_fraction=PBC_CENTER, name="pbc-train")],
            [CropSource(root, split="val", splits_csv=splits, center_fraction=PBC_CENTER, name="pbc-val")])


def base_config() -> dict:
    """The base recipe's ``train_classifier`` options (``train_default_classifier.py --pbc-only --epochs 14``)."""
    from train_default_classifier import AUGMENT_FRAMED, CACHE_SCALE, CROP_SCALE

    from smearpipe.preprocess import Preprocessing

    return {"input_size": 64, "epochs": 14, "lr": 1e-3, "crop_scale": CROP_SCALE, "framing": "cell",
            "augment": AUGMENT_FRAMED, "cache_scale": CACHE_SCALE,
            "preprocessing": Preprocessing(steps=("reinhard",), macenko_on_failure="passthrough").resolved()}


def pack(out: Path) -> None:
    from input_size_sweep import validation_crops

    from smearpipe.classify import resize_preprocessed
    from smearpipe.datasets import WBC_CLASSES
    from smearpipe.train import _load_crops

    out.mkdir(parents=True, exist_ok=True)
    cfg = base_config()
    train, _ = base_sources()
    prep = cfg["preprocessing"]
    tr_x, tr_y, _ = _load_crops(train, WBC_CLASSES, 96, prep, "train crops", True, cfg["framing"])
    blobs = [_encode_jpeg(x) for x in tr_x]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    np.savez(out / "train.npz", jpg=np.frombuffer(b"".join(blobs), np.uint8), offsets=offsets, y=tr_y)
    back = _decode_jpegs(np.frombuffer(b"".join(blobs), np.uint8), offsets)
    stats = {"train_crops": len(tr_y), "train_jpeg_mb": round(float(offsets[-1]) / 1e6, 1),
             "train_jpeg_mean_abs_error_grey_levels": round(float(np.abs(back.astype(int) - tr_x).mean()), 2)}
    arrays = {}
    for key, (crops, y) in validation_crops(WBC_CLASSES).items():
        arrays[f"{key}_plain"] = np.stack([resize_preprocessed(c, size=64, preprocessing=prep, preprocess_resized=True,
                                                               framing=cfg["framing"]) for c in crops])
        arrays[f"{key}_y"] = y
    np.savez_compressed(out / "eval.npz", **arrays)
    stats |= {f"{k.removesuffix('_y')}_crops": len(v) for k, v in arrays.items() if k.endswith("_y")}
    (out / "pack.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(stats)


def eval_arrays(pack_dir: Path) -> dict[str, np.ndarray]:
    """The pack's eval crops, and the same with ``"sharpen"`` after Reinhard: at 64 px the step acts on the
    Reinhard-normalised resized crop, so it is applied to the stored one (the pack leaves it out for size)."""
    ev = dict(np.load(pack_dir / "eval.npz"))
    sharpen = dataclasses.replace(base_config()["preprocessing"], steps=("sharpen",))
    for key in ("pbc_val", "bccd_dev"):
        ev[f"{key}_sharpen"] = np.stack([sharpen(x) for x in ev[f"{key}_plain"]])
    return ev


def score(weights: Path, ev: dict, device: str) -> dict:
    """Accuracy and correct counts of a trained classifier on the pack's preprocessed 64 px eval arrays."""
    import torch
    from sklearn.metrics import f1_score

    from smearpipe.classify import Classifier

    clf = Classifier.load(str(weights))
    model = clf.model.to(device).eval()
    mean = torch.tensor(clf.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(clf.std, device=device).view(1, 3, 1, 1)
    res = {}
    for key in ("pbc_val", "bccd_dev"):
        y = ev[f"{key}_y"]
        for tag in ("plain", "sharpen"):
            x = torch.from_numpy(ev[f"{key}_{tag}"]).to(device).permute(0, 3, 1, 2).float().div(255)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16):
                p = torch.softmax(model(x).float(), 1).cpu().numpy()
            pred = p.argmax(1)
            res[f"{key}_{tag}"] = {"correct": int((pred == y).sum()), "n": int(len(y)),
                                   "macro_f1": float(f1_score(y, pred, labels=list(range(5)), average="macro",
                                                              zero_division=0)),  # as cross_lab_protocol.score
                                   "proba": np.round(p, 4).tolist()}
    return res


def run_one(name: str, pack_dir: Path, work: Path, device: str, workers: int, max_minutes: float) -> dict:
    import torch

    import smearpipe.train as T

    torch.set_num_threads(1)
    arms = {n: (o, s) for n, o, s in ARMS}
    overrides, seed = arms[name]
    z = np.load(pack_dir / "train.npz")
    tr_x, tr_y = _decode_jpegs(z["jpg"], z["offsets"]), z["y"]
    ev = eval_arrays(pack_dir)
    va_x, va_y = ev["pbc_val_plain"], ev["pbc_val_y"]
    stand_in = pack_dir / "train.npz"

    # The pack replaces the PBC folders: train_classifier's cache key stats the sources' files, and its loader
    # decodes them; both go to the pack (train at the 96 px cache size, val at the 64 px input size). These patches
    # of smearpipe.train last for this process alone, which trains this one run and exits (``one``).
    T.CropSource.samples = lambda self, classes: [(stand_in, 0)]

    def load(sources, classes, size, prep, desc, resized_first, framing):
        x, y = (tr_x, tr_y) if desc.startswith("caching train") else (va_x, va_y)
        if x.shape[1] != size:
            raise RuntimeError(f"pack crops are {x.shape[1]} px, the run asks for {size}")
        return x, y, np.zeros(len(y), np.int64)

    T._load_crops = load
    cfg = base_config()
    over = dict(overrides)
    if "augment" in over:
        over["augment"] = dataclasses.replace(cfg["augment"], **over["augment"])
    cfg.update(over)
    train, val = [T.CropSource("pack", name="pbc-train")], [T.CropSource("pack", name="pbc-val")]
    t0 = time.time()
    result = T.train_classifier(train, val, out_dir=work, name=name, record_name=f"sweep-{name}", seed=seed,
                                device=device, num_workers=workers, max_minutes=max_minutes, **cfg)
    minutes = (time.time() - t0) / 60
    stopped = json.loads(result.record.read_text())["training"]["stopped"]
    return {"name": name, "seed": seed, "overrides": json.loads(json.dumps(overrides)), "minutes": round(minutes, 2),
            "best_epoch": result.best_epoch, "epochs_run": len(result.history), "epochs_planned": cfg["epochs"],
            "stopped": stopped,
            "history": [{k: round(v, 5) for k, v in h.items()} for h in result.history],
            "scores": score(result.weights, ev, device)}


def summary_line(r: dict) -> str:
    s = r["scores"]
    return (f"{r['name']:12s} val {s['pbc_val_plain']['correct']}/{s['pbc_val_sharpen']['correct']} "
            f"dev {s['bccd_dev_plain']['correct']}/{s['bccd_dev_sharpen']['correct']} "
            f"best epoch {r['best_epoch']}/{r['epochs_run']} {r['minutes']:.1f} min")


def run_all(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    known = [n for n, _, _ in ARMS]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        raise ValueError(f"--only: unknown run(s) {unknown}; known: {known}")
    queue = [n for n in known if not args.only or n in args.only]
    running: dict[str, subprocess.Popen] = {}
    done, failed = [], {}
    log = (out / "sweep.log").open("a")

    def write() -> None:
        tmp = out / "sweep.json.tmp"
        tmp.write_text(json.dumps({"what": RUN_WHAT, "arms": _ARMS, "runs": done, "failed": failed,
                                   "running": sorted(running), "not_started": queue,
                                   "elapsed_s": round(time.time() - t0)}, indent=1))
        os.replace(tmp, out / "sweep.json")

    while running or (queue and time.time() - t0 < args.deadline):
        while queue and len(running) < args.parallel and time.time() - t0 < args.deadline:
            name = queue.pop(0)
            cmd = [sys.executable, __file__, "one", name, "--pack", args.pack, "--work", str(work),
                   "--device", args.device, "--workers", str(args.workers), "--max-minutes", str(args.max_minutes)]
            with (work / f"{name}.log").open("w") as f:  # the child keeps its own handle
                running[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
            print(f"{time.time() - t0:6.0f} s start {name}", file=log, flush=True)
            write()
        time.sleep(2)
        for name, proc in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            res = work / f"{name}.json"
            if proc.returncode == 0 and res.is_file():
                done.append(json.loads(res.read_text()))
                print(f"{time.time() - t0:6.0f} s {summary_line(done[-1])}", file=log, flush=True)
            else:
                tail = (work / f"{name}.log").read_text()[-3000:]
                failed[name] = {"returncode": proc.returncode, "log_tail": tail}
                print(f"{time.time() - t0:6.0f} s FAILED {name} rc={proc.returncode}\n{tail}", file=log, flush=True)
            write()
    write()
    log.close()
    print((out / "sweep.log").read_text())


def _complete(r: dict) -> bool:
    """Whether a run trained its whole schedule (runs of the first call have no ``epochs_planned``: from the arm)."""
    return r["epochs_run"] == r.get("epochs_planned", r["overrides"].get("epochs", BASE_EPOCHS))


def summarize(calls: list[Path], pack_dir: Path, out: Path, val_names: list[str] | None = None) -> dict:
    """Per-arm means against the control and the plan's rule; each call's JSON without probabilities, and the
    probabilities in ``probabilities.npz`` (float16, keys ``RUN/EVAL``). Returns what ``summary.json`` holds.

    The rule (reports/recipe_sweep/README.md) compares an arm's mean with the mean of the control runs of the same
    calls. ``vs_ctrl_same_seeds`` (the control runs with the arm's seeds) is given beside it, not used by the rule.
    ``val_names``: the PBC val images in the pack's order, to name the images most runs miss.
    """
    y = {k: np.load(pack_dir / "eval.npz")[f"{k}_y"] for k in ("pbc_val", "bccd_dev")}
    runs, proba = [], {}
    for i, call in enumerate(calls, 1):
        d = json.loads(call.read_text())
        for r in d["runs"]:
            if any(r["name"] == q["name"] for q in runs):
                raise ValueError(f"{call}: run {r['name']!r} is also in an earlier call")
            r["call"] = i
            for key, sc in r["scores"].items():
                proba[f"{r['name']}/{key}"] = np.array(sc.pop("proba"), np.float16)
            runs.append(r)
        d["what"] = RUN_WHAT  # the first calls' files carried a wrong paragraph of this docstring
        (out / f"sweep_call{i}.json").write_text(json.dumps(d, indent=1) + "\n")
    np.savez_compressed(out / "probabilities.npz", **proba)
    arms: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        arms.setdefault(r["name"].rsplit("-", 1)[0], []).append(r)
    ctrl = arms["ctrl"]

    def mean(rs: list[dict], key: str) -> float:
        return float(np.mean([r["scores"][key]["correct"] for r in rs]))

    table = {}
    for arm, rs in arms.items():
        calls_of = {r["call"] for r in rs}
        same_calls = [r for r in ctrl if r["call"] in calls_of]
        same_seeds = [r for r in ctrl if r["seed"] in {q["seed"] for q in rs}]
        row = {"seeds": [r["seed"] for r in rs], "calls": sorted(calls_of),
               "complete_runs": sum(_complete(r) for r in rs),
               "control_seeds_compared": [r["seed"] for r in same_calls]}
        diff = {}
        for key in ("pbc_val_plain", "pbc_val_sharpen", "bccd_dev_plain", "bccd_dev_sharpen"):
            diff[key] = mean(rs, key) - mean(same_calls, key)
            row[key] = {"correct": [r["scores"][key]["correct"] for r in rs], "mean": round(mean(rs, key), 2),
                        "vs_ctrl": round(diff[key], 2)}
            if len(same_seeds) == len(rs):
                row[key]["vs_ctrl_same_seeds"] = round(mean(rs, key) - mean(same_seeds, key), 2)
        row["stopped_early"] = [f"seed {r['seed']}: {r.get('stopped', 'stopped before its last epoch')}, best epoch "
                                f"{r['best_epoch']} of {r['epochs_run']} run" for r in rs if not _complete(r)]
        val, dev = diff["pbc_val_plain"], diff["bccd_dev_sharpen"]
        row["rule"] = {"towards_4": bool(val >= 3 and dev >= -4), "towards_6": bool(dev >= 8 and val >= -1)}
        row["mean_probability_ensemble"] = {}
        for key, yy in (("pbc_val_plain", y["pbc_val"]), ("bccd_dev_sharpen", y["bccd_dev"])):
            p = np.mean([proba[f"{r['name']}/{key}"].astype(np.float32) for r in rs], axis=0)
            row["mean_probability_ensemble"][key] = int((p.argmax(1) == yy).sum())
        table[arm] = row
    hard = {}
    complete = [r for r in runs if _complete(r)]
    for key, yy in (("pbc_val_plain", y["pbc_val"]), ("bccd_dev_sharpen", y["bccd_dev"])):
        preds = np.array([proba[f"{r['name']}/{key}"].argmax(1) for r in complete])
        wrong = preds != yy
        freq = wrong.sum(0)
        hard[key] = {"runs": len(complete), "wrong_in_every_run": int((freq == len(complete)).sum()),
                     "wrong_in_half_or_more": int((freq >= len(complete) / 2).sum()), "wrong_in_any": int((freq > 0).sum()),
                     "errors_per_run": [int(wrong.sum(1).min()), int(wrong.sum(1).max())]}
        if key == "pbc_val_plain" and val_names is not None:
            hard[key]["half_or_more"] = [
                {"image": val_names[i], "wrong_in": int(freq[i]),
                 "most_given": int(np.bincount(preds[wrong[:, i], i], minlength=5).argmax())}
                for i in np.flatnonzero(freq >= len(complete) / 2)]
    stats = pack_dir / "pack.json"
    summary = {
        "what": "Means over each arm's seeds of correct PBC val (of 1,030) and BCCD dev (of 280) crops, as recorded "
                "(plain, Reinhard) and with 'sharpen' added. vs_ctrl: the difference from the mean of the control runs of "
                "the same calls (control_seeds_compared), which the rule in README.md uses; vs_ctrl_same_seeds: against "
                "the control runs of the same seeds, given beside it, not used by the rule. mean_probability_ensemble: "
                "all of an arm's seeds averaged. hard_images: over every run that trained its whole schedule "
                "(most_given: class index of the answer most runs that miss the image give).",
        "pack": json.loads(stats.read_text()) if stats.is_file() else None,
        "arms": table, "hard_images": hard}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for arm, row in table.items():
        print(f"{arm:8s} seeds {row['seeds']} val {row['pbc_val_plain']['mean']:.2f} ({row['pbc_val_plain']['vs_ctrl']:+.2f}) "
              f"dev {row['bccd_dev_sharpen']['mean']:.2f} ({row['bccd_dev_sharpen']['vs_ctrl']:+.2f}) rule {row['rule']} "
              f"ensemble {row['mean_probability_ensemble']}")
    print(json.dumps(hard))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--out", default=".pack")
    m = sub.add_parser("summarize")
    m.add_argument("calls", nargs="+", help="sweep.json of each device call, in order")
    m.add_argument("--pack", default=".pack")
    m.add_argument("--out", default="reports/recipe_sweep")
    for name in ("run", "one"):
        r = sub.add_parser(name)
        if name == "one":
            r.add_argument("name", help="a run of ARMS, e.g. ctrl-s1")
        else:
            r.add_argument("--out", default="sweep-out", help="folder of sweep.json and sweep.log")
            r.add_argument("--parallel", type=int, default=4, help="runs at a time")
            r.add_argument("--deadline", type=float, default=480, help="seconds after which no run starts")
            r.add_argument("--only", nargs="*", default=None, help="run only these (names as in ARMS)")
        r.add_argument("--pack", default=".pack")
        r.add_argument("--work", default="/tmp/sweep-runs", help="run folders and each run's log")
        r.add_argument("--device", default="cuda")
        r.add_argument("--workers", type=int, default=3, help="data-loading processes per run")
        r.add_argument("--max-minutes", type=float, default=6.0, help="each run's train_classifier(max_minutes=)")
    args = ap.parse_args()
    if args.cmd == "pack":
        pack(Path(args.out))
    elif args.cmd == "summarize":
        _, val = base_sources()
        names = None
        if Path(val[0].root).is_dir():
            from smearpipe.datasets import WBC_CLASSES

            names = [str(p.relative_to(val[0].root)) for p, _ in val[0].samples(WBC_CLASSES)]
        summarize([Path(c) for c in args.calls], Path(args.pack), Path(args.out), val_names=names)
    elif args.cmd == "one":
        res = run_one(args.name, Path(args.pack), Path(args.work), args.device, args.workers, args.max_minutes)
        tmp = Path(args.work) / f"{args.name}.json.tmp"
        tmp.write_text(json.dumps(res))
        os.replace(tmp, Path(args.work) / f"{args.name}.json")
    else:
        run_all(args)


if __name__ == "__main__":
    main()
