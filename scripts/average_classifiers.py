"""Average the weights of classifiers fine-tuned from one network ("model soup", Wortsman et al. 2022).

Usage: python scripts/average_classifiers.py A.safetensors B.safetensors [...] --out runs/soup \\
           --name classifier-vgg16bn-v11

Every tensor of the state dict (batch-norm running statistics included) becomes the plain mean of the
ingredients' tensors (uniform weights). The ingredients must be the same kind of network: same classes, input
size, architecture, framing, preprocessing, mean/std and crop scale in their records, and the same tensor
names and shapes; otherwise the script refuses. Averaging only makes sense for fine-tunes of one starting
network (their records' ``training.pretrained`` must name the same file): two networks trained apart from
scratch do not share a basin, and their average is not a working network.

Writes ``<out>/<name>.safetensors`` (fp16, as shipped) and its record; the record's ``training`` lists the
ingredients (name, sha256, training) and ``method: uniform weight average``. Nothing is evaluated here: run
``scripts/compare_classifiers.py`` on the result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from smearpipe.classify import Classifier, save_classifier

SAME = ("classes", "input_size", "preprocessing", "architecture", "framing", "mean", "std", "crop_scale",
        "preprocess_resized")


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
    clfs = [Classifier.load(m, precision="fp32") for m in args.models]  # verifies each sha256
    records = [c.record.to_dict() for c in clfs]
    for key in SAME:
        values = [json.dumps(r.get(key), sort_keys=True) for r in records]
        if len(set(values)) > 1:
            raise SystemExit(f"the classifiers differ in {key!r}; only fine-tunes of one network can be averaged")
    starts = {json.dumps((r.get("training") or {}).get("pretrained"), sort_keys=True) for r in records}
    if len(starts) > 1 or starts == {"null"}:
        raise SystemExit("the classifiers were not fine-tuned from one recorded starting network; averaging "
                         "networks trained apart does not give a working network")
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
        "pretrained": (first.get("training") or {}).get("pretrained"),
        "ingredients": [{"name": r["name"], "sha256": r["sha256"], "file": str(Path(m)),
                         "training": r.get("training"), "metrics": {"best_val_macro_f1": (r.get("metrics") or {})
                                                                    .get("best_val_macro_f1")}}
                        for r, m in zip(records, args.models, strict=True)],
        "wall_minutes": round(sum(float((r.get("training") or {}).get("wall_minutes") or 0.0) for r in records), 1),
    }
    fields["metrics"] = {"history": []}
    rec = save_classifier(model, fields, args.out, args.name)
    print(json.dumps({"weights": str(rec.path), "sha256": rec.sha256,
                      "ingredients": [r["name"] for r in records]}, indent=1))


if __name__ == "__main__":
    main()
