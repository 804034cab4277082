"""Command-line interface: ``smearpipe <command> ...`` (see ``smearpipe --help``)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import SmearpipeError

__all__ = ["main"]


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from .io import read_image, write_image
    from .preprocess import Preprocessing

    steps = tuple(s for s in args.steps.split(",") if s)
    prep = Preprocessing(steps=steps, macenko_on_failure=args.on_failure).resolved()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in args.images:
        path = Path(path)
        target = out_dir / f"{path.stem}_preprocessed.png"
        try:
            result = prep(read_image(path))
            write_image(target, result, overwrite=args.overwrite)
        except (SmearpipeError, FileExistsError) as exc:
            print(f"error: {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        print(f"{path} -> {target}")
    record = out_dir / "preprocessing.json"
    if not record.exists() or args.overwrite:
        record.write_text(json.dumps(prep.to_dict(), indent=2) + "\n")
    return 1 if failures else 0


def _cmd_convert_voc(args: argparse.Namespace) -> int:
    from .datasets import voc_to_yolo

    report = voc_to_yolo(
        args.voc_root,
        args.out,
        splits=tuple(args.splits.split(",")),
        on_unknown=args.on_unknown,
        overwrite=args.overwrite,
        link_images=not args.copy,
    )
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smearpipe", description="Automated peripheral blood smear analysis.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="apply median / CLAHE / Macenko preprocessing to images")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--steps", default="median,clahe,macenko", help="comma-separated steps in order (default: %(default)s)")
    p.add_argument("--out", default="smearpipe-out", help="output folder (default: %(default)s)")
    p.add_argument("--on-failure", choices=("raise", "passthrough"), default="raise",
                   help="Macenko on a blank image: report an error (raise) or keep the image unchanged")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("convert-voc", help="convert a Pascal VOC dataset (BCCD layout) to the YOLO layout")
    p.add_argument("voc_root", help="folder with Annotations/, JPEGImages/, ImageSets/Main/")
    p.add_argument("out", help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--splits", default="train,val,test")
    p.add_argument("--on-unknown", choices=("error", "skip"), default="error")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")
    p.set_defaults(func=_cmd_convert_voc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (SmearpipeError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
