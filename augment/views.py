"""K-view GPU augmentation (Kornia) and the matching eval transform.

One module turns a uint8 batch into K independently augmented, normalised views::

    augment = build_augmentation("cifar", K=4).to(device)   # SimSiam's CIFAR recipe
    views = augment(images)          # images: (B, 3, H, W) uint8 -> views: (K, B, 3, 32, 32) float
    evaluate = build_eval_transform("cifar")
    x = evaluate(images)             # (B, 3, H, W) float, normalised only

Layout: views are view-major, ``views[k, b]`` (or row ``k*B + b`` of the flattened
(K·B, 3, h, w) form) is view k of image b. Each of the K·B views draws its own random
parameters (``same_on_batch=False``): the batch is repeated K times and run through one
Kornia pipeline. Outputs are channels-last (each (·, 3, h, w) slice, and the flattened
(K·B, 3, h, w) tensor, satisfy ``is_contiguous(memory_format=torch.channels_last)``) in the
requested dtype. Kornia runs in float32; the cast to the output dtype happens last.

Recipes (:data:`PRESETS`, SimSiam's augmentations, Chen & He 2020):

- ``cifar``: RandomResizedCrop(32, scale 0.2–1), horizontal flip p=0.5,
  ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2; CIFAR-10 statistics.
- ``imagenet``: the same at 84 px plus Gaussian blur (σ 0.1–2, p=0.5, kernel ≈ 10 % of the
  side, odd); ImageNet statistics (used for Mini-ImageNet).
- ``cifar_linear`` / ``imagenet_linear``: linear-evaluation training augmentation,
  RandomResizedCrop (scale 0.08–1) and flip only (use with K=1).

Every knob of a preset can be overridden (crop scale/ratio, the probabilities, the statistics),
e.g. ``build_augmentation("cifar", K=2, scale=(1, 1), ratio=(1, 1), p_flip=0, p_jitter=0,
p_gray=0)`` is the identity up to normalisation. Ops whose probability is 0 are left out of
the pipeline. ``crop_mode`` picks how Kornia crops: per-view slicing (its default, faster on CPU)
or one batched warp (``auto`` uses it off the CPU); see :class:`KViewAugment`.

The normalisation statistics live only in :data:`NORM_STATS`; both the K-view module and
:func:`build_eval_transform` use :class:`NormalizeImages`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import math

import kornia.color as KC
import kornia.enhance as KE
import kornia.filters as KF
import kornia.geometry.transform as KG
import torch
from kornia.geometry.bbox import bbox_generator
from torch import nn

__all__ = [
    "CROP_MODES",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORM_STATS",
    "PRESETS",
    "AugmentRecipe",
    "KViewAugment",
    "NormalizeImages",
    "blur_kernel_size",
    "build_augmentation",
    "build_eval_transform",
]

RGB = tuple[float, float, float]

CIFAR10_MEAN: RGB = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: RGB = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: RGB = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: RGB = (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN: RGB = (0.485, 0.456, 0.406)
IMAGENET_STD: RGB = (0.229, 0.224, 0.225)

NORM_STATS: dict[str, tuple[RGB, RGB]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
}
"""Per-channel (mean, std) of pixel values in [0, 1], by dataset name."""


def blur_kernel_size(size: int, max_sigma: float = 2.0) -> int:
    """Gaussian-blur kernel side for images of side ``size``: ~10 % of it (SimSiam's rule), odd, and
    wide enough that the largest sigma is not truncated before ±3σ (13 px for σ = 2)."""
    return max(int(0.1 * size) // 2 * 2 + 1, 2 * math.ceil(3 * max_sigma) + 1)


@dataclass(frozen=True)
class AugmentRecipe:
    """One augmentation recipe. Probabilities in [0, 1]; ``size`` is the output side h = w.

    ``blur_kernel`` None means :func:`blur_kernel_size` of ``size``. ``stats`` names an entry
    of :data:`NORM_STATS`, unless ``mean`` and ``std`` are given explicitly.
    """

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    p_flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    p_jitter: float = 0.8
    p_gray: float = 0.2
    p_blur: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None
    stats: str = "cifar10"
    mean: RGB | None = None
    std: RGB | None = None

    def __post_init__(self) -> None:
        if int(self.size) != self.size or self.size < 1:
            raise ValueError(f"augmentation size must be a positive int, got {self.size!r}")
        for name in ("p_flip", "p_jitter", "p_gray", "p_blur"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {self.ratio}")
        if self.blur_kernel is not None and (self.blur_kernel < 1 or self.blur_kernel % 2 == 0):
            raise ValueError(f"blur_kernel must be a positive odd int, got {self.blur_kernel}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is None and self.stats not in NORM_STATS:
            raise ValueError(f"unknown normalisation stats {self.stats!r}; known: {sorted(NORM_STATS)}")

    @property
    def mean_std(self) -> tuple[RGB, RGB]:
        """The (mean, std) this recipe normalises with."""
        if self.mean is not None and self.std is not None:
            return tuple(self.mean), tuple(self.std)  # type: ignore[return-value]
        return NORM_STATS[self.stats]


_LINEAR = dict(scale=(0.08, 1.0), p_jitter=0.0, p_gray=0.0, p_blur=0.0)

PRESETS: dict[str, AugmentRecipe] = {
    "cifar": AugmentRecipe(size=32, stats="cifar10"),
    "imagenet": AugmentRecipe(size=84, p_blur=0.5, stats="imagenet"),
    "cifar_linear": AugmentRecipe(size=32, stats="cifar10", **_LINEAR),
    "imagenet_linear": AugmentRecipe(size=84, stats="imagenet", **_LINEAR),
}
"""The named recipes of :func:`build_augmentation` (see the module docstring)."""


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"expected a uint8 image tensor (B, 3, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images (B, 3, H, W) with values 0..255, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images of shape (B, 3, H, W), got shape {tuple(images.shape)}")


def _check_dtype(dtype: torch.dtype) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"output dtype must be a floating-point torch.dtype, got {dtype!r}")


class NormalizeImages(nn.Module):
    """uint8 (B, 3, H, W) -> normalised float (B, 3, H, W), channels-last, in ``dtype``.

    ``(x / 255 − mean) / std`` per channel, computed in float32. This is the eval transform
    (no crop: eval images keep their stored size) and the last step of :class:`KViewAugment`.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        _check_dtype(dtype)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got mean={mean}, std={std}")
        self.dtype = dtype
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def normalize_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], (N, 3, h, w) -> normalised, channels-last, ``self.dtype``."""
        mean = self.mean.to(x.device)
        std = self.std.to(x.device)
        return ((x - mean) / std).to(dtype=self.dtype, memory_format=torch.channels_last)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) uint8, any device and layout -> (B, 3, H, W) float, channels-last."""
        _check_images(images)
        return self.normalize_unit(images.to(torch.float32) / 255.0)

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, dtype={self.dtype}"


CROP_MODES = ("auto", "slice", "resample")

# Columns of the one (N, _DRAWS) uniform draw that gives every view all its random parameters.
_AREA, _LOG_RATIO = slice(0, 10), slice(10, 20)  # 10 crop candidates, as Kornia and torchvision try
_X0, _Y0, _FLIP, _JITTER, _FACTORS, _GRAY, _BLUR, _SIGMA = 20, 21, 22, 23, slice(24, 28), 28, 29, 30
_DRAWS = 31


def _crop_boxes(u: torch.Tensor, height: int, width: int, recipe: AugmentRecipe) -> tuple[torch.Tensor, ...]:
    """RandomResizedCrop boxes from uniform draws ``u`` (N, _DRAWS): (x0, y0, w, h), each (N,) float, whole pixels.

    Kornia's ``ResizedCropGenerator``, vectorised on the device of ``u`` without a host read: 10
    candidates with area ~ U(scale)·H·W and log-aspect ~ U(log ratio), w and h rounded; the first
    that fits is taken, else the whole image (or its largest centred box of an extreme aspect);
    the top-left corner is uniform over the positions where the box fits.
    """
    (s0, s1), (r0, r1) = recipe.scale, recipe.ratio
    area = (u[:, _AREA] * (s1 - s0) + s0) * (height * width)
    aspect = torch.exp(u[:, _LOG_RATIO] * (math.log(r1) - math.log(r0)) + math.log(r0))
    w = torch.sqrt(area * aspect).round()
    h = torch.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits & (fits.cumsum(1) == 1)  # the first candidate that fits (at most one True per row)
    # Fallback when none fits (a compile-time constant, as in torchvision's get_params).
    in_ratio = width / height
    if in_ratio < r0:
        w_fb, h_fb = float(width), float(round(width / r0))
    elif in_ratio > r1:
        w_fb, h_fb = float(round(height * r1)), float(height)
    else:
        w_fb, h_fb = float(width), float(height)
    found = first.any(1)
    w = torch.where(found, (w * first).sum(1), w_fb).clamp(1, width)
    h = torch.where(found, (h * first).sum(1), h_fb).clamp(1, height)
    x0 = torch.minimum((u[:, _X0] * (width - w + 1)).floor(), width - w)
    y0 = torch.minimum((u[:, _Y0] * (height - h + 1)).floor(), height - h)
    return x0, y0, w, h


def _crop_flip_matrix(x0, y0, w, h, flip: torch.Tensor | None, size: int) -> torch.Tensor:  # noqa: ANN001
    """(N, 2, 3) affine source pixel -> output pixel mapping the box corners onto the output's
    (aligned corners), mirrored left-right where ``flip`` (N,) bool: crop and flip in one warp."""
    out = float(max(size - 1, 1))
    ax = out / (w - 1).clamp_min(1e-3)  # a one-pixel box repeats its pixel
    ay = out / (h - 1).clamp_min(1e-3)
    zero = torch.zeros_like(ax)
    if flip is None:
        tx = -ax * x0
    else:
        sign = 1.0 - 2.0 * flip.to(ax.dtype)
        ax = ax * sign
        tx = -ax * torch.where(flip, x0 + w - 1, x0)
    return torch.stack([ax, zero, tx, zero, ay, -ay * y0], dim=1).view(-1, 2, 3)


def _range(center: float, magnitude: float, lower: float | None = 0.0) -> tuple[float, float]:
    """Kornia's / torchvision's jitter range: [center − m, center + m], the lower end floored at ``lower``."""
    lo = center - magnitude
    return (max(lo, lower) if lower is not None else lo), center + magnitude


def _jitter(x: torch.Tensor, u: torch.Tensor, strengths: tuple[float, float, float, float]) -> torch.Tensor:
    """Kornia ColorJitter's four steps with per-view factors from ``u`` (N, 4), in the fixed order
    brightness, contrast, saturation, hue; a step whose strength is 0 is left out."""
    brightness, contrast, saturation, hue = strengths
    steps = (
        (brightness, _range(1.0, brightness), KE.adjust_brightness_accumulative),
        (contrast, _range(1.0, contrast), KE.adjust_contrast_with_mean_subtraction),
        (saturation, _range(1.0, saturation), KE.adjust_saturation_with_gray_subtraction),
        (hue, _range(0.0, hue, lower=None), None),
    )
    for i, (strength, (lo, hi), step) in enumerate(steps):
        if strength <= 0:
            continue
        factor = u[:, i] * (hi - lo) + lo
        x = KE.adjust_hue(x, factor * (2 * math.pi)) if step is None else step(x, factor)
    return x


class KViewAugment(nn.Module):
    """K independently augmented, normalised views of a uint8 batch (built by :func:`build_augmentation`).

    Every random parameter of every view comes from one ``torch.rand`` on the device of the
    images; Kornia's functions (``kornia.geometry.transform.warp_affine`` / ``crop_by_indices``,
    ``kornia.enhance.adjust_*``, ``kornia.color.rgb_to_grayscale``, ``kornia.filters.gaussian_blur2d``)
    do the image work, on all views; a view that skips an op (probability gate) keeps its input
    through ``torch.where``. So on CUDA a call reads nothing back on the host (no sync), has no
    data-dependent shapes or branches, and launches a fixed set of kernels (see docs/BENCHMARKS.md).

    Args:
        recipe: what to apply (see :data:`PRESETS`).
        K: number of views per image, K >= 1.
        dtype: output dtype (float32, bfloat16, ...).
        flatten: default output form: False -> (K, B, 3, h, w), True -> (K·B, 3, h, w).
        crop_mode: how the crop is resampled: ``"slice"`` (Kornia's ``crop_by_indices``: index each
            view's box and resize it, one Python-level resize per view; reads the boxes on the host),
            ``"resample"`` (one batched bilinear ``warp_affine`` for all views, with the flip folded
            into the same warp), or ``"auto"``: slice on CPU (faster there), resample on other
            devices (no host read, no K·B small kernels). Both sample the same boxes and agree to
            float rounding (~1e-5).

    Raises (forward): ValueError for input that is not uint8 of shape (B, 3, H, W).
    """

    def __init__(
        self,
        recipe: AugmentRecipe,
        K: int,
        dtype: torch.dtype = torch.float32,
        flatten: bool = False,
        crop_mode: str = "auto",
    ) -> None:
        super().__init__()
        if int(K) != K or K < 1:
            raise ValueError(f"K (views per image) must be an int >= 1, got {K!r}")
        if crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
        _check_dtype(dtype)
        self.recipe = recipe
        self.K = int(K)
        self.flatten = bool(flatten)
        self.crop_mode = crop_mode
        self.blur_kernel = ((recipe.blur_kernel or blur_kernel_size(int(recipe.size), recipe.blur_sigma[1]))
                            if recipe.p_blur > 0 else None)
        self.normalize = NormalizeImages(*recipe.mean_std, dtype=dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.normalize.dtype

    @property
    def size(self) -> int:
        return int(self.recipe.size)

    @property
    def ops(self) -> tuple[str, ...]:
        """The ops applied after the crop, in order (those whose probability is 0 are left out)."""
        r = self.recipe
        named = (("flip", r.p_flip), ("jitter", r.p_jitter), ("gray", r.p_gray), ("blur", r.p_blur))
        return ("crop",) + tuple(name for name, p in named if p > 0)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, flatten: bool | None = None) -> torch.Tensor:
        """images: (B, 3, H, W) uint8 -> views (K, B, 3, h, w), or (K·B, 3, h, w) if flatten.

        ``views[k, b]`` is view k of image b; h = w = ``recipe.size``; channels-last; float in
        ``self.dtype``; on the device of ``images``.
        """
        _check_images(images)
        r, size = self.recipe, self.size
        batch, _, height, width = images.shape
        x = images.to(dtype=torch.float32, memory_format=torch.contiguous_format).div_(255.0)
        if self.K > 1:
            x = x.repeat(self.K, 1, 1, 1)  # view-major: row k*B + b is image b
        u = torch.rand(x.shape[0], _DRAWS, device=x.device)  # every parameter of every view
        x0, y0, w, h = _crop_boxes(u, height, width, r)
        flip = u[:, _FLIP] < r.p_flip if r.p_flip > 0 else None
        resample = self.crop_mode == "resample" or (self.crop_mode == "auto" and x.device.type != "cpu")
        if resample:
            matrix = _crop_flip_matrix(x0, y0, w, h, flip, size)
            x = KG.warp_affine(x, matrix, (size, size), mode="bilinear", padding_mode="zeros", align_corners=True)
        else:
            x = KG.crop_by_indices(x, bbox_generator(x0, y0, w, h), (size, size), "bilinear", align_corners=True)
            if flip is not None:
                x = torch.where(flip.view(-1, 1, 1, 1), KG.hflip(x), x)
        if r.p_jitter > 0:
            gate = (u[:, _JITTER] < r.p_jitter).view(-1, 1, 1, 1)
            x = torch.where(gate, _jitter(x, u[:, _FACTORS], r.jitter), x)
        if r.p_gray > 0:
            gate = (u[:, _GRAY] < r.p_gray).view(-1, 1, 1, 1)
            x = torch.where(gate, KC.rgb_to_grayscale(x), x)  # (N, 1, h, w) broadcasts over channels
        if self.blur_kernel is not None:
            gate = (u[:, _BLUR] < r.p_blur).view(-1, 1, 1, 1)
            sigma = (u[:, _SIGMA] * (r.blur_sigma[1] - r.blur_sigma[0]) + r.blur_sigma[0]).view(-1, 1)
            # gaussian_blur2d's own steps without its host-side `sigma > 0` check (sigma >= 0.1 here):
            # one 1-D kernel per view, used along both axes, as RandomGaussianBlur does.
            kernel = KF.get_gaussian_kernel1d(self.blur_kernel, sigma)
            x = torch.where(gate, KF.filter2d_separable(x, kernel, kernel, border_type="reflect"), x)
        views = self.normalize.normalize_unit(x)
        if self.flatten if flatten is None else flatten:
            return views
        return views.view(self.K, batch, *views.shape[1:])

    def extra_repr(self) -> str:
        return f"K={self.K}, flatten={self.flatten}, crop_mode={self.crop_mode!r}, ops={self.ops}, recipe={self.recipe}"


def _recipe(preset: str, **overrides: object) -> AugmentRecipe:
    if preset not in PRESETS:
        raise ValueError(f"unknown augmentation preset {preset!r}; known: {sorted(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key in ("scale", "ratio", "jitter", "blur_sigma", "mean", "std"):
        if key in changes:
            changes[key] = tuple(float(v) for v in changes[key])  # type: ignore[union-attr]
    if changes.get("mean") is not None:
        changes.pop("stats", None)
    return dataclasses.replace(PRESETS[preset], **changes)


def resolve_preset(choice: str, image_size: int) -> str:
    """``choice`` unless it is ``auto``: then ``cifar`` for images of 64 px or less, else ``imagenet``."""
    if choice != "auto":
        return choice
    return "cifar" if image_size <= 64 else "imagenet"


def build_augmentation(
    preset: str,
    K: int,
    size: int | None = None,
    *,
    scale: tuple[float, float] | None = None,
    ratio: tuple[float, float] | None = None,
    p_flip: float | None = None,
    p_jitter: float | None = None,
    p_gray: float | None = None,
    p_blur: float | None = None,
    jitter: tuple[float, float, float, float] | None = None,
    blur_sigma: tuple[float, float] | None = None,
    blur_kernel: int | None = None,
    stats: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    flatten: bool = False,
    crop_mode: str = "auto",
) -> KViewAugment:
    """The K-view augmentation of a preset, with any knob overridden (None keeps the preset's).

    Args:
        preset: ``cifar``, ``imagenet``, ``cifar_linear`` or ``imagenet_linear`` (:data:`PRESETS`).
        K: views per image (>= 1).
        size: output side (default 32 for cifar*, 84 for imagenet*).
        scale, ratio: RandomResizedCrop area fraction and aspect-ratio ranges.
        p_flip, p_jitter, p_gray, p_blur: probabilities of each op (0 removes it).
        jitter: ColorJitter (brightness, contrast, saturation, hue).
        blur_sigma, blur_kernel: Gaussian blur sigma range and odd kernel side.
        stats: a key of :data:`NORM_STATS`; or ``mean`` and ``std`` explicitly.
        dtype: output dtype.  flatten: return (K·B, 3, h, w) instead of (K, B, 3, h, w).
        crop_mode: ``auto`` / ``slice`` / ``resample``, see :class:`KViewAugment`.

    Raises:
        ValueError: unknown preset or stats, K < 1, a probability outside [0, 1], a bad range.
    """
    recipe = _recipe(
        preset,
        size=size,
        scale=scale,
        ratio=ratio,
        p_flip=p_flip,
        p_jitter=p_jitter,
        p_gray=p_gray,
        p_blur=p_blur,
        jitter=jitter,
        blur_sigma=blur_sigma,
        blur_kernel=blur_kernel,
        stats=stats,
        mean=mean,
        std=std,
    )
    return KViewAugment(recipe, K, dtype=dtype, flatten=flatten, crop_mode=crop_mode)


def build_eval_transform(
    preset: str,
    dtype: torch.dtype = torch.float32,
    *,
    stats: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> NormalizeImages:
    """The eval transform matching ``preset``: uint8 -> float, normalise, channels-last; no crop.

    Uses the same statistics as ``build_augmentation(preset, ...)`` with the same overrides.
    """
    recipe = _recipe(preset, stats=stats, mean=mean, std=std)
    return NormalizeImages(*recipe.mean_std, dtype=dtype)
