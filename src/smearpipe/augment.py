"""Training augmentations for WBC crops (torchvision transforms v2 + batched colour/stain jitter).

Geometric augmentations (the method paper's rotation, flips, scaling, shifts/shear, elastic
deformation) run per sample on uint8 tensors; colour augmentations for robustness across labs
(stain amount and colour jitter in haematoxylin-eosin-DAB optical-density space, brightness/contrast/saturation,
gamma, white balance, blur, noise) run vectorised on a float batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["AugmentConfig", "geometric_transform", "color_augment_batch", "stain_jitter", "jitter_stain_vectors",
           "reinhard_batch", "match_sharpness_batch", "mix_style", "add_mix_style",
           "grayscale_batch"]

# scikit-image's rgb_from_hed (Ruifrok & Johnston 2001), rows H, E, DAB
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (0 disables a step); recorded with trained weights."""

    crop_scale_min: float = 0.6
    rotate: bool = True  # rot90 + small free rotation
    affine_degrees: float = 15.0
    affine_shear: float = 8.0
    affine_translate: float = 0.05
    elastic_p: float = 0.15
    jpeg_p: float = 0.2
    stain_alpha: float = 0.2  # HED concentration scale in [1-a, 1+a]
    stain_beta: float = 0.05  # HED concentration shift in [-b, b]
    stain_vector: float = 0.0  # stain colour, in [0, 0.5]: H and E absorbance vectors moved by U(-v, v) per component
    brightness: float = 0.15
    contrast: float = 0.2
    saturation: float = 0.25
    gamma: float = 0.2
    white_balance: float = 0.08
    blur_p: float = 0.3
    blur_sigma_max: float = 1.6
    noise_std_max: float = 0.03
    lowres_p: float = 0.0  # share of crops seen through a coarser camera: downsampled, then upsampled back
    lowres_max: float = 3.0  # largest downsampling factor (drawn from [1.5, lowres_max])
    randconv_p: float = 0.0  # share of crops seen through a random convolution (texture/colour randomisation)
    randconv_kernels: tuple[int, ...] = (1, 3, 5)  # its kernel sizes, one drawn per batch
    mixstyle_p: float = 0.0  # chance per batch and block that feature statistics are mixed between crops (MixStyle)
    mixstyle_alpha: float = 0.1  # Beta(alpha, alpha) mixing weights
    gray_p: float = 0.0  # share of crops shown in grey, after normalisation (train_classifier; see grayscale_batch)

    def __post_init__(self) -> None:
        _check_stain_vector(self.stain_vector)
        _check_probability("gray_p", self.gray_p)
        _check_randconv(self.randconv_p, self.randconv_kernels)
        _check_mix_style(self.mixstyle_p, self.mixstyle_alpha)
        object.__setattr__(self, "randconv_kernels", tuple(int(k) for k in self.randconv_kernels))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RandomRot90(torch.nn.Module):
    """Rotate by a random multiple of 90 degrees (cells have no orientation)."""

    def forward(self, x: Any) -> Any:
        return torch.rot90(x, int(torch.randint(4, ())), dims=(-2, -1))


class RandomJPEG(torch.nn.Module):
    """JPEG re-compression artefacts at a random quality (OpenCV codec)."""

    def __init__(self, quality: tuple[int, int]) -> None:
        super().__init__()
        self.quality = quality

    def forward(self, x: Any) -> Any:
        import cv2

        q = int(torch.randint(self.quality[0], self.quality[1] + 1, ()))
        arr = np.ascontiguousarray(x.permute(1, 2, 0).numpy())
        ok, buf = cv2.imencode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, q])
        if not ok:
            return x
        return torch.from_numpy(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED).reshape(arr.shape)).permute(2, 0, 1).contiguous()


def geometric_transform(size: int, cfg: AugmentConfig, fill: tuple[int, int, int] = (245, 215, 200)) -> Any:
    """Per-sample v2 pipeline on (3, H, W) uint8 tensors -> (3, size, size) uint8."""
    from torchvision.transforms import v2

    ops: list[Any] = [
        v2.RandomResizedCrop(size, scale=(cfg.crop_scale_min, 1.0), ratio=(0.85, 1.18), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
    ]
    if cfg.rotate:
        ops.append(RandomRot90())
    if cfg.affine_degrees or cfg.affine_shear or cfg.affine_translate:
        ops.append(v2.RandomAffine(degrees=cfg.affine_degrees, translate=(cfg.affine_translate,) * 2,
                                   shear=cfg.affine_shear, fill=list(fill)))
    if cfg.elastic_p:
        ops.append(v2.RandomApply([v2.ElasticTransform(alpha=25.0, sigma=5.0, fill=list(fill))], p=cfg.elastic_p))
    if cfg.jpeg_p:
        ops.append(v2.RandomApply([RandomJPEG((40, 95))], p=cfg.jpeg_p))
    return v2.Compose(ops)


def stain_jitter(x: Any, alpha: Any, beta: Any, *, stains: Any = None) -> Any:
    """HED stain jitter on a float batch in [0, 1]: concentrations ``c * alpha + beta`` (Tellez et al. 2018).

    Parameters
    ----------
    x : (B, 3, H, W) float32 tensor in [0, 1]
    alpha, beta : (B, 3) float32 tensors
        Scale and shift of each crop's H, E and DAB concentrations.
    stains : (B, 3, 3) float32 tensor, optional
        Absorbance vectors (rows H, E, DAB) to rebuild each crop with instead of the ones it was decomposed with
        (:func:`jitter_stain_vectors`), so that the stains change colour, not only amount.

    Returns
    -------
    (B, 3, H, W) float32 tensor in [0, 1]

    References
    ----------
    Ruifrok & Johnston 2001, "Quantification of histochemical staining by color deconvolution", Anal. Quant. Cytol.
    Histol. (the vectors); Tellez et al. 2018, IEEE Trans. Med. Imaging (the concentration jitter).
    """
    import torch

    rgb_from_hed = torch.as_tensor(_RGB_FROM_HED, device=x.device)
    hed_from_rgb = torch.linalg.inv(rgb_from_hed)
    od = -torch.log(x.clamp_min(1e-3))  # (B, 3, H, W)
    conc = torch.einsum("bchw,cd->bdhw", od, hed_from_rgb)
    conc = conc * alpha[:, :, None, None] + beta[:, :, None, None]
    if stains is None:
        od2 = torch.einsum("bdhw,dc->bchw", conc, rgb_from_hed)
    else:
        if tuple(stains.shape) != (x.shape[0], 3, 3):
            raise ValueError(f"stains must be ({x.shape[0]}, 3, 3) for a batch of {x.shape[0]}, got {tuple(stains.shape)}")
        od2 = torch.einsum("bdhw,bdc->bchw", conc, stains.to(device=x.device, dtype=rgb_from_hed.dtype))
    return torch.exp(-od2).clamp(0.0, 1.0)


def jitter_stain_vectors(batch: int, amount: float, generator: Any = None) -> Any:
    """Per-crop absorbance vectors for :func:`stain_jitter`: another lab's stain colours.

    Each component of the haematoxylin and eosin vectors (rows 0 and 1 of scikit-image's ``rgb_from_hed``) is moved
    by U(-amount, amount) and kept positive (a stain absorbs no negative light); then the vector is rescaled to its
    original length (so a component may end up moved by somewhat more than ``amount``). The stain changes hue (a
    yellower eosin, a bluer or redder azure), not strength. The DAB row, which holds only the part of a Romanowsky
    stain that H and E do not explain, is kept. Stain amount is :func:`stain_jitter`'s ``alpha``/``beta``; a colour
    cast of the whole image is white balance.

    Parameters
    ----------
    batch : int
        Number of crops, >= 0.
    amount : float
        In [0, 0.5]; 0 gives the unchanged vectors.
    generator : torch.Generator, optional

    Returns
    -------
    (batch, 3, 3) float32 tensor

    Raises
    ------
    ValueError
        ``batch`` not an integer >= 0, or ``amount`` not a number in [0, 0.5].
    """
    import torch

    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 0:
        raise ValueError(f"batch must be an integer >= 0, got {batch!r}")
    _check_stain_vector(amount)
    base = torch.as_tensor(_RGB_FROM_HED)
    out = base.repeat(int(batch), 1, 1)
    if amount:
        moved = (base[:2] + (torch.rand(int(batch), 2, 3, generator=generator) * 2 - 1) * amount).clamp_min(0.01)
        out[:, :2] = moved * (base[:2].norm(dim=1) / moved.norm(dim=2))[..., None]
    return out


def color_augment_batch(x: Any, cfg: AugmentConfig, generator: Any = None) -> Any:
    """Random colour/stain/resolution/blur/noise augmentation of a float batch (B, 3, H, W) in [0, 1].

    Stain: HED concentrations (``cfg.stain_alpha``, ``cfg.stain_beta``) and, with ``cfg.stain_vector``, the stains'
    colours (:func:`jitter_stain_vectors`), one draw per crop. Low resolution (``cfg.lowres_p`` of the crops, one factor per batch drawn from
    ``[1.5, max(1.5, cfg.lowres_max)]``): downsampled with antialiasing, then upsampled back. Random
    convolution (``cfg.randconv_p`` of the crops, :func:`random_convolution_batch`) comes last, before the noise.
    """
    import torch
    import torch.nn.functional as F

    b = x.shape[0]

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * (hi - lo) + lo

    if cfg.stain_alpha or cfg.stain_beta or cfg.stain_vector:
        x = stain_jitter(x, u(1 - cfg.stain_alpha, 1 + cfg.stain_alpha, b, 3), u(-cfg.stain_beta, cfg.stain_beta, b, 3),
                         stains=jitter_stain_vectors(b, cfg.stain_vector, generator) if cfg.stain_vector else None)
    if cfg.white_balance:
        x = x * u(1 - cfg.white_balance, 1 + cfg.white_balance, b, 3)[:, :, None, None]
    if cfg.brightness:
        x = x * u(1 - cfg.brightness, 1 + cfg.brightness, b)[:, None, None, None]
    if cfg.contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * u(1 - cfg.contrast, 1 + cfg.contrast, b)[:, None, None, None] + mean
    if cfg.saturation:
        gray = _luma(x)
        x = gray + (x - gray) * u(1 - cfg.saturation, 1 + cfg.saturation, b)[:, None, None, None]
    x = x.clamp(0.0, 1.0)
    if cfg.gamma:
        x = x ** torch.exp(u(-cfg.gamma, cfg.gamma, b))[:, None, None, None]
    if cfg.lowres_p:
        pick = torch.rand(b, generator=generator) < cfg.lowres_p
        if pick.any():
            h, w = x.shape[-2:]
            s = float(u(1.5, max(1.5, cfg.lowres_max), 1))
            small = F.interpolate(x[pick], size=(max(4, round(h / s)), max(4, round(w / s))), mode="bilinear",
                                  antialias=True, align_corners=False)
            x = x.clone()
            x[pick] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    if cfg.blur_p:
        pick = torch.rand(b, generator=generator) < cfg.blur_p
        if pick.any():
            sigma = float(u(0.4, cfg.blur_sigma_max, 1))
            r = max(1, int(round(2.5 * sigma)))
            t = torch.arange(-r, r + 1, dtype=x.dtype)
            k = torch.exp(-(t**2) / (2 * sigma**2))
            k = k / k.sum()
            sub = x[pick]
            sub = F.conv2d(F.pad(sub, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
            sub = F.conv2d(F.pad(sub, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)
            x = x.clone()
            x[pick] = sub
    if cfg.randconv_p:
        x = random_convolution_batch(x, cfg.randconv_p, cfg.randconv_kernels, generator=generator)
    if cfg.noise_std_max:
        x = x + torch.randn(x.shape, generator=generator) * u(0, cfg.noise_std_max, b)[:, None, None, None]
    return x.clamp(0.0, 1.0)


def grayscale_batch(x: Any, p: float, generator: Any = None) -> Any:
    """Show a share ``p`` of a float batch (B, 3, H, W) in [0, 1] in grey (ITU-R 601 luma in all three channels).

    A network that sometimes sees no colour must also type cells by shape and texture, which another lab's stain
    changes less than it changes colour. :func:`~smearpipe.train.train_classifier` applies it last, after the batch's
    colour augmentation and normalisation (``AugmentConfig.gray_p``): normalising a grey crop would blow its
    near-zero chroma up to the reference's spread.

    Raises
    ------
    ValueError
        ``p`` not a number in [0, 1].
    """
    import torch

    _check_probability("gray_p", p)
    if not p:
        return x
    pick = torch.rand(x.shape[0], generator=generator) < p
    if not pick.any():
        return x
    out = x.clone()
    out[pick] = _luma(x[pick]).expand(-1, 3, -1, -1)
    return out


def _luma(x: Any) -> Any:
    """ITU-R 601 luma of a float batch (B, 3, H, W) -> (B, 1, H, W)."""
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _check_probability(name: str, p: Any) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {p!r}")


def _check_stain_vector(amount: Any) -> None:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0.0 <= amount <= 0.5:
        raise ValueError(f"stain_vector must be a number in [0, 0.5], got {amount!r}")


def _check_randconv(p: float, kernels: Any) -> None:
    _check_probability("randconv_p", p)
    if (isinstance(kernels, (str, bytes)) or not hasattr(kernels, "__len__") or not len(kernels)
            or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 or k % 2 == 0 for k in kernels)):
        raise ValueError(f"randconv_kernels must be odd positive integers, got {kernels!r}")


def random_convolution_batch(x: Any, p: float, kernels: tuple[int, ...] = (1, 3, 5), generator: Any = None) -> Any:
    """Random-convolution augmentation (Xu et al. 2021, "RandConv") of a float batch (B, 3, H, W) in [0, 1].

    A share ``p`` of the crops is filtered by one random 3 -> 3 convolution (kernel size drawn from
    ``kernels``, weights ~ N(0, 1 / (3 k^2)), reflect padding), which scrambles local texture and colour but
    keeps shapes. Each filtered crop is rescaled to its own per-channel mean and standard deviation, so
    that it stays an image of the same brightness, then mixed with the original by a weight drawn from
    U(0, 1) per crop (RandConv's "mix" variant), and clipped to [0, 1].

    Parameters
    ----------
    x : (B, 3, H, W) float tensor in [0, 1]
    p : float in [0, 1]
        Share of the crops filtered (each crop drawn independently).
    kernels : tuple of odd int
        Kernel sizes; one is drawn per call, with one random kernel for all crops filtered in that call.
    generator : torch.Generator, optional

    Returns
    -------
    (B, 3, H, W) float tensor in [0, 1]; ``x`` itself when no crop is drawn.

    Raises
    ------
    ValueError
        ``p`` outside [0, 1], or a kernel size that is not an odd positive integer.

    References
    ----------
    Xu, Liu, Yang, Niethammer & Raffel (2021), "Robust and Generalizable Visual Representation Learning via
    Random Convolutions", ICLR.
    """
    import torch
    import torch.nn.functional as F

    _check_randconv(p, kernels)
    b = x.shape[0]
    pick = torch.rand(b, generator=generator) < p
    if not pick.any():
        return x
    k = int(kernels[int(torch.randint(len(kernels), (1,), generator=generator))])
    weight = torch.randn(3, 3, k, k, generator=generator, dtype=x.dtype) / float(np.sqrt(3 * k * k))
    sub = x[pick]
    r = k // 2
    out = F.conv2d(F.pad(sub, (r, r, r, r), mode="reflect") if r else sub, weight)
    mean, std = sub.mean(dim=(2, 3), keepdim=True), sub.std(dim=(2, 3), keepdim=True)
    out = (out - out.mean(dim=(2, 3), keepdim=True)) / out.std(dim=(2, 3), keepdim=True).clamp_min(1e-6) * std + mean
    alpha = torch.rand(sub.shape[0], 1, 1, 1, generator=generator, dtype=x.dtype)
    x = x.clone()
    x[pick] = (alpha * sub + (1 - alpha) * out).clamp(0.0, 1.0)
    return x


def _check_mix_style(p: float, alpha: float) -> None:
    _check_probability("mixstyle_p", p)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"mixstyle_alpha must be a positive finite number, got {alpha!r}")


def mix_style(x: Any, alpha: float = 0.1, eps: float = 1e-6) -> Any:
    """MixStyle (Zhou et al. 2021) on a feature batch: mix each crop's feature statistics with another crop's.

    Each crop's feature maps are normalised by their own per-channel mean and standard deviation
    (over H, W; not back-propagated through) and given statistics mixed with those of another crop
    of the batch (a random permutation), by a weight drawn from Beta(alpha, alpha) per crop. Content
    (the normalised maps) is kept; "style" (feature statistics, which follow stain and camera) is
    randomised between the crops of one batch. Draws from torch's global random generator (seeded by
    :func:`~smearpipe.train.train_classifier`).

    Parameters
    ----------
    x : (B, C, H, W) float tensor
        Feature maps (float32 or bfloat16 under autocast).
    alpha : float
        Beta(alpha, alpha) mixing weights; 0.1, the paper's, mostly keeps one crop's style or the other's.
    eps : float
        Added to the variance before the square root.

    Returns
    -------
    (B, C, H, W) tensor of ``x``'s dtype, computed in float32; ``x`` itself for a batch of one crop.

    References
    ----------
    Zhou, Yang, Qiao & Xiang (2021), "Domain Generalization with MixStyle", ICLR.
    """
    import torch

    b = x.shape[0]
    if b < 2:
        return x
    f = x.float()
    mu = f.mean(dim=(2, 3), keepdim=True).detach()
    sig = (f.var(dim=(2, 3), keepdim=True) + eps).sqrt().detach()
    lam = torch.distributions.Beta(float(alpha), float(alpha)).sample((b, 1, 1, 1)).to(f.device)
    perm = torch.randperm(b, device=f.device)
    mu_mix = lam * mu + (1 - lam) * mu[perm]
    sig_mix = lam * sig + (1 - lam) * sig[perm]
    return ((f - mu) / sig * sig_mix + mu_mix).to(x.dtype)


def add_mix_style(features: Any, p: float, alpha: float = 0.1, blocks: int = 3) -> list[Any]:
    """Apply :func:`mix_style` after the first ``blocks`` pooling layers of a VGG ``features`` module.

    Forward hooks, active only in training mode: each hooked layer mixes the styles of a batch with
    chance ``p`` per forward pass (the paper's p = 0.5 after the first three stages). In eval mode
    the network is unchanged, so validation, inference and the saved weights do not depend on it.

    Parameters
    ----------
    features : torch.nn.Module
        The network's convolutional part (``model.features`` of :func:`~smearpipe.classify.build_vgg16`).
    p : float in [0, 1]
        Chance per training forward pass and hooked layer.
    alpha : float > 0
        Beta(alpha, alpha) mixing weights (:func:`mix_style`).
    blocks : int
        How many stages, from the input on, are followed by a mix.

    Returns
    -------
    list of torch.utils.hooks.RemovableHandle
        ``handle.remove()`` takes a hook off.

    Raises
    ------
    ValueError
        ``p`` outside [0, 1], ``alpha`` not a positive finite number, or ``blocks`` not in
        [1, number of pooling layers].

    Examples
    --------
    >>> from smearpipe.classify import build_vgg16
    >>> model = build_vgg16(5)
    >>> handles = add_mix_style(model.features, p=0.5)
    >>> len(handles)
    3
    """
    import torch

    _check_mix_style(p, alpha)
    pools = [m for m in features.modules() if isinstance(m, torch.nn.MaxPool2d)]
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= len(pools):
        raise ValueError(f"blocks must be an integer in [1, {len(pools)}] (pooling layers found), got {blocks!r}")

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        if module.training and float(torch.rand(())) < p:
            return mix_style(output, alpha)
        return None

    return [m.register_forward_hook(hook) for m in pools[:blocks]]


# sRGB (D65) -> XYZ, as OpenCV's COLOR_RGB2LAB; white point (Xn, Yn, Zn) = (0.950456, 1, 1.088754)
_XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169],
                          [0.019334, 0.119193, 0.950227]], np.float32)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB).astype(np.float32)
_WHITE = np.array([0.950456, 1.0, 1.088754], np.float32)


def _rgb_to_lab(x: Any) -> Any:
    lin = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("bchw,dc->bdhw", lin, torch.as_tensor(_XYZ_FROM_RGB / _WHITE[:, None], device=x.device))
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1 / 3), 7.787 * xyz + 16 / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def _lab_to_rgb(lab: Any) -> Any:
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f > 0.206893, f**3, (f - 16 / 116) / 7.787) * torch.as_tensor(_WHITE, device=lab.device)[:, None, None]
    lin = torch.einsum("bdhw,cd->bchw", xyz, torch.as_tensor(_RGB_FROM_XYZ, device=lab.device))
    lin = lin.clamp(0.0, 1.0)
    return torch.where(lin <= 0.0031308, 12.92 * lin, 1.055 * lin.clamp_min(0.0031308) ** (1 / 2.4) - 0.055).clamp(0.0, 1.0)


def reinhard_batch(x: Any, *, reference: Any = None) -> Any:
    """:func:`~smearpipe.preprocess.reinhard_normalize` on a float batch, in torch.

    Each image's L*a*b* mean and standard deviation (over its lit field, as there) become the reference's. Used by
    ``train_classifier(normalize_after_augment=True)`` to normalise crops *after* colour augmentation.

    Parameters
    ----------
    x : (B, 3, H, W) float torch.Tensor
        RGB in [0, 1].
    reference : ReinhardReference, optional
        Target statistics; the shipped PBC reference by default.

    Returns
    -------
    (B, 3, H, W) float32 torch.Tensor
        RGB in [0, 1]. Equal to ``reinhard_normalize`` of the same image as uint8 up to rounding (one grey level);
        a few out-of-gamut pixels are clipped up to a few levels differently.

    Raises
    ------
    ValueError
        ``x`` is not a float tensor of shape (B, 3, H, W) with values in [0, 1], or the reference's
        ``region`` is not ``"all"`` (statistics over stained pixels only have no torch twin).

    Examples
    --------
    >>> x = torch.rand(2, 3, 16, 16)
    >>> reinhard_batch(x).shape
    torch.Size([2, 3, 16, 16])
    """
    from .preprocess import _REINHARD_MIN_STD, _UNLIT_MAX_L, _UNLIT_MAX_SHARE, _lit_mask, default_reinhard_reference

    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"reinhard_batch takes a float tensor (B, 3, H, W) in [0, 1], got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}")
    if x.numel() and (float(x.min()) < 0 or float(x.max()) > 1):
        raise ValueError(f"reinhard_batch takes values in [0, 1], got {float(x.min()):.3g}..{float(x.max()):.3g}")
    ref = reference if reference is not None else default_reinhard_reference()
    if ref.region != "all" or ref.min_stained_fraction is not None:
        raise ValueError("reinhard_batch normalises with statistics of all (lit) pixels; this reference's region is "
                         f"{ref.region!r}, min_stained_fraction {ref.min_stained_fraction}")
    lab = _rgb_to_lab(x.float())
    # as reinhard_normalize: the black outside an image's lit field is left out of its statistics (preprocess._lit_mask;
    # only images more than 1 % that dark are looked at, on the CPU)
    masks = {}
    for i in torch.nonzero((lab[:, 0] < _UNLIT_MAX_L).float().mean(dim=(1, 2)) > _UNLIT_MAX_SHARE).flatten().tolist():
        keep = _lit_mask(lab[i, 0].detach().cpu().numpy())
        if keep is not None:
            masks[i] = torch.from_numpy(keep)
    if masks:
        w = torch.ones_like(lab[:, :1])
        for i, keep in masks.items():
            w[i, 0] = keep.to(w)
        w_sum = w.sum(dim=(2, 3), keepdim=True)
        m = (lab * w).sum(dim=(2, 3), keepdim=True) / w_sum
        s = (((lab - m) ** 2 * w).sum(dim=(2, 3), keepdim=True) / w_sum).sqrt().clamp_min(_REINHARD_MIN_STD)
    else:
        m = lab.mean(dim=(2, 3), keepdim=True)
        s = lab.std(dim=(2, 3), correction=0, keepdim=True).clamp_min(_REINHARD_MIN_STD)
    ref_m = torch.as_tensor(np.asarray(ref.mean, np.float32), device=x.device).view(1, 3, 1, 1)
    ref_s = torch.as_tensor(np.asarray(ref.std, np.float32), device=x.device).view(1, 3, 1, 1)
    out = (lab - m) * (ref_s / s) + ref_m
    out = torch.cat([out[:, :1].clamp(0.0, 100.0), out[:, 1:]], dim=1)
    return _lab_to_rgb(out)


def _filter_reflect(x: Any, kernel: Any) -> Any:
    """Correlate a (B, 1, H, W) batch with a 2-D kernel, borders mirrored as OpenCV's default (BORDER_REFLECT_101)."""
    ph, pw = kernel.shape[0] // 2, kernel.shape[1] // 2
    padded = torch.nn.functional.pad(x, (pw, pw, ph, ph), mode="reflect")
    return torch.nn.functional.conv2d(padded, kernel[None, None].to(x))


def match_sharpness_batch(x: Any, *, target: float = 0.45, sigma: float = 2.0, max_amount: float = 4.0) -> Any:
    """:func:`~smearpipe.preprocess.match_sharpness` on a float batch, in torch.

    Used by ``train_classifier(normalize_after_augment=True)`` when the preprocessing has a ``"sharpen"``
    step: crops are blurred (or not) by augmentation first and then sharpened, as another lab's soft
    crops are at inference.

    Parameters
    ----------
    x : (B, 3, H, W) float torch.Tensor
        RGB in [0, 1]; H and W larger than ``4 * sigma``.
    target, sigma, max_amount : float
        As for ``match_sharpness`` (checked the same way: TypeError, ValueError).

    Returns
    -------
    (B, 3, H, W) float32 torch.Tensor
        RGB in [0, 1]: each image with the amount ``match_sharpness`` would choose for it (up to float
        rounding), without rounding to 256 levels.

    Raises
    ------
    ValueError
        ``x`` is not a float tensor of shape (B, 3, H, W), or is too small for the Gaussian.

    Examples
    --------
    >>> x = torch.rand(2, 3, 32, 32)
    >>> match_sharpness_batch(x).shape
    torch.Size([2, 3, 32, 32])
    """
    import cv2

    from .preprocess import _check_sharpen_args, _gaussian_ksize, _sharpening_amounts

    target, sigma, max_amount = _check_sharpen_args(target, sigma, max_amount)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"match_sharpness_batch takes a float tensor (B, 3, H, W) in [0, 1], got "
                         f"{type(x).__name__} {getattr(x, 'dtype', '')} {tuple(getattr(x, 'shape', ()))}")
    ksize = _gaussian_ksize(sigma)
    if min(x.shape[2:]) <= ksize // 2:
        raise ValueError(f"match_sharpness_batch needs images larger than {ksize // 2} px for sigma {sigma}, "
                         f"got {tuple(x.shape[2:])}")
    k1 = torch.from_numpy(cv2.getGaussianKernel(ksize, sigma).astype(np.float32)[:, 0])
    gauss = torch.outer(k1, k1)
    laplace = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
    b = x.shape[0]
    x = x.float()
    detail = x - _filter_reflect(x.reshape(-1, 1, *x.shape[2:]), gauss).reshape(x.shape)
    grey, grey_detail = x.mean(1, keepdim=True), detail.mean(1, keepdim=True)
    lap, lap_detail = _filter_reflect(grey, laplace), _filter_reflect(grey_detail, laplace)

    def moments(u: Any, v: Any) -> list[Any]:
        u = (u - u.mean(dim=(1, 2, 3), keepdim=True)).double().flatten(1)
        v = (v - v.mean(dim=(1, 2, 3), keepdim=True)).double().flatten(1)
        return [(u * u).mean(1), (u * v).mean(1), (v * v).mean(1)]

    amount = _sharpening_amounts(torch.stack(moments(lap, lap_detail), 1).cpu().numpy(),
                                 torch.stack(moments(grey, grey_detail), 1).cpu().numpy(), target=target,
                                 max_amount=max_amount)
    return (x + torch.from_numpy(amount).to(x.device, torch.float32).view(b, 1, 1, 1) * detail).clamp(0.0, 1.0)
