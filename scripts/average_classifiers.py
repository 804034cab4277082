"""Average the weights of classifiers fine-tuned from one network ("model soup", Wortsman et al. 2022).

Usage: python scripts/average_classifiers.py A.safetensors B.safetensors [...] --out runs/soup \\
           --name classifier-vgg16bn-v11

Every floating-point tensor of the state dict (batch-norm running statistics included) becomes the plain mean
of the ingredients' tensors (uniform weights); integer ones (batch-norm step counters, unused at inference) are
the first ingredient's. The ingredients must be the same kind of network: same classes, input
size, architecture, framing, preprocessing, mean/std and crop scale in their records, and the same tensor
names and shapes; otherwise the script refuses. Averaging only makes sense for fine-tunes of one starting
network (their records' ``training.pretrained_sha256``, or for older records ``training.pretrained``, must
name the same file): two networks trained apart, from scratch or from ImageNet features with new random
heads, do not share a basin, and their average is not a working network. The same weights twice are refused.

Writes ``<out>/<name>.safetensors`` (fp16, as shipped) and its record; the record's ``training`` names the
common start and lists the ingredients (name, sha256, training, which holds their data and splits) with
``method: uniform weight average``; its metrics are empty until it is evaluated. Nothing is evaluated here: run
``scripts/compare_classifiers.py`` on the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smearpipe.classify import Classifier, save_classifier
from smearpipe.errors import SmearpipeError

REPO = Path(__file__).resolve().parents[1]

SAME = ("classes", "input_size", "preprocessing", "architecture", "framing", "mean", "std", "crop_scale",
        "preprocess_resized")


def common_start(records: list[dict]) -> tuple[str, str | None]:
    """The network all ``records`` were fine-tuned from: its path as recorded, and its sha256 where known.

    Records from ``train_classifier`` carry the start's sha256 (``training.pretrained_sha256``); older ones
    only its path, which is then compared resolved against the repository (where the training scripts run).
    Runs from scratch, or from ImageNet features with new random heads, have no common start.
    """
    keys, paths = set(), []
    for r in records:
        training = r.get("training") or {}
        start = training.get("pretrained")
        if start in (None, "", "imagenet"):
            raise SystemExit(f"{r['name']} was not fine-tuned from a saved network (start: {start!r}); averaging "
                             "networks trained apart does not give a working network")
        path = Path(start) if Path(start).is_absolute() else REPO / start
        keys.add(training.get("pretrained_sha256") or f"path:{path.resolve()}")
        paths.append(str(start))
    if len(keys) > 1:
        raise SystemExit(f"the classifiers were not fine-tuned from one network (starts: {sorted(keys)}); averaging "
                         "networks trained apart does not give a working network")
    (key,) = keys
    if key.startswith("path:"):
        print(f"note: the records name their start only by path ({paths[0]}), not by sha256; it is assumed "
              "unchanged since they were trained")
        return paths[0], None
    return paths[0], key


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", help="classifier .safetensors files with their records (at least 2)")
    ap.add_argument("--out", required=True, help="folder for the averaged weights and record")
    ap.add_argument("--name", required=True, help="record name of the average")
    args = ap.parse_args()
    if len(args.models) < 2:
        raise SystemExit("give at least two classifiers to average")

    target = Path(args.out) / f"{args.name}.safetensors"
    if target.exists() or target.with_suffix(".json").exists():
        raise SystemExit(f"{target} or its record exists: pick a new name or folder")
    try:
        clfs = [Classifier.load(m, precision="fp32") for m in args.models]  # verifies each sha256
    except SmearpipeError as exc:
        raise SystemExit(str(exc)) from None
    records = [c.record.to_dict() for c in clfs]
    for key in SAME:
        values = [json.dumps(r.get(key), sort_keys=True) for r in records]
        if len(set(values)) > 1:
            raise SystemExit(f"the classifiers differ in {key!r}; only fine-tunes of one network can be averaged")
    if len({r["sha256"] for r in records}) < len(records):
        raise SystemExit("the same weights were given twice")
    start, start_sha256 = common_start(records)
    states = [c.model.state_dict() for c in clfs]
    if any(s.keys() != states[0].keys() or any(s[k].shape != states[0][k].shape for k in s) for s in states):
        raise SystemExit("the classifiers' tensors differ in names or shapes")

    model = clfs[0].model
    averaged = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            averaged[k] = torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype)
        else:  # e.g. batch-norm num_batches_tracked: not used in eval mode; keep the first's
            averaged[k] = v.clone()
    model.load_state_dict(averaged)

    first = records[0]
    fields = {k: first[k] for k in SAME if k in first}
    fields["preprocessing"] = clfs[0].preprocessing
    fields["training"] = {
        "method": "uniform weight average (model soup, Wortsman et al. 2022); no training of its own",
        "pretrained": start,
        "pretrained_sha256": start_sha256,
        "ingredients": [{"name": r["name"], "sha256": r["sha256"], "file": str(Path(m)),
                         "training": r.get("training"), "metrics": {"best_val_macro_f1": (r.get("metrics") or {})
                                                                    .get("best_val_macro_f1")}}
                        for r, m in zip(records, args.models, strict=True)],
        "ingredients_wall_minutes": round(sum(float((r.get("training") or {}).get("wall_minutes") or 0.0) for r in records), 1),
    }
    fields["metrics"] = {"history": []}
    rec = save_classifier(model, fields, args.out, args.name)
    print(json.dumps({"weights": str(rec.path), "sha256": rec.sha256,
                      "ingredients": [r["name"] for r in records]}, indent=1))


if __name__ == "__main__":
    main()
