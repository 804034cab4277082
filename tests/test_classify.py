from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

from smearpipe.augment import (
    AugmentConfig,
    color_augment_batch,
    geometric_transform,
    grayscale_batch,
    jitter_stain_vectors,
    match_sharpness_batch,
    reinhard_batch,
    stain_jitter,
)
from smearpipe.classify import Classifier, build_vgg16
from smearpipe.datasets import (
    WBC_CLASSES,
    extract_wbc_crops,
    normalize_wbc_class,
    read_bccd_subtype_labels,
    square_crop,
)
from smearpipe.errors import DatasetError, InvalidImageError, SmearpipeError, WeightsError
from smearpipe.evaluate import evaluate_classifier
from smearpipe.framing import Framing
from smearpipe.train import CropSource, train_classifier

from .conftest import REPO, SHARED, gamma_lut


@pytest.mark.parametrize("name, expected", [("NEUTROPHIL", "neutrophil"), ("Neutrophil", "neutrophil"),
                                            ("neutrophils", "neutrophil"), ("EOSINOPHIL", "eosinophil"),
                                            ("Lymphocytes", "lymphocyte"), ("mono", "monocyte"), ("BASOPHIL", "basophil"),
                                            ("platelet", None), ("", None)])
def test_wbc_class_normalisation(name, expected):
    assert normalize_wbc_class(name) == expected


@pytest.mark.parametrize("size", [32, 64, 112])
def test_model_shapes(size):
    import torch

    model = build_vgg16(5).eval()
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, size, size)).shape == (2, 5)
    frozen = build_vgg16(3, freeze_features=True)
    trainable = {n.split(".")[0] for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable == {"head"}


def test_pretrained_offline_and_bad_path(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        build_vgg16(5, pretrained=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot read"):
        build_vgg16(5, pretrained=bad)


def test_local_state_dict_is_loaded(tmp_path):
    import torch
    from torchvision.models import vgg16_bn

    ref = vgg16_bn(weights=None)
    torch.save(ref.state_dict(), tmp_path / "vgg.pth")
    model = build_vgg16(5, pretrained=tmp_path / "vgg.pth")
    assert torch.equal(model.features[0].weight, ref.features[0].weight)


def test_own_classifier_as_start_keeps_a_matching_head(tmp_path):
    import torch
    from safetensors.torch import save_file

    ref = build_vgg16(5)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(tmp_path / "mine.safetensors"))
    same = build_vgg16(5, pretrained=tmp_path / "mine.safetensors")
    assert torch.equal(same.features[0].weight, ref.features[0].weight)
    assert torch.equal(same.head[4].weight, ref.head[4].weight)  # same classes: fine-tuning keeps the head
    other = build_vgg16(3, pretrained=tmp_path / "mine.safetensors")
    assert torch.equal(other.features[0].weight, ref.features[0].weight) and other.head[4].weight.shape == (3, 256)


def test_square_crop_centre_and_padding():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :] = (250, 240, 230)
    img[40:60, 90:110] = 10
    crop = square_crop(img, (90, 40, 110, 60), scale=2.0)
    assert crop.shape == (40, 40, 3)
    assert (crop[10:30, 10:30] == 10).all()
    edge = square_crop(img, (0, 0, 20, 20), scale=3.0)  # cell at the corner: padded with background
    assert edge.shape == (60, 60, 3)
    assert (edge[20:40, 20:40] == img[0:20, 0:20]).all()
    assert (edge[0, 0] == (250, 240, 230)).all()
    with pytest.raises(ValueError):
        square_crop(img, (10, 10, 10, 20))


def test_bccd_labels_and_crop_extraction(bccd_root, tmp_path):
    labels = read_bccd_subtype_labels(SHARED / "bccd_wbc_subtypes" / "labels.csv")
    assert labels["BloodImage_00000"] == ["neutrophil"]
    assert labels["BloodImage_00010"] == ["neutrophil", "eosinophil"]
    report = extract_wbc_crops(bccd_root, tmp_path / "crops", labels_csv=SHARED / "bccd_wbc_subtypes" / "labels.csv",
                               split="test", scale=1.75)
    assert sum(report.written.values()) >= 60
    assert "BloodImage_00135" in report.skipped  # no WBC box
    files = list((tmp_path / "crops").glob("*/*.png"))
    assert len(files) == sum(report.written.values())
    with pytest.raises(DatasetError, match="not empty"):
        extract_wbc_crops(bccd_root, tmp_path / "crops", labels_csv=SHARED / "bccd_wbc_subtypes" / "labels.csv")


def test_stain_jitter_keeps_structure_changes_stain():
    import torch

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(0.2, 0.95, (2, 3, 24, 24)).astype(np.float32))
    same = stain_jitter(x, torch.ones(2, 3), torch.zeros(2, 3))
    torch.testing.assert_close(same, x.clamp(1e-3, 1), rtol=1e-4, atol=1e-4)  # identity parameters
    changed = stain_jitter(x, torch.full((2, 3), 1.3), torch.full((2, 3), 0.05))
    assert (changed - x).abs().mean() > 0.02
    # structure kept: per-pixel intensity order correlates strongly
    corr = np.corrcoef(changed.mean(1).flatten().numpy(), x.mean(1).flatten().numpy())[0, 1]
    assert corr > 0.9
    out = color_augment_batch(x, AugmentConfig())
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_stain_vectors_move_hue_keep_length():
    import torch

    from smearpipe.augment import _RGB_FROM_HED

    base = torch.as_tensor(_RGB_FROM_HED)
    assert torch.equal(jitter_stain_vectors(3, 0.0), base.repeat(3, 1, 1))  # off: the decomposition's own vectors
    v = jitter_stain_vectors(64, 0.15, torch.Generator().manual_seed(0))
    assert v.shape == (64, 3, 3) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(dim=2), base.norm(dim=1).expand(64, 3))  # every vector keeps its length
    assert torch.equal(v[:, 2], base[2].expand(64, 3))  # the DAB row (the residual) is kept
    assert float(v.min()) > 0  # no negative absorbance
    moved = (v[:, :2] - base[:2]).abs()
    assert float(moved.max()) < 0.3 and float(moved.mean()) > 0.02  # moved, by about the amount asked
    assert (v[0] != v[1]).any()  # one draw per crop
    cos = (v[:, :2] * base[:2]).sum(-1) / base[:2].norm(dim=1) ** 2
    assert float(cos.min()) < 0.995  # the directions turn: another hue, not only a rescaled vector

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(0.2, 0.95, (64, 3, 24, 24)).astype(np.float32))
    ones, zeros = torch.ones(64, 3), torch.zeros(64, 3)
    torch.testing.assert_close(stain_jitter(x, ones, zeros, stains=base.repeat(64, 1, 1)), stain_jitter(x, ones, zeros))
    changed = stain_jitter(x, ones, zeros, stains=v)
    assert changed.shape == x.shape and float(changed.min()) >= 0 and float(changed.max()) <= 1
    assert (changed - x).abs().mean() > 0.01
    corr = np.corrcoef(changed.mean(1).flatten().numpy(), x.mean(1).flatten().numpy())[0, 1]
    assert corr > 0.9  # structure kept
    with pytest.raises(ValueError, match=r"stains must be \(64, 3, 3\)"):
        stain_jitter(x, ones, zeros, stains=base)

    off = dict(stain_alpha=0, stain_beta=0, brightness=0, contrast=0, saturation=0, gamma=0, white_balance=0, blur_p=0,
               noise_std_max=0)
    assert torch.equal(color_augment_batch(x, AugmentConfig(**off)), x)
    out = color_augment_batch(x, AugmentConfig(**off, stain_vector=0.15), generator=torch.Generator().manual_seed(1))
    assert (out - x.clamp_min(1e-3)).abs().mean() > 0.01  # the option alone changes colour


@pytest.mark.parametrize("bad", [-0.1, 0.6, True, "0.1", float("nan"), None])
def test_stain_vector_amount_refused(bad):
    with pytest.raises(ValueError, match="stain_vector"):
        AugmentConfig(stain_vector=bad)
    with pytest.raises(ValueError, match="stain_vector"):
        jitter_stain_vectors(2, bad)


def test_stain_vector_bounds_and_batch():
    assert AugmentConfig(stain_vector=0).stain_vector == 0 and AugmentConfig(stain_vector=0.5).stain_vector == 0.5
    assert jitter_stain_vectors(0, 0.5).shape == (0, 3, 3)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="batch"):
            jitter_stain_vectors(bad, 0.1)


def test_grayscale_batch_greys_a_share_and_keeps_the_rest():
    import torch

    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (200, 3, 8, 8)).astype(np.float32))
    assert grayscale_batch(x, 0.0) is x
    out = grayscale_batch(x, 0.25, torch.Generator().manual_seed(0))
    grey = (out[:, 0] == out[:, 1]).all(dim=(1, 2)) & (out[:, 1] == out[:, 2]).all(dim=(1, 2))
    assert 30 <= int(grey.sum()) <= 70  # about a quarter
    assert torch.equal(out[~grey], x[~grey])  # the others untouched
    luma = 0.299 * x[grey, 0] + 0.587 * x[grey, 1] + 0.114 * x[grey, 2]
    torch.testing.assert_close(out[grey, 0], luma)
    assert bool(grayscale_batch(x, 1.0).std(dim=1).max() == 0)
    for bad in (-0.1, 1.5, True, "0.2"):
        with pytest.raises(ValueError, match="gray_p"):
            grayscale_batch(x, bad)
        with pytest.raises(ValueError, match="gray_p"):
            AugmentConfig(gray_p=bad)


def test_lowres_augmentation_removes_fine_detail_only():
    import torch

    x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (4, 3, 32, 32)).astype(np.float32))
    off = dict(stain_alpha=0, stain_beta=0, brightness=0, contrast=0, saturation=0, gamma=0, white_balance=0, blur_p=0,
               noise_std_max=0)
    assert torch.equal(color_augment_batch(x, AugmentConfig(**off)), x)  # everything off: identity
    out = color_augment_batch(x, AugmentConfig(**off, lowres_p=1.0, lowres_max=3.0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    detail = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert detail(out) < 0.6 * detail(x)  # pixel-scale detail is lost, as through a coarser camera
    assert abs(float(out.mean() - x.mean())) < 0.02  # the image itself is kept


def test_random_convolution_changes_texture_and_colour_but_keeps_shapes_and_brightness():
    import torch

    from smearpipe.augment import random_convolution_batch

    # a dark disc ("nucleus") on a light, noisy background, 8 crops
    yy, xx = np.mgrid[:48, :48]
    disc = ((yy - 24) ** 2 + (xx - 24) ** 2 < 12**2).astype(np.float32)
    rng = np.random.default_rng(0)
    base = 0.85 - 0.5 * disc[None, None] * np.array([0.6, 1.0, 0.3], np.float32)[None, :, None, None]
    x = torch.from_numpy((base + rng.normal(0, 0.03, (8, 3, 48, 48))).clip(0, 1).astype(np.float32))
    g = torch.Generator().manual_seed(1)
    assert torch.equal(random_convolution_batch(x, 0.0, generator=g), x)  # p = 0: untouched
    out = random_convolution_batch(x, 1.0, (3,), generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype and float(out.min()) >= 0 and float(out.max()) <= 1
    assert float((out - x).abs().mean()) > 0.01  # the crops changed
    torch.testing.assert_close(out.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=0.03, rtol=0)  # brightness kept
    mask = torch.from_numpy(disc > 0)
    inside, outside = out[..., mask].mean(-1), out[..., ~mask].mean(-1)  # (8, 3) per channel
    contrast = (inside - outside).abs().max(1).values
    assert bool((contrast > 0.05).all())  # the disc is still there in every crop
    half = random_convolution_batch(x, 0.5, generator=torch.Generator().manual_seed(2))
    changed = (half - x).abs().flatten(1).max(1).values > 0
    assert 0 < int(changed.sum()) < 8  # only a share of the crops is filtered
    with pytest.raises(ValueError, match="randconv_p"):
        random_convolution_batch(x, 1.5)
    with pytest.raises(ValueError, match="randconv_kernels"):
        random_convolution_batch(x, 0.5, (2,))
    with pytest.raises(ValueError, match="randconv_p"):  # refused when configured, not at the first training batch
        AugmentConfig(randconv_p=-0.1)
    with pytest.raises(ValueError, match="randconv_kernels"):
        AugmentConfig(randconv_p=0.5, randconv_kernels=(3.0,))
    assert AugmentConfig(randconv_kernels=[3, 5]).randconv_kernels == (3, 5)  # as read back from a JSON record


def test_mix_style_swaps_feature_statistics_keeps_content_and_acts_only_in_training():
    import torch

    from smearpipe.augment import add_mix_style, mix_style
    from smearpipe.classify import build_vgg16

    torch.manual_seed(0)
    # 6 crops whose feature maps share content but differ in per-channel "style" (mean and spread)
    content = torch.randn(1, 4, 8, 8).expand(6, -1, -1, -1)
    x = content * (torch.rand(6, 4, 1, 1) * 2 + 0.5) + (torch.rand(6, 4, 1, 1) * 4 - 2)
    out = mix_style(x, alpha=0.1)
    assert out.shape == x.shape and out.dtype == x.dtype
    norm = lambda t: (t - t.mean((2, 3), keepdim=True)) / t.std((2, 3), keepdim=True)  # noqa: E731
    torch.testing.assert_close(norm(out), norm(x), atol=1e-3, rtol=0)  # content kept
    x_mu, out_mu = x.mean((2, 3), keepdim=True), out.mean((2, 3), keepdim=True)
    assert float((out_mu - x_mu).abs().max()) > 0.1  # statistics moved
    lo, hi = x_mu.amin(0, keepdim=True), x_mu.amax(0, keepdim=True)
    assert bool(((out_mu >= lo - 1e-4) & (out_mu <= hi + 1e-4)).all())  # mixed within the batch's own statistics
    assert torch.equal(mix_style(x[:1]), x[:1])  # a lone crop has nobody to mix with
    assert mix_style(x.bfloat16()).dtype == torch.bfloat16

    model = build_vgg16(5)
    handles = add_mix_style(model.features, p=1.0)
    assert len(handles) == 3
    crops = torch.rand(4, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        plain = model(crops)
        torch.testing.assert_close(model(crops), plain)  # eval mode: the plain network
        model.train()
        torch.manual_seed(1)
        mixed = model.features(crops)
        for h in handles:
            h.remove()
        torch.manual_seed(1)
        unhooked = model.features(crops)  # same dropout-free path, hooks taken off
    assert float((mixed - unhooked).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="mixstyle_p"):
        add_mix_style(model.features, p=1.5)
    with pytest.raises(ValueError, match="mixstyle_alpha"):
        AugmentConfig(mixstyle_p=0.5, mixstyle_alpha=0)
    with pytest.raises(ValueError, match="blocks"):
        add_mix_style(model.features, p=0.5, blocks=9)


def test_reinhard_batch_is_reinhard_normalize_on_a_batch(pbc_crops):
    """The training-time (torch) normalisation gives what inference's uint8 one gives, shifted crops included."""
    import cv2
    import torch

    from smearpipe.preprocess import default_reinhard_reference, lab_statistics, reinhard_normalize

    ref = default_reinhard_reference()
    gamma = gamma_lut(1.6)
    crops = [cv2.resize(c, (48, 48), interpolation=cv2.INTER_AREA) for c in pbc_crops.values()]
    crops += [gamma[c] for c in crops] + [np.full((48, 48, 3), 200, np.uint8)]  # a tone curve; a flat crop
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    out = reinhard_batch(x, reference=ref)
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1
    got = np.rint(out.permute(0, 2, 3, 1).numpy() * 255).astype(int)
    expected = np.stack([reinhard_normalize(c, reference=ref) for c in crops]).astype(int)
    diff = np.abs(got - expected)  # rounding; a few out-of-gamut pixels are clipped a little differently
    assert np.quantile(diff, 0.999) <= 1 and diff.max() <= 6 and diff.mean() < 0.3
    for im in got[:-1]:  # every real crop, shifted or not, ends with the reference's mean colour
        np.testing.assert_allclose(lab_statistics(im.astype(np.uint8))[0], ref.mean, atol=1.5)
    for bad in (x * 255, x.permute(0, 2, 3, 1), x.to(torch.uint8), x.numpy()):
        with pytest.raises(ValueError, match="reinhard_batch"):
            reinhard_batch(bad)
    from smearpipe.preprocess import field_reinhard_reference

    with pytest.raises(ValueError, match="region"):  # statistics over stained pixels have no torch twin
        reinhard_batch(x, reference=field_reinhard_reference("stained"))


def test_match_sharpness_batch_is_match_sharpness_on_a_batch(pbc_crops):
    import cv2
    import torch

    from smearpipe.preprocess import match_sharpness, sharpness

    crops = [cv2.resize(c, (64, 64), interpolation=cv2.INTER_AREA) for c in pbc_crops.values()]
    crops += [cv2.GaussianBlur(c, (0, 0), s) for c, s in zip(crops, (0.8, 1.2, 1.6, 2.2, 3.0), strict=True)]  # softer cameras
    crops.append(np.full((64, 64, 3), 128, np.uint8))
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    out = match_sharpness_batch(x, target=0.45, sigma=2.0, max_amount=4.0)
    assert out.shape == x.shape and out.dtype == torch.float32 and float(out.min()) >= 0 and float(out.max()) <= 1
    got = np.rint(out.permute(0, 2, 3, 1).numpy() * 255).astype(int)
    expected = np.stack([match_sharpness(c, target=0.45, sigma=2.0, max_amount=4.0) for c in crops]).astype(int)
    assert np.abs(got - expected).max() <= 1  # the same amount per image; rounding only
    changed = [i for i, c in enumerate(crops) if (expected[i] != c).any()]
    assert changed and all(sharpness(crops[i]) < 0.45 for i in changed)  # only soft crops are touched
    for bad in (x.permute(0, 2, 3, 1), x.to(torch.uint8), x.numpy(), x[:, :, :6, :6]):
        with pytest.raises(ValueError, match="match_sharpness_batch"):
            match_sharpness_batch(bad)
    for bad in ({"sigma": -1.0}, {"target": float("nan")}, {"max_amount": 1e6}):
        with pytest.raises(ValueError, match="sharpening"):
            match_sharpness_batch(x, **bad)


def test_normalize_after_augment_then_sharpen(tiny_crops, tmp_path, monkeypatch):
    import smearpipe.augment as augment
    from smearpipe.preprocess import Preprocessing

    calls = []
    real_colour, real_norm, real_sharpen = augment.color_augment_batch, augment.reinhard_batch, augment.match_sharpness_batch
    monkeypatch.setattr(augment, "color_augment_batch", lambda x, *a, **k: calls.append("colour") or real_colour(x, *a, **k))
    monkeypatch.setattr(augment, "reinhard_batch", lambda x, *a, **k: calls.append("normalise") or real_norm(x, *a, **k))
    monkeypatch.setattr(augment, "match_sharpness_batch",
                        lambda x, *a, **k: calls.append(("sharpen", k["target"])) or real_sharpen(x, *a, **k))
    real_grey = augment.grayscale_batch
    monkeypatch.setattr(augment, "grayscale_batch", lambda x, p, *a: calls.append(("grey", p)) or real_grey(x, p, *a))
    prep = Preprocessing(steps=("reinhard", "sharpen"), sharpen_target=0.5)
    run = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, batch_size=5, input_size=32,
                           out_dir=tmp_path, num_workers=0, normalize_after_augment=True, preprocessing=prep,
                           augment=AugmentConfig(gray_p=0.3))
    # every training batch, in this order; grey last, so that no normalisation sees a grey crop
    assert calls == ["colour", "normalise", ("sharpen", 0.5), ("grey", 0.3)] * 3
    assert json.loads(run.record.read_text())["training"]["augment"]["gray_p"] == 0.3
    loaded = Classifier.load(run.weights).preprocessing
    assert loaded.steps == ("reinhard", "sharpen") and loaded.sharpen_target == 0.5  # inference does the same
    with pytest.raises(ValueError, match="normalize_after_augment"):  # cached crops are larger than the input
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, input_size=32, out_dir=tmp_path,
                         preprocessing=prep)


def test_train_with_mix_style(tiny_crops, tmp_path, monkeypatch):
    """AugmentConfig(mixstyle_p=1): three stages mix styles on every training batch, never in validation."""
    import smearpipe.augment as augment

    shapes = []
    real = augment.mix_style
    monkeypatch.setattr(augment, "mix_style", lambda x, *a, **k: shapes.append(tuple(x.shape)) or real(x, *a, **k))
    run = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, batch_size=5, input_size=32,
                           out_dir=tmp_path, num_workers=0, augment=AugmentConfig(mixstyle_p=1.0, stain_vector=0.2))
    assert shapes == [(5, 64, 16, 16), (5, 128, 8, 8), (5, 256, 4, 4)] * 3  # 3 batches x 3 stages; no eval call
    recorded = json.loads(run.record.read_text())["training"]["augment"]
    assert recorded["mixstyle_p"] == 1.0 and recorded["stain_vector"] == 0.2
    assert Classifier.load(run.weights).predict_proba([np.zeros((40, 40, 3), np.uint8)]).shape == (1, 5)


def test_js_divergence_zero_for_equal_symmetric_and_bounded():
    import torch

    from smearpipe.train import js_divergence

    a = torch.tensor([[4.0, 0.0, -1.0], [0.0, 2.0, 1.0]])
    b = torch.tensor([[0.0, 4.0, -1.0], [1.0, 0.0, 3.0]])
    assert float(js_divergence(a, a)) == pytest.approx(0.0, abs=1e-7)
    assert float(js_divergence(a, b)) == pytest.approx(float(js_divergence(b, a)))
    p, q = torch.softmax(a, 1), torch.softmax(b, 1)
    m = (p + q) / 2
    expected = float(((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1)).mean() / 2)  # by hand, per row then mean
    assert float(js_divergence(a, b)) == pytest.approx(expected, rel=1e-5)
    far = torch.tensor([[40.0, 0.0], [0.0, 40.0]])
    assert float(js_divergence(far, far.flip(1))) == pytest.approx(np.log(2), rel=1e-4)  # disjoint: ln 2
    for x, y in ((a, a[:1]), (a[0], a[0])):
        with pytest.raises(ValueError, match="js_divergence"):
            js_divergence(x, y)


def test_sam_gradient_is_the_gradient_at_the_perturbed_weights():
    """SAM's second gradient, against a by-hand copy: taken at w + rho g/||g||; weights and batch-norm statistics kept."""
    import copy

    import torch

    from smearpipe.train import _sam_second_gradient

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).train()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    by_hand = copy.deepcopy(net)
    loss = torch.nn.functional.cross_entropy
    params = list(net.parameters())
    loss(net(x), y).backward()
    first = [p.grad.clone() for p in params]
    weights, stats = [p.detach().clone() for p in params], [b.clone() for b in net[1].buffers()]
    _sam_second_gradient(net, params, 0.05, lambda: (loss(net(x), y), None))

    by_hand(x)  # the first pass's batch-norm update, as in training
    norm = torch.sqrt(sum((g ** 2).sum() for g in first))
    with torch.no_grad():
        for p, g in zip(by_hand.parameters(), first, strict=True):
            p.add_(0.05 * g / norm)
    loss(by_hand(x), y).backward()
    for p, q in zip(params, by_hand.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)
    assert any(not torch.allclose(p.grad, g) for p, g in zip(params, first, strict=True))  # not the first gradient
    assert all(torch.equal(p, w) for p, w in zip(params, weights, strict=True))  # weights restored bit for bit
    # the second pass is not counted: running mean, variance and batch count as the first pass left them
    assert all(torch.equal(b, s) for b, s in zip(net[1].buffers(), stats, strict=True))

    for fill in (0.0, float("nan")):  # nothing to climb along: the first pass's gradient stays
        for p in params:
            p.grad = torch.full_like(p, fill)
        _sam_second_gradient(net, params, 0.05, lambda: pytest.fail("no second pass without a finite gradient norm"))
        for p in params:
            torch.testing.assert_close(p.grad, torch.full_like(p, fill), rtol=0, atol=0, equal_nan=True)


def test_train_with_sam(tiny_crops, tmp_path, monkeypatch):
    """sam_rho > 0: AdamW steps with the gradient of the second pass; recorded."""
    import torch

    import smearpipe.train as train

    seen, stepped = [], []

    def second_pass(model, params, rho, loss_fn):  # stands in for SAM's gradient: a marker AdamW must receive
        seen.append(rho)
        for p in params:
            p.grad = torch.full_like(p, 0.123)

    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        stepped.append(all(torch.all(p.grad == 0.123) for g in self.param_groups for p in g["params"]))
        return real_step(self, *a, **k)

    monkeypatch.setattr(train, "_sam_second_gradient", second_pass)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, batch_size=5, input_size=32,
                           out_dir=tmp_path, num_workers=0, sam_rho=0.05)
    assert seen == [0.05] * 3  # 3 batches, one second pass each; none in validation
    assert stepped == [True] * 3  # every step used the second pass's gradient, not the first
    assert json.loads(run.record.read_text())["training"]["sam_rho"] == 0.05
    assert json.loads((run.run_dir / "run_config.json").read_text())["sam_rho"] == 0.05


@pytest.mark.parametrize("option", ["consistency", "sam_rho", "mixup"])
@pytest.mark.parametrize("bad, error", [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                                        (True, TypeError), ("0.05", TypeError)])
def test_train_refuses_bad_loss_settings(tiny_crops, tmp_path, option, bad, error):
    """A weight or radius must be a finite real number >= 0."""
    with pytest.raises(error, match=option):
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, input_size=32, out_dir=tmp_path,
                         num_workers=0, **{option: bad})


def test_train_with_mixup(tiny_crops, tmp_path, monkeypatch):
    """mixup > 0: the network sees lam * crop + (1 - lam) * another crop of the batch, and the loss weighs their
    labels by lam and 1 - lam; mixup=0 draws nothing (earlier recipes' random streams are as they were)."""
    import torch

    import smearpipe.classify as classify

    draws = []
    real_randperm = torch.randperm

    def randperm(n, *a, **k):
        if n != 5:
            return real_randperm(n, *a, **k)
        draws.append("perm")
        return torch.arange(n - 1, -1, -1)  # a batch of 5, reversed

    def beta(self, *a, **k):
        draws.append("beta")
        return torch.tensor(0.25)

    monkeypatch.setattr(torch, "randperm", randperm)
    monkeypatch.setattr(torch.distributions.Beta, "sample", beta)
    inputs, targets = [], []
    real_build = classify.build_vgg16

    def build(*a, **k):
        model = real_build(*a, **k)
        model.register_forward_pre_hook(lambda m, x: inputs.append(x[0].detach().clone()) if m.training else None)
        return model

    monkeypatch.setattr(classify, "build_vgg16", build)
    real_ce = torch.nn.CrossEntropyLoss.forward
    monkeypatch.setattr(torch.nn.CrossEntropyLoss, "forward",
                        lambda self, logits, t: targets.append(t.clone()) or real_ce(self, logits, t))
    opts = dict(epochs=1, batch_size=5, input_size=32, num_workers=0, augment=False, bf16=False)
    with pytest.raises(ValueError, match="mixup and consistency"):
        train_classifier(tiny_crops / "train", tiny_crops / "val", out_dir=tmp_path, mixup=0.4, consistency=1.0,
                         **{**opts, "augment": None})
    plain = train_classifier(tiny_crops / "train", tiny_crops / "val", out_dir=tmp_path, name="plain", **opts)
    assert "beta" not in draws and draws.count("perm") == 0  # mixup off: nothing drawn for it
    plain_inputs, plain_targets = inputs[:], targets[:]
    inputs.clear(), targets.clear()
    run = train_classifier(tiny_crops / "train", tiny_crops / "val", out_dir=tmp_path, name="mix", mixup=0.4, **opts)
    assert draws.count("beta") == 3 and len(inputs) == len(plain_inputs) == 3  # 15 crops: 3 batches of 5
    for seen, own in zip(inputs, plain_inputs, strict=True):  # the same batches (same seed), blended 0.25 / 0.75
        assert torch.allclose(seen, 0.25 * own + 0.75 * own.flip(0), atol=1e-5)
    assert len(targets) == 6  # per batch: its own labels (weight 0.25), then the reversed batch's (0.75)
    for k, own in enumerate(plain_targets):
        assert torch.equal(targets[2 * k], own) and torch.equal(targets[2 * k + 1], own.flip(0))
    assert run.history[0]["train_loss"] != plain.history[0]["train_loss"]
    assert json.loads(run.record.read_text())["training"]["mixup"] == 0.4


def test_train_with_consistency(tiny_crops, tmp_path, monkeypatch):
    """consistency > 0: each batch is colour-augmented twice, both views normalised, and their answers compared."""
    import smearpipe.augment as augment
    import smearpipe.train as train

    calls, pairs = [], []
    real_colour, real_norm, real_js = augment.color_augment_batch, augment.reinhard_batch, train.js_divergence
    monkeypatch.setattr(augment, "color_augment_batch", lambda x, *a, **k: calls.append(("colour", len(x))) or real_colour(x, *a, **k))
    monkeypatch.setattr(augment, "reinhard_batch", lambda x, *a, **k: calls.append(("normalise", len(x))) or real_norm(x, *a, **k))
    # the divergence, replaced by 1 (keeping its graph): the loss must then exceed the weight, 12
    monkeypatch.setattr(train, "js_divergence",
                        lambda p, q: pairs.append((tuple(p.shape), tuple(q.shape))) or real_js(p, q) * 0 + 1.0)
    run = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, batch_size=5, input_size=32,
                           out_dir=tmp_path, num_workers=0, normalize_after_augment=True, consistency=12)
    assert calls == [("colour", 5), ("normalise", 5)] * 6  # 3 batches x 2 independent colour views
    assert pairs == [((5, 5), (5, 5))] * 3  # the two views' logits, once per batch; not in validation
    assert all(12 < h["train_loss"] < 20 for h in run.history)  # weight x 1 + the cross-entropy (~ln 5 untrained)
    assert json.loads(run.record.read_text())["training"]["consistency"] == 12.0
    assert json.loads((run.run_dir / "run_config.json").read_text())["consistency"] == 12.0
    with pytest.raises(ValueError, match="needs augmentation"):
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, input_size=32, out_dir=tmp_path,
                         num_workers=0, consistency=1.0, augment=False)


def test_normalize_after_augment(tiny_crops, tmp_path, monkeypatch):
    """Training crops are cached un-normalised; each batch is colour-augmented, then normalised."""
    import smearpipe.augment as augment
    from smearpipe.classify import resize_preprocessed
    from smearpipe.io import read_image
    from smearpipe.preprocess import Preprocessing

    calls = []
    real_colour, real_norm = augment.color_augment_batch, augment.reinhard_batch
    monkeypatch.setattr(augment, "color_augment_batch", lambda x, *a, **k: calls.append("colour") or real_colour(x, *a, **k))
    monkeypatch.setattr(augment, "reinhard_batch", lambda x, *a, **k: calls.append("normalise") or real_norm(x, *a, **k))
    run = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, batch_size=5, input_size=32,
                           out_dir=tmp_path, num_workers=0, normalize_after_augment=True)
    assert calls == ["colour", "normalise"] * 3  # every training batch (15 crops, batches of 5), in this order
    assert json.loads(run.record.read_text())["training"]["normalize_after_augment"] is True
    assert Classifier.load(run.weights).preprocessing.steps == ("reinhard",)  # inference normalises as before
    (cache,) = (tmp_path / ".crop_cache").glob("*.npz")
    z = np.load(cache)

    def first(split: str, size: int, prep: Preprocessing) -> np.ndarray:
        path = CropSource(str(tiny_crops / split)).samples(WBC_CLASSES)[0][0]
        return resize_preprocessed(read_image(path), size=size, preprocessing=prep, preprocess_resized=True, framing="cell")

    np.testing.assert_array_equal(z["tr_x"][0], first("train", 37, Preprocessing()))  # cached as cut: not normalised
    np.testing.assert_array_equal(z["va_x"][0], first("val", 32, Preprocessing(steps=("reinhard",)).resolved()))  # as at inference
    from smearpipe.preprocess import field_reinhard_reference

    stained = Preprocessing(steps=("reinhard",), reinhard_reference=field_reinhard_reference("stained"))
    for bad in (dict(preprocessing=Preprocessing(steps=("median", "reinhard"))), dict(augment=False),
                dict(preprocess_resized=False), dict(preprocessing=stained)):
        with pytest.raises(ValueError, match="normalize_after_augment"):
            train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, input_size=32, out_dir=tmp_path,
                             normalize_after_augment=True, **bad)


def test_geometric_transform_output():
    import torch

    g = geometric_transform(48, AugmentConfig(elastic_p=1.0, jpeg_p=1.0))
    out = g(torch.randint(0, 256, (3, 60, 60), dtype=torch.uint8))
    assert out.shape == (3, 48, 48) and out.dtype == torch.uint8


def test_smoke_training_and_roundtrip(tiny_run, tiny_crops):
    rec = json.loads(tiny_run.record.read_text())
    assert rec["classes"] == list(WBC_CLASSES) and rec["input_size"] == 32
    assert rec["preprocessing"]["steps"] == ["reinhard"] and rec["preprocessing"]["reinhard_reference"] is not None
    assert rec["dtype"] == "float16" and len(rec["training"]["train"]) == 1
    assert rec["preprocess_resized"] is True  # the training default, recorded so that inference does the same
    assert rec["framing"]["name"] == "cell" and rec["framing"]["max_growth"] == 1.0  # recorded with its parameters
    assert len(tiny_run.history) == 1 and tiny_run.weights.suffix == ".safetensors"
    clf = Classifier.load(tiny_run.weights)
    assert clf.classes == WBC_CLASSES and clf.framing == Framing("cell")
    crops = [np.full((50, 70, 3), 200, np.uint8), np.random.default_rng(1).integers(0, 255, (300, 310, 3), dtype=np.uint8)]
    p = clf.predict_proba(crops)
    assert p.shape == (2, 5)
    np.testing.assert_allclose(p.sum(1), 1.0, rtol=1e-6)
    again = Classifier.load(tiny_run.weights).predict_proba(crops)
    np.testing.assert_allclose(p, again, rtol=1e-5, atol=1e-6)  # deterministic after reload
    assert clf.predict_proba([]).shape == (0, 5)
    with pytest.raises(InvalidImageError):
        clf.predict_proba([np.zeros((10, 10), np.float32) + np.nan])
    with pytest.raises(InvalidImageError, match="list of crops"):
        clf.predict_proba(np.zeros((10, 10, 3), np.uint8))


def test_prepare_crops_preprocessing_order(bccd_root):
    """Macenko after resizing (what new records ask for) vs at native size: same shape, close but not equal."""
    from smearpipe.classify import prepare_crops
    from smearpipe.io import read_image
    from smearpipe.preprocess import Preprocessing

    crop = read_image(SHARED / "bccd_wbc_subtypes" / "BCCD_cropped" / "Neutrophil" / "BloodImage_00001_1.jpg")
    prep = Preprocessing(steps=("macenko",)).resolved()
    native = prepare_crops([crop], size=64, preprocessing=prep, preprocess_resized=False, framing="as_given")
    resized = prepare_crops([crop], size=64, preprocessing=prep, preprocess_resized=True, framing="as_given")
    assert native.shape == resized.shape == (1, 3, 64, 64) and native.dtype == resized.dtype == np.float32
    assert not np.array_equal(native, resized)
    assert np.abs(native - resized).mean() < 0.25  # the same stain normalisation, estimated on fewer pixels


def test_evaluation_figures(tiny_run, tiny_crops, tmp_path):
    m = evaluate_classifier(CropSource(str(tiny_crops / "val"), center_fraction=0.7), classifier=tiny_run.weights, out_dir=tmp_path / "ev")
    assert m["n"] == 15 and 0 <= m["accuracy"] <= 1
    assert set(m["per_class"]) == set(WBC_CLASSES) and m["per_class"]["basophil"]["support"] == 3
    assert np.asarray(m["confusion_matrix"]).sum() == 15
    for fig in ("confusion_matrix.png", "roc_curves.png", "confidence.png", "training_curves.png"):
        assert (tmp_path / "ev" / fig).stat().st_size > 1000
    with pytest.raises(FileExistsError):
        evaluate_classifier(tiny_crops / "val", classifier=tiny_run.weights, out_dir=tmp_path / "ev")
    bad = tmp_path / "bad" / "neutrophil"
    bad.mkdir(parents=True)
    (bad / "broken.jpg").write_bytes(b"junk")
    with pytest.raises(SmearpipeError):
        evaluate_classifier(tmp_path / "bad", classifier=tiny_run.weights, out_dir=tmp_path / "ev_bad")
    assert not (tmp_path / "ev_bad").exists()  # a run that fails on its data leaves no empty folder behind


def test_evaluation_of_a_subset_and_over_an_earlier_one(tiny_run, tiny_crops, tmp_path):
    """Two classes of five: the macro average is over the classes seen (as training's), not zeros for the rest;
    evaluating another model over an earlier evaluation leaves no figure of the earlier model."""
    import csv

    from sklearn.metrics import f1_score

    subset = tmp_path / "subset"
    for c in ("eosinophil", "neutrophil"):
        shutil.copytree(tiny_crops / "val" / c, subset / c)
    m = evaluate_classifier(subset, classifier=tiny_run.weights, out_dir=tmp_path / "ev")
    rows = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv")))
    assert m["macro_f1"] == pytest.approx(f1_score([r["true"] for r in rows], [r["pred"] for r in rows], average="macro"))
    assert set(m["macro_over"]) == {r["true"] for r in rows} | {r["pred"] for r in rows}
    assert len(m["macro_over"]) < 5, "the tiny model answered every class: the subset case is not tested"
    assert "training_curves.png" in m["figures"]
    other = tmp_path / "other"
    other.mkdir()
    for f in (tiny_run.weights, tiny_run.record):
        shutil.copy(f, other / f.name)
    rec = json.loads((other / tiny_run.record.name).read_text())
    del rec["metrics"]["history"]  # as adapted weights: no training history
    (other / tiny_run.record.name).write_text(json.dumps(rec))
    m = evaluate_classifier(subset, classifier=other / tiny_run.weights.name, out_dir=tmp_path / "ev", overwrite=True)
    assert "training_curves.png" not in m["figures"] and not (tmp_path / "ev" / "training_curves.png").exists()
    assert sorted(p.name for p in (tmp_path / "ev").glob("*.png")) == m["figures"]


def test_tampered_and_wrong_size_weights(tiny_run, tmp_path):
    from safetensors.torch import load_file, save_file

    # the weights are as readable as their record (both follow the umask; safetensors' own writer made 0600)
    assert tiny_run.weights.stat().st_mode & 0o777 == tiny_run.record.stat().st_mode & 0o777

    for f in (tiny_run.weights, tiny_run.record):
        shutil.copy(f, tmp_path / f.name)
    path = tmp_path / tiny_run.weights.name
    with open(path, "ab") as f:
        f.write(b" ")
    with pytest.raises(WeightsError, match="sha256"):
        Classifier.load(path)
    # a file of the wrong architecture whose record checksum matches still fails clearly
    state = load_file(str(tiny_run.weights))
    key = next(k for k in state if k.startswith("head.") and k.endswith("weight"))
    state[key] = state[key][:, :10].contiguous()
    save_file(state, str(path))
    from smearpipe.weights import sha256_file

    rec = json.loads((tmp_path / tiny_run.record.name).read_text())
    rec["sha256"] = sha256_file(path)
    (tmp_path / tiny_run.record.name).write_text(json.dumps(rec))
    with pytest.raises(WeightsError, match="do not fit"):
        Classifier.load(path)
    with pytest.raises(WeightsError, match="unknown classifier"):
        Classifier.load("no-such-classifier")


def test_bad_training_data(tiny_crops, tmp_path):
    empty = tmp_path / "empty"
    (empty / "neutrophil").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no images"):
        train_classifier([empty], [tiny_crops / "val"], epochs=1, out_dir=tmp_path / "r")
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_crops / "train", unknown)
    (unknown / "neutrophil").rename(unknown / "megakaryocyte")
    with pytest.raises(DatasetError, match="megakaryocyte"):
        train_classifier([unknown], [tiny_crops / "val"], epochs=1, out_dir=tmp_path / "r")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_crops / "train", corrupt)
    (corrupt / "basophil" / "zz_broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match="zz_broken.jpg"):
        train_classifier([corrupt], [tiny_crops / "val"], epochs=1, batch_size=5, out_dir=tmp_path / "r2")
    assert not (tmp_path / "r2" / "train").exists()  # failed while caching, before a checkpoint: no run folder
    assert not (tmp_path / "r" / "train").exists()  # refused when listed: none made
    with pytest.raises(DatasetError, match="cannot resume"):
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, out_dir=tmp_path / "r3", resume=True)


def test_too_few_crops_for_batch(tiny_crops, tmp_path):
    with pytest.raises(DatasetError, match="only 15 training crops for batch_size 64"):
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, batch_size=64, input_size=32,
                         out_dir=tmp_path, num_workers=0)
    # one source given alone, as a str or a Path, is that source (not its characters)
    for one in (str(tiny_crops / "train"), tiny_crops / "train"):
        with pytest.raises(DatasetError, match="only 15 training crops"):
            train_classifier(one, tiny_crops / "val", epochs=1, batch_size=64, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # refused before any run folder was made
    for name in ("mine.safetensors", "sub/mine", ""):  # refused before training, not when the weights are written
        with pytest.raises(ValueError, match="name"):
            train_classifier(tiny_crops / "train", tiny_crops / "val", epochs=1, out_dir=tmp_path, record_name=name)
    with pytest.raises(DatasetError, match="15 validation crops are training crops too"):
        train_classifier(tiny_crops / "train", tiny_crops / "train", epochs=1, batch_size=5, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    val = tmp_path / "val2"
    for c in ("eosinophil", "neutrophil"):
        shutil.copytree(tiny_crops / "val" / c, val / c)
    with pytest.warns(UserWarning, match=r"no validation crops for class\(es\) \['basophil', 'lymphocyte', 'monocyte'\]"):
        train_classifier(tiny_crops / "train", val, epochs=1, batch_size=5, input_size=32, num_workers=0,
                         out_dir=tmp_path / "runs")


def test_crop_folders_as_users_have_them(tiny_crops, tmp_path):
    """Own class names in any case, images in sub-folders, hidden files and folders skipped; CSVs from a spreadsheet."""
    from smearpipe.train import CropSource, class_index

    root = tmp_path / "crops"
    src = sorted((tiny_crops / "train" / "neutrophil").iterdir())
    for folder, files in (("BLAST/slide1", src[:2]), ("Band_Cells", src[2:]), ("Neutrophils/.ipynb_checkpoints", src[:1])):
        (root / folder).mkdir(parents=True)
        for f in files:
            shutil.copy(f, root / folder / f.name)
    (root / "Neutrophils" / "a.jpg").write_bytes(src[0].read_bytes())
    (root / "Neutrophils" / "._a.jpg").write_bytes(b"macOS resource fork")
    (root / ".DS_Store").mkdir()
    classes = ("blast", "band cell", "neutrophil")
    got = CropSource(str(root)).samples(classes)
    assert sorted((p.relative_to(root).as_posix(), k) for p, k in got) == sorted(
        [(f"BLAST/slide1/{f.name}", 0) for f in src[:2]] + [(f"Band_Cells/{f.name}", 1) for f in src[2:]]
        + [("Neutrophils/a.jpg", 2)])
    assert class_index("EOS", ("basophil", "eosinophil")) == 1 and class_index("megakaryocyte", classes) is None
    table = tmp_path / "splits.csv"
    table.write_text("path,class,split\nBLAST/slide1/" + src[0].name + ",Blast,train\n", encoding="utf-8-sig")
    assert CropSource(str(root), split="train", splits_csv=str(table)).samples(classes)[0][1] == 0
    table.write_text("file,label,split\nx.jpg,blast,train\n")
    with pytest.raises(DatasetError, match="no path / class column"):
        CropSource(str(root), split="train", splits_csv=str(table)).samples(classes)


def test_a_resumed_run_is_the_run_it_would_have_been(tiny_crops, tmp_path, monkeypatch):
    """Resumed after its first epoch, from another working folder with the data given as an absolute path, a
    run draws the crops it would have drawn uninterrupted (it used to replay the first epoch's order)."""
    opts = dict(epochs=3, batch_size=5, input_size=32, num_workers=0, bf16=False)
    whole = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], out_dir=tmp_path / "whole", **opts)
    monkeypatch.chdir(tiny_crops)
    first = train_classifier(["train"], ["val"], out_dir=tmp_path / "cut", max_minutes=0, **opts)
    assert len(first.history) == 1
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"\['epochs'\] \(it was started with epochs=3\)"):  # its schedule has 3 epochs' steps
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], out_dir=tmp_path / "cut", resume=True,
                         **{**opts, "epochs": 4})
    done = train_classifier([f"{tiny_crops / 'train'}/"], [tiny_crops / "val"], out_dir=tmp_path / "cut", resume=True, **opts)
    assert [h["train_loss"] for h in done.history] == pytest.approx([h["train_loss"] for h in whole.history], rel=1e-5)
    assert json.loads(done.record.read_text())["training"]["train"][0]["root"] == str(tiny_crops / "train")


def test_resume_refuses_other_settings(tiny_run):
    with pytest.raises(ValueError, match="input_size"):
        train_classifier([tiny_run.run_dir.parent / "x"], [tiny_run.run_dir.parent / "y"], input_size=48, epochs=1,
                         out_dir=tiny_run.run_dir.parent, name=tiny_run.run_dir.name, resume=True)
    with pytest.raises(ValueError, match="framing"):
        train_classifier([tiny_run.run_dir.parent / "x"], [tiny_run.run_dir.parent / "y"], input_size=32, epochs=1,
                         out_dir=tiny_run.run_dir.parent, name=tiny_run.run_dir.name, resume=True, framing="as_given")


def test_record_with_unknown_framing_is_refused_at_load(tiny_run, tmp_path):
    for ext in (".safetensors", ".json"):
        shutil.copy(tiny_run.weights.with_suffix(ext), tmp_path / f"{tiny_run.weights.stem}{ext}")
    edited = tmp_path / f"{tiny_run.weights.stem}.json"
    rec = json.loads(edited.read_text())
    rec["framing"] = {**rec["framing"], "name": "tight"}
    edited.write_text(json.dumps(rec))
    with pytest.raises(WeightsError, match="framing"):
        Classifier.load(tmp_path / f"{tiny_run.weights.stem}.safetensors")


def test_unknown_framing_is_refused(tiny_crops, tmp_path):
    with pytest.raises(ValueError, match="framing"):
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, input_size=32, out_dir=tmp_path,
                         framing="tight")


def test_training_leaves_caller_rng_alone(tiny_crops, tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, batch_size=5, input_size=32,
                     out_dir=tmp_path, num_workers=0, augment=False)
    assert torch.equal(torch.rand(3), expected)


def test_cli_train_classifier_records_its_preprocessing(tiny_crops, tmp_path, capsys):
    from smearpipe.cli import main as cli_main

    code = cli_main(["train-classifier", "--train", str(tiny_crops / "train"), "--val", str(tiny_crops / "val"),
                     "--epochs", "1", "--input-size", "32", "--batch", "5", "--out", str(tmp_path), "--preprocess", "",
                     "--framing", "as_given", "--consistency", "2", "--sam-rho", "0.02"])
    assert code == 0
    rec = json.loads((tmp_path / "train" / "classifier.json").read_text())
    assert rec["framing"]["name"] == "as_given" and rec["training"]["consistency"] == 2.0
    assert rec["training"]["sam_rho"] == 0.02
    assert rec["preprocessing"]["steps"] == [] and Classifier.load(tmp_path / "train" / "classifier.safetensors").preprocessing.steps == ()
    assert cli_main(["train-classifier", "--train", str(tiny_crops / "train"), "--val", str(tiny_crops / "val"),
                     "--preprocess", "unsharp", "--out", str(tmp_path)]) == 2
    assert "unsharp" in capsys.readouterr().err
    assert cli_main(["train-classifier", "--train", str(tiny_crops / "train"), "--val", str(tiny_crops / "val"),
                     "--framing", "as_given", "--mask-radius", "0.8", "--out", str(tmp_path)]) == 2
    assert "mask_radius needs the 'cell' framing" in capsys.readouterr().err


def test_a_masked_framing_is_recorded_and_repeated_at_inference(tiny_crops, tmp_path):
    from smearpipe.classify import prepare_crops
    from smearpipe.framing import Framing, frame_cell

    res = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, batch_size=5, input_size=32,
                           out_dir=tmp_path, num_workers=0, framing=Framing("cell", mask_radius=0.8))
    rec = json.loads(res.record.read_text())
    assert rec["framing"]["mask_radius"] == 0.8
    clf = Classifier.load(res.weights)
    assert clf.framing == Framing("cell", mask_radius=0.8)
    from smearpipe.io import read_image

    crop = read_image(next((tiny_crops / "val").rglob("*.jpg")))
    a = prepare_crops([crop], size=32, preprocessing=clf.preprocessing, preprocess_resized=clf.preprocess_resized,
                      framing=clf.framing)
    b = prepare_crops([frame_cell(crop, mask_radius=0.8)], size=32, preprocessing=clf.preprocessing,
                      preprocess_resized=clf.preprocess_resized, framing="as_given")
    np.testing.assert_array_equal(a, b)
    unmasked = prepare_crops([crop], size=32, preprocessing=clf.preprocessing, preprocess_resized=clf.preprocess_resized,
                             framing="cell")
    assert not np.array_equal(a, unmasked)  # the mask did something


def test_cli_classify_types_crops_in_input_order_and_keeps_earlier_output(tiny_run, tiny_crops, tmp_path, capsys):
    import csv

    from smearpipe.cli import main as cli_main
    from smearpipe.io import read_image

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "preds" / "types.csv"
    args = ["classify", str(bad), str(tiny_crops / "val"), "--classifier", str(tiny_run.weights), "--out", str(out)]
    assert cli_main(args) == 1  # one unreadable file: its row says why, the others are typed
    rows = list(csv.DictReader(out.open()))
    files = sorted((tiny_crops / "val").rglob("*.jpg"))
    assert [r["path"] for r in rows] == [str(bad), *map(str, files)]
    assert rows[0]["error"].startswith("cannot decode") and rows[0]["wbc_type"] == ""
    clf = Classifier.load(tiny_run.weights)
    expected = clf.predict_proba([read_image(f) for f in files])
    for r, e in zip(rows[1:], expected, strict=True):
        probs = np.array([float(r[f"p_{c}"]) for c in clf.classes])
        np.testing.assert_allclose(probs, e, atol=6e-5)  # written with 4 decimals
        assert r["wbc_type"] == clf.classes[int(e.argmax())] and r["error"] == ""
    assert "broken.jpg" in capsys.readouterr().err
    before = out.read_bytes()
    assert cli_main(args) == 2 and out.read_bytes() == before  # an earlier output is kept
    assert "exists" in capsys.readouterr().err
    assert cli_main(["classify", str(bad), "--out", str(out), "--overwrite"]) == 2  # nothing typed: earlier CSV kept
    assert out.read_bytes() == before and "kept as it was" in capsys.readouterr().err
    assert sorted(f.name for f in out.parent.iterdir()) == ["types.csv"]  # no temporary file left
    assert cli_main(["classify", str(tmp_path / "preds"), "--out", str(tmp_path / "x.csv")]) == 2  # no images there
    assert cli_main([*args[:-1], str(tmp_path / "y.csv"), "--review-probability", "2"]) == 2
    assert cli_main([*args[:-1], str(tmp_path / "preds"), "--overwrite"]) == 2  # a folder is no CSV
    assert "is a folder" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "y.csv").exists()

    # the shipped classifier and the default threshold: confident PBC crops pass, a blank crop is flagged
    import cv2

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((120, 120, 3), 235, np.uint8))
    shipped_out = tmp_path / "shipped.csv"
    assert cli_main(["classify", *map(str, files[:4]), str(blank), "--out", str(shipped_out)]) == 0
    rows = list(csv.DictReader(shipped_out.open()))
    shipped = Classifier.load()
    expected = shipped.predict_proba([read_image(f) for f in [*files[:4], blank]])
    assert [r["wbc_type"] for r in rows] == [shipped.classes[int(e.argmax())] for e in expected]
    assert [r["review"] == "yes" for r in rows[:4]] == [bool(e.max() < 0.7) for e in expected[:4]]
    assert any(r["review"] == "no" for r in rows[:4])
    assert rows[4]["review"] == "yes" and "no nucleus found" in rows[4]["reasons"]


def test_resume_of_a_run_from_before_newer_options(tiny_crops, tmp_path):
    opts = dict(epochs=2, batch_size=5, input_size=32, out_dir=tmp_path, name="old", num_workers=0, framing="as_given")
    first = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], max_minutes=0, **opts)
    saved = json.loads((first.run_dir / "run_config.json").read_text())
    del saved["framing"], saved["consistency"], saved["augment"]["lowres_p"], saved["augment"]["lowres_max"]  # as before they existed
    del saved["augment"]["stain_vector"], saved["augment"]["gray_p"], saved["sam_rho"]
    for key in ("sharpen_target", "sharpen_sigma", "sharpen_max_amount"):
        del saved["preprocessing"][key]
    (first.run_dir / "run_config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="consistency"):  # the old run had no consistency term: not one now
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], resume=True, consistency=12, **opts)
    with pytest.raises(ValueError, match="sam_rho"):  # nor SAM
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], resume=True, sam_rho=0.05, **opts)
    done = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], resume=True, **opts)
    assert [h["epoch"] for h in done.history] == [1, 2]


def test_resume_finishes_the_run_and_keeps_its_clock(tiny_crops, tmp_path):
    opts = dict(epochs=2, batch_size=5, input_size=32, out_dir=tmp_path, name="r", num_workers=0, augment=False)
    first = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], max_minutes=0, **opts)
    assert len(first.history) == 1 and "time limit" in json.loads(first.record.read_text())["training"]["stopped"]
    assert sorted(p.name for p in first.run_dir.glob("*.tmp")) == []  # checkpoints are renamed into place
    done = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], resume=True, **opts)
    assert done.run_dir == first.run_dir and [h["epoch"] for h in done.history] == [1, 2]
    assert done.history[1]["minutes"] >= done.history[0]["minutes"]  # the resumed run continues the clock


def test_weight_average_update():
    """The average moves towards the model by 1 - decay (ramped up early); integer buffers are copied."""
    import torch

    from smearpipe.train import _WeightAverage

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    avg = _WeightAverage(model, 0.9)
    start = [p.clone() for p in avg.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 3))  # changes the running statistics and the step count
    avg.update()
    d = 2 / 11  # min(0.9, (1 + 1) / (10 + 1)) at the first update
    for a, s, m in zip(avg.model.parameters(), start, model.parameters(), strict=True):
        torch.testing.assert_close(a, d * s + (1 - d) * m)
    bn, bn_avg = model[1], avg.model[1]
    assert int(bn_avg.num_batches_tracked) == int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn_avg.running_mean, (1 - d) * bn.running_mean)  # it started at 0
    assert not any(p.requires_grad for p in avg.model.parameters())
    for _ in range(200):
        avg.update()
    for a, m in zip(avg.model.parameters(), model.parameters(), strict=True):  # converges to a fixed model
        torch.testing.assert_close(a, m)


def test_train_with_ema(tiny_crops, tmp_path):
    """With ``ema``, the saved weights are the average (not the last step's) and the run resumes with it."""
    import torch

    kw = dict(epochs=3, batch_size=5, input_size=32, out_dir=tmp_path, name="ema", num_workers=0, ema=0.9, patience=10)
    first = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], max_minutes=0, **kw)  # stops after epoch 1
    ck1 = torch.load(first.run_dir / "checkpoint.pt", weights_only=False)
    assert ck1["ema"]["updates"] == 3  # 15 crops, batches of 5
    best1 = torch.load(first.run_dir / "best_state.pt", weights_only=True)  # epoch 1 is the best so far
    key = "features.0.weight"
    torch.testing.assert_close(best1[key], ck1["ema"]["model"][key], rtol=0, atol=0)  # the average is what is kept
    assert not torch.equal(best1[key], ck1["model"][key])  # not the last step's weights
    run = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], resume=True, **kw)
    assert len(run.history) == 3 and json.loads(run.record.read_text())["training"]["ema"] == 0.9
    ck = torch.load(run.run_dir / "checkpoint.pt", weights_only=False)
    assert ck["ema"]["updates"] == 9  # the average went on from the checkpoint
    assert not torch.equal(ck["ema"]["model"][key], ck1["ema"]["model"][key])


@pytest.mark.parametrize("bad, error", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), (True, TypeError),
                                        ("0.9", TypeError)])
def test_train_ema_refuses(tiny_crops, tmp_path, bad, error):
    with pytest.raises(error, match="ema"):
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, input_size=32, out_dir=tmp_path, ema=bad)
    assert not (tmp_path / "train").exists()  # refused before a run folder is made



@pytest.mark.parametrize("bad", ["gpu", None, 3, "cuda:999"])
def test_train_device_refuses(tiny_crops, tmp_path, bad):
    with pytest.raises(ValueError, match="device"):
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, input_size=32, out_dir=tmp_path,
                         device=bad)
    assert not (tmp_path / "train").exists()  # refused before a run folder is made


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_train_num_workers_refuses(tiny_crops, tmp_path, bad):
    with pytest.raises(ValueError, match="num_workers"):
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, input_size=32, out_dir=tmp_path,
                         num_workers=bad)
    assert not (tmp_path / "train").exists()


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, "5"])
def test_train_patience_refuses(tiny_crops, tmp_path, bad):
    with pytest.raises(ValueError, match="patience"):  # 0 would stop every run after its first epoch
        train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, input_size=32, out_dir=tmp_path,
                         patience=bad)
    assert not (tmp_path / "train").exists()


def test_training_device_is_recorded(tiny_run):
    assert json.loads(tiny_run.record.read_text())["training"]["device"] == "cpu"


def test_cli_train_classifier_unknown_device(tiny_crops, tmp_path, capsys):
    from smearpipe.cli import main as cli_main

    code = cli_main(["train-classifier", "--train", str(tiny_crops / "train"), "--val", str(tiny_crops / "val"),
                     "--epochs", "1", "--input-size", "32", "--out", str(tmp_path), "--device", "gpu"])
    assert code == 2 and "device" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_forced_bf16_warns_where_the_cpu_lacks_it(tiny_run, monkeypatch):
    import smearpipe.classify as classify

    monkeypatch.setattr(classify, "_bf16_supported", lambda: False)
    with pytest.warns(RuntimeWarning, match="bf16"):
        assert Classifier.load(tiny_run.weights, precision="bf16").use_bf16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not Classifier.load(tiny_run.weights).use_bf16  # "auto": float32 here, no warning
    monkeypatch.setattr(classify, "_bf16_supported", lambda: True)
    assert Classifier.load(tiny_run.weights).use_bf16


def test_predict_proba_names_the_bad_crop_across_batches(tiny_run):
    clf = Classifier.load(tiny_run.weights)
    crop = np.full((40, 40, 3), 180, np.uint8)
    with pytest.raises(InvalidImageError, match="crop 40 "):
        clf.predict_proba([crop] * 40 + [np.zeros((0, 5, 3), np.uint8)])
    with pytest.raises(TypeError, match="list of RGB crops"):
        clf.predict_proba(None)
    with pytest.raises(InvalidImageError, match="wrap a single crop"):
        clf.predict_proba(np.zeros((40, 40), np.uint8))


def test_bf16_inference_copy_gives_the_autocast_logits_and_follows_the_model(tiny_run, tiny_crops):
    """predict_proba in bf16 runs a copy of the network with bf16 conv/linear weights: the same numbers as autocast
    on ``model``, rebuilt when ``model`` changes; networks with other layers run under autocast."""
    import copy

    import torch

    from smearpipe.classify import prepare_crops
    from smearpipe.io import read_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # forced bf16 on a CPU without it: slow, still exact
        clf = Classifier.load(tiny_run.weights, precision="bf16")
    crops = [read_image(f) for f in sorted((tiny_crops / "val").rglob("*.jpg"))]

    def autocast_proba(model):
        x = torch.from_numpy(prepare_crops(crops, size=clf.input_size, preprocessing=clf.preprocessing, mean=clf.mean,
                                           std=clf.std, preprocess_resized=clf.preprocess_resized,
                                           framing=clf.framing)).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.softmax(model(x).float(), dim=1).numpy().astype(np.float64)

    first = clf.predict_proba(crops)
    net = clf._bf16_network()
    assert net is not None and clf._bf16_copy[1] is net and clf._bf16_network() is net  # made once, then kept
    assert net[0][0].weight.dtype == torch.bfloat16 and net[0][1].weight.dtype == torch.float32
    np.testing.assert_array_equal(first, autocast_proba(clf.model))
    np.testing.assert_array_equal(first, autocast_proba(lambda x: net(x.to(torch.bfloat16))))
    with torch.no_grad():  # a change of the network in place (as a user's adaptation would make) is followed
        clf.model.head[4].bias += torch.arange(len(clf.classes), dtype=torch.float32)
    changed = clf.predict_proba(crops)
    assert clf._bf16_network() is not net
    np.testing.assert_array_equal(changed, autocast_proba(clf.model))
    assert np.abs(changed - first).max() > 0.01
    hook = clf.model.head.register_forward_hook(lambda mod, inp, out: out * 0)
    assert clf._bf16_network() is None  # hooks run only on ``model``: autocast
    np.testing.assert_allclose(clf.predict_proba(crops), 1 / len(clf.classes))
    hook.remove()
    clf.model.train()
    assert clf._bf16_network() is None  # the copy is in eval mode
    clf.model.eval()
    with torch.inference_mode(), warnings.catch_warnings():  # a network made in inference mode has no version counters
        warnings.simplefilter("ignore", RuntimeWarning)
        made_there = Classifier(copy.deepcopy(clf.model), clf.record, precision="bf16")
    assert made_there._bf16_network() is None
    np.testing.assert_array_equal(made_there.predict_proba(crops), changed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        other = Classifier(torch.nn.Sequential(clf.model, torch.nn.Identity()), clf.record, precision="bf16")
    assert other._bf16_network() is None  # a layer the copy does not cover: autocast, same numbers
    np.testing.assert_array_equal(other.predict_proba(crops), changed)


def test_average_classifiers_script(tiny_run, tmp_path, monkeypatch):
    """scripts/average_classifiers.py: the mean of two fine-tunes of one network, and refusals otherwise."""
    import importlib.util
    import sys

    import torch

    from smearpipe.classify import save_classifier

    spec = importlib.util.spec_from_file_location("average_classifiers", REPO / "scripts" / "average_classifiers.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    start = Classifier.load(tiny_run.weights, precision="fp32")
    fields = {k: v for k, v in start.record.to_dict().items() if k not in ("name", "kind", "file", "sha256", "dtype")}
    fields["preprocessing"] = start.preprocessing

    start_sha256 = json.loads(tiny_run.record.read_text())["sha256"]

    def fine_tune(name, seed, sha256=start_sha256, **changed):  # a fine-tune of ``start``: weights moved, start recorded
        model = Classifier.load(tiny_run.weights, precision="fp32").model
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for v in model.state_dict().values():
                if v.is_floating_point():
                    v += 0.01 * torch.randn(v.shape, generator=gen)
        training = {**fields["training"], "pretrained": str(tiny_run.weights), "pretrained_sha256": sha256}
        return save_classifier(model, {**fields, "training": training, **changed}, tmp_path, name).path

    a, b = fine_tune("a", 1), fine_tune("b", 2)

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["average_classifiers.py", *map(str, argv)])
        script.main()

    run(a, b, "--out", tmp_path / "soup", "--name", "soup")
    soup = Classifier.load(tmp_path / "soup" / "soup.safetensors", precision="fp32")
    sa, sb = (Classifier.load(p, precision="fp32").model.state_dict() for p in (a, b))
    for k, v in soup.model.state_dict().items():
        if v.is_floating_point():
            mean = (sa[k].float() + sb[k].float()) / 2
            np.testing.assert_allclose(v.float().numpy(), mean.numpy(), rtol=2e-3, atol=1e-4)  # stored as fp16
    assert not np.allclose(sa["head.4.weight"].numpy(), sb["head.4.weight"].numpy())  # two different ingredients
    rec = json.loads((tmp_path / "soup" / "soup.json").read_text())
    assert [i["sha256"] for i in rec["training"]["ingredients"]] == [json.loads(p.with_suffix(".json").read_text())["sha256"]
                                                                     for p in (a, b)]
    assert rec["training"]["pretrained_sha256"] == start_sha256
    proba = soup.predict_proba(list(np.zeros((2, 40, 40, 3), np.uint8)))
    assert proba.shape == (2, 5) and np.isfinite(proba).all()
    with pytest.raises(SystemExit, match="exists"):  # never silently replaced
        run(a, b, "--out", tmp_path / "soup", "--name", "soup")
    other_start, other_scale = fine_tune("c", 3, sha256="0" * 64), fine_tune("d", 4, crop_scale=3.0)
    for models, error in [((a,), "at least two"), ((a, a), "twice"),
                          ((tiny_run.weights, a), "not fine-tuned from a saved network"),  # the start itself: from scratch
                          ((a, other_start), "not fine-tuned from one network"), ((a, other_scale), "differ in 'crop_scale'"),
                          ((a, tmp_path / "missing.safetensors"), "missing")]:
        with pytest.raises(SystemExit, match=error):
            run(*models, "--out", tmp_path / "x", "--name", "x")
    assert not (tmp_path / "x").exists()  # nothing written on a refusal


def test_fine_tune_records_its_start_by_sha256(tiny_run, tiny_crops, tmp_path):
    assert json.loads(tiny_run.record.read_text())["training"]["pretrained_sha256"] is None  # from scratch
    copy = tmp_path / "start.safetensors"
    shutil.copy(tiny_run.weights, copy)
    done = train_classifier([tiny_crops / "train"], [tiny_crops / "val"], epochs=1, batch_size=5, input_size=32,
                            out_dir=tmp_path, name="ft", num_workers=0, augment=False, pretrained=copy)
    training = json.loads(done.record.read_text())["training"]
    assert training["pretrained"] == str(copy)
    assert training["pretrained_sha256"] == json.loads(tiny_run.record.read_text())["sha256"]


@pytest.mark.parametrize("change, message", [
    (dict(classes="abcde"), "classes"), (dict(classes=["a", "a", "b", "c", "d"]), "classes"),
    (dict(input_size=0), "input_size"), (dict(input_size="64"), "input_size"), (dict(sha256="abc"), "sha256"),
    (dict(std=[0, 0, 0]), "std"), (dict(mean=[0.5, 0.5]), "mean"), (dict(preprocess_resized="false"), "preprocess_resized"),
    (dict(architecture=[1]), "architecture"), (dict(architecture={"hidden": 0}), "architecture"),
    (dict(crop_scale=float("nan")), "crop_scale"), (dict(framing={"name": "cell", "contxt": 1.8}), "contxt"),
])
def test_malformed_classifier_records_are_refused_at_load(tiny_run, tmp_path, change, message):
    for ext in (".safetensors", ".json"):
        shutil.copy(tiny_run.weights.with_suffix(ext), tmp_path / f"{tiny_run.weights.stem}{ext}")
    edited = tmp_path / f"{tiny_run.weights.stem}.json"
    edited.write_text(json.dumps({**json.loads(edited.read_text()), **change}))
    with pytest.raises(WeightsError, match=message):
        Classifier.load(tmp_path / f"{tiny_run.weights.stem}.safetensors")


def test_record_sha256_in_capitals_is_the_same_digest(tiny_run, tmp_path):
    for ext in (".safetensors", ".json"):
        shutil.copy(tiny_run.weights.with_suffix(ext), tmp_path / f"{tiny_run.weights.stem}{ext}")
    edited = tmp_path / f"{tiny_run.weights.stem}.json"
    rec = json.loads(edited.read_text())
    edited.write_text(json.dumps({**rec, "sha256": rec["sha256"].upper()}))
    assert Classifier.load(tmp_path / f"{tiny_run.weights.stem}.safetensors").record.sha256 == rec["sha256"]


@pytest.mark.parametrize("kwargs, message", [(dict(num_classes=2.5), "num_classes"), (dict(num_classes=True), "num_classes"),
                                             (dict(num_classes=5, hidden=0), "hidden"),
                                             (dict(num_classes=5, dropout=1.0), "dropout")])
def test_build_vgg16_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_vgg16(**kwargs)
