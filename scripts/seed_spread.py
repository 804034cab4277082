"""Run-to-run spread of the leave-one-lab-out protocol: two runs of one recipe, scored on the same crops.

Usage:
  python scripts/seed_spread.py reports/cross_lab/<run A> reports/cross_lab/<run B> --out reports/cross_lab/seed_spread.json

Reads what ``scripts/cross_lab_protocol.py`` wrote for each run (``summary.json`` and
``bccd_all_crops/predictions.csv``); runs no network. Besides each run's scores, it counts the BCCD crops the two
runs type differently and the errors they share: errors made by both runs are properties of the crops (another
lab's look, or their labels), not of one run's luck.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path


def predictions(run: Path) -> dict[str, tuple[str, str]]:
    """``{class folder/file name: (true, predicted)}`` of one run (keys independent of where the crops were)."""
    path = run / "bccd_all_crops" / "predictions.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    found = {str(Path(*Path(r["path"]).parts[-2:])): (r["true"], r["pred"]) for r in rows}
    if len(found) != len(rows):
        sys.exit(f"{path}: {len(rows)} rows name only {len(found)} distinct crops")
    return found


def headline(run: Path) -> dict:
    s = json.loads((run / "summary.json").read_text())
    pick = {"n", "accuracy", "macro_f1"}
    return {"classifier": s["classifier"]["name"], "sha256": s["classifier"]["sha256"],
            "bccd_all_crops": {k: v for k, v in s["bccd_all_crops"].items() if k in pick},
            **{f"bccd_{split}_fields": {k: v for k, v in s["bccd_by_field_split"][split].items() if k in pick}
               for split in ("dev", "test")},
            "pbc_test": {k: v for k, v in s["pbc_test"].items() if k in pick}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs=2, type=Path, help="two output folders of scripts/cross_lab_protocol.py")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists; choose another --out")
    a, b = (predictions(r) for r in args.runs)
    if a.keys() != b.keys():
        sys.exit(f"the two runs were not scored on the same crops: {len(a.keys() - b.keys())} only in the first, "
                 f"{len(b.keys() - a.keys())} only in the second (e.g. {sorted(a.keys() ^ b.keys())[0]})")
    relabelled = sorted(k for k in a if a[k][0] != b[k][0])
    if relabelled:
        sys.exit(f"{len(relabelled)} crops carry different labels in the two runs, e.g. {relabelled[0]}: "
                 f"{a[relabelled[0]][0]} vs {b[relabelled[0]][0]}")
    wrong_a = {k for k, (t, p) in a.items() if p != t}
    wrong_b = {k for k, (t, p) in b.items() if p != t}
    shared: dict[str, int] = {}
    for k in sorted(wrong_a & wrong_b):
        pair = f"{a[k][0]} called {a[k][1]}" if a[k][1] == b[k][1] else f"{a[k][0]}, each run wrong differently"
        shared[pair] = shared.get(pair, 0) + 1
    result = {"runs": [headline(r) for r in args.runs],
              "bccd_crops": len(a),
              "typed_differently": sum(a[k][1] != b[k][1] for k in a),
              "errors": {"run_a": len(wrong_a), "run_b": len(wrong_b), "both": len(wrong_a & wrong_b),
                         "only_a": len(wrong_a - wrong_b), "only_b": len(wrong_b - wrong_a)},
              "errors_of_both_runs": dict(sorted(shared.items(), key=lambda kv: (-kv[1], kv[0])))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("typed_differently", "errors", "errors_of_both_runs")}, indent=1))


if __name__ == "__main__":
    main()
