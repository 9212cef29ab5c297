"""K-view GPU augmentation (Kornia) and the matching eval transform; see :mod:`augment.views`."""

from augment.views import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    NORM_STATS,
    PRESETS,
    AugmentRecipe,
    KViewAugment,
    NormalizeImages,
    blur_kernel_size,
    build_augmentation,
    build_eval_transform,
    resolve_preset,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
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
    "resolve_preset",
]
