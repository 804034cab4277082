from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from smearpipe.detect import Detection, Detector
from smearpipe.errors import DatasetError, WeightsError
from smearpipe.evaluate import evaluate_detector
from smearpipe.io import read_image
from smearpipe.train import load_data_yaml, train_detector

from .conftest import SAMPLES


def test_smoke_training_writes_weights_and_record(smoke_run):
    assert smoke_run.weights.is_file() and smoke_run.record.is_file()
    rec = json.loads(smoke_run.record.read_text())
    assert rec["kind"] == "detector" and rec["classes"] == ["WBC", "RBC", "Platelets"]
    assert rec["input_size"] == 96 and rec["preprocessing"]["steps"] == []
    assert rec["training"]["stats"]["train"]["images"] == 4
    assert len(rec["sha256"]) == 64
    # the training scale, for rescaling: BCCD fields are 640 px wide, their red cells ~88 px by the image ruler
    assert rec["train_long_side_px"] == 640 and 60 < rec["rbc_diameter_px"] < 120
    assert "4 training fields" in rec["scale_note"]
    # the box ruler: measured, or left out with the reason (a one-epoch detector finds few red cells)
    assert ("rbc_box_px" in rec) != ("rbc_box_missing" in rec)


def test_training_scale_records_only_what_it_can_measure(tiny_data, monkeypatch):
    from smearpipe import train

    class Finds:
        def __init__(self, n):
            self.n = n

        def predict(self, image):
            return [Detection((20.0 + 60 * k, 20.0, 70.0 + 60 * k, 70.0), "RBC", 0.9) for k in range(self.n)]

    cfg = load_data_yaml(tiny_data)
    monkeypatch.setattr(Detector, "load", lambda *args, **kwargs: Finds(3))
    out = train._training_scale(Path("detector.pt"), cfg)
    assert out["rbc_box_px"] == 50.0 and out["train_long_side_px"] == 640 and 60 < out["rbc_diameter_px"] < 120
    assert "4 training fields" in out["scale_note"] and "rbc_box_missing" not in out
    monkeypatch.setattr(Detector, "load", lambda *args, **kwargs: Finds(2))  # too few boxes on every field
    out = train._training_scale(Path("detector.pt"), cfg)
    assert "rbc_box_px" not in out and "only 0 of 4 fields" in out["rbc_box_missing"]


def test_second_run_gets_new_folder(tiny_data, smoke_run):
    again = train_detector(tiny_data, model="yolov8n.yaml", epochs=1, imgsz=64, batch=2,
                           out_dir=smoke_run.run_dir.parent, name="smoke")
    assert again.run_dir.name == "smoke-2"
    assert smoke_run.weights.is_file()  # the first run is untouched


def test_load_and_predict(smoke_run):
    det = Detector.load(smoke_run.weights)
    assert det.record.sha256 == json.loads(smoke_run.record.read_text())["sha256"]
    img = read_image(SAMPLES / "BloodImage_00007.jpg")
    cells = det.predict(img, conf=0.001)
    assert isinstance(cells, list) and len(cells) > 0  # an untrained model still emits low-score boxes
    for c in cells:
        assert isinstance(c, Detection) and c.label in {"WBC", "RBC", "Platelets"}
        x1, y1, x2, y2 = c.box
        assert 0 <= x1 <= x2 <= 640 and 0 <= y1 <= y2 <= 480 and 0 <= c.score <= 1
    assert [c.score for c in cells] == sorted((c.score for c in cells), reverse=True)
    assert len(det.predict(img, conf=0.5)) <= len(cells)
    by_path = det.predict(SAMPLES / "BloodImage_00007.jpg", conf=0.001)
    assert len(by_path) == len(cells)
    with pytest.raises(ValueError):
        det.predict(img, conf=2.0)


def test_tampered_weights_refused(smoke_run, tmp_path):
    shutil.copy(smoke_run.weights, tmp_path / "detector.pt")
    rec = json.loads(smoke_run.record.read_text())
    (tmp_path / "detector.json").write_text(json.dumps(rec))
    Detector.load(tmp_path / "detector.pt")  # intact copy loads
    with open(tmp_path / "detector.pt", "ab") as f:
        f.write(b"\0")
    with pytest.raises(WeightsError, match="sha256"):
        Detector.load(tmp_path / "detector.pt")


def test_unknown_and_missing_weights():
    with pytest.raises(WeightsError, match="unknown detector weights"):
        Detector.load("no-such-detector")
    with pytest.raises(WeightsError, match="not found"):
        Detector.load("/nonexistent/dir/model.pt")


def test_garbage_pt_file(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a checkpoint")
    from smearpipe.preprocess import Preprocessing

    with pytest.raises(WeightsError, match="cannot load"):
        Detector.load(bad, preprocessing=Preprocessing())


def test_evaluate_writes_metrics_and_figures(smoke_run, tiny_data, tmp_path):
    m = evaluate_detector(tiny_data, detector=smoke_run.weights, split="val", out_dir=tmp_path / "ev")
    assert 0.0 <= m["map50"] <= 1.0 and 0.0 <= m["map50_95"] <= m["map50"] + 1e-9
    assert set(m["counting"]) == {"WBC", "RBC", "Platelets"}
    assert m["counting"]["WBC"]["total_true"] == 2
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "counts.csv").is_file()
    assert any("PR_curve" in f or "BoxPR" in f for f in m["figures"]), m["figures"]
    assert any("confusion_matrix" in f for f in m["figures"]), m["figures"]
    with pytest.raises(FileExistsError):
        evaluate_detector(tiny_data, detector=smoke_run.weights, split="val", out_dir=tmp_path / "ev")


def test_bad_training_inputs(tiny_data, tmp_path):
    with pytest.raises(DatasetError, match="data YAML not found"):
        train_detector(tmp_path / "missing.yaml", epochs=1)
    # unknown class name
    text = tiny_data.read_text().replace("Platelets", "Megakaryocyte")
    (tmp_path / "unknown.yaml").write_text(text)
    with pytest.raises(DatasetError, match="Megakaryocyte"):
        load_data_yaml(tmp_path / "unknown.yaml")
    # pretrained weights are never downloaded
    with pytest.raises(WeightsError, match="not downloaded"):
        train_detector(tiny_data, model="yolov8n.pt", epochs=1, out_dir=tmp_path / "r")
    with pytest.raises(DatasetError, match="cannot resume"):
        train_detector(tiny_data, epochs=1, out_dir=tmp_path / "r", name="never", resume=True)
    with pytest.raises(ValueError, match="multiple of 32.*128 is the size it would train at"):
        train_detector(tiny_data, epochs=1, imgsz=100, out_dir=tmp_path / "r")
    lists = tmp_path / "lists.yaml"
    lists.write_text(tiny_data.read_text().replace("train: images/train", "train: [images/train]"))
    with pytest.raises(DatasetError, match="one images folder per split"):
        load_data_yaml(lists)

def test_a_detector_run_that_fails_before_its_first_checkpoint_leaves_no_folder(tiny_data, tmp_path, monkeypatch):
    import smearpipe.detect

    def fail():
        assert (tmp_path / "r" / "train" / "run_config.json").is_file()  # the folder was made and in use
        raise RuntimeError("ultralytics failed")

    monkeypatch.setattr(smearpipe.detect, "import_ultralytics", fail)
    with pytest.raises(RuntimeError, match="ultralytics failed"):
        train_detector(tiny_data, epochs=1, imgsz=64, batch=2, out_dir=tmp_path / "r")
    assert list((tmp_path / "r").iterdir()) == []


def test_a_finished_detector_run_is_not_resumed(smoke_run, tiny_data, tmp_path, monkeypatch):
    """ultralytics would start a new run with its own defaults (COCO, downloaded) in its own folder."""
    monkeypatch.chdir(tmp_path)
    same = dict(model="yolov8n.yaml", epochs=1, imgsz=96, batch=2, out_dir=smoke_run.run_dir.parent, name="smoke",
                resume=True)
    with pytest.raises(DatasetError, match="training finished"):
        train_detector(tiny_data, **same)
    with pytest.raises(ValueError, match=r"\['epochs', 'imgsz'\] \(it was started with epochs=1, imgsz=96\)"):
        train_detector(tiny_data, **{**same, "epochs": 50, "imgsz": 320})
    assert list(tmp_path.iterdir()) == []  # nothing written where the call was made


def test_the_training_clock_of_a_detector_run_counts_every_segment(smoke_run, tmp_path):
    """What a resumed run's record adds as time logged before the resume (train_detector's resume path itself
    needs an interrupted ultralytics run, which no test makes)."""
    from smearpipe.train import _start_train_clock

    run = tmp_path / "run"
    run.mkdir()
    assert _start_train_clock(run) == 0.0  # a new run
    csv_path = run / "results.csv"
    csv_path.write_text("epoch,time,metrics/mAP50(B)\n1,10.0,0.1\n2,30.0,0.2\n")
    assert _start_train_clock(run) == pytest.approx(30.0)  # first resume: the first segment's 30 s
    # the second segment's first epoch (40 s) took longer than the whole first segment: still a new segment
    csv_path.write_text(csv_path.read_text() + "3,40.0,0.3\n4,not a number,0.4\n")
    assert _start_train_clock(run) == pytest.approx(70.0)
    assert _start_train_clock(run) == pytest.approx(70.0)  # resumed again before any new epoch: nothing added
    # a damaged marker (a kill while it was written, a hand edit): warned, read from the time column alone
    csv_path.write_text("epoch,time\n1,10.0\n2,30.0\n3,12.5\n4,25.0\n")
    for damaged in ("", "[]", '{"rows": 2}', '{"rows": -1, "seconds": 5}', '{"rows": 9, "seconds": 5}',
                    '{"rows": 1, "seconds": "x"}', '{"rows": 1, "seconds": NaN}'):
        (run / "train_time.json").write_text(damaged)
        with pytest.warns(UserWarning, match="unreadable"):
            assert _start_train_clock(run) == pytest.approx(55.0)
        assert json.loads((run / "train_time.json").read_text()) == {"seconds": 55.0, "rows": 4}
    # rows logged by an ultralytics resume that bypassed train_detector: its restart is still found
    (run / "train_time.json").write_text('{"rows": 2, "seconds": 30.0}')
    csv_path.write_text(csv_path.read_text() + "5,8.0\n")
    assert _start_train_clock(run) == pytest.approx(30.0 + 25.0 + 8.0)
    # a run from before train_time.json: restarts are where the time column falls back
    (run / "train_time.json").unlink()
    csv_path.write_text("epoch,time\n1,10.0\n2,30.0\n3,12.5\n4,25.0\n")
    assert _start_train_clock(run) == pytest.approx(55.0)
    csv_path.write_text("                  epoch,                   time\n1,4.5\n")  # older, padded header
    (run / "train_time.json").unlink()
    assert _start_train_clock(run) == pytest.approx(4.5)
    # the smoke run: started once, its record's time at least what it logged (plus setup and final validation)
    assert json.loads((smoke_run.run_dir / "train_time.json").read_text()) == {"seconds": 0.0, "rows": 0}
    logged = max(float(r.split(",")[1]) for r in (smoke_run.run_dir / "results.csv").read_text().splitlines()[1:]) / 60
    assert 0 < logged <= json.loads(smoke_run.record.read_text())["training"]["wall_minutes"] + 0.05


def _copy_dataset(tiny_data: Path, dest: Path) -> Path:
    shutil.copytree(tiny_data.parent, dest, symlinks=False)
    yaml_path = dest / "data.yaml"
    yaml_path.write_text(yaml_path.read_text().replace(str(tiny_data.parent.resolve()), str(dest.resolve())))
    return yaml_path


def test_empty_label_files_rejected(tiny_data, tmp_path):
    data = _copy_dataset(tiny_data, tmp_path / "d")
    for f in (tmp_path / "d" / "labels" / "train").glob("*.txt"):
        f.write_text("")
    with pytest.raises(DatasetError, match="train split has no boxes"):
        load_data_yaml(data)


def test_non_image_file_rejected(tiny_data, tmp_path):
    data = _copy_dataset(tiny_data, tmp_path / "d")
    (tmp_path / "d" / "images" / "train" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="non-image file"):
        load_data_yaml(data)
    (tmp_path / "d" / "images" / "train" / "notes.txt").unlink()
    (tmp_path / "d" / "images" / "train" / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="broken.jpg"):
        load_data_yaml(data)


def test_import_smearpipe_does_not_import_ultralytics():
    code = "import sys, smearpipe, smearpipe.detect, smearpipe.preprocess; print('ultralytics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    code = "import sys, smearpipe; smearpipe.SlideResult; print('torch' in sys.modules, 'ultralytics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"  # the package and its results: neither torch nor ultralytics


def test_load_and_predict_with_network_forbidden(smoke_run):
    code = textwrap.dedent(
        f"""
        import socket
        def refuse(*a, **k):
            raise AssertionError("network access attempted: " + repr(a[:2]))
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        from smearpipe.detect import Detector
        det = Detector.load({str(smoke_run.weights)!r})
        cells = det.predict({str(SAMPLES / 'BloodImage_00011.jpg')!r}, conf=0.001)
        print("predicted", len(cells))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].startswith("predicted ")


def test_training_with_preprocessing_and_evaluation(tiny_data, tmp_path):
    from smearpipe.preprocess import Preprocessing

    prep = Preprocessing(steps=("median",), median_ksize=3)
    run = train_detector(tiny_data, epochs=1, imgsz=64, batch=2, out_dir=tmp_path / "r", name="prep", preprocessing=prep)
    det = Detector.load(run.weights)
    assert det.preprocessing == prep.resolved()
    assert (run.run_dir / "data" / "images" / "train").is_dir()  # training saw preprocessed copies
    m = evaluate_detector(tiny_data, detector=det, split="val", out_dir=tmp_path / "ev")
    assert 0.0 <= m["map50"] <= 1.0


def test_unrecorded_checkpoint_needs_explicit_preprocessing(smoke_run):
    from smearpipe.preprocess import Preprocessing

    raw = smoke_run.run_dir / "weights" / "last.pt"
    with pytest.raises(WeightsError, match="detector.pt"):
        Detector.load(raw)
    det = Detector.load(raw, preprocessing=Preprocessing())
    assert det.record.preprocessing == Preprocessing()
    with pytest.raises(ValueError, match="only for weight files without a record"):
        Detector.load(smoke_run.weights, preprocessing=Preprocessing())


def test_reserved_train_args(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="imgsz"):
        train_detector(tiny_data, epochs=1, out_dir=tmp_path, train_args={"imgsz": 320})


def test_predict_batch_needs_a_list(smoke_run):
    det = Detector.load(smoke_run.weights)
    with pytest.raises(TypeError, match="list"):
        det.predict_batch(str(SAMPLES / "BloodImage_00007.jpg"))
    with pytest.raises(TypeError, match="list"):
        det.predict_batch(read_image(SAMPLES / "BloodImage_00007.jpg"))
    assert len(det.predict_batch([SAMPLES / "BloodImage_00007.jpg", SAMPLES / "BloodImage_00011.jpg"], conf=0.001)) == 2


def test_class_order_mismatch_is_refused(smoke_run, tiny_data, tmp_path):
    text = tiny_data.read_text()
    swapped = text.replace("0: WBC", "0: TMP").replace("1: RBC", "1: WBC").replace("0: TMP", "0: RBC")
    (tmp_path / "swapped.yaml").write_text(swapped)
    with pytest.raises(DatasetError, match="class order"):
        evaluate_detector(tmp_path / "swapped.yaml", detector=smoke_run.weights, split="val", out_dir=tmp_path / "ev")


def test_loading_a_detector_keeps_global_settings(smoke_run):
    """ultralytics' import changes print options, cv2 threads, the environment and warning filters, and patches
    PIL.Image.open / torch.save: all are as before once it is imported, and (the filters aside, which torch's
    own lazily imported modules extend) once a detector is loaded and has predicted."""
    code = textwrap.dedent(
        f"""
        import os, warnings, cv2, numpy as np, torch, PIL.Image
        names = ["print", "threads", "torch print", "environ", "Image.open", "save", "load", "imread", "imwrite",
                 "filters"]
        def state():
            env = {{k: v for k, v in os.environ.items() if k != "YOLO_OFFLINE"}}
            return (np.get_printoptions(), cv2.getNumThreads(), torch._tensor_str.PRINT_OPTS.linewidth, env,
                    PIL.Image.open, torch.save, torch.load, cv2.imread, cv2.imwrite, list(warnings.filters))
        def changed(a, b):
            return [n for n, x, y in zip(names[:len(a)], a, b, strict=True) if x != y]
        before = state()
        from smearpipe.detect import Detector, import_ultralytics
        import_ultralytics()
        print(changed(before, state()) or "same")
        Detector.load({str(smoke_run.weights)!r}).predict(np.full((64, 64, 3), 200, np.uint8))
        print(changed(before[:-1], state()[:-1]) or "same")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-2:] == ["same", "same"], out.stdout


def test_suppress_nested_drops_boxes_inside_a_better_box():
    from smearpipe.detect import suppress_nested

    cell = Detection((100.0, 100.0, 200.0, 200.0), "WBC", 0.9)
    lobe = Detection((110.0, 120.0, 150.0, 160.0), "WBC", 0.95)  # scores higher than the whole cell
    neighbour = Detection((190.0, 100.0, 290.0, 200.0), "WBC", 0.8)  # touches the cell: 10 % of its area
    rbc = Detection((120.0, 120.0, 160.0, 160.0), "RBC", 0.7)  # other labels are never touched
    out = suppress_nested([cell, lobe, neighbour, rbc])
    # the higher-scoring lobe is kept and the cell around it dropped: the rule is by score, not size
    assert out == [lobe, neighbour, rbc]
    assert suppress_nested([cell, neighbour, rbc]) == [cell, neighbour, rbc]
    assert suppress_nested([cell, lobe], max_overlap=1.0) == [cell, lobe]
    assert suppress_nested([cell, lobe], label="RBC") == [cell, lobe]
    assert suppress_nested([]) == []
    # a box without area (clipped at the image edge) keeps its place but suppresses nothing
    flat = Detection((0.0, 0.0, 0.0, 50.0), "WBC", 0.99)
    assert suppress_nested([flat, cell, neighbour]) == [flat, cell, neighbour]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_overlap"):
            suppress_nested([cell], max_overlap=bad)
