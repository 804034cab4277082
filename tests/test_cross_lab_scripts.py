"""Pure-numpy parts of the cross-lab experiment scripts (no network, no dataset)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys

import numpy as np
import pytest

from .conftest import REPO


def _script(name: str):
    sys.path.insert(0, str(REPO / "scripts"))  # the scripts import their sibling cross_lab_protocol
    try:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return module


def test_information_maximisation_objective():
    im = _script("colour_offset_calibration").im_objective
    k = 5
    confident_and_diverse = np.eye(k)[np.arange(20) % k]  # each crop sure, all classes used: the minimum
    assert im(confident_and_diverse) == pytest.approx(-math.log(k))
    collapsed = np.eye(k)[np.zeros(20, int)]  # each crop sure, all the same class: no reward
    assert im(collapsed) == pytest.approx(0.0, abs=1e-9)
    unsure = np.full((20, k), 1 / k)
    assert im(unsure) == pytest.approx(0.0, abs=1e-9)
    mixed = 0.5 * confident_and_diverse + 0.5 * unsure
    assert -math.log(k) < im(mixed) < 0


def _run(folder, rows):
    (folder / "bccd_all_crops").mkdir(parents=True)
    with (folder / "bccd_all_crops" / "predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "pred"])
        w.writerows(rows)
    score = {"n": len(rows), "accuracy": float(np.mean([t == p for _, t, p in rows])), "macro_f1": 0.5}
    (folder / "summary.json").write_text(json.dumps({
        "classifier": {"name": folder.name, "sha256": "0" * 64}, "bccd_all_crops": score,
        "bccd_by_field_split": {"dev": score, "test": score}, "pbc_test": score}))
    return folder


def test_seed_spread_counts_shared_errors(tmp_path, monkeypatch):
    script = _script("seed_spread")
    crops = [f"/data/{c}/BloodImage_{i:05d}_1.jpg" for i, c in enumerate(["Eosinophil"] * 3 + ["Neutrophil"] * 3)]
    truth = ["eosinophil"] * 3 + ["neutrophil"] * 3
    a = _run(tmp_path / "a", list(zip(crops, truth, ["neutrophil", "neutrophil", "eosinophil",
                                                     "neutrophil", "monocyte", "neutrophil"], strict=True)))
    # b: the same crops read from elsewhere, so only class folder and file name match
    b = _run(tmp_path / "b", list(zip([c.replace("/data/", "/other/place/") for c in crops], truth,
                                      ["neutrophil", "eosinophil", "eosinophil", "neutrophil", "lymphocyte", "eosinophil"], strict=True)))
    out = tmp_path / "reports" / "spread.json"
    monkeypatch.setattr(sys, "argv", ["seed_spread.py", str(a), str(b), "--out", str(out)])
    script.main()
    got = json.loads(out.read_text())
    assert got["bccd_crops"] == 6 and got["typed_differently"] == 3
    assert got["errors"] == {"run_a": 3, "run_b": 3, "both": 2, "only_a": 1, "only_b": 1}
    assert got["errors_of_both_runs"] == {"eosinophil called neutrophil": 1, "neutrophil, each run wrong differently": 1}
    assert [r["classifier"] for r in got["runs"]] == ["a", "b"]
    with pytest.raises(SystemExit, match="exists"):  # never silently replaced
        script.main()

    relabelled = _run(tmp_path / "c", list(zip(crops, ["neutrophil"] + truth[1:], truth, strict=True)))
    monkeypatch.setattr(sys, "argv", ["seed_spread.py", str(a), str(relabelled), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="1 crops carry different labels"):
        script.main()
    fewer = _run(tmp_path / "d", list(zip(crops[:5], truth[:5], truth[:5], strict=True)))
    monkeypatch.setattr(sys, "argv", ["seed_spread.py", str(a), str(fewer), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="1 only in the first"):
        script.main()
    assert not (tmp_path / "x.json").exists()


def test_error_gallery_of_shared_errors(tmp_path, monkeypatch):
    import cv2

    script = _script("error_gallery")
    paths = []
    for i, cls in enumerate(["Eosinophil", "Eosinophil", "Neutrophil"]):
        (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
        paths.append(tmp_path / "data" / cls / f"BloodImage_{i:05d}_1.jpg")
        cv2.imwrite(str(paths[-1]), np.full((50, 60, 3), 40 * i, np.uint8))

    def predictions(name, preds):
        csv_path = tmp_path / f"{name}.csv"
        with csv_path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "true", "pred", "p_eosinophil", "p_neutrophil", "p_monocyte"])
            for p, true, pred in zip(paths, ["eosinophil", "eosinophil", "neutrophil"], preds, strict=True):
                w.writerow([p, true, pred, 0.2, 0.7 if pred == "neutrophil" else 0.1, 0.7 if pred == "monocyte" else 0.1])
        return csv_path

    a = predictions("a", ["neutrophil", "neutrophil", "monocyte"])
    b = predictions("b", ["neutrophil", "monocyte", "monocyte"])  # shares the first and the third mistake
    out = tmp_path / "g" / "shared.png"
    monkeypatch.setattr(sys, "argv", ["error_gallery.py", str(a), str(out), "--shared-with", str(b)])
    script.main()
    with out.with_suffix(".csv").open() as f:
        shown = [(r["row"], r["true"], r["pred"], r["crop"]) for r in csv.DictReader(f)]
    assert sorted(shown) == [("1", "eosinophil", "neutrophil", "Eosinophil/BloodImage_00000_1.jpg"),
                             ("2", "neutrophil", "monocyte", "Neutrophil/BloodImage_00002_1.jpg")]
    assert cv2.imread(str(out)).shape[0] == 2 * script.TILE  # one row per confusion
    with pytest.raises(SystemExit, match="exists"):  # never silently replaced
        script.main()
    monkeypatch.setattr(sys, "argv", ["error_gallery.py", str(a), str(out), "--shared-with", str(a), "--overwrite"])
    script.main()  # with itself: every mistake is shared
    with out.with_suffix(".csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3
    c = predictions("c", ["eosinophil", "neutrophil", "neutrophil"])  # one right answer per true class
    chosen = tmp_path / "g" / "chosen.png"
    monkeypatch.setattr(sys, "argv", ["error_gallery.py", str(c), str(chosen), "--group", "eosinophil:neutrophil",
                                      "--group", "eosinophil:eosinophil"])
    script.main()  # rows as asked, right answers included, in the order given
    with chosen.with_suffix(".csv").open() as f:
        assert [(r["row"], r["true"], r["pred"]) for r in csv.DictReader(f)] == [
            ("1", "eosinophil", "neutrophil"), ("2", "eosinophil", "eosinophil")]
    for group, message in (("eosinophil", "expected TRUE:PRED"), ("basophil:basophil", "no such crops")):
        monkeypatch.setattr(sys, "argv", ["error_gallery.py", str(c), str(chosen), "--group", group, "--overwrite"])
        with pytest.raises(SystemExit, match=message):
            script.main()


def test_red_cell_shift_moves_only_the_colour():
    import cv2

    from smearpipe.preprocess import Preprocessing, reinhard_normalize

    script = _script("red_cell_shift")
    ref = Preprocessing(steps=("reinhard",)).resolved().reinhard_reference
    rng = np.random.default_rng(0)
    crop = cv2.GaussianBlur(rng.integers(60, 220, (64, 64, 3), dtype=np.uint8), (5, 5), 0)
    assert np.array_equal(script.reinhard_shifted(crop, ref, np.zeros(2)), reinhard_normalize(crop, reference=ref))

    def lab_mean(rgb):
        return cv2.cvtColor(rgb.astype(np.float32) / 255, cv2.COLOR_RGB2LAB).reshape(-1, 3).mean(axis=0)

    moved = lab_mean(script.reinhard_shifted(crop, ref, np.array([4.0, -6.0]))) - lab_mean(reinhard_normalize(crop, reference=ref))
    np.testing.assert_allclose(moved, [0.0, 4.0, -6.0], atol=1.0)  # uint8 rounding and gamut clipping aside
    assert script.red_cell_lab(np.full((80, 80, 3), 235, np.uint8)) is None  # glass only: no red cells, no shift


def test_scale_up_window_keeps_boxes_mostly_inside():
    mod = _script("eval_scale_up")
    w, h = mod.WINDOW
    # enlarged 2x and shifted by (100, 50): a box well inside is scaled and shifted
    assert mod.in_window((100, 50, 150, 100), 2.0, 100, 50) == pytest.approx((100, 50, 200, 150))
    # cut by the window's left edge: 80 % inside -> clipped and kept; 40 % inside -> dropped
    assert mod.in_window((40, 100, 90, 150), 2.0, 100, 50) == pytest.approx((0, 150, 80, 250))
    assert mod.in_window((40, 100, 90, 150), 2.0, 140, 50) is None
    # exactly half inside is kept (the rule is "at least half"), beyond the far corner nothing is
    assert mod.in_window((150, 0, 170, 10), 2.0, 320, 0) == pytest.approx((0, 0, 20, 20))
    assert mod.in_window((w, h, w + 10, h + 10), 1.5, 0, 0) is None
    assert mod.in_window((10, 10, 10, 20), 2.0, 0, 0) is None  # no area
    assert mod.pct_error(90, 100) == pytest.approx(-10.0)
    assert mod.pct_error(3, 0) is None  # nothing to count: no percentage, not inf in the JSON


def test_recipe_sweep_pack_jpeg_round_trip():
    sweep = _script("recipe_sweep")
    rng = np.random.default_rng(0)
    steps = rng.integers(-2, 3, (2, 96, 96, 3))
    smooth = np.clip(steps.cumsum(axis=1).cumsum(axis=2) // 8 + 128, 0, 255).astype(np.uint8)  # smooth both ways
    blobs = [sweep._encode_jpeg(x) for x in smooth]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    back = sweep._decode_jpegs(np.frombuffer(b"".join(blobs), np.uint8), offsets)
    assert back.shape == smooth.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - smooth).mean() < 3  # quality 95, full-resolution colour
    # colour at full resolution: a one-pixel-wide red/blue stripe pattern keeps its colours (4:2:0 would grey them)
    stripes = np.zeros((96, 96, 3), np.uint8)
    stripes[:, 0::2, 0] = 220
    stripes[:, 1::2, 2] = 220
    blob = sweep._encode_jpeg(stripes)
    out = sweep._decode_jpegs(np.frombuffer(blob, np.uint8), np.array([0, len(blob)]))[0].astype(int)
    assert (out[:, 0::2, 0] - out[:, 0::2, 2]).mean() > 100 and (out[:, 1::2, 2] - out[:, 1::2, 0]).mean() > 100


def _sweep_run(name, seed, call_wrong, y_val, y_dev, epochs=14, planned=14):
    """A sweep run whose answers miss the first ``n`` val / dev crops (moved to the next class, no ties)."""
    val_wrong, dev_wrong = call_wrong
    scores = {}
    for key, y, wrong in (("pbc_val", y_val, val_wrong), ("bccd_dev", y_dev, dev_wrong)):
        for tag in ("plain", "sharpen"):
            # the columns the rule does not read miss 5 crops in every run: a rule reading them sees no change
            n = 5 if (key, tag) in (("pbc_val", "sharpen"), ("bccd_dev", "plain")) else wrong
            pred = y.copy()
            pred[:n] = (pred[:n] + 1) % 5
            p = np.full((len(y), 5), 0.05)
            p[np.arange(len(y)), pred] = 0.8 - 0.01 * seed  # seeds differ a little: averages have no ties
            scores[f"{key}_{tag}"] = {"correct": int((pred == y).sum()), "n": len(y), "macro_f1": 0.0,
                                      "proba": p.tolist()}
    return {"name": f"{name}-s{seed}", "seed": seed, "best_epoch": epochs, "epochs_run": epochs,
            "epochs_planned": planned, "overrides": {}, "scores": scores}


@pytest.mark.parametrize(("val_gain", "dev_gain", "rule"), [
    (3, -4, {"towards_4": True, "towards_6": False}),   # both edges of condition 1
    (4, -5, {"towards_4": False, "towards_6": False}),  # dev fell too far
    (-1, 8, {"towards_4": False, "towards_6": True}),   # both edges of condition 2
    (-2, 8, {"towards_4": False, "towards_6": False}),  # val fell too far
    (2, 7, {"towards_4": False, "towards_6": False}),
])
def test_recipe_sweep_summary_applies_the_rule(tmp_path, val_gain, dev_gain, rule):
    sweep = _script("recipe_sweep")
    y_val, y_dev = np.arange(40) % 5, np.arange(40) % 5
    np.savez_compressed(tmp_path / "eval.npz", pbc_val_y=y_val, bccd_dev_y=y_dev)
    ctrl = [(10, 20), (12, 20)]  # (val, dev) errors of the control's two seeds: mean 11 and 20
    arm = [(11 - val_gain, 20 - dev_gain)] * 2
    call = tmp_path / "call.json"
    call.write_text(json.dumps({"runs": [_sweep_run("ctrl", s, w, y_val, y_dev) for s, w in zip((1, 2), ctrl, strict=True)]
                                + [_sweep_run("arm", s, w, y_val, y_dev) for s, w in zip((1, 2), arm, strict=True)]}))
    out = tmp_path / "out"
    out.mkdir()
    summary = sweep.summarize([call], tmp_path, out)
    row = summary["arms"]["arm"]
    assert row["pbc_val_plain"]["vs_ctrl"] == val_gain and row["bccd_dev_sharpen"]["vs_ctrl"] == dev_gain
    assert row["rule"] == rule
    assert json.loads((out / "summary.json").read_text())["arms"]["arm"]["rule"] == rule


def test_recipe_sweep_summary_compares_within_calls_and_counts_hard_images(tmp_path):
    sweep = _script("recipe_sweep")
    y = np.arange(20) % 5
    np.savez_compressed(tmp_path / "eval.npz", pbc_val_y=y, bccd_dev_y=y)
    first = tmp_path / "call1.json"
    first.write_text(json.dumps({"runs": [_sweep_run("ctrl", 1, (4, 0), y, y), _sweep_run("arm", 1, (2, 0), y, y),
                                          _sweep_run("cut", 1, (0, 0), y, y, epochs=9, planned=24)]}))
    second = tmp_path / "call2.json"  # a later call: more control seeds, which call 1's arms are not compared with
    second.write_text(json.dumps({"runs": [_sweep_run("ctrl", 2, (10, 0), y, y)]}))
    out = tmp_path / "out"
    out.mkdir()
    summary = sweep.summarize([first, second], tmp_path, out, val_names=[f"img{i}" for i in range(20)])
    arm = summary["arms"]["arm"]
    assert arm["control_seeds_compared"] == [1] and arm["pbc_val_plain"]["vs_ctrl"] == 2
    assert summary["arms"]["ctrl"]["pbc_val_plain"]["mean"] == 13  # (16 + 10) / 2, both calls
    assert summary["arms"]["cut"]["complete_runs"] == 0 and len(summary["arms"]["cut"]["stopped_early"]) == 1
    hard = summary["hard_images"]["pbc_val_plain"]
    assert hard["runs"] == 3  # the cut run is left out
    assert hard["wrong_in_every_run"] == 2 and hard["wrong_in_half_or_more"] == 4 and hard["errors_per_run"] == [2, 10]
    assert [h["image"] for h in hard["half_or_more"]] == ["img0", "img1", "img2", "img3"]
    assert hard["half_or_more"][0]["most_given"] == 1  # class 0 moved to the next class
    assert summary["arms"]["ctrl"]["mean_probability_ensemble"]["pbc_val_plain"] == 20 - 4  # seed 1 is surer
    saved = np.load(out / "probabilities.npz")
    assert saved["ctrl-s1/pbc_val_plain"].shape == (20, 5)
    assert "proba" not in (out / "sweep_call1.json").read_text()
    with pytest.raises(ValueError, match="also in an earlier call"):
        sweep.summarize([first, first], tmp_path, out)


def test_field_shift_panel_changes_the_stain_and_not_the_glass():
    script = _script("eval_field_shift_panel")
    rng = np.random.default_rng(0)
    field = np.full((60, 80, 3), (225, 232, 218), np.uint8)  # BCCD's greenish-white glass
    field[20:40, 20:40] = (95, 70, 170)  # a violet nucleus
    field[5:15, 50:70] = (200, 140, 150)  # a red cell
    field = np.clip(field + rng.integers(-2, 3, field.shape), 0, 255).astype(np.uint8)
    assert np.array_equal(script.hed_shift(1.0, 1.0)(field), field)  # no shift: the same image, glass included
    stronger = script.hed_shift(1.5, 1.0)(field)
    glass = (slice(45, 60), slice(0, 15))
    assert np.abs(stronger[glass].astype(int) - field[glass]).max() <= 3  # the lamp is not stained
    assert stronger[20:40, 20:40].mean() < field[20:40, 20:40].mean() - 10  # the nucleus takes more haematoxylin
