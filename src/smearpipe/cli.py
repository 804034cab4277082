"""Command-line interface: ``smearpipe <command> ...`` (see ``smearpipe --help``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import SmearpipeError

__all__ = ["main"]


def _recorded_preprocessing(path: Path) -> Any:
    """The preprocessing recorded in ``path`` (fields added since filled with their defaults), or None when the
    file is not such a record."""
    from .preprocess import Preprocessing

    try:
        return Preprocessing.from_dict(json.loads(path.read_text())).to_dict()
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from .io import read_image, replace_file, write_image
    from .preprocess import Preprocessing

    steps = tuple(s for s in args.steps.split(",") if s)
    prep = Preprocessing(steps=steps, macenko_on_failure=args.on_failure).resolved()
    if not args.out:
        print("error: --out is empty; give the output folder", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    record = out_dir / "preprocessing.json"
    earlier = _recorded_preprocessing(record) if record.exists() else None
    other_settings = record.exists() and earlier != prep.to_dict()
    if other_settings and not args.overwrite:
        # images made with other settings are already there: one record cannot describe both
        print(f"error: {record} records other preprocessing than --steps {args.steps!r}; use another --out or "
              "--overwrite", file=sys.stderr)
        return 2
    paths = _inputs_for(args.images, out_dir, action="preprocessed")
    if paths is None:
        return 2
    targets = [out_dir / f"{stem}_preprocessed.png" for stem in _output_stems(paths, set())]
    taken = [t for t in targets if t.exists()]
    if taken and not args.overwrite:  # before any image is processed
        print(f"error: {taken[0]} exists; use another --out or --overwrite", file=sys.stderr)
        return 2
    made = _make_folder(out_dir)
    failures, written = 0, set()
    try:
        for path, target in zip(paths, targets, strict=True):
            try:
                write_image(target, prep(read_image(path)), overwrite=args.overwrite)
            except SmearpipeError as exc:
                print(f"error: {path}: {exc}", file=sys.stderr)
                failures += 1
                continue
            except FileExistsError:  # appeared since the check above
                print(f"error: {path}: {target} exists; use another --out or --overwrite", file=sys.stderr)
                failures += 1
                continue
            written.add(target)
            print(f"{path} -> {target}")
    finally:  # whatever stops the loop, the images written are described by their record
        if written:
            replace_file(record, (json.dumps(prep.to_dict(), indent=2) + "\n").encode())
    if not written:
        _unmake(made)
        print("error: no image could be preprocessed; nothing written", file=sys.stderr)
        return 2
    if other_settings and earlier is None:
        print(f"warning: {record} was not a preprocessing record; the other images in {out_dir} are kept",
              file=sys.stderr)
    elif other_settings:  # --overwrite with new settings: the earlier images, made otherwise, go with their record
        stale = [f for f in out_dir.glob("*_preprocessed.png") if f not in written and f.is_file()]
        for f in stale:
            f.unlink()
        if stale:
            print(f"removed {len(stale)} images of {out_dir} made with the earlier settings")
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
        wbc_types_as_wbc=args.wbc_types,
    )
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def _cmd_extract_crops(args: argparse.Namespace) -> int:
    from .datasets import extract_wbc_crops

    report = extract_wbc_crops(args.source, args.out, labels_csv=args.labels, split=None if args.all else args.split,
                               scale=args.scale, overwrite=args.overwrite)
    print(json.dumps(report.to_dict(), indent=2))
    print(f"{sum(report.written.values())} crops in {args.out} ("
          + ", ".join(f"{k} {v}" for k, v in sorted(report.written.items())) + f"); {len(report.skipped)} fields skipped")
    return 0


def _image_paths(raw_paths: Sequence[str], *, recursive: bool = False) -> list[Path]:
    """Files as given; folders expanded to their images (sorted; with ``recursive``, sub-folders too)."""
    from .io import IMAGE_SUFFIXES

    paths: list[Path] = []
    for raw in raw_paths:
        p = Path(raw)
        if p.is_dir():
            found = p.rglob("*") if recursive else p.iterdir()
            # a link to a missing file is listed too: it gets its error like any unreadable file
            paths += sorted(f for f in found if f.suffix.lower() in IMAGE_SUFFIXES
                            and (f.is_file() or (f.is_symlink() and not f.exists()))
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        else:
            paths.append(p)
    return paths


def _cmd_adapt_classifier(args: argparse.Namespace) -> int:
    from .classify import adapt_batchnorm, adapt_entropy
    from .errors import DatasetError
    from .io import read_image

    paths = _image_paths(args.paths, recursive=True)
    if not paths:
        raise DatasetError(f"no images found in {args.paths}")
    if args.fields:
        from .datasets import square_crop
        from .pipeline import analyze_smear, load_pipeline

        pipeline = load_pipeline(detector=args.detector, classifier=args.classifier)
        scale = pipeline.classifier.crop_scale
        crops = []
        for path in paths:  # the WBCs analyze_smear reports, cut as it cuts them
            rgb = read_image(path)
            crops += [square_crop(rgb, c.box, scale=scale) for c in analyze_smear(rgb, pipeline=pipeline).wbcs]
        if not crops:
            raise DatasetError(f"no WBC detected in {len(paths)} field image(s): nothing to adapt on")
        classifier = pipeline.classifier
    else:
        crops, classifier = [read_image(p) for p in paths], args.classifier
    adapt = {"batchnorm": adapt_batchnorm, "entropy": adapt_entropy}[args.method]
    clf = adapt(classifier, crops, out_dir=args.out, name=args.name)
    print(f"adapted ({args.method}) {clf.record.metadata['adapted']['from']} on {len(crops)} WBC crops from {len(paths)} images -> "
          f"{clf.record.path}")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    import csv
    import io

    from .classify import Classifier
    from .errors import ImageReadError, InvalidImageError
    from .io import read_image, replace_file
    from .pipeline import PipelineConfig, type_review_reasons

    out = Path(args.out)
    if out.is_dir():
        print(f"error: --out {out} is a folder; give the CSV file to write", file=sys.stderr)
        return 2
    if out.exists() and not args.overwrite:
        print(f"error: {out} exists; use another --out or --overwrite", file=sys.stderr)
        return 2
    review = PipelineConfig.review_probability if args.review_probability is None else args.review_probability
    if not 0.0 <= review <= 1.0:
        print(f"error: --review-probability must be in [0, 1], got {review}", file=sys.stderr)
        return 2
    paths = _unique_inputs(_image_paths(args.paths, recursive=True), action="typed")
    if not paths:
        print(f"error: no images found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    clf = Classifier.load(args.classifier)
    classes = clf.classes
    counts = dict.fromkeys(classes, 0)
    n_ok = n_review = 0
    errors: list[tuple[Path, str]] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"error: cannot use --out {out}: {exc}", file=sys.stderr)
        return 2
    table = io.StringIO()  # the CSV is written whole at the end, or not at all
    w = csv.writer(table)
    w.writerow(["path", "wbc_type", "probability", *(f"p_{c}" for c in classes), "review", "reasons", "error"])
    for start in range(0, len(paths), 256):  # a few hundred crops in memory at a time
        read: dict[int, Any] = {}
        for i, path in enumerate(paths[start:start + 256]):
            try:
                read[i] = read_image(path)
            except (ImageReadError, InvalidImageError) as exc:
                read[i] = exc
        crops = [c for c in read.values() if not isinstance(c, Exception)]
        rows = iter(clf.predict_proba(crops)) if crops else iter(())
        for i, path in enumerate(paths[start:start + 256]):  # rows in input order
            crop = read[i]
            if isinstance(crop, Exception):
                errors.append((path, str(crop)))
                w.writerow([path, "", "", *([""] * len(classes)), "", "", str(crop)])
                continue
            row = next(rows)
            k = int(row.argmax())
            reasons = type_review_reasons(row, crop, review_probability=review)
            counts[classes[k]] += 1
            n_ok += 1
            n_review += bool(reasons)
            w.writerow([path, classes[k], f"{row[k]:.4f}", *(f"{v:.4f}" for v in row), "yes" if reasons else "no",
                        "; ".join(reasons), ""])
    if n_ok:  # UTF-8; a file name that is not valid UTF-8 (bytes of another encoding) is written escaped: \udce9
        replace_file(out, table.getvalue().encode("utf-8", errors="backslashreplace"))
    for path, msg in errors:
        print(f"error: {path}: {msg}", file=sys.stderr)
    if not n_ok:  # nothing typed: no CSV of error rows, and an earlier output stays as it was
        print(f"error: no crop could be read; {out} " + ("kept as it was" if out.exists() else "not written"),
              file=sys.stderr)
        return 2
    print(f"{n_ok} crops typed by {clf.record.name} ({len(errors)} unreadable), {n_review} flagged for review: "
          + ", ".join(f"{c} {n}" for c, n in counts.items()))
    print(f"predictions in {out}")
    return 1 if errors else 0


def _earlier_outputs(summary: Path) -> list[str]:
    """The per-field output stems an earlier ``analyze`` recorded in ``summary`` (none if it is not one of ours).

    ``--overwrite`` removes those this run does not write again, so a folder never mixes two runs' fields.
    A summary from before the stems were recorded: nothing is removed, with a warning.
    """
    try:
        payload = json.loads(summary.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(payload, dict) or "summary" not in payload:
        return []
    outputs = payload.get("outputs")
    if not isinstance(outputs, list) or not all(isinstance(s, str) and s and Path(s).name == s for s in outputs):
        print(f"warning: {summary} does not list its per-field files: those of fields this run does not "
              "analyse stay in the folder", file=sys.stderr)
        return []
    return outputs


def _unique_inputs(paths: list[Path], *, action: str = "analysed") -> list[Path]:
    """``paths`` without repeats of one file (a file given and also found in a folder, a link to it, another
    spelling of it), with a warning for each."""
    seen: dict[object, Path] = {}
    kept = []
    for p in paths:
        try:
            st = p.stat()
            key: object = (st.st_dev, st.st_ino)
        except OSError:  # missing or unreadable: reported when read
            key = p.absolute()
        if key in seen:
            print(f"warning: {p} is the same file as {seen[key]}: {action} once", file=sys.stderr)
            continue
        seen[key] = p
        kept.append(p)
    return kept


def _inputs_in(paths: list[Path], folder: Path) -> list[Path]:
    """The inputs that lie in ``folder`` (as given, or where a link points), however either is spelled."""
    import os

    # as spelled, and with ".." taken away first (x/../fields names fields even before x exists)
    folders = [f for f in (folder, Path(os.path.normpath(folder.absolute()))) if f.is_dir()]

    def inside(p: Path) -> bool:
        for parent in (p.absolute().parent, p.resolve().parent):
            for f in folders:
                try:
                    if os.path.samefile(parent, f):  # device and inode: case, links and mounts do not matter
                        return True
                except OSError:
                    continue
        return False

    return [p for p in paths if inside(p)]


def _inputs_for(raw_paths: Sequence[str], out_dir: Path, *, action: str) -> list[Path] | None:
    """The images of ``raw_paths`` (folders not searched recursively), each once; None, with the error printed,
    when there are none or ``out_dir`` holds some of them (outputs would replace PNG inputs, and the next run of
    the same command would read this run's outputs as inputs)."""
    paths = _unique_inputs(_image_paths(raw_paths), action=action)
    if not paths:
        print(f"error: no images found in {' '.join(raw_paths)}", file=sys.stderr)
        return None
    inside = _inputs_in(paths, out_dir)
    if inside:
        print(f"error: --out {out_dir} holds input images ({inside[0]}" + (f" and {len(inside) - 1} more" if len(inside) > 1
              else "") + "); write the outputs to another folder", file=sys.stderr)
        return None
    return paths


def _output_stems(paths: list[Path], reserved: set[str]) -> list[str]:
    """One output stem per input, in order: its file name's stem, ``_2``, ``_3``... for repeated names.

    Names are compared case-insensitively (``Cell`` and ``cell`` are one file on macOS and Windows).
    """
    stems, used = [], {r.casefold() for r in reserved}
    for source in paths:
        base = stem = source.stem
        if base in ("", ".", ".."):  # e.g. a file named "..png": not a name to write outputs under
            base = stem = "field"
        n = 2
        while stem.casefold() in used:
            stem, n = f"{base}_{n}", n + 1
        used.add(stem.casefold())
        stems.append(stem)
    return stems


def _make_folder(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; returns those it made, deepest first (for :func:`_unmake`)."""
    made = [d for d in (folder, *folder.parents) if not d.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return made


def _unmake(made: list[Path]) -> None:
    """Remove the folders :func:`_make_folder` made, if still empty: a command that wrote nothing leaves nothing."""
    for d in made:
        try:
            d.rmdir()
        except OSError:
            return


def _print_warnings(caught: list, source: str | None) -> tuple[list[str], list[str]]:
    """Print and forget the warnings ``caught`` while ``source`` was analysed, each naming it (unless it does, or
    is about the whole slide: those come while the first field is read). Returns smearpipe's own among them, as
    they were given: the field's, and the slide's."""
    from .errors import SlideWarning

    package = Path(__file__).resolve().parent
    own: list[str] = []
    slide: list[str] = []
    for w in caught:
        text = str(w.message)
        ours = Path(w.filename).resolve().is_relative_to(package)  # not torch's or ultralytics'
        if issubclass(w.category, SlideWarning):
            print(f"warning: slide: {text}", file=sys.stderr)
            slide.append(text)
            continue
        named = text if source is None or text.startswith(source) else f"{source}: {text}"
        print(f"warning: {named}", file=sys.stderr)
        if ours:
            own.append(text)
    caught.clear()
    return own, slide


def _cmd_analyze(args: argparse.Namespace) -> int:
    import csv
    import io

    from .io import replace_file
    from .pipeline import PipelineConfig, iter_fields, load_pipeline, summarize, write_field_outputs

    out_dir = Path(args.out)
    if not args.out:
        print("error: --out is empty; give the output folder", file=sys.stderr)
        return 2
    paths = _inputs_for(args.paths, out_dir, action="analysed")
    if paths is None:
        return 2
    summary_paths = [out_dir / "slide_summary.json", out_dir / "slide_summary.csv"]
    if not args.overwrite:
        existing = [str(p) for p in summary_paths if p.exists()]
        if existing:
            print(f"error: {existing[0]} exists; use another --out or --overwrite", file=sys.stderr)
            return 2
    stems = _output_stems(paths, {p.stem for p in summary_paths})  # a field called slide_summary.jpg keeps its own name
    if not args.overwrite:  # before any field is analysed, not after the slide
        taken = [f for stem in stems for f in (out_dir / f"{stem}.png", out_dir / f"{stem}.json") if f.exists()]
        if taken:
            print(f"error: {taken[0]} exists" + (f" (and {len(taken) - 1} more per-field files)" if len(taken) > 1 else "")
                  + "; use another --out or --overwrite", file=sys.stderr)
            return 2
    earlier = _earlier_outputs(summary_paths[0]) if args.overwrite else []
    rescale = {"auto": "auto", "ruler": True, "off": False}[args.rescale]
    config = PipelineConfig(det_conf=args.conf, rescale=rescale, pixel_size_um=args.pixel_size_um,
                            rbc_diameter_px=args.rbc_diameter_px)
    detector = args.detector
    if args.detector_preprocess is not None:  # a detector file without a record: its preprocessing, as trained
        from .detect import Detector
        from .preprocess import Preprocessing
        from .weights import DEFAULT_DETECTOR, WeightsRecord, resolve

        if isinstance(resolve(args.detector or DEFAULT_DETECTOR, kind="detector"), WeightsRecord):
            print(f"error: --detector-preprocess is only for a detector file without a record; "
                  f"{args.detector or DEFAULT_DETECTOR} has one, with its preprocessing", file=sys.stderr)
            return 2
        steps = tuple(x for x in args.detector_preprocess.split(",") if x)
        detector = Detector.load(args.detector, preprocessing=Preprocessing(steps=steps))
    with warnings.catch_warnings(record=True) as caught:  # about the models, printed as the fields' warnings are
        warnings.filterwarnings("always", category=UserWarning, module=r"smearpipe\.")
        pipeline = load_pipeline(detector=detector, classifier=args.classifier, config=config)
    _print_warnings(caught, None)
    try:  # before any field is analysed: an --out that cannot be a folder fails now, not after the slide
        made = _make_folder(out_dir)
    except OSError as exc:
        print(f"error: cannot use --out {out_dir} as the output folder: {exc}", file=sys.stderr)
        return 2
    results, errors, written, slide_warnings = [], [], [], []
    fields = iter_fields(paths, pipeline=pipeline, progress=not args.quiet)  # in input order
    with warnings.catch_warnings(record=True) as caught:  # each warning printed with the field it is about
        warnings.filterwarnings("always", category=UserWarning, module=r"smearpipe\.")  # per field, not once
        for (source, out), stem in zip(fields, stems, strict=True):
            warned, about_slide = _print_warnings(caught, source)
            slide_warnings += about_slide
            if not isinstance(out, Exception):
                try:
                    write_field_outputs(out, source, out_dir, stem, overwrite=args.overwrite, messages=warned)
                except FileExistsError as exc:  # appeared while the slide was analysed
                    errors.append((source, str(exc)))
                    print(f"error: {source}: {exc}; use another --out or --overwrite", file=sys.stderr)
                    continue
                results.append(out)
                written.append(stem)
                diff = ", ".join(f"{k} {v}" for k, v in out.differential.items() if v) or "-"
                print(f"{source}: " + ", ".join(f"{k} {v}" for k, v in out.counts.items()) + f" | WBC types: {diff}"
                      + (f" | {out.n_review} flagged" if out.n_review else ""))
            else:
                errors.append((source, str(out)))
                print(f"error: {source}: {out}", file=sys.stderr)
        slide_warnings += _print_warnings(caught, None)[1]
    if not results:  # nothing analysed: no summary of nothing, and an earlier run's outputs stay as they were
        _unmake(made)
        print("error: no field could be analysed; " + (f"the earlier run's outputs in {out_dir} are kept" if earlier
              else "nothing written"), file=sys.stderr)
        return 2
    summary = summarize(results, failed=len(errors), classes=pipeline.classifier.classes)
    payload = {"summary": summary.to_dict(), "errors": [list(e) for e in errors], "models": pipeline.models,
               "fields": [r.source for r in results], "outputs": written, "warnings": slide_warnings}
    replace_file(summary_paths[0], (json.dumps(payload, indent=2) + "\n").encode())
    table = io.StringIO()
    w = csv.writer(table)
    w.writerow(["wbc_type", "count", "percent", "ci95_low", "ci95_high"])
    for k, v in summary.differential.items():
        lo, hi = summary.differential_ci95[k]
        w.writerow([k, v, f"{summary.differential_percent[k]:.2f}", f"{lo:.2f}", f"{hi:.2f}"])
    replace_file(summary_paths[1], table.getvalue().encode())
    # only once the new summary is written: the earlier run's per-field files of fields this run did not write
    stale = [f for stem in earlier if stem not in written for f in (out_dir / f"{stem}.png", out_dir / f"{stem}.json")
             if f.is_file()]
    for f in stale:
        f.unlink()
    if stale:
        print(f"removed {len(stale)} per-field files of the earlier run in {out_dir} that this run did not replace")
    print(summary.table())
    print(f"outputs in {out_dir}")
    return 1 if errors else 0


def _cmd_train_detector(args: argparse.Namespace) -> int:
    from .preprocess import Preprocessing
    from .train import train_detector

    prep = Preprocessing(steps=tuple(x for x in args.preprocess.split(",") if x))
    try:
        train_args = json.loads(args.train_args)
    except json.JSONDecodeError as exc:
        print(f"error: --train-args is not JSON ({exc}): give an object, e.g. '{{\"cos_lr\": true}}'", file=sys.stderr)
        return 2
    if not isinstance(train_args, dict):
        print(f"error: --train-args must be a JSON object, got {args.train_args!r}", file=sys.stderr)
        return 2
    res = train_detector(args.data, model=args.model, epochs=args.epochs, imgsz=args.imgsz, batch=args.batch,
                         device=args.device, out_dir=args.out, name=args.name, resume=args.resume, preprocessing=prep,
                         select=args.select, train_args=train_args, seed=args.seed, record_name=args.record_name)
    print(json.dumps(res.to_dict(), indent=2))
    return 0


def _cmd_evaluate_detector(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_detector

    m = evaluate_detector(args.data, detector=args.weights, split=args.split, out_dir=args.out, overwrite=args.overwrite)
    print(json.dumps({k: m[k] for k in ("detector", "split", "images", "map50", "map50_95", "per_class", "counting")}, indent=2))
    return 0


def add_training_options(p: argparse.ArgumentParser) -> None:
    """``--ema``, ``--consistency``, ``--mixup``, ``--sam-rho``: the :func:`~smearpipe.train.train_classifier` options
    of the same names (``smearpipe train-classifier`` and ``scripts/train_default_classifier.py``)."""
    p.add_argument("--ema", type=float, default=0.0,
                   help="validate and save an exponential moving average of the weights with this decay (e.g. 0.998; "
                        "0: off)")
    p.add_argument("--consistency", type=float, default=0.0,
                   help="weight of a Jensen-Shannon consistency term between two colour augmentations of each crop "
                        "(AugMix uses 12; 0: off; twice the compute per step)")
    p.add_argument("--mixup", type=float, default=0.0,
                   help="mixup with this Beta(a, a) parameter: each batch blended with a shuffled copy of itself, "
                        "labels alike (0.2-0.4 is usual; 0: off)")
    p.add_argument("--sam-rho", type=float, default=0.0,
                   help="sharpness-aware minimisation (SAM) with this neighbourhood radius (0.05 is usual; 0: off; "
                        "twice the compute per step)")


def _add_run_args(p: argparse.ArgumentParser, *, out: str, record_help: str) -> None:
    """The options of a training run's folder, seed, record name and resumption (train-detector, train-classifier)."""
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", default=out, help="the run goes to OUT/NAME (default: %(default)s)")
    p.add_argument("--name", default="train", help="run folder name; NAME-2, ... if it exists (default: %(default)s)")
    p.add_argument("--record-name", default=None, help=record_help)
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run OUT/NAME from its checkpoint (give the settings it was started "
                        "with)")


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _crop_source(spec: str):  # noqa: ANN202
    """``ROOT`` or ``ROOT::SPLITS_CSV::SPLIT[::CENTER_FRACTION]``."""
    from .train import CropSource

    parts = spec.split("::")
    if len(parts) == 1:
        return CropSource(parts[0])
    if len(parts) not in (3, 4):
        raise ValueError(f"crop source must be ROOT or ROOT::SPLITS_CSV::SPLIT[::CENTER_FRACTION], got {spec!r}")
    return CropSource(parts[0], splits_csv=parts[1], split=parts[2], center_fraction=float(parts[3]) if len(parts) == 4 else 1.0)


def _cmd_train_classifier(args: argparse.Namespace) -> int:
    from .framing import Framing
    from .preprocess import Preprocessing
    from .train import train_classifier

    framing = Framing(args.framing, mask_radius=args.mask_radius)  # ValueError (reported by main) for bad values
    prep = Preprocessing(steps=tuple(x for x in args.preprocess.split(",") if x), macenko_on_failure="passthrough")

    res = train_classifier([_crop_source(s) for s in args.train], [_crop_source(s) for s in args.val],
                           input_size=args.input_size, epochs=args.epochs, batch_size=args.batch, lr=args.lr,
                           out_dir=args.out, name=args.name, resume=args.resume, max_minutes=args.max_minutes,
                           pretrained=args.pretrained, freeze_features=args.freeze_features, preprocessing=prep,
                           framing=framing, normalize_after_augment=args.normalize_after_augment,
                           ema=args.ema, consistency=args.consistency, sam_rho=args.sam_rho, mixup=args.mixup,
                           device=args.device,
                           num_workers=args.workers, patience=args.patience, seed=args.seed, record_name=args.record_name,
                           classes=tuple(c.strip() for c in args.classes.split(",") if c.strip()) if args.classes else None)
    print(json.dumps({k: v for k, v in res.to_dict().items() if k != "history"}, indent=2))
    return 0


def _cmd_evaluate_classifier(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_classifier

    m = evaluate_classifier([_crop_source(s) for s in args.crops], classifier=args.weights, out_dir=args.out, overwrite=args.overwrite)
    print(json.dumps({k: m[k] for k in ("classifier", "n", "accuracy", "macro_f1", "per_class")}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .framing import FRAMINGS
    from .pipeline import AUTO_RESCALE_TOLERANCE, PipelineConfig

    parser = argparse.ArgumentParser(prog="smearpipe", description="Automated peripheral blood smear analysis.")
    parser.add_argument("--version", action="version", version=f"smearpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("preprocess", help="apply median / CLAHE / Macenko / Reinhard preprocessing to images")
    p.add_argument("images", nargs="+", help="image files or folders of them")
    p.add_argument("--steps", default="median,clahe,macenko", help="comma-separated steps in order (default: %(default)s)")
    p.add_argument("--out", default="smearpipe-out", help="output folder (default: %(default)s)")
    p.add_argument("--on-failure", choices=("raise", "passthrough"), default="raise",
                   help="Macenko on a blank image: report an error (raise) or keep the image unchanged")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser("analyze", help="detect, count and type cells on field images (one slide)")
    p.add_argument("paths", nargs="+", help="field images or folders of them")
    p.add_argument("--out", default="smearpipe-out", help="output folder (default: %(default)s)")
    p.add_argument("--detector", default=None, help="detector weights name or .pt path (default: shipped)")
    p.add_argument("--detector-preprocess", default=None, metavar="STEPS",
                   help="only for a --detector .pt file without a record: the preprocessing its training images had, "
                        "comma-separated steps ('' for none)")
    p.add_argument("--classifier", default=None, help="classifier weights name or .safetensors path (default: shipped)")
    p.add_argument("--conf", type=float, default=None, help="detector score threshold (default: from the weights record)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    scale = p.add_mutually_exclusive_group()
    p.set_defaults(rescale="auto")  # the default: the detector's own red-cell boxes decide, field by field
    scale.add_argument("--rescale", dest="rescale", action="store_const", const="ruler",
                       help="always show fields at the detector's training scale, measured by the image's red cells "
                            f"(median over the slide's first {PipelineConfig().slide_scale_fields} measurable fields) "
                            "instead of the default: the detector's own red-cell boxes, field by field, where a "
                            f"field's scale differs by more than {AUTO_RESCALE_TOLERANCE}x")
    scale.add_argument("--no-rescale", dest="rescale", action="store_const", const="off",
                       help="show every field to the detector as it is")
    scale.add_argument("--pixel-size-um", type=float, default=None, help="known pixel size in micrometres (rescales)")
    scale.add_argument("--rbc-diameter-px", type=float, default=None, help="known red-cell diameter in pixels (rescales)")
    p.set_defaults(func=_cmd_analyze)

    p = sub.add_parser("classify", help="type single-WBC crop images (no detector): a CSV of types and probabilities")
    p.add_argument("paths", nargs="+", help="WBC crop images or folders of them (searched recursively)")
    p.add_argument("--out", required=True, help="CSV file to write (refused if it exists, unless --overwrite)")
    p.add_argument("--classifier", default=None, help="weights: name or .safetensors path (default: shipped)")
    p.add_argument("--review-probability", type=float, default=None,
                   help="flag crops whose most probable type is below this (default: PipelineConfig's, as in analyze)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("convert-voc", help="convert a Pascal VOC dataset (BCCD layout) to the YOLO layout")
    p.add_argument("voc_root", help="folder with Annotations/, JPEGImages/, ImageSets/Main/")
    p.add_argument("out", help="output folder (must be new or empty unless --overwrite)")
    p.add_argument("--splits", default="train,val,test")
    p.add_argument("--on-unknown", choices=("error", "skip"), default="error")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--copy", action="store_true", help="copy images instead of symlinking them")
    p.add_argument("--wbc-types", action="store_true",
                   help="boxes labelled with a WBC type (Neutrophil, ...) are WBC boxes (their crops: extract-crops)")
    p.set_defaults(func=_cmd_convert_voc)

    p = sub.add_parser("extract-crops", help="cut labelled WBC crops from annotated fields (an ImageFolder tree)")
    p.add_argument("source", help="VOC folder (Annotations/, JPEGImages/, ImageSets/Main/) or YOLO data YAML")
    p.add_argument("--out", required=True, help="output folder: OUT/<type>/<field>_<n>.png and crop_report.json")
    p.add_argument("--labels", default=None,
                   help="CSV with columns Image, Category for fields whose boxes say only WBC (BCCD's labels.csv; "
                        "Image a BCCD number or an image name); boxes labelled with their type need none")
    p.add_argument("--split", default="train", help="only this split's fields (default: %(default)s)")
    p.add_argument("--all", action="store_true", help="every annotated field, whatever its split")
    p.add_argument("--scale", type=_positive_float, default=2.0,
                   help="crop side relative to the box's longer side (default: %(default)s; the shipped classifiers' "
                        "BCCD crops: 1.75)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier extraction in --out")
    p.set_defaults(func=_cmd_extract_crops)

    p = sub.add_parser("train-detector", help="train a YOLO detector on a YOLO-layout dataset")
    p.add_argument("data", help="data YAML (from convert-voc)")
    p.add_argument("--model", default="yolov8n.yaml", help="model config (from scratch) or local .pt to fine-tune")
    p.add_argument("--epochs", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--imgsz", type=int, default=640, help="network input size, a multiple of 32 (default: %(default)s)")
    p.add_argument("--batch", type=int, default=16, help="(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    _add_run_args(p, out="runs/detector",
                  record_help="name written in the record of detector.pt (default: the run folder's name)")
    p.add_argument("--preprocess", default="",
                   help="comma-separated preprocessing steps applied to all images, recorded and repeated at "
                        "inference; 'reinhard' normalises to the average BCCD training field")
    p.add_argument("--select", choices=("best", "last"), default="best", help="(default: %(default)s)")
    p.add_argument("--train-args", default="{}", help='JSON of further ultralytics arguments, e.g. \'{"cos_lr": true}\'')
    p.set_defaults(func=_cmd_train_detector)

    p = sub.add_parser("evaluate-detector", help="mAP and counting accuracy of a detector on a split")
    p.add_argument("data", help="data YAML")
    p.add_argument("--weights", default=None, help="name or .pt path (default: shipped)")
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="runs/eval_detector")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_evaluate_detector)

    p = sub.add_parser("train-classifier", help="train the VGG16 WBC classifier on ImageFolder crops")
    p.add_argument("--train", nargs="+", required=True, help="crop sources: ROOT or ROOT::SPLITS_CSV::SPLIT[::CENTER_FRACTION]")
    p.add_argument("--val", nargs="+", required=True, help="validation crop sources (same syntax)")
    p.add_argument("--classes", default=None,
                   help="comma-separated class names in output order (default: basophil,eosinophil,lymphocyte,"
                        "monocyte,neutrophil); folder names match them in any letter case")
    p.add_argument("--input-size", type=int, default=112,
                   help="network input side in px (default: %(default)s; the shipped classifiers use 64)")
    p.add_argument("--epochs", type=int, default=15, help="(default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the one-cycle schedule (default: %(default)s)")
    p.add_argument("--patience", type=int, default=5,
                   help="early stop after this many epochs without a better val macro-F1 (default: %(default)s)")
    _add_run_args(p, out="runs/classifier",
                  record_help="name of the weights file and its record, NAME.safetensors and NAME.json "
                              "(default: classifier)")
    p.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="stop after the first epoch that ends past this wall time (resumable)")
    p.add_argument("--pretrained", default=None, help="'imagenet' (needs internet), a local VGG16-BN state dict, or a smearpipe classifier (.safetensors) to fine-tune")
    p.add_argument("--freeze-features", action="store_true", help="train only the head (the paper's recipe)")
    p.add_argument("--preprocess", default="reinhard",
                   help="comma-separated preprocessing steps of every crop, recorded and repeated at inference, as the "
                        "shipped v4-v6 ('reinhard,sharpen' as v8); '' for none (default: %(default)s)")
    p.add_argument("--framing", default="cell", choices=FRAMINGS,
                   help="recut every crop around its WBC nucleus before resizing (recorded, repeated at inference), "
                        "or use crops as given (default: %(default)s)")
    p.add_argument("--mask-radius", type=float, default=None,
                   help="with --framing cell: show only a disk of this many half-sides of the square around the nucleus, "
                        "background colour outside (Framing.mask_radius; recorded; default: the whole square)")
    p.add_argument("--normalize-after-augment", action="store_true",
                   help="apply the 'reinhard' step to each training batch after colour augmentation, as inference "
                        "normalises another lab's shifted crop (needs --preprocess reinhard)")
    add_training_options(p)
    p.add_argument("--device", default="cpu", help="where the network trains: cpu, cuda, cuda:N, mps (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="data-loading processes (default: %(default)s)")
    p.set_defaults(func=_cmd_train_classifier)

    p = sub.add_parser("evaluate-classifier", help="classification report and figures on labelled crops")
    p.add_argument("crops", nargs="+", help="crop sources: ROOT or ROOT::SPLITS_CSV::SPLIT[::CENTER_FRACTION]")
    p.add_argument("--weights", default=None, help="name or .safetensors path (default: shipped)")
    p.add_argument("--out", default="runs/eval_classifier")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_evaluate_classifier)

    p = sub.add_parser("adapt-classifier", help="calibrate the classifier to your lab on unlabelled WBC crops")
    p.add_argument("paths", nargs="+", help="WBC crop images or folders of them (searched recursively)")
    p.add_argument("--fields", action="store_true", help="the images are smear fields: cut WBC crops with the detector")
    p.add_argument("--out", required=True, help="folder for NAME.safetensors and its record (never overwritten)")
    p.add_argument("--name", required=True, help="name of the adapted weights, e.g. classifier-mylab")
    p.add_argument("--classifier", default=None, help="weights to adapt: name or .safetensors path (default: shipped)")
    p.add_argument("--detector", default=None, help="with --fields: detector name or .pt path (default: shipped)")
    p.add_argument("--method", choices=("batchnorm", "entropy"), default="batchnorm",
                   help="batchnorm: re-estimate batch-norm statistics (AdaBN, adapt_batchnorm); entropy: move batch-norm "
                        "scale and shift to make the answers confident (TENT, adapt_entropy)")
    p.set_defaults(func=_cmd_adapt_classifier)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # a file name that is not valid UTF-8 is printed escaped, not a crash; put back for an in-process caller
    streams = [(s, s.errors) for s in (sys.stdout, sys.stderr) if hasattr(s, "reconfigure")]
    for stream, _ in streams:
        stream.reconfigure(errors="backslashreplace")
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            return int(args.func(args))
        except (SmearpipeError, OSError, ValueError, TypeError) as exc:  # OSError: e.g. --out under a file
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
    finally:
        for stream, errors in streams:
            stream.reconfigure(errors=errors)


if __name__ == "__main__":
    sys.exit(main())
