"""Tests for augment/views.py: the K-view Kornia augmentation and the eval transform."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from bench.cuda_trace import CudaTrace

from augment import (
    NORM_STATS,
    PRESETS,
    KViewAugment,
    blur_kernel_size,
    build_augmentation,
    build_eval_transform,
)

# Independent copies of the published statistics (a typo in the module must not pass).
CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

OFF = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_jitter=0.0, p_gray=0.0, p_blur=0.0)
"""Knobs that disable every random op: the augmentation is then normalisation only."""


def _reference(images: torch.Tensor, stats: tuple) -> torch.Tensor:
    """(x / 255 - mean) / std in float64, NCHW."""
    mean = torch.tensor(stats[0], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(stats[1], dtype=torch.float64).view(1, 3, 1, 1)
    return (images.double() / 255 - mean) / std


def _to_pixels(views: torch.Tensor, stats: tuple) -> torch.Tensor:
    """Undo the normalisation: (..., 3, h, w) float -> pixel values in [0, 255], float64."""
    mean = torch.tensor(stats[0], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(stats[1], dtype=torch.float64).view(3, 1, 1)
    return (views.double() * std + mean) * 255


def _random_images(batch: int, side: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8, generator=gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flatten", [False, True])
def test_shape_dtype_layout_device(dtype: torch.dtype, flatten: bool) -> None:
    torch.manual_seed(0)
    K, B = 3, 4
    images = _random_images(B, 40).contiguous(memory_format=torch.channels_last)  # as FFCV gives them
    views = build_augmentation("cifar", K=K, dtype=dtype, flatten=flatten)(images)
    assert views.dtype == dtype and views.device.type == "cpu"
    flat = views if flatten else views.flatten(0, 1)
    assert views.shape == ((K * B, 3, 32, 32) if flatten else (K, B, 3, 32, 32))
    assert flat.is_contiguous(memory_format=torch.channels_last)
    assert not flat.is_contiguous()  # really NHWC strides, not a 1x1 corner case
    if not flatten:
        assert all(views[k].is_contiguous(memory_format=torch.channels_last) for k in range(K))
    assert torch.isfinite(flat.float()).all()


def test_flatten_can_be_chosen_per_call() -> None:
    aug = build_augmentation("cifar", K=2)
    images = _random_images(3, 32)
    assert aug(images).shape == (2, 3, 3, 32, 32)
    assert aug(images, flatten=True).shape == (6, 3, 32, 32)


def test_imagenet_preset_size_and_blur() -> None:
    torch.manual_seed(1)
    aug = build_augmentation("imagenet", K=2)
    assert aug(_random_images(2, 96)).shape == (2, 2, 3, 84, 84)
    assert aug.ops == ("crop", "flip", "jitter", "gray", "blur") and aug.blur_kernel == 13  # ±3σ at σ = 2
    assert build_augmentation("imagenet", K=1, size=64)(_random_images(2, 84)).shape == (1, 2, 3, 64, 64)
    assert [blur_kernel_size(s) for s in (32, 84, 224)] == [13, 13, 23]
    assert blur_kernel_size(84, max_sigma=1.0) == 9 and blur_kernel_size(84, max_sigma=2.0) >= 6 * 2.0 + 1
    assert PRESETS["imagenet"].mean_std == IMAGENET and PRESETS["cifar"].mean_std == CIFAR10
    cifar = build_augmentation("cifar", K=2)
    assert cifar.ops == ("crop", "flip", "jitter", "gray") and cifar.blur_kernel is None


def test_views_differ_from_one_another() -> None:
    torch.manual_seed(2)
    K, B = 4, 8
    views = build_augmentation("cifar", K=K)(_random_images(B, 32))
    for b in range(B):
        for k in range(K):
            for j in range(k + 1, K):
                assert (views[k, b] - views[j, b]).abs().max() > 0.1, (k, j, b)


def test_seeded_runs_repeat() -> None:
    images = _random_images(4, 32)
    aug = build_augmentation("cifar", K=3)
    torch.manual_seed(3)
    first = aug(images)
    torch.manual_seed(3)
    torch.testing.assert_close(aug(images), first, rtol=0, atol=0)


@pytest.mark.parametrize("crop_mode", ["slice", "resample"])
def test_alignment_with_random_ops_disabled(crop_mode: str) -> None:
    K, B = 3, 5
    images = _random_images(B, 16, seed=4)
    views = build_augmentation("cifar", K=K, size=16, crop_mode=crop_mode, **OFF)(images)
    expected = _reference(images, CIFAR10).float()
    for k in range(K):
        for b in range(B):
            torch.testing.assert_close(views[k, b], expected[b], rtol=0, atol=1e-4)


def test_alignment_under_random_geometry() -> None:
    """Crops and flips of a constant image keep its colour: view k of image b comes from image b."""
    torch.manual_seed(5)
    K, B = 4, 6
    colours = _random_images(B, 1, seed=5)
    images = colours.expand(B, 3, 24, 24).contiguous()
    views = build_augmentation("cifar", K=K, p_jitter=0.0, p_gray=0.0)(images)
    pixels = _to_pixels(views, CIFAR10)
    target = colours.double().view(1, B, 3, 1, 1).expand_as(pixels)
    torch.testing.assert_close(pixels, target, rtol=0, atol=1e-3)


def test_flip_rate_and_independence_across_views() -> None:
    torch.manual_seed(6)
    K, B, side = 2, 1000, 8
    ramp = (torch.arange(side) * 30).to(torch.uint8)  # left-right asymmetric
    images = ramp.expand(B, 3, side, side).contiguous()
    knobs = {**OFF, "p_flip": 0.5}
    views = build_augmentation("cifar", K=K, size=side, **knobs)(images)
    pixels = _to_pixels(views, CIFAR10)
    flipped = pixels[..., 0, 0, 0] > pixels[..., 0, 0, -1]  # (K, B)
    expected = torch.where(flipped[..., None, None, None], ramp.flip(0).double(), ramp.double())
    torch.testing.assert_close(pixels, expected.expand_as(pixels), rtol=0, atol=1e-3)
    assert abs(flipped.double().mean().item() - 0.5) < 0.05
    # Each view draws its own flip: the two views of an image disagree about half of the time.
    assert abs((flipped[0] != flipped[1]).double().mean().item() - 0.5) < 0.06


def test_grayscale_rate() -> None:
    torch.manual_seed(7)
    B = 2000
    colour = torch.tensor([200, 60, 120], dtype=torch.uint8)
    images = colour.view(1, 3, 1, 1).expand(B, 3, 8, 8).contiguous()
    knobs = {**OFF, "p_gray": 0.2}
    pixels = _to_pixels(build_augmentation("cifar", K=1, size=8, flatten=True, **knobs)(images), CIFAR10)
    spread = pixels.amax(1) - pixels.amin(1)  # (N, h, w): 0 where grayscale
    gray = spread.amax((1, 2)) < 1e-2
    assert ((spread.amin((1, 2)) > 100) | gray).all()  # either all grey or untouched
    assert abs(gray.double().mean().item() - 0.2) < 0.04
    luminance = 0.299 * 200 + 0.587 * 60 + 0.114 * 120
    torch.testing.assert_close(pixels[gray], torch.full_like(pixels[gray], luminance), rtol=0, atol=0.05)


@pytest.mark.parametrize("crop_mode", ["slice", "resample"])
def test_crop_area_and_ratio_within_range(crop_mode: str) -> None:
    """Pixels encode their coordinates (R = 8x, G = 8y): a crop's box can be read off its corners."""
    torch.manual_seed(8)
    B, side = 1000, 32
    coord = torch.arange(side) * 8
    images = torch.zeros(B, 3, side, side, dtype=torch.uint8)
    images[:, 0] = coord.view(1, side).to(torch.uint8)
    images[:, 1] = coord.view(side, 1).to(torch.uint8)
    aug = build_augmentation("cifar", K=1, flatten=True, crop_mode=crop_mode, p_flip=0.0, p_jitter=0.0, p_gray=0.0)
    coords = _to_pixels(aug(images), CIFAR10) / 8  # output pixel -> source coordinate
    x0, x1 = coords[:, 0, 0, 0], coords[:, 0, 0, -1]
    y0, y1 = coords[:, 1, 0, 0], coords[:, 1, -1, 0]
    # Bilinear resizing with aligned corners is linear in the coordinates: a proper box.
    torch.testing.assert_close(x0, x0.round(), rtol=0, atol=1e-3)
    torch.testing.assert_close(y1, y1.round(), rtol=0, atol=1e-3)
    w, h = (x1 - x0 + 1).round(), (y1 - y0 + 1).round()
    assert (x0 >= -1e-3).all() and (x1 <= side - 1 + 1e-3).all()
    assert (y0 >= -1e-3).all() and (y1 <= side - 1 + 1e-3).all()
    # Kornia rounds the sampled width and height to whole pixels: allow half a pixel on each.
    assert ((w + 0.5) * (h + 0.5) >= 0.2 * side * side).all()
    assert ((w - 0.5) * (h - 0.5) <= side * side).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    area = w * h / side**2
    assert area.min() < 0.25 and area.max() > 0.95 and 0.45 < area.mean() < 0.65
    assert x0.round().unique().numel() > 10  # positions vary too


def test_normalisation_statistics() -> None:
    value = torch.tensor([10, 128, 250], dtype=torch.uint8)
    constant = value.view(1, 3, 1, 1).expand(2, 3, 8, 8).contiguous()
    for preset, stats in (("cifar", CIFAR10), ("imagenet", IMAGENET)):
        expected = ((value.double() / 255 - torch.tensor(stats[0])) / torch.tensor(stats[1])).float()
        views = build_augmentation(preset, K=2, size=8, **OFF)(constant)
        got = build_eval_transform(preset)(constant)
        for out in (views.flatten(0, 1), got):
            torch.testing.assert_close(out, expected.view(1, 3, 1, 1).expand_as(out), rtol=0, atol=1e-5)
    # Uniform random pixels: per-channel mean of the output is (127.5 / 255 - mean) / std.
    out = build_eval_transform("cifar")(_random_images(64, 32, seed=9))
    expected_mean = (0.5 - torch.tensor(CIFAR10[0])) / torch.tensor(CIFAR10[1])
    torch.testing.assert_close(out.mean((0, 2, 3)), expected_mean, rtol=0, atol=0.02)
    # Statistics can be chosen by name or given explicitly.
    assert build_eval_transform("cifar", stats="imagenet").mean.flatten().tolist() == pytest.approx(IMAGENET[0])
    half = build_eval_transform("cifar", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(constant)
    torch.testing.assert_close(half[0, :, 0, 0], value.float() / 127.5 - 1, rtol=0, atol=1e-6)
    assert NORM_STATS["cifar10"] == CIFAR10 and NORM_STATS["imagenet"] == IMAGENET


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eval_transform_equals_normalised_source(dtype: torch.dtype) -> None:
    images = _random_images(3, 40, seed=10).contiguous(memory_format=torch.channels_last)
    out = build_eval_transform("imagenet", dtype=dtype)(images)
    assert out.shape == (3, 3, 40, 40) and out.dtype == dtype  # no crop
    assert out.is_contiguous(memory_format=torch.channels_last)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), _reference(images, IMAGENET), rtol=0, atol=atol)


def test_linear_presets_crop_and_flip_only() -> None:
    for preset in ("cifar_linear", "imagenet_linear"):
        aug = build_augmentation(preset, K=1)
        assert aug.ops == ("crop", "flip")
        assert PRESETS[preset].scale == (0.08, 1.0)
    torch.manual_seed(11)
    colour = _random_images(1, 1, seed=11)
    views = build_augmentation("cifar_linear", K=1)(colour.expand(16, 3, 32, 32).contiguous())
    torch.testing.assert_close(
        _to_pixels(views, CIFAR10), colour.double().view(1, 1, 3, 1, 1).expand(1, 16, 3, 32, 32), rtol=0, atol=1e-3
    )


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(2, 3, 8, 8),  # float
        torch.zeros(3, 8, 8, dtype=torch.uint8),  # no batch dimension
        torch.zeros(2, 1, 8, 8, dtype=torch.uint8),  # one channel
        torch.zeros(2, 8, 8, 3, dtype=torch.uint8),  # NHWC shape
    ],
)
def test_rejects_bad_input(bad: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="uint8"):
        build_augmentation("cifar", K=2)(bad)
    with pytest.raises(ValueError, match="uint8"):
        build_eval_transform("cifar")(bad)


def test_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="preset"):
        build_augmentation("svhn", K=2)
    with pytest.raises(ValueError, match="K"):
        build_augmentation("cifar", K=0)
    with pytest.raises(ValueError, match="p_gray"):
        build_augmentation("cifar", K=2, p_gray=1.5)
    with pytest.raises(ValueError, match="scale"):
        build_augmentation("cifar", K=2, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="stats"):
        build_augmentation("cifar", K=2, stats="mnist")
    with pytest.raises(ValueError, match="dtype"):
        build_augmentation("cifar", K=2, dtype=torch.int64)
    with pytest.raises(ValueError, match="crop_mode"):
        build_augmentation("cifar", K=2, crop_mode="warp")


def test_is_one_module_that_moves_with_to() -> None:
    aug = build_augmentation("cifar", K=2)
    assert isinstance(aug, KViewAugment) and isinstance(aug, nn.Module) and aug.K == 2 and aug.size == 32
    # The normalisation statistics are buffers, so .to() carries them along with the module.
    buffers = dict(aug.named_buffers())
    assert {"normalize.mean", "normalize.std"} <= set(buffers)
    torch.testing.assert_close(buffers["normalize.mean"].flatten(), torch.tensor(CIFAR10[0]))
    moved = build_augmentation("cifar", K=2).to(torch.float64)
    assert {b.dtype for b in moved.buffers()} == {torch.float64}
    transform = build_eval_transform("cifar").to("meta")
    assert [b.device.type for b in transform.buffers()] == ["meta", "meta"]
    # Moved buffers still normalise correctly (the output keeps the module's dtype).
    images = _random_images(2, 8, seed=12)
    torch.manual_seed(12)
    out = build_augmentation("cifar", K=1, size=8, **OFF).to(torch.float64)(images)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0].double(), _reference(images, CIFAR10), rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_views_match_cpu_layout() -> None:
    images = _random_images(8, 32).cuda()
    views = build_augmentation("cifar", K=2, dtype=torch.bfloat16).cuda()(images)
    assert views.device.type == "cuda" and views.dtype == torch.bfloat16
    assert views.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert build_eval_transform("cifar")(images).device.type == "cuda"


@pytest.mark.parametrize(("preset", "side"), [("cifar", 32), ("imagenet", 96)])
def test_cuda_path_has_no_host_sync(preset: str, side: int) -> None:
    """The real module on (fake) CUDA tensors: no host sync, a fixed and small number of launches.

    No GPU is needed: FakeTensorMode runs every CUDA branch with shape-only tensors and CudaTrace
    sees every aten op (see bench/cuda_trace.py for what counts as a sync and as a launch).
    """
    K, B = 4, 512
    with FakeTensorMode(allow_non_fake_inputs=True):
        augment = build_augmentation(preset, K=K).to("cuda")
        augment_bf16 = build_augmentation(preset, K=K, dtype=torch.bfloat16).to("cuda")
        images = torch.empty(B, 3, side, side, dtype=torch.uint8, device="cuda")
        with CudaTrace(placeholders=False) as trace:
            with trace.region("augment"):
                views = augment(images)
            with trace.region("augment_bf16_flat"):
                augment_bf16(images, flatten=True)
    assert views.device.type == "cuda" and views.shape == (K, B, 3, augment.size, augment.size)
    assert views.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    assert trace.syncs == [], trace.summary()
    ops = {r.op for r in trace.records}
    for data_dependent in ("nonzero", "masked_select", "_local_scalar_dense", "index.Tensor", "index_put"):
        assert not any(data_dependent in op for op in ops), data_dependent
    # Every CUDA op runs on the device: nothing was made on the CPU and copied over.
    copies = [r for r in trace.records if r.op in ("aten._to_copy.default", "aten.copy_.default")]
    assert copies and all(r.sync is None for r in copies)
    # Launch budget (docs/BENCHMARKS.md): Kornia's own augmentation modules needed 350 (cifar) and
    # 411 (imagenet) launches plus 8-9 host syncs per call.
    assert trace.launches["augment"] <= {"cifar": 250, "imagenet": 280}[preset], trace.launches
