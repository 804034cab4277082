"""Does SAM's step survive bf16 autocast? SAM's gradient change, float32 against bf16, on one batch.

Usage: python scripts/sam_bf16_check.py [--classifier classifier-vgg16bn-v8] [--n 32] [--rho 0.05]

With bf16 autocast each layer sees its weights rounded to bf16, whose steps are larger than most weights' share of a
SAM move of radius 0.05, so the move could be lost in rounding. This takes ``n`` PBC *train* crops (every k-th row of
``splits.csv``'s train split), the network in training mode with dropout off (so both runs see the same function),
and compares ``d = g_SAM - g`` (what SAM changes in the gradient) between float32 and bf16 autocast: their cosine and
their size relative to ``g``. Prints one JSON object. No test split is read.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def main() -> None:
    import torch

    from smearpipe.classify import Classifier, prepare_crops
    from smearpipe.io import read_image
    from smearpipe.train import _sam_second_gradient

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", default="classifier-vgg16bn-v8")
    ap.add_argument("--n", type=int, default=32, help="crops in the batch")
    ap.add_argument("--rho", type=float, default=0.05, help="SAM radius")
    args = ap.parse_args()

    root = SHARED / "pbc" / "PBC_dataset_normal_DIB"
    with (SHARED / "pbc" / "splits.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["split"] == "train"]
    rows = rows[:: max(1, len(rows) // args.n)][: args.n]
    clf = Classifier.load(args.classifier, precision="fp32")
    x = torch.from_numpy(prepare_crops([read_image(root / r["path"]) for r in rows], size=clf.input_size,
                                       preprocessing=clf.preprocessing, preprocess_resized=clf.preprocess_resized,
                                       framing=clf.framing)).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([clf.classes.index(r["class"]) for r in rows])
    model = clf.model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    params = list(model.parameters())
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def gradients(bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
        state = {k: v.clone() for k, v in model.state_dict().items()}

        def loss() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            return criterion(out.float(), y), out

        for p in params:
            p.grad = None
        loss()[0].backward()
        g = torch.cat([p.grad.flatten() for p in params]).double()
        _sam_second_gradient(model, params, args.rho, loss)
        g_sam = torch.cat([p.grad.flatten() for p in params]).double()
        model.load_state_dict(state)  # the first pass's batch-norm update undone for the other run
        return g, g_sam

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))  # float64: 15 M terms

    g32, s32 = gradients(False)
    g16, s16 = gradients(True)
    d32, d16 = s32 - g32, s16 - g16
    print(json.dumps({
        "classifier": args.classifier, "crops": len(rows), "rho": args.rho,
        "cos_g_float32_bf16": round(cosine(g32, g16), 4),
        "cos_sam_change_float32_bf16": round(cosine(d32, d16), 4),
        "sam_change_over_g_float32": round(float(d32.norm() / g32.norm()), 4),
        "sam_change_over_g_bf16": round(float(d16.norm() / g16.norm()), 4),
    }, indent=1))


if __name__ == "__main__":
    main()
