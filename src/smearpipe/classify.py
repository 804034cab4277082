"""Classifier stage: VGG16 (batch-norm) typing of WBC crops.

The network is torchvision's VGG16-BN feature extractor (13 conv layers) with a small head
(global average pooling -> dropout -> 256 -> N classes) instead of the 120 M-parameter ImageNet head,
so it trains from scratch on a CPU and ships as a ~29 MB fp16 safetensors file.

References
----------
.. [1] K. Simonyan and A. Zisserman, "Very deep convolutional networks for large-scale image
   recognition", ICLR 2015.
.. [2] A. Acevedo et al., "A dataset of microscopic peripheral blood cell images for development of
   automatic recognition systems", Data in Brief 30, 2020.
"""

from __future__ import annotations

import copy
import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import DatasetError, InvalidImageError, WeightsError
from .framing import Framing, apply_framing
from .io import to_rgb_uint8
from .preprocess import Preprocessing
from .weights import DEFAULT_CLASSIFIER, WeightsRecord, resolve

__all__ = ["build_vgg16", "Classifier", "load_imagenet_features", "IMAGENET_MEAN", "IMAGENET_STD", "prepare_crops",
           "resize_preprocessed", "adapt_batchnorm", "adapt_entropy", "MIN_ADAPT_CROPS"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_vgg16(
    num_classes: int,
    *,
    batch_norm: bool = True,
    pretrained: str | os.PathLike | None = None,
    hidden: int = 256,
    dropout: float = 0.3,
    freeze_features: bool = False,
) -> Any:
    """VGG16 (-BN) features with a small classification head.

    Parameters
    ----------
    num_classes : int
    batch_norm : bool
        VGG16-BN (trains reliably from scratch) or plain VGG16 (the paper's network).
    pretrained : {"imagenet"} or path, optional
        ``"imagenet"`` loads torchvision's ImageNet weights for the conv layers (needs internet the
        first time; offline it raises with instructions); a path loads a local torchvision VGG16
        state dict (ImageNet or your own) or a smearpipe classifier (``.safetensors``), whose head is
        kept too when it has the same shape (fine-tuning on the same classes). None: random initialisation.
    hidden, dropout : int, float
        Head size and dropout.
    freeze_features : bool
        Frozen-base feature extraction (the paper's recipe): only the head trains.

    Returns
    -------
    torch.nn.Module
        Takes ``(N, 3, S, S)`` float tensors normalised with ImageNet mean/std; any S >= 32.
    """
    import torch
    from torch import nn
    from torchvision.models import vgg16, vgg16_bn

    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, (int, np.integer)) or hidden < 1:
        raise ValueError(f"hidden must be a positive integer, got {hidden!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    base = (vgg16_bn if batch_norm else vgg16)(weights=None)
    if pretrained is not None:
        state = load_imagenet_features(batch_norm=batch_norm) if str(pretrained) == "imagenet" else _load_state(pretrained)
        try:
            missing = base.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise WeightsError(f"pretrained state dict does not fit VGG16{'-BN' if batch_norm else ''} "
                               f"(batch_norm={batch_norm}): {str(exc)[:300]}") from None
        feats_missing = [k for k in missing.missing_keys if k.startswith("features.")]
        if feats_missing:
            raise WeightsError(f"pretrained state dict lacks VGG16{'-BN' if batch_norm else ''} feature layers: {feats_missing[:4]}...")
    model = nn.Sequential()
    model.add_module("features", base.features)
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flatten", nn.Flatten())
    model.add_module("head", nn.Sequential(nn.Dropout(dropout), nn.Linear(512, hidden), nn.ReLU(inplace=True),
                                           nn.Dropout(dropout), nn.Linear(hidden, num_classes)))
    if pretrained is not None:
        head = {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
        own = model.head.state_dict()
        if head.keys() == own.keys() and all(head[k].shape == own[k].shape for k in own):
            model.head.load_state_dict(head)
    if freeze_features:
        for p in model.features.parameters():
            p.requires_grad_(False)
    del torch
    return model


def _load_state(path: str | os.PathLike) -> dict:
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"pretrained weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"cannot read state dict {path}: {exc}") from exc
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_imagenet_features(*, batch_norm: bool = True) -> dict:
    """torchvision's ImageNet VGG16(-BN) state dict (downloads once into the torch hub cache).

    Raises
    ------
    WeightsError
        When the weights cannot be downloaded (offline): download
        ``VGG16_BN_Weights.IMAGENET1K_V1`` on a machine with internet and pass the file path as
        ``pretrained=``.
    """
    from torchvision.models import VGG16_BN_Weights, VGG16_Weights

    weights = VGG16_BN_Weights.IMAGENET1K_V1 if batch_norm else VGG16_Weights.IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)
    except Exception as exc:  # URLError, socket errors, HTTP errors
        raise WeightsError(
            f"cannot download ImageNet weights ({weights.url}): {exc}. Without internet, fetch that file "
            "elsewhere and pass its path as pretrained=PATH"
        ) from exc


def prepare_crops(crops: Sequence[np.ndarray], *, size: int, preprocessing: Preprocessing,
                  preprocess_resized: bool, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD, framing: Framing | str, first_index: int = 0) -> np.ndarray:
    """Crops (any size, RGB uint8) -> ``(N, 3, size, size)`` float32, preprocessed and normalised.

    ``preprocess_resized`` (required, the order is part of what a model was trained with: pass
    ``Classifier.preprocess_resized``): resize to ``size`` first, then preprocess (models trained with
    ``train_classifier(preprocess_resized=True)``; much cheaper on large crops). Otherwise preprocess
    at the crop's own size, then resize. ``framing`` (required too: pass ``Classifier.framing``;
    ``"as_given"`` for models recorded without one) is applied first. :meth:`Classifier.predict_proba`
    does all this for you. ``first_index``: the index of ``crops[0]`` in the caller's list, for error messages.
    """
    out = np.empty((len(crops), 3, size, size), np.float32)
    m = np.asarray(mean, np.float32)[:, None, None] * 255
    s = np.asarray(std, np.float32)[:, None, None] * 255
    for i, crop in enumerate(crops):
        rgb = resize_preprocessed(to_rgb_uint8(crop, name=f"crop {first_index + i}"), size=size, preprocessing=preprocessing,
                                  preprocess_resized=preprocess_resized, framing=framing)
        out[i] = (rgb.transpose(2, 0, 1).astype(np.float32) - m) / s
    return out


def resize_preprocessed(rgb: np.ndarray, *, size: int, preprocessing: Preprocessing, preprocess_resized: bool,
                        framing: Framing | str) -> np.ndarray:
    """One RGB uint8 crop -> ``(size, size, 3)`` uint8: reframed, then preprocessed before or after resizing.

    The single place that fixes the order, used both for training crops and at inference.
    """
    rgb = apply_framing(rgb, framing)
    if not preprocess_resized:
        rgb = preprocessing(rgb)
    interp = cv2.INTER_AREA if min(rgb.shape[:2]) >= size else cv2.INTER_LINEAR
    rgb = cv2.resize(rgb, (size, size), interpolation=interp)
    return preprocessing(rgb) if preprocess_resized else rgb


def _crop_list(crops: Sequence[np.ndarray], *, caller: str) -> list[np.ndarray]:
    """``crops`` as a list; one (H, W[, 3]) array is refused (iterating it would give H rows, not crops)."""
    if isinstance(crops, np.ndarray) and crops.ndim in (2, 3):
        raise InvalidImageError(f"{caller} takes a list of crops; wrap a single crop as [crop]")
    if isinstance(crops, (str, bytes, os.PathLike)) or not isinstance(crops, Iterable):
        raise TypeError(f"{caller} takes a list of RGB crops (arrays), got {type(crops).__name__}")
    return list(crops)


def _bf16_copy_layers() -> tuple[type, ...]:
    """The layers whose bfloat16 copy computes what CPU autocast computes (:meth:`Classifier._bf16_network`)."""
    import torch.nn as nn

    return (nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
            nn.Dropout, nn.Linear)


def _same_state(a: tuple, b: tuple) -> bool:
    """Whether two ``(tensors with versions, layer settings)`` states of a network are the same tensors, unchanged."""
    (ta, sa), (tb, sb) = a, b
    return sa == sb and len(ta) == len(tb) and all(x is y and vx == vy for (x, vx), (y, vy) in zip(ta, tb, strict=True))


def _bf16_supported() -> bool:
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


class Classifier:
    """A loaded WBC-crop classifier with its weights record.

    Use :meth:`load`. ``classes`` are lowercase WBC type names in output order.

    Examples
    --------
    >>> clf = Classifier.load()                                 # doctest: +SKIP
    >>> clf.predict_proba([crop]).shape                         # doctest: +SKIP
    (1, 5)
    """

    def __init__(self, model: Any, record: WeightsRecord, *, precision: str = "auto", batch_size: int = 32) -> None:
        if precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        import torch

        self.model = model.eval().to(memory_format=torch.channels_last)  # faster oneDNN convolutions on CPU
        self._bf16_copy: tuple[tuple, Any] | None = None  # (state of model, bf16 network): see _bf16_network
        self.record = record
        self.batch_size = int(batch_size)
        self.use_bf16 = precision == "bf16" or (precision == "auto" and _bf16_supported())
        if precision == "bf16" and not _bf16_supported():
            warnings.warn("precision='bf16' on a CPU without oneDNN's bf16 support (it needs AVX-512): autocast falls "
                          "back to kernels far slower than float32; precision='auto' chooses float32 here",
                          RuntimeWarning, stacklevel=3)
        meta = record.metadata
        self.mean = tuple(meta.get("mean", IMAGENET_MEAN))
        self.std = tuple(meta.get("std", IMAGENET_STD))
        try:
            self._framing = Framing.from_value(meta.get("framing"))
        except (TypeError, ValueError) as exc:
            raise WeightsError(f"{record.name}: unusable framing in its record: {exc}") from None

    def __repr__(self) -> str:
        return f"Classifier({self.record.name!r}, classes={self.classes}, input_size={self.input_size})"

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.record.classes)

    @property
    def input_size(self) -> int:
        return self.record.input_size

    @property
    def preprocessing(self) -> Preprocessing:
        return self.record.preprocessing

    @property
    def preprocess_resized(self) -> bool:
        """Whether the recorded preprocessing runs after resizing to the input size (else before)."""
        return bool(self.record.metadata.get("preprocess_resized", False))

    @property
    def framing(self) -> Framing:
        """How crops are reframed before resizing (records before v5 have none: crops as given)."""
        return self._framing

    @property
    def crop_scale(self) -> float:
        """Crop side relative to the detector box that the model was trained with."""
        return float(self.record.metadata.get("crop_scale", 2.0))

    @classmethod
    def load(cls, name_or_path: str | os.PathLike | None = None, *, precision: str = "auto") -> Classifier:
        """Load the shipped default (None), a registered name, or a ``.safetensors`` file with its record.

        A user file needs its record (``<stem>.json`` beside it, written by
        :func:`~smearpipe.train.train_classifier`): classes, input size and preprocessing cannot be guessed.

        Parameters
        ----------
        precision : {"auto", "fp32", "bf16"}
            ``"auto"``: bfloat16 autocast where oneDNN supports bf16 on the CPU (AVX-512; native with AVX512-BF16
            or AMX), float32 elsewhere (``benchmarks/bench_classify.py``: 8.3 ms per crop with bf16 on one CPU,
            24.2 ms in float32 on another). ``"bf16"`` forces it, with a warning on a CPU without that support,
            where autocast runs far slower.

        Raises
        ------
        WeightsError
            Unknown name, missing record or file, sha256 mismatch, tensors that do not fit the architecture.
        """
        found = resolve(DEFAULT_CLASSIFIER if name_or_path is None else name_or_path, kind="classifier")
        if not isinstance(found, WeightsRecord):
            raise WeightsError(f"{found} has no record ({found.with_suffix('.json').name}); classifier weights need one")
        _check_classifier_record(found)
        return cls(_model_from_record(found), found, precision=precision)

    def predict_proba(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities of WBC crops.

        Parameters
        ----------
        crops : list of (H, W, 3) uint8 ndarray
            RGB crops of any size; each is preprocessed with the record's preprocessing and resized.

        Returns
        -------
        proba : (N, len(classes)) float64 ndarray
            Rows sum to 1.
        """
        import torch

        crops = _crop_list(crops, caller="predict_proba")
        if not crops:
            return np.zeros((0, len(self.classes)))
        outs = []
        net = self._bf16_network() if self.use_bf16 else None
        with torch.inference_mode():
            for i in range(0, len(crops), self.batch_size):
                x = torch.from_numpy(prepare_crops(crops[i: i + self.batch_size], size=self.input_size,
                                                   preprocessing=self.preprocessing, mean=self.mean, std=self.std,
                                                   preprocess_resized=self.preprocess_resized, framing=self.framing,
                                                   first_index=i))
                x = x.contiguous(memory_format=torch.channels_last)
                if net is not None:
                    logits = net(x.to(torch.bfloat16))
                else:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.use_bf16):
                        logits = self.model(x)
                outs.append(torch.softmax(logits.float(), dim=1).numpy().astype(np.float64))
        return np.concatenate(outs)

    def _bf16_network(self) -> Any:
        """``model`` with its convolution and linear weights cast to bfloat16 once, or None where the copy could
        differ from ``model`` under autocast (they then run under autocast).

        CPU autocast casts those weights again on every call; the copy gives the same logits, bit for bit
        (tests/test_classify.py), 1-1.8 ms sooner per call for the shipped 64 px VGG16-BN on one crop. It is made
        only for networks of plain VGG layers in eval mode without hooks, and made again when any of ``model``'s
        tensors is replaced or changed in place, or a layer's settings change.
        """
        import torch

        modules, layers = list(self.model.modules()), _bf16_copy_layers()
        if self.model.training or not all(type(m) in layers and not (m._forward_hooks or m._forward_pre_hooks)
                                          for m in modules):
            return None
        tensors = [*self.model.parameters(), *self.model.buffers()]
        if any(t.is_inference() for t in tensors):  # no version counter to follow changes by
            return None
        state = ([(t, t._version) for t in tensors], [m.extra_repr() for m in modules])
        cached = self._bf16_copy
        if cached is None or not _same_state(cached[0], state):
            net = copy.deepcopy(self.model)
            with torch.no_grad():
                for m in net.modules():
                    if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                        m.to(torch.bfloat16)  # batch norm stays float32, as under autocast
            self._bf16_copy = cached = (state, net.eval())
        return cached[1]

    def predict(self, crops: Sequence[np.ndarray]) -> list[str]:
        """Most probable class name of each crop."""
        proba = self.predict_proba(crops)
        return [self.classes[i] for i in proba.argmax(axis=1)]


def _check_classifier_record(record: WeightsRecord) -> None:
    """WeightsError naming the entry of a classifier record that inference cannot use as it is."""
    meta = record.metadata

    def bad(key: str, expected: str) -> WeightsError:
        return WeightsError(f"record {record.name!r}: {key} must be {expected}, got {meta.get(key)!r}")

    def real(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    for key, positive in (("mean", False), ("std", True)):
        v = meta.get(key)
        if v is not None and not (isinstance(v, (list, tuple)) and len(v) == 3 and all(real(x) for x in v)
                                  and (not positive or min(v) > 0)):
            raise bad(key, "3 finite numbers" + (" > 0" if positive else ""))
    if "preprocess_resized" in meta and not isinstance(meta["preprocess_resized"], bool):
        raise bad("preprocess_resized", "true or false")
    if "crop_scale" in meta and not (real(meta["crop_scale"]) and meta["crop_scale"] > 0):
        raise bad("crop_scale", "a finite number > 0")
    arch = meta.get("architecture", {})
    if not isinstance(arch, dict):
        raise bad("architecture", "a mapping")
    if not isinstance(arch.get("batch_norm", True), bool):
        raise bad("architecture", "a mapping with batch_norm true or false")
    hidden, dropout = arch.get("hidden", 256), arch.get("dropout", 0.3)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise bad("architecture", "a mapping with hidden a positive integer")
    if not (real(dropout) and 0 <= dropout < 1):
        raise bad("architecture", "a mapping with dropout in [0, 1)")
    try:
        Framing.from_value(meta.get("framing"))
    except (TypeError, ValueError) as exc:
        raise WeightsError(f"{record.name}: unusable framing in its record: {exc}") from None


def _model_from_record(record: WeightsRecord) -> Any:
    import torch
    from safetensors.torch import load_file

    arch = record.metadata.get("architecture", {})
    model = build_vgg16(len(record.classes), batch_norm=arch.get("batch_norm", True), hidden=arch.get("hidden", 256),
                        dropout=arch.get("dropout", 0.3))
    try:
        state = load_file(str(record.path))
    except Exception as exc:
        raise WeightsError(f"cannot read safetensors file {record.path}: {exc}") from exc
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights {record.path} do not fit the architecture of record {record.name!r}: {str(exc)[:300]}") from None
    del torch
    return model


def check_weights_name(name: object) -> None:
    """ValueError unless ``name`` is a plain file name without the extension (``NAME.safetensors`` and
    ``NAME.json`` are written; ``x.safetensors.safetensors`` otherwise)."""
    from .io import require_file_name

    require_file_name(name)
    if str(name).lower().endswith((".safetensors", ".json")):
        raise ValueError(f"name is the weights' name without an extension (NAME.safetensors and NAME.json are "
                         f"written), got {name!r}")


def _check_output(out_dir: str | os.PathLike, name: object) -> None:
    """ValueError unless ``name`` is a plain weights name and ``out_dir`` is (or can become) a folder."""
    check_weights_name(name)
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"out_dir {out_dir} is an existing file; pass the path of a folder")


def save_classifier(model: Any, record_fields: Mapping[str, Any], out_dir: str | os.PathLike, name: str,
                    *, fp16: bool = True, overwrite: bool = False) -> WeightsRecord:
    """Write ``<name>.safetensors`` (fp16 by default) and its record ``<name>.json`` in ``out_dir``."""
    import torch
    from safetensors.torch import save

    from .io import replace_file
    from .weights import sha256_file

    _check_output(out_dir, name)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.safetensors"
    if (path.exists() or path.with_suffix(".json").exists()) and not overwrite:
        raise FileExistsError(f"refusing to overwrite {path} / its record")
    state = {k: (v.detach().to(torch.float16) if fp16 and v.is_floating_point() else v.detach()).contiguous()
             for k, v in model.state_dict().items()}
    replace_file(path, save(state))  # whole or not at all, mode from the umask (safetensors' own writer: 0600)
    fields = dict(record_fields)
    rec = WeightsRecord(
        name=name, kind="classifier", file=path.name, sha256=sha256_file(path), classes=tuple(fields.pop("classes")),
        input_size=int(fields.pop("input_size")), preprocessing=fields.pop("preprocessing", Preprocessing()),
        metadata={**fields, "dtype": "float16" if fp16 else "float32"}, folder=str(out_dir),
    )
    rec.write(path.with_suffix(".json"), overwrite=overwrite)
    return rec


MIN_ADAPT_CROPS = 32


def _adaptation_inputs(classifier: Classifier | str | os.PathLike | None, crops: Iterable[np.ndarray], *,
                       out_dir: str | os.PathLike, name: str, batch_size: int, caller: str) -> tuple[Classifier, Any]:
    """Checks shared by the adaptation functions (before any work), then ``(classifier, prepared crops tensor)``."""
    import torch

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_output(out_dir, name)
    target = Path(out_dir) / f"{name}.safetensors"
    if target.exists() or target.with_suffix(".json").exists():
        raise FileExistsError(f"refusing to overwrite {target} / its record: pick another name")
    crops = _crop_list(crops, caller=caller)
    if len(crops) < MIN_ADAPT_CROPS:
        raise DatasetError(f"{caller} needs at least {MIN_ADAPT_CROPS} WBC crops of the new lab, got {len(crops)}")
    clf = classifier if isinstance(classifier, Classifier) else Classifier.load(classifier)
    x_all = torch.from_numpy(prepare_crops(crops, size=clf.input_size, preprocessing=clf.preprocessing, mean=clf.mean,
                                           std=clf.std, preprocess_resized=clf.preprocess_resized, framing=clf.framing))
    return clf, x_all


def _batchnorms(model: Any, name: str) -> list[Any]:
    """The network's batch-norm layers in order; WeightsError if it has none."""
    import torch

    bns = [m for m in model.features.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise WeightsError(f"{name} has no batch-norm layers to adapt")
    return bns


def _save_adapted(model: Any, clf: Classifier, out_dir: str | os.PathLike, name: str, *, n_crops: int, method: str,
                  **details: Any) -> Classifier:
    """Write the adapted network with the source's record (less its test metrics) and what it was adapted on."""
    meta = {k: v for k, v in clf.record.metadata.items() if k not in ("dtype", "metrics")}
    meta["adapted"] = {"method": method, "from": clf.name, "from_sha256": clf.record.sha256, "n_crops": n_crops,
                       **details}
    save_classifier(model, {"classes": clf.classes, "input_size": clf.input_size, "preprocessing": clf.preprocessing, **meta},
                    out_dir, name)
    return Classifier.load(Path(out_dir) / f"{name}.safetensors")


class _Stop(Exception):
    """Ends a forward pass once the batch-norm layer being measured has seen its input."""


def adapt_batchnorm(classifier: Classifier | str | os.PathLike | None, crops: Iterable[np.ndarray], *,
                    out_dir: str | os.PathLike, name: str, batch_size: int = 64) -> Classifier:
    """Calibrate a classifier to another lab without labels: re-estimate its batch-norm statistics.

    A network trained in one lab normalises every layer with that lab's feature statistics; under another
    stain and camera they are off, and whole classes collapse into one. AdaBN [3]_ replaces each
    batch-norm layer's running mean and variance by those of the new lab's crops (no labels, no
    gradient step); the learned weights stay. Give it the WBC crops of a few slides of the new lab
    (cut as :func:`~smearpipe.pipeline.analyze_smear` cuts them, or any crops around one WBC), a
    few hundred covering the usual mix of types; then use the written weights for that lab only.

    The statistics are exact, layer by layer: each layer's input is measured over all crops with the
    layers before it already adapted, so the result does not depend on ``batch_size`` or crop order.

    Parameters
    ----------
    classifier : Classifier, name or path, or None for the shipped default
    crops : iterable of (H, W, 3) uint8 ndarray
        Unlabelled WBC crops of the new lab, at least :data:`MIN_ADAPT_CROPS` (a list, or any iterable, read once).
    out_dir, name :
        Writes ``out_dir/name.safetensors`` and its record ``name.json``. The record keeps the
        source's record (less its test metrics, which do not describe the adapted model) and says
        what it was adapted on.
    batch_size : int
        Crops per forward pass (memory only).

    Returns
    -------
    Classifier
        The adapted classifier, loaded from the written file.

    Raises
    ------
    FileExistsError
        ``out_dir/name`` weights or record exist (checked before any work).
    ValueError
        ``name`` is not a plain file name (it has folders in it), or ``out_dir`` is a file.
    DatasetError
        Fewer than :data:`MIN_ADAPT_CROPS` crops.
    InvalidImageError
        A crop that is not an image (its index is in the message).
    WeightsError
        Unknown or broken weights, or a network without batch norm.

    Examples
    --------
    >>> crops = [read_image(p) for p in Path("mylab_crops").glob("*.png")]    # doctest: +SKIP
    >>> clf = adapt_batchnorm(None, crops, out_dir="weights_mylab", name="classifier-mylab")  # doctest: +SKIP
    >>> pipeline = load_pipeline(classifier="weights_mylab/classifier-mylab.safetensors")  # doctest: +SKIP

    References
    ----------
    .. [3] Y. Li, N. Wang, J. Shi, J. Liu and X. Hou, "Revisiting batch normalization for practical
       domain adaptation", arXiv:1603.04779, 2016.
    """
    import torch

    clf, x_all = _adaptation_inputs(classifier, crops, out_dir=out_dir, name=name, batch_size=batch_size,
                                    caller="adapt_batchnorm")
    model = copy.deepcopy(clf.model).float().to(memory_format=torch.contiguous_format).eval()
    bns = _batchnorms(model, clf.name)
    with torch.inference_mode():
        for bn in bns:  # in network order: each layer sees the output of the already adapted ones
            total = torch.zeros(bn.num_features, dtype=torch.float64)
            squares = torch.zeros_like(total)
            count = 0

            def measure(_module: Any, inputs: tuple[Any, ...]) -> None:
                nonlocal total, squares, count
                v = inputs[0].double().transpose(0, 1).reshape(inputs[0].shape[1], -1)
                total += v.sum(1)
                squares += (v * v).sum(1)
                count += v.shape[1]
                raise _Stop

            hook = bn.register_forward_pre_hook(measure)
            try:
                for i in range(0, len(x_all), batch_size):
                    try:
                        model.features(x_all[i:i + batch_size])
                    except _Stop:
                        pass
            finally:
                hook.remove()
            mean = total / count
            var = (squares / count - mean * mean).clamp_min(0) * count / max(count - 1, 1)  # unbiased, as BN keeps it
            bn.running_mean.copy_(mean.to(bn.running_mean.dtype))
            bn.running_var.copy_(var.to(bn.running_var.dtype))
    return _save_adapted(model, clf, out_dir, name, n_crops=len(x_all),
                         method="AdaBN: batch-norm running statistics re-estimated on unlabelled crops")


def adapt_entropy(classifier: Classifier | str | os.PathLike | None, crops: Iterable[np.ndarray], *,
                  out_dir: str | os.PathLike, name: str, lr: float = 1e-3, epochs: int = 1, batch_size: int = 64,
                  seed: int = 0) -> Classifier:
    """Calibrate a classifier to another lab without labels: make its answers on that lab's crops confident.

    TENT [4]_: the scale and shift of every batch-norm layer (about 0.06 % of the weights) take gradient
    steps (Adam) that lower the entropy of the predicted class probabilities on the new lab's crops; the
    convolution weights and the head stay. Unlike TENT, the layers keep normalising with their
    running statistics from training, as at inference: re-estimating those on another lab's crops
    (:func:`adapt_batchnorm`, AdaBN) cost accuracy on Reinhard-normalised crops in the project's
    leave-one-lab-out protocol (README, "Other labs and microscopes"). Give it the WBC crops of a few
    slides of the new lab, a few hundred covering the usual mix of types; then use the written
    weights for that lab only. Minimising entropy sharpens whatever the network already leans
    towards: in the protocol it typed more of the crops it was adapted on right (mostly by calling more
    cells neutrophils, the commonest type) and fewer of another slide set's (README). Check a few dozen
    typed cells of your lab before and after.

    Parameters
    ----------
    classifier : Classifier, str or path, or None
        The classifier to adapt: loaded, a registered name, a ``.safetensors`` file with its record, or
        None for the shipped default.
    crops : iterable of (H, W, 3) uint8 ndarray
        Unlabelled WBC crops of the new lab, at least :data:`MIN_ADAPT_CROPS` (a list, or any iterable, read once).
    out_dir : str or path
        Folder for the adapted weights (created if missing).
    name : str
        Plain file name: writes ``out_dir/name.safetensors`` and its record ``name.json`` (as
        :func:`adapt_batchnorm`; the record also gives ``lr``, ``epochs``, ``batch_size`` and ``seed``).
        The weights are stored in float16, as the shipped ones; the small steps of the scale and shift are
        rounded with them (the project's measurements are of the saved weights).
    lr : float
        Adam learning rate of the batch-norm scale and shift, in (0, 1).
    epochs : int
        Passes over the crops; each batch is one step.
    batch_size : int
        Crops per step.
    seed : int
        Seeds the random order of the crops in each pass: the same inputs give the same weights.

    Returns
    -------
    Classifier
        The adapted classifier, loaded from the written file.

    Raises
    ------
    FileExistsError, ValueError, DatasetError, InvalidImageError, WeightsError
        As :func:`adapt_batchnorm`; ValueError also for ``lr``, ``epochs`` or ``seed`` out of range.

    Examples
    --------
    >>> from pathlib import Path
    >>> from smearpipe.io import read_image
    >>> crops = [read_image(p) for p in Path("mylab_crops").glob("*.png")]    # doctest: +SKIP
    >>> clf = adapt_entropy(None, crops, out_dir="weights_mylab", name="classifier-mylab-tent")  # doctest: +SKIP

    References
    ----------
    .. [4] D. Wang, E. Shelhamer, S. Liu, B. Olshausen and T. Darrell, "Tent: fully test-time adaptation
       by entropy minimization", ICLR 2021.
    """
    import torch

    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < 1:
        raise ValueError(f"lr must be a number in (0, 1), got {lr!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    clf, x_all = _adaptation_inputs(classifier, crops, out_dir=out_dir, name=name, batch_size=batch_size,
                                    caller="adapt_entropy")
    model = copy.deepcopy(clf.model).float().to(memory_format=torch.contiguous_format).eval()
    params = [p for bn in _batchnorms(model, clf.name) for p in (bn.weight, bn.bias) if p is not None]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=float(lr))
    generator = torch.Generator().manual_seed(int(seed))
    with torch.enable_grad():
        for _ in range(int(epochs)):
            order = torch.randperm(len(x_all), generator=generator)
            for i in range(0, len(order), batch_size):
                logits = model(x_all[order[i:i + batch_size]])  # eval mode: running statistics, no dropout
                entropy = -(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()
                optimizer.zero_grad()
                entropy.backward()
                optimizer.step()
    return _save_adapted(model, clf, out_dir, name, n_crops=len(x_all),
                         method="TENT with running statistics kept: batch-norm scale and shift moved by Adam to lower "
                                "the entropy of the predictions on unlabelled crops",
                         lr=float(lr), epochs=int(epochs), batch_size=int(batch_size), seed=int(seed))
