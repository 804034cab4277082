"""Calibrating the classifier to another lab on unlabelled crops (AdaBN)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from smearpipe.classify import MIN_ADAPT_CROPS, Classifier, adapt_batchnorm
from smearpipe.cli import main as cli_main
from smearpipe.errors import DatasetError
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
    return other_lab([read_image(p) for p in sorted((tiny_crops / "train").rglob("*.jpg"))], MIN_ADAPT_CROPS)


def test_adapt_batchnorm_writes_a_new_calibrated_classifier(tiny_run, lab_crops, tmp_path):
    import torch

    source = Classifier.load(tiny_run.weights)
    adapted = adapt_batchnorm(source, lab_crops, out_dir=tmp_path, name="classifier-mylab")
    rec = json.loads((tmp_path / "classifier-mylab.json").read_text())
    assert rec["adapted"]["from"] == source.name and rec["adapted"]["n_crops"] == MIN_ADAPT_CROPS
    assert rec["adapted"]["from_sha256"] == source.record.sha256 and "metrics" not in rec
    assert adapted.classes == source.classes and adapted.preprocessing == source.preprocessing

    def bn_means(clf):
        return torch.cat([m.running_mean.float() for m in clf.model.modules() if isinstance(m, torch.nn.BatchNorm2d)])

    assert not torch.allclose(bn_means(adapted), bn_means(source), atol=1e-3)  # statistics re-estimated
    conv = next(m for m in adapted.model.modules() if isinstance(m, torch.nn.Conv2d))
    conv0 = next(m for m in source.model.modules() if isinstance(m, torch.nn.Conv2d))
    torch.testing.assert_close(conv.weight.float(), conv0.weight.float(), atol=2e-3, rtol=1e-2)  # weights kept (fp16)
    p = adapted.predict_proba(lab_crops[:4])
    assert p.shape == (4, 5) and np.allclose(p.sum(1), 1)
    # the same crops in another order give the same statistics
    again = adapt_batchnorm(source, lab_crops[::-1], out_dir=tmp_path, name="classifier-mylab-2")
    torch.testing.assert_close(bn_means(again), bn_means(adapted), atol=1e-2, rtol=1e-2)
    with pytest.raises(FileExistsError):
        adapt_batchnorm(source, lab_crops, out_dir=tmp_path, name="classifier-mylab")


def test_adapt_batchnorm_needs_enough_crops(tiny_run, lab_crops, tmp_path):
    with pytest.raises(DatasetError, match=str(MIN_ADAPT_CROPS)):
        adapt_batchnorm(tiny_run.weights, lab_crops[:5], out_dir=tmp_path, name="x")
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_adapt_classifier(tiny_run, lab_crops, tmp_path, capsys):
    folder = tmp_path / "crops" / "slide1"
    for i, c in enumerate(lab_crops):
        write_image(folder / f"c{i}.png", c)
    code = cli_main(["adapt-classifier", str(tmp_path / "crops"), "--out", str(tmp_path / "w"), "--name", "lab",
                     "--classifier", str(tiny_run.weights)])
    assert code == 0 and (tmp_path / "w" / "lab.safetensors").is_file()
    assert f"on {MIN_ADAPT_CROPS} WBC crops" in capsys.readouterr().out
    code = cli_main(["adapt-classifier", str(folder / "c0.png"), "--out", str(tmp_path / "w"), "--name", "lab2",
                     "--classifier", str(tiny_run.weights)])
    assert code == 2 and "at least" in capsys.readouterr().err
