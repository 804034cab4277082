"""Calibrating the classifier to another lab on unlabelled crops (AdaBN, entropy minimisation)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smearpipe.classify import MIN_ADAPT_CROPS, Classifier, adapt_batchnorm, adapt_entropy, prepare_crops
from smearpipe.cli import main as cli_main
from smearpipe.errors import DatasetError, InvalidImageError
from smearpipe.io import read_image, write_image


def other_lab(crops: list[np.ndarray], n: int) -> list[np.ndarray]:
    """``n`` crops with a bluer stain and darker camera, as another lab's might look."""
    out = []
    for i in range(n):
        c = crops[i % len(crops)].astype(np.float32)
        out.append(np.clip(c * np.array([0.8, 0.85, 1.05]) - 10, 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def lab_crops(tiny_crops):
    return other_lab([read_image(p) for p in sorted((tiny_crops / "train").rglob("*.jpg"))], MIN_ADAPT_CROPS + 4)


def test_adapt_batchnorm_writes_a_new_calibrated_classifier(tiny_run, lab_crops, tmp_path):
    import torch

    source = Classifier.load(tiny_run.weights)
    adapted = adapt_batchnorm(source, iter(lab_crops), out_dir=tmp_path, name="classifier-mylab")  # any iterable
    rec = json.loads((tmp_path / "classifier-mylab.json").read_text())
    assert rec["adapted"]["from"] == source.name and rec["adapted"]["n_crops"] == len(lab_crops)
    assert rec["adapted"]["from_sha256"] == source.record.sha256 and "metrics" not in rec
    assert adapted.classes == source.classes and adapted.preprocessing == source.preprocessing

    def bn_means(clf):
        return torch.cat([m.running_mean.float() for m in clf.model.modules() if isinstance(m, torch.nn.BatchNorm2d)])

    assert not torch.allclose(bn_means(adapted), bn_means(source), atol=1e-3)  # statistics re-estimated
    # the first layer's statistics are those of its input over all the new crops
    x = torch.from_numpy(prepare_crops(lab_crops, size=source.input_size, preprocessing=source.preprocessing,
                                       mean=source.mean, std=source.std, preprocess_resized=source.preprocess_resized,
                                       framing=source.framing))
    with torch.inference_mode():
        conv_out = adapted.model.features[0].float()(x)
    bn0 = adapted.model.features[1]
    torch.testing.assert_close(bn0.running_mean.float(), conv_out.mean((0, 2, 3)), rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(bn0.running_var.float(), conv_out.var((0, 2, 3)), rtol=1e-2, atol=2e-3)
    conv = next(m for m in adapted.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv0 = next(m for m in source.model.modules() if isinstance(m, torch.nn.Conv2d))
    torch.testing.assert_close(conv.weight.float(), conv0.weight.float(), atol=2e-3, rtol=1e-2)  # weights kept (fp16)
    p = adapted.predict_proba(lab_crops[:4])
    assert p.shape == (4, 5) and np.allclose(p.sum(1), 1)
    # the same crops in another order and batches that do not divide them give the same statistics
    again = adapt_batchnorm(source, lab_crops[::-1], out_dir=tmp_path, name="classifier-mylab-2", batch_size=5)
    torch.testing.assert_close(bn_means(again), bn_means(adapted), atol=1e-2, rtol=1e-2)
    with pytest.raises(FileExistsError):
        adapt_batchnorm(source, lab_crops, out_dir=tmp_path, name="classifier-mylab")


def test_adapt_batchnorm_bad_input(tiny_run, lab_crops, tmp_path):
    with pytest.raises(DatasetError, match=str(MIN_ADAPT_CROPS)):
        adapt_batchnorm(tiny_run.weights, lab_crops[:5], out_dir=tmp_path, name="x")
    with pytest.raises(InvalidImageError, match="crop 33"):
        adapt_batchnorm(tiny_run.weights, lab_crops[:33] + [np.zeros((4, 4), np.float32) + np.nan], out_dir=tmp_path, name="x")
    with pytest.raises(InvalidImageError, match="list of crops"):
        adapt_batchnorm(tiny_run.weights, lab_crops[0], out_dir=tmp_path, name="x")
    with pytest.raises(ValueError, match="batch_size"):
        adapt_batchnorm(tiny_run.weights, lab_crops, out_dir=tmp_path, name="x", batch_size=0)
    assert not list(tmp_path.iterdir())  # nothing written
    (tmp_path / "taken.json").write_text("{}")
    with pytest.raises(FileExistsError):
        adapt_batchnorm(tiny_run.weights, lab_crops, out_dir=tmp_path, name="taken")
    assert (tmp_path / "taken.json").read_text() == "{}" and not (tmp_path / "taken.safetensors").exists()
    for name in ("../escaped", "sub/x", "", ".."):  # the files stay in out_dir
        with pytest.raises(ValueError, match="plain file name"):
            adapt_batchnorm(tiny_run.weights, lab_crops, out_dir=tmp_path / "out", name=name)
    with pytest.raises(ValueError, match="existing file"):  # said before the work, not after it
        adapt_batchnorm(tiny_run.weights, lab_crops, out_dir=tmp_path / "taken.json", name="x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.json"]


def mean_entropy(clf: Classifier, crops: list[np.ndarray]) -> float:
    p = clf.predict_proba(crops)
    return float(-(p * np.log(np.clip(p, 1e-12, None))).sum(1).mean())


def test_adapt_entropy_moves_only_batchnorm_scale_and_shift_and_lowers_entropy(tiny_run, lab_crops, tmp_path):
    import torch

    source = Classifier.load(tiny_run.weights)
    adapted = adapt_entropy(source, (c for c in lab_crops), out_dir=tmp_path, name="lab", lr=1e-2, epochs=5,
                            batch_size=8)
    rec = json.loads((tmp_path / "lab.json").read_text())
    assert rec["adapted"]["from"] == source.name and rec["adapted"]["from_sha256"] == source.record.sha256
    assert (rec["adapted"]["n_crops"], rec["adapted"]["lr"], rec["adapted"]["epochs"]) == (len(lab_crops), 1e-2, 5)
    assert "TENT" in rec["adapted"]["method"] and "metrics" not in rec
    assert adapted.classes == source.classes and adapted.preprocessing == source.preprocessing
    before, after = dict(source.model.named_parameters()), dict(adapted.model.named_parameters())
    bn = {n for n, m in source.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    moved = {n for n in before if not torch.allclose(after[n].float(), before[n].float(), atol=2e-3, rtol=1e-2)}
    assert moved and all(n.rsplit(".", 1)[0] in bn for n in moved)  # convolutions and head kept (fp16)
    stats = [n for n, _ in source.model.named_buffers() if n.endswith(("running_mean", "running_var"))]
    b0, b1 = dict(source.model.named_buffers()), dict(adapted.model.named_buffers())
    for n in stats:  # the training lab's running statistics are kept
        torch.testing.assert_close(b1[n].float(), b0[n].float(), atol=2e-3, rtol=1e-2)
    assert mean_entropy(adapted, lab_crops) < 0.9 * mean_entropy(source, lab_crops)
    assert (rec["adapted"]["batch_size"], rec["adapted"]["seed"]) == (8, 0)
    again = adapt_entropy(source, lab_crops, out_dir=tmp_path, name="lab-again", lr=1e-2, epochs=5, batch_size=8)
    assert again.record.sha256 == adapted.record.sha256  # the seed fixes the crop order: same weights
    other = adapt_entropy(source, lab_crops, out_dir=tmp_path, name="lab-seed1", lr=1e-2, epochs=5, batch_size=8, seed=1)
    assert other.record.sha256 != adapted.record.sha256  # another order, other steps
    with pytest.raises(FileExistsError):
        adapt_entropy(source, lab_crops, out_dir=tmp_path, name="lab")


def test_adapt_entropy_bad_input(tiny_run, lab_crops, tmp_path):
    for kwargs, match in (({"lr": 0}, "lr"), ({"lr": 2.0}, "lr"), ({"lr": True}, "lr"), ({"epochs": 0}, "epochs"),
                          ({"epochs": 1.5}, "epochs"), ({"seed": -1}, "seed"), ({"batch_size": 0}, "batch_size")):
        with pytest.raises(ValueError, match=match):
            adapt_entropy(tiny_run.weights, lab_crops, out_dir=tmp_path, name="x", **kwargs)
    with pytest.raises(DatasetError, match="adapt_entropy needs at least"):
        adapt_entropy(tiny_run.weights, lab_crops[:5], out_dir=tmp_path, name="x")
    with pytest.raises(InvalidImageError, match="crop 33"):
        adapt_entropy(tiny_run.weights, lab_crops[:33] + [np.zeros((4, 4), np.float32) + np.nan], out_dir=tmp_path, name="x")
    assert not list(tmp_path.iterdir())  # nothing written


def test_cli_adapt_classifier(tiny_run, lab_crops, tmp_path, capsys):
    folder = tmp_path / "crops" / "slide1"
    for i, c in enumerate(lab_crops):
        write_image(folder / f"c{i}.png", c)
    code = cli_main(["adapt-classifier", str(tmp_path / "crops"), "--out", str(tmp_path / "w"), "--name", "lab",
                     "--classifier", str(tiny_run.weights)])
    assert code == 0 and (tmp_path / "w" / "lab.safetensors").is_file()
    assert f"on {len(lab_crops)} WBC crops" in capsys.readouterr().out
    code = cli_main(["adapt-classifier", str(tmp_path / "crops"), "--out", str(tmp_path / "w"), "--name", "lab-e",
                     "--classifier", str(tiny_run.weights), "--method", "entropy"])
    assert code == 0 and "adapted (entropy)" in capsys.readouterr().out
    assert "TENT" in json.loads((tmp_path / "w" / "lab-e.json").read_text())["adapted"]["method"]
    (tmp_path / "crops" / ".hidden").mkdir()
    write_image(tmp_path / "crops" / ".hidden" / "x.png", lab_crops[0])  # e.g. .ipynb_checkpoints: skipped
    code = cli_main(["adapt-classifier", str(folder / "c0.png"), "--out", str(tmp_path / "w"), "--name", "lab2",
                     "--classifier", str(tiny_run.weights)])
    assert code == 2 and "at least" in capsys.readouterr().err
    write_image(tmp_path / "only_hidden" / ".ipynb_checkpoints" / "x.png", lab_crops[0])
    assert cli_main(["adapt-classifier", str(tmp_path / "only_hidden"), "--out", str(tmp_path / "w"), "--name", "x"]) == 2
    assert "no images" in capsys.readouterr().err


def test_cli_adapt_classifier_from_fields(tiny_run, lab_crops, tmp_path, capsys, monkeypatch):
    """--fields cuts the WBCs analyze_smear reports, as the pipeline cuts them."""
    import types

    import smearpipe.pipeline as pipeline_mod

    field = np.full((300, 400, 3), 230, np.uint8)
    field[100:160, 200:260] = lab_crops[0][:60, :60]
    write_image(tmp_path / "fields" / "f1.png", field)
    write_image(tmp_path / "fields" / "f2.png", field)
    clf = Classifier.load(tiny_run.weights)
    box = types.SimpleNamespace(box=(200.0, 100.0, 260.0, 160.0))
    monkeypatch.setattr(pipeline_mod, "load_pipeline", lambda **kw: types.SimpleNamespace(classifier=clf))
    calls = []

    def fake_analyze(rgb, pipeline):
        calls.append(rgb.shape)
        return types.SimpleNamespace(wbcs=[box] * 20)

    monkeypatch.setattr(pipeline_mod, "analyze_smear", fake_analyze)
    code = cli_main(["adapt-classifier", str(tmp_path / "fields"), "--fields", "--out", str(tmp_path / "w"), "--name", "lab"])
    assert code == 0 and calls == [(300, 400, 3)] * 2
    assert "on 40 WBC crops from 2 images" in capsys.readouterr().out
    monkeypatch.setattr(pipeline_mod, "analyze_smear", lambda rgb, pipeline: types.SimpleNamespace(wbcs=[]))
    assert cli_main(["adapt-classifier", str(tmp_path / "fields"), "--fields", "--out", str(tmp_path / "w"), "--name", "b"]) == 2
    assert "no WBC detected in 2 field" in capsys.readouterr().err
