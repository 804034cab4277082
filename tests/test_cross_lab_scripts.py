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
    smooth = np.clip(np.cumsum(rng.integers(-3, 4, (2, 96, 96, 3)), axis=2) + 128, 0, 255).astype(np.uint8)
    blobs = [sweep._encode_jpeg(x) for x in smooth]
    offsets = np.cumsum([0] + [len(b) for b in blobs])
    back = sweep._decode_jpegs(np.frombuffer(b"".join(blobs), np.uint8), offsets)
    assert back.shape == smooth.shape and back.dtype == np.uint8
    assert np.abs(back.astype(int) - smooth).mean() < 3  # quality 95, full-resolution colour
    # RGB order kept: a red crop comes back red
    red = np.zeros((96, 96, 3), np.uint8)
    red[..., 0] = 200
    blob = sweep._encode_jpeg(red)
    out = sweep._decode_jpegs(np.frombuffer(blob, np.uint8), np.array([0, len(blob)]))
    assert out[0, ..., 0].mean() > 190 and out[0, ..., 2].mean() < 10


def test_recipe_sweep_summary_applies_the_rule(tmp_path):
    sweep = _script("recipe_sweep")
    y_val, y_dev = np.arange(20) % 5, np.arange(10) % 5
    np.savez_compressed(tmp_path / "eval.npz", pbc_val_y=y_val, bccd_dev_y=y_dev)

    def proba(y, wrong):  # one-hot answers, the first ``wrong`` of them shifted to the next class
        pred = y.copy()
        pred[:wrong] = (pred[:wrong] + 1) % 5
        return np.eye(5)[pred].tolist()

    def run(name, seed, val_wrong, dev_wrong, epochs=14):
        scores = {}
        for key, y, wrong in (("pbc_val", y_val, val_wrong), ("bccd_dev", y_dev, dev_wrong)):
            for tag in ("plain", "sharpen"):
                scores[f"{key}_{tag}"] = {"correct": len(y) - wrong, "n": len(y), "macro_f1": 0.0,
                                          "proba": proba(y, wrong)}
        return {"name": f"{name}-s{seed}", "seed": seed, "best_epoch": epochs, "epochs_run": epochs, "scores": scores}

    runs = [run("ctrl", 1, 6, 8), run("ctrl", 2, 8, 8),      # control: val 13, dev 2 correct on average
            run("better", 1, 3, 8), run("better", 2, 4, 9),  # 3.5 fewer val errors, dev -0.5: towards #4
            run("worse", 1, 7, 9), run("worse", 2, 7, 9)]
    call = tmp_path / "call.json"
    call.write_text(json.dumps({"runs": runs, "failed": {}, "not_started": []}))
    out = tmp_path / "out"
    out.mkdir()
    sweep.summarize([call], tmp_path, out)
    arms = json.loads((out / "summary.json").read_text())["arms"]
    assert arms["ctrl"]["pbc_val_plain"]["mean"] == 13 and arms["better"]["pbc_val_plain"]["vs_ctrl"] == 3.5
    assert arms["better"]["rule"] == {"towards_4": True, "towards_6": False}
    assert arms["worse"]["rule"] == {"towards_4": False, "towards_6": False}
    assert arms["ctrl"]["mean_probability_ensemble"]["pbc_val_plain"] == 14  # 6 of 20 wrong in both seeds
    saved = np.load(out / "probabilities.npz")
    assert saved["ctrl-s1/pbc_val_plain"].shape == (20, 5)
    assert "proba" not in json.dumps(json.loads((out / "sweep_call1.json").read_text()))
