"""Tests for train/model.py: the SimMER encoder (timm backbone + SimSiam projector)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from train.model import (
    SimMEREncoder,
    apply_cifar_stem,
    build_backbone,
    build_encoder,
    build_projector,
    default_projector_layers,
    use_cifar_stem,
)
from train.checkpoint import save_backbone


@pytest.fixture(scope="module")
def r18_encoder() -> SimMEREncoder:
    torch.manual_seed(0)
    return build_encoder("resnet18", image_size=32, proj_dim=64)


def _stage1(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output of a timm ResNet's first stage: stem then layer1."""
    return backbone.layer1(backbone.maxpool(backbone.act1(backbone.bn1(backbone.conv1(x)))))


def test_forward_takes_all_views_in_one_backbone_call(r18_encoder: SimMEREncoder) -> None:
    torch.manual_seed(1)
    K, B = 2, 3
    views = torch.randn(K, B, 3, 32, 32)
    calls: list[tuple[int, ...]] = []
    handle = r18_encoder.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    try:
        z = r18_encoder(views)
    finally:
        handle.remove()
    assert z.shape == (K, B, 64)
    assert calls == [(K * B, 3, 32, 32)]
    # View-major: z[k, b] is the representation of views[k, b] (same batch, so same BN statistics).
    z_flat = r18_encoder(views.reshape(K * B, 3, 32, 32))
    assert z_flat.shape == (K * B, 64)
    torch.testing.assert_close(z, z_flat.reshape(K, B, 64))


def test_forward_features_shapes(r18_encoder: SimMEREncoder) -> None:
    torch.manual_seed(2)
    r18_encoder.eval()
    try:
        images = torch.randn(4, 3, 32, 32)
        feats = r18_encoder.forward_features(images)
        assert feats.shape == (4, 512) == (4, r18_encoder.num_features)
        views = images.reshape(2, 2, 3, 32, 32)
        torch.testing.assert_close(r18_encoder.forward_features(views), feats.reshape(2, 2, 512))
    finally:
        r18_encoder.train()
    with pytest.raises(ValueError, match="shape"):
        r18_encoder(torch.randn(3, 32, 32))


@pytest.mark.parametrize("arch", ["resnet18", "resnet18d"])
def test_cifar_stem_keeps_32x32_at_first_stage(arch: str) -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 3, 32, 32)
    plain = build_backbone(arch, cifar_stem=False)
    stem = build_backbone(arch, cifar_stem=True)
    with torch.no_grad():
        assert _stage1(plain, x).shape == (2, 64, 8, 8)
        assert _stage1(stem, x).shape == (2, 64, 32, 32)
    assert isinstance(stem.maxpool, nn.Identity)
    first = stem.conv1 if isinstance(stem.conv1, nn.Conv2d) else stem.conv1[0]
    assert first.kernel_size == (3, 3) and first.stride == (1, 1) and first.padding == (1, 1)
    assert first.bias is None


def test_stem_choice_follows_arch_and_image_size() -> None:
    assert use_cifar_stem("resnet18", 32)
    assert use_cifar_stem("resnet50", 64)
    assert not use_cifar_stem("resnet50", 84)
    assert not use_cifar_stem("mobilenetv3_small_050", 32)
    assert isinstance(build_encoder("resnet18", 32).backbone.maxpool, nn.Identity)
    assert not isinstance(build_encoder("resnet18", 96).backbone.maxpool, nn.Identity)


def test_cifar_stem_rejects_non_resnet() -> None:
    with pytest.raises(ValueError, match="CIFAR stem"):
        build_backbone("mobilenetv3_small_050", cifar_stem=True)
    with pytest.raises(ValueError, match="CIFAR stem"):
        apply_cifar_stem(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="unknown timm model"):
        build_backbone("not_a_model", cifar_stem=False)
    with pytest.raises(ValueError, match="unknown timm model"):
        build_encoder("not_a_model", 32)


def _layers(projector: nn.Module) -> list[nn.Module]:
    return list(projector.children())


def test_projector_two_layers_simsiam_cifar() -> None:
    proj = build_projector(512, out_dim=2048, num_layers=2)
    kinds = [type(m) for m in _layers(proj)]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d]
    lin1, bn1, _, lin2, bn2 = _layers(proj)
    assert (lin1.in_features, lin1.out_features, lin2.in_features, lin2.out_features) == (512, 512, 512, 2048)
    assert lin1.bias is None and lin2.bias is None
    assert bn1.affine and not bn2.affine
    assert proj(torch.randn(5, 512)).shape == (5, 2048)


def test_projector_three_layers_for_resnet50() -> None:
    assert default_projector_layers("resnet18") == 2
    assert default_projector_layers("resnet34") == 2
    assert default_projector_layers("resnet50") == 3
    enc = build_encoder("resnet50", image_size=84)
    linears = [m for m in enc.projector if isinstance(m, nn.Linear)]
    norms = [m for m in enc.projector if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 2048)] * 3
    assert [m.affine for m in norms] == [True, True, False]
    assert enc.out_dim == 2048 and enc.num_features == 2048
    custom = build_encoder("resnet18", 32, proj_dim=128, proj_layers=3, proj_hidden=256)
    linears = [m for m in custom.projector if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 256), (256, 256), (256, 128)]
    with pytest.raises(ValueError, match="num_layers"):
        build_projector(512, num_layers=0)


def test_projector_output_is_batch_normalised() -> None:
    torch.manual_seed(4)
    z = build_projector(16, out_dim=32)(torch.randn(64, 16) * 5 + 3)
    torch.testing.assert_close(z.mean(0), torch.zeros(32), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(32), atol=1e-3, rtol=0)


def test_channels_last_weights_and_layout_independent_output(r18_encoder: SimMEREncoder) -> None:
    convs = [m for m in r18_encoder.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen: list[bool] = []
    handle = r18_encoder.backbone.conv1.register_forward_pre_hook(
        lambda m, i: seen.append(i[0].is_contiguous(memory_format=torch.channels_last))
    )
    torch.manual_seed(5)
    x = torch.randn(4, 3, 16, 16)  # NCHW-contiguous input
    r18_encoder.eval()
    try:
        with torch.no_grad():
            z_nchw = r18_encoder(x)
            z_nhwc = r18_encoder(x.contiguous(memory_format=torch.channels_last))
    finally:
        handle.remove()
        r18_encoder.train()
    assert seen == [True, True]
    torch.testing.assert_close(z_nchw, z_nhwc)


def test_backbone_roundtrip_into_plain_timm(tmp_path, r18_encoder: SimMEREncoder) -> None:
    torch.manual_seed(6)
    with torch.no_grad():  # move the BN running statistics away from their initial values
        r18_encoder(torch.randn(2, 2, 3, 32, 32) * 2 + 1)
    path = tmp_path / "sub" / "backbone.pt"
    save_backbone(r18_encoder, path)
    assert [p.name for p in path.parent.iterdir()] == ["backbone.pt"]  # no temporary left behind

    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in state.values())
    fresh = timm.create_model("resnet18", pretrained=False, num_classes=0)
    apply_cifar_stem(fresh)
    assert set(state) == set(fresh.state_dict())
    fresh.load_state_dict(state)

    x = torch.randn(3, 3, 32, 32)
    r18_encoder.eval()
    try:
        with torch.no_grad():
            expected = r18_encoder.forward_features(x)
            got_timm = fresh.eval()(x)
    finally:
        r18_encoder.train()
    torch.testing.assert_close(got_timm, expected)


def test_save_backbone_strips_compile_wrapper(tmp_path) -> None:
    class _Wrapped(nn.Module):  # what torch.compile's OptimizedModule looks like from outside
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

    enc = build_encoder("resnet18", 32, proj_dim=16)
    save_backbone(_Wrapped(enc), tmp_path / "b.pt")
    keys = set(torch.load(tmp_path / "b.pt", weights_only=True))
    assert keys == set(enc.backbone.state_dict())


@pytest.mark.parametrize("maxpool, expected", [(None, nn.MaxPool2d), (False, nn.Identity), (True, nn.MaxPool2d)])
def test_maxpool_option_keeps_the_stem_and_changes_only_the_pool(maxpool, expected) -> None:
    encoder = build_encoder("resnet18", image_size=84, proj_dim=16, maxpool=maxpool)
    assert isinstance(encoder.backbone.maxpool, expected)
    assert encoder.backbone.conv1.kernel_size == (7, 7) and encoder.backbone.conv1.stride == (2, 2)
    with torch.no_grad():
        features = encoder.backbone.eval().forward_features(torch.randn(1, 3, 84, 84))
    assert features.shape[-1] == (6 if maxpool is False else 3)  # 84 px: stem /2, (pool /2), layers 2-4 /2 each


def test_maxpool_is_an_encoder_key_and_old_checkpoints_resume() -> None:
    from train.checkpoint import CheckpointError, check_compatible
    from train.model import ENCODER_KEYS, build_encoder_from_cfg

    assert "maxpool" in ENCODER_KEYS
    cfg = {"arch": "resnet18", "cifar_stem": -1, "maxpool": 0, "proj_dim": 16, "proj_layers": 0, "proj_hidden": 0,
           "image_size": 0, "augment": "auto"}
    assert isinstance(build_encoder_from_cfg(cfg, 84).backbone.maxpool, nn.Identity)
    old = {k: v for k, v in cfg.items() if k != "maxpool"}  # a checkpoint from before the option
    current = {"cfg": {**cfg, "maxpool": -1}, "run": {}, "data": {}}
    check_compatible({"config": {"cfg": old, "run": {}, "data": {}}}, current, "old.pt")
    with pytest.raises(CheckpointError, match="cfg.maxpool: checkpoint -1 vs now 0"):
        check_compatible({"config": {"cfg": old, "run": {}, "data": {}}}, {**current, "cfg": cfg}, "old.pt")


def test_projector_tail_runs_in_float32_under_autocast():
    """z reaches the loss unrounded: the last Linear + BatchNorm see float32 under bf16 autocast."""
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", 32, proj_dim=64)
    encoder.train()
    x = torch.randn(2, 8, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        features = encoder.backbone(x.flatten(0, 1).contiguous(memory_format=torch.channels_last))
        z = encoder(x)
        hidden = encoder.projector[:-2](features)
    assert z.dtype == torch.float32 and hidden.dtype == torch.bfloat16
    with torch.no_grad():
        by_hand = encoder.projector[-2:](hidden.float()).reshape(2, 8, -1)  # float32 Linear + BN
    torch.testing.assert_close(z, by_hand, rtol=1e-5, atol=1e-5)
    encoder.fp32_tail = False
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = encoder(x)
    assert rounded.dtype == torch.bfloat16  # the bf16 Linear rounds z
    assert (rounded.float() - by_hand).abs().max() > 1e-3
    assert set(build_encoder("resnet18", 32, proj_dim=64, fp32_tail=False).state_dict()) == set(encoder.state_dict())
