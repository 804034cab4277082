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
