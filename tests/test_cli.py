"""Command-line behaviour around outputs: nothing silently overwritten, lost or left wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from smearpipe.cli import main as cli_main

from .conftest import SAMPLES

FIELD = SAMPLES / "BloodImage_00007.jpg"


def _analyze(smoke_run, tiny_run, *args):
    return cli_main(["analyze", *map(str, args), "--detector", str(smoke_run.weights), "--classifier",
                     str(tiny_run.weights), "--conf", "0.01", "--quiet", "--no-rescale"])


def test_preprocess_refuses_to_mix_settings_in_one_folder(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["preprocess", str(FIELD), "--steps", "median", "--out", str(out)]) == 0
    assert json.loads((out / "preprocessing.json").read_text())["steps"] == ["median"]
    other = tmp_path / "other.jpg"
    shutil.copy(SAMPLES / "BloodImage_00135.jpg", other)
    assert cli_main(["preprocess", str(other), "--steps", "clahe", "--out", str(out)]) == 2
    assert "preprocessing.json" in capsys.readouterr().err
    assert not (out / "other_preprocessed.png").exists()  # refused before any image was written
    record = json.loads((out / "preprocessing.json").read_text())
    old = {k: v for k, v in record.items() if not k.startswith("sharpen")}  # written before those fields existed
    (out / "preprocessing.json").write_text(json.dumps(old))
    assert cli_main(["preprocess", str(other), "--steps", "median", "--out", str(out)]) == 0  # same settings: added
    assert cli_main(["preprocess", str(other), "--steps", "clahe", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "preprocessing.json").read_text())["steps"] == ["clahe"]
    (out / "preprocessing.json").write_text("not json")
    assert cli_main(["preprocess", str(other), "--steps", "clahe", "--out", str(out)]) == 2


def test_analyze_field_named_like_the_summary(smoke_run, tiny_run, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(FIELD, src / "slide_summary.jpg")
    shutil.copy(SAMPLES / "BloodImage_00135.jpg", src / "a.jpg")
    out = tmp_path / "out"
    assert _analyze(smoke_run, tiny_run, src, "--out", out) == 0
    assert "summary" in json.loads((out / "slide_summary.json").read_text())
    assert json.loads((out / "slide_summary_2.json").read_text())["source"].endswith("slide_summary.jpg")


def test_analyze_refuses_an_output_folder_it_cannot_make(smoke_run, tiny_run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert _analyze(smoke_run, tiny_run, FIELD, "--out", afile / "sub") == 2
    assert "--out" in capsys.readouterr().err
    assert _analyze(smoke_run, tiny_run, FIELD, "--out", afile) == 2
    assert afile.read_text() == "x"


def test_analyze_empty_folder(smoke_run, tiny_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _analyze(smoke_run, tiny_run, tmp_path / "empty", "--out", tmp_path / "out") == 2
    assert "no images found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_analyze_reports_a_field_whose_outputs_exist(smoke_run, tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert _analyze(smoke_run, tiny_run, FIELD, "--out", out) == 0
    (out / "slide_summary.json").unlink()
    (out / "slide_summary.csv").unlink()
    before = (out / "BloodImage_00007.json").read_text()
    capsys.readouterr()
    assert _analyze(smoke_run, tiny_run, FIELD, "--out", out) == 2  # its only field could not be written
    assert "BloodImage_00007" in capsys.readouterr().err
    assert (out / "BloodImage_00007.json").read_text() == before


def test_analyze_overwrite_leaves_no_files_of_the_earlier_run(smoke_run, tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    second = SAMPLES / "BloodImage_00135.jpg"
    assert _analyze(smoke_run, tiny_run, FIELD, second, "--out", out) == 0
    assert json.loads((out / "slide_summary.json").read_text())["outputs"] == [FIELD.stem, second.stem]
    (out / "notes.txt").write_text("mine")
    assert _analyze(smoke_run, tiny_run, second, "--out", out, "--overwrite") == 0
    assert not (out / f"{FIELD.stem}.png").exists() and not (out / f"{FIELD.stem}.json").exists()
    assert (out / f"{second.stem}.png").is_file() and (out / "notes.txt").read_text() == "mine"
    assert "removed 2 per-field files" in capsys.readouterr().out
    payload = json.loads((out / "slide_summary.json").read_text())
    del payload["outputs"]  # a summary written before the stems were recorded: nothing is removed, with a warning
    (out / "slide_summary.json").write_text(json.dumps(payload))
    assert _analyze(smoke_run, tiny_run, FIELD, "--out", out, "--overwrite") == 0
    assert (out / f"{second.stem}.png").is_file()
    assert "does not list its per-field files" in capsys.readouterr().err


def test_analyze_overwrite_with_no_readable_field_keeps_the_earlier_run(smoke_run, tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    assert _analyze(smoke_run, tiny_run, FIELD, "--out", out) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert _analyze(smoke_run, tiny_run, bad, "--out", out, "--overwrite") == 2
    assert "are kept" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("listed", [["../outside"], [""], ["sub/x"], "BloodImage_00007", [3]])
def test_analyze_overwrite_removes_only_plain_names_it_listed(smoke_run, tiny_run, tmp_path, capsys, listed):
    out = tmp_path / "out"
    second = SAMPLES / "BloodImage_00135.jpg"
    assert _analyze(smoke_run, tiny_run, FIELD, "--out", out) == 0
    (tmp_path / "outside.png").write_text("keep")
    payload = json.loads((out / "slide_summary.json").read_text())
    payload["outputs"] = listed
    (out / "slide_summary.json").write_text(json.dumps(payload))
    assert _analyze(smoke_run, tiny_run, second, "--out", out, "--overwrite") == 0
    assert "does not list its per-field files" in capsys.readouterr().err
    assert (tmp_path / "outside.png").read_text() == "keep" and (out / f"{FIELD.stem}.png").is_file()


def test_out_under_a_file_is_a_message_not_a_traceback(tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert cli_main(["preprocess", str(FIELD), "--steps", "median", "--out", str(tmp_path / "a_file" / "out")]) == 2
    assert "error:" in capsys.readouterr().err


def test_analyze_a_file_whose_stem_is_a_dot(smoke_run, tiny_run, tmp_path):
    odd = tmp_path / "in" / "..png"
    odd.parent.mkdir()
    shutil.copy(FIELD, odd)
    out = tmp_path / "out"
    assert _analyze(smoke_run, tiny_run, odd, "--out", out) == 0
    assert (out / "field.json").is_file() and (out / "slide_summary.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "out"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_analyze_refuses_to_write_into_its_input_folder(smoke_run, tiny_run, tmp_path, capsys, overwrite):
    """Annotated PNGs would replace PNG fields, and a second run would read the first run's outputs as fields."""
    fields = tmp_path / "fields"
    fields.mkdir()
    from smearpipe.io import read_image, write_image

    write_image(fields / "f1.png", read_image(FIELD))
    shutil.copy(SAMPLES / "BloodImage_00135.jpg", fields / "f2.jpg")
    before = {p.name: p.read_bytes() for p in fields.iterdir()}
    args = ["--overwrite"] if overwrite else []
    assert _analyze(smoke_run, tiny_run, fields, "--out", fields, *args) == 2
    assert "holds input images" in capsys.readouterr().err
    assert _analyze(smoke_run, tiny_run, fields / "f2.jpg", "--out", fields, *args) == 2  # a file given: the same
    # other spellings of the folder, a link to it, and a link to an input in it given from elsewhere
    (tmp_path / "view").mkdir()
    (tmp_path / "view" / "f1.png").symlink_to(fields / "f1.png")
    (tmp_path / "alias").symlink_to(fields)
    for given, out in ((fields, tmp_path / "x" / ".." / "fields"), (tmp_path / "view", fields),
                       (fields, tmp_path / "alias")):
        assert _analyze(smoke_run, tiny_run, given, "--out", out, *args) == 2
        assert "holds input images" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in fields.iterdir()} == before  # nothing replaced, nothing added


def test_analyze_checks_per_field_outputs_before_analysing(smoke_run, tiny_run, tmp_path, capsys, monkeypatch):
    """An interrupted run's per-field files: the rerun is refused at once, not after analysing the slide."""
    import smearpipe.pipeline as pipeline

    out = tmp_path / "out"
    out.mkdir()
    (out / "BloodImage_00135.json").write_text("{}")  # left by an earlier run that did not finish
    monkeypatch.setattr(pipeline, "load_pipeline", lambda **k: pytest.fail("nothing may be loaded or analysed"))
    assert _analyze(smoke_run, tiny_run, FIELD, SAMPLES / "BloodImage_00135.jpg", "--out", out) == 2
    assert "BloodImage_00135.json exists" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["BloodImage_00135.json"]


def test_analyze_with_no_readable_field_writes_nothing(smoke_run, tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = tmp_path / "out"
    assert _analyze(smoke_run, tiny_run, bad, "--out", out) == 2
    assert "nothing written" in capsys.readouterr().err
    assert not out.exists()  # no summary of zero fields to block the corrected command
    shutil.copy(FIELD, bad)
    assert _analyze(smoke_run, tiny_run, bad, "--out", out) == 0


def test_analyze_counts_a_file_given_twice_once(smoke_run, tiny_run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(FIELD, folder / "a.jpg")
    shutil.copy(SAMPLES / "BloodImage_00135.jpg", folder / "b.jpg")
    out = tmp_path / "out"
    assert _analyze(smoke_run, tiny_run, folder / "a.jpg", folder, "--out", out) == 0
    assert "same file" in capsys.readouterr().err
    payload = json.loads((out / "slide_summary.json").read_text())
    assert payload["summary"]["fields"] == 2 and payload["outputs"] == ["a", "b"]


def test_a_broken_link_in_a_folder_is_an_error_not_skipped(smoke_run, tiny_run, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(FIELD, folder / "a.jpg")
    (folder / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    assert _analyze(smoke_run, tiny_run, folder, "--out", tmp_path / "out") == 1
    assert "gone.jpg" in capsys.readouterr().err
    assert cli_main(["classify", str(folder), "--out", str(tmp_path / "t.csv"), "--classifier", str(tiny_run.weights)]) == 1
    assert "gone.jpg" in (tmp_path / "t.csv").read_text()


def test_analyze_refuses_an_empty_out(smoke_run, tiny_run, capsys):
    assert _analyze(smoke_run, tiny_run, FIELD, "--out", "") == 2
    assert "--out is empty" in capsys.readouterr().err


def test_file_names_that_are_not_utf8(smoke_run, tiny_run, tmp_path, capsys):
    """A Latin-1 name (bytes that are not UTF-8) is read and reported escaped, not a crash of the output streams."""
    import os

    folder = tmp_path / "in"
    folder.mkdir()
    odd = folder / os.fsdecode(b"caf\xe9.jpg")
    try:
        shutil.copy(FIELD, odd)
    except OSError:
        pytest.skip("this file system refuses file names that are not UTF-8 (macOS)")
    shutil.copy(SAMPLES / "BloodImage_00135.jpg", folder / "b.jpg")
    table = tmp_path / "t.csv"
    assert cli_main(["classify", str(folder), "--out", str(table), "--classifier", str(tiny_run.weights)]) == 0
    rows = table.read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and any("caf\\udce9.jpg" in r for r in rows)
    import sys

    errors = sys.stdout.errors
    assert _analyze(smoke_run, tiny_run, folder, "--out", tmp_path / "out") == 0
    assert sys.stdout.errors == errors  # the streams as they were, for an in-process caller
    assert "caf\\udce9.jpg" in capsys.readouterr().out
    assert (tmp_path / "out" / odd.with_suffix(".png").name).is_file()


def test_preprocess_overwrite_with_new_settings_leaves_no_image_of_the_old(tmp_path, capsys):
    out = tmp_path / "out"
    second = SAMPLES / "BloodImage_00135.jpg"
    assert cli_main(["preprocess", str(FIELD), str(second), "--steps", "median", "--out", str(out)]) == 0
    assert cli_main(["preprocess", str(FIELD), "--steps", "clahe", "--out", str(out), "--overwrite"]) == 0
    assert "removed 1 images" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["BloodImage_00007_preprocessed.png", "preprocessing.json"]
    assert json.loads((out / "preprocessing.json").read_text())["steps"] == ["clahe"]


def test_preprocess_takes_folders_and_refuses_before_writing(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(FIELD, folder / "a.jpg")
    (folder / "bad.jpg").write_text("not an image")
    out = tmp_path / "out"
    assert cli_main(["preprocess", str(folder), "--steps", "median", "--out", str(out)]) == 1  # bad.jpg reported
    assert sorted(p.name for p in out.iterdir()) == ["a_preprocessed.png", "preprocessing.json"]
    capsys.readouterr()
    assert cli_main(["preprocess", str(folder), "--steps", "median", "--out", str(out)]) == 2  # a_preprocessed.png exists
    err = capsys.readouterr().err
    assert "a_preprocessed.png exists" in err and "--overwrite" in err and "overwrite=True" not in err
    assert cli_main(["preprocess", str(folder), "--steps", "median", "--out", str(folder)]) == 2
    assert "holds input images" in capsys.readouterr().err
    assert cli_main(["preprocess", str(folder / "bad.jpg"), "--steps", "median", "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()  # nothing preprocessed: no folder holding only a record


def test_analyze_warnings_name_their_field(tmp_path, capsys):
    """The shipped pipeline warns about a field whose red cells read implausibly; the CLI says which field."""
    from smearpipe.io import write_image

    noise = tmp_path / "noise.png"  # random noise: read as red cells 8.6x too small, and no red cell boxed
    write_image(noise, np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    assert cli_main(["analyze", str(FIELD), str(noise), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {noise}: red cells measured" in err
    assert f"warning: {FIELD}" not in err
    # kept with the results: the field JSON lists its warnings, as analyze_smear gave them
    measured, no_red = json.loads((tmp_path / "out" / "noise.json").read_text())["warnings"]
    assert measured.startswith("red cells measured ") and no_red.startswith(f"{noise}: no red cells found")
    assert json.loads((tmp_path / "out" / f"{FIELD.stem}.json").read_text())["warnings"] == []


def test_analyze_a_slide_warning_names_no_field(tmp_path, capsys):
    """The slide's ruler is measured while the first field is read: its warning is the slide's, not that field's."""
    from smearpipe.io import write_image

    for name in ("a.png", "b.png"):  # blank glass: no red cell to measure on either
        write_image(tmp_path / name, np.full((480, 640, 3), (235, 225, 230), np.uint8))
    assert cli_main(["analyze", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--rescale", "--out",
                     str(tmp_path / "out"), "--quiet"]) == 2  # nor on each alone: no field analysed
    err = capsys.readouterr().err
    assert "warning: slide: no red cells measurable on the first 2 fields" in err
    assert f"warning: {tmp_path / 'a.png'}" not in err
    assert cli_main(["analyze", str(tmp_path / "a.png"), str(FIELD), "--rescale", "--out", str(tmp_path / "out2"),
                     "--quiet"]) == 0  # the sample field gives the slide's ruler, the blank one is seen at it
    capsys.readouterr()
    summary = json.loads((tmp_path / "out2" / "slide_summary.json").read_text())
    assert summary["warnings"] == []  # no slide warning: a field had red cells


def test_analyze_with_a_detector_file_without_a_record(smoke_run, tiny_run, tmp_path, capsys):
    bare = tmp_path / "mydet.pt"
    shutil.copy(smoke_run.weights, bare)
    args = ["analyze", str(FIELD), "--detector", str(bare), "--classifier", str(tiny_run.weights), "--quiet",
            "--no-rescale", "--conf", "0.01"]
    assert cli_main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "--detector-preprocess" in capsys.readouterr().err  # the CLI's way, not only the API's
    assert cli_main([*args, "--out", str(tmp_path / "b"), "--detector-preprocess", ""]) == 0
    assert json.loads((tmp_path / "b" / "slide_summary.json").read_text())["models"]["detector"]["name"] == "mydet"


def test_version(capsys):
    from smearpipe import __version__

    with pytest.raises(SystemExit) as exit_:
        cli_main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"smearpipe {__version__}"


def test_outputs_replace_a_link_never_write_through_it(smoke_run, tiny_run, tmp_path):
    """A link in --out named like an output is replaced by the output; the file it pointed to stays as it was."""
    keep = tmp_path / "precious.png"
    keep.write_bytes(b"mine")
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{FIELD.stem}.png").symlink_to(keep)
    assert _analyze(smoke_run, tiny_run, FIELD, "--out", out, "--overwrite") == 0
    assert keep.read_bytes() == b"mine" and not (out / f"{FIELD.stem}.png").is_symlink()


def test_output_names_differ_in_more_than_case(smoke_run, tiny_run, tmp_path):
    """Cell.jpg and cell.jpg, or a field called Slide_Summary.jpg, would share a file on macOS and Windows."""
    for folder, name in (("a", "Cell.jpg"), ("b", "cell.jpg"), ("c", "Slide_Summary.jpg")):
        (tmp_path / folder).mkdir()
        shutil.copy(FIELD, tmp_path / folder / name)
    out = tmp_path / "out"
    assert _analyze(smoke_run, tiny_run, tmp_path / "a", tmp_path / "b", tmp_path / "c", "--out", out) == 0
    assert json.loads((out / "slide_summary.json").read_text())["outputs"] == ["Cell", "cell_2", "Slide_Summary_2"]


def test_classify_types_a_crop_given_twice_once(tiny_run, tmp_path, capsys):
    folder = tmp_path / "crops"
    folder.mkdir()
    shutil.copy(FIELD, folder / "a.jpg")
    table = tmp_path / "t.csv"
    assert cli_main(["classify", str(folder / "a.jpg"), str(folder), "--out", str(table), "--classifier",
                     str(tiny_run.weights)]) == 0
    assert "same file" in capsys.readouterr().err
    assert len(table.read_text().splitlines()) == 2  # header + one row


def test_a_warning_about_the_models_is_printed_as_a_warning(smoke_run, tiny_run, tmp_path, capsys):
    """The smoke detector boxed too few red cells to record its box ruler: the warning says which entry and why."""
    reason = json.loads(smoke_run.record.read_text())["rbc_box_missing"]
    assert cli_main(["analyze", str(FIELD), "--detector", str(smoke_run.weights), "--classifier", str(tiny_run.weights),
                     "--conf", "0.01", "--quiet", "--out", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"warning: detector 'smoke' records no rbc_box_px ({reason}): rescale='auto'" in err
    assert "UserWarning" not in err and "train_long_side_px" not in err


def test_extract_crops(tmp_path, capsys):
    voc = tmp_path / "voc"
    for sub in ("Annotations", "JPEGImages"):
        (voc / sub).mkdir(parents=True)
    for xml in SAMPLES.glob("*.xml"):
        shutil.copy(xml, voc / "Annotations")
        shutil.copy(xml.with_suffix(".jpg"), voc / "JPEGImages")
    assert cli_main(["extract-crops", str(voc), "--all", "--out", str(tmp_path / "none")]) == 2
    assert "no crop could be cut from 6 fields" in capsys.readouterr().err  # boxes say only WBC, and no labels file
    assert not (tmp_path / "none").exists()
    assert cli_main(["extract-crops", str(voc), "--all", "--labels", str(SAMPLES / "labels.csv"), "--scale", "1.75",
                     "--out", str(tmp_path / "crops")]) == 0
    assert "6 crops in" in capsys.readouterr().out
    assert len(list((tmp_path / "crops" / "neutrophil").glob("*.png"))) == 4
    assert cli_main(["extract-crops", str(voc), "--split", "train", "--out", str(tmp_path / "x")]) == 2
    assert "VOC folder not found" in capsys.readouterr().err  # no ImageSets/Main: no splits
