"""SimMER encoder: a timm backbone plus SimSiam's projection MLP.

The encoder F maps every augmented view to a D-dimensional representation. The K views of a
batch of B images go through ONE forward pass, as a (K·B, 3, H, W) batch, in channels-last
memory format::

    encoder = build_encoder("resnet18", image_size=32)     # CIFAR stem, 2-layer projector
    views = augment(images)                                 # (K, B, 3, 32, 32), see augment/
    z = encoder(views)                                      # (K, B, 2048)
    feats = encoder.forward_features(images_normalised)     # (B, 512) pooled backbone features

Backbone: any timm model by name, created with ``num_classes=0`` so that it returns pooled
features (N, F), F = ``backbone.num_features``. For ResNets on images of 64 px or less we use
the CIFAR stem (3×3 stride-1 first conv, no max-pool); timm has no argument for it, so
:func:`apply_cifar_stem` swaps the two modules.

Projector (SimSiam, Chen & He 2020): ``num_layers − 1`` blocks of Linear(no bias)–BN–ReLU, then
Linear(no bias)–BN(affine=False). Two layers for ResNet-18/34 (basic-block ResNets), three
otherwise (ResNet-50); hidden width = F; output D = 2048. The projector's BatchNorm sees all K·B
views of a step at once.

Predictor (SimSiam only, ``cfg.method=simsiam``): Linear(D, D/4, no bias)–BN–ReLU–Linear(D/4, D),
:func:`build_predictor`. It is part of the encoder's ``state_dict`` (``predictor.*``), so
checkpoints keep it and a resume restores it; the backbone alone is what is evaluated and exported.

The backbone alone
-----------------
:func:`backbone_state` is the backbone's ``state_dict`` with timm's own keys;
``train.checkpoint.save_backbone`` writes it as ``backbone.pt``, which plain timm reads::

    import timm, torch
    from train.model import apply_cifar_stem

    backbone = timm.create_model("resnet18", pretrained=False, num_classes=0)
    apply_cifar_stem(backbone)          # only if trained with the CIFAR stem (32-px data)
    backbone.load_state_dict(torch.load("backbone.pt", weights_only=True))

Whether the stem was used follows :func:`use_cifar_stem` (ResNet family and images of 64 px or
less); ``train/export.py`` writes a folder that timm loads without this project.
"""

from __future__ import annotations

import functools

import timm
import torch
from timm.models import ResNet
from timm.models.resnet import BasicBlock
from torch import nn

from train.methods import get_method

__all__ = [
    "CIFAR_STEM_MAX_SIZE",
    "SimMEREncoder",
    "apply_cifar_stem",
    "build_backbone",
    "build_encoder",
    "build_predictor",
    "build_projector",
    "default_projector_layers",
    "ENCODER_DEFAULTS",
    "stem_from_cfg",
    "ENCODER_KEYS",
    "backbone_state",
    "build_encoder_from_cfg",
    "use_cifar_stem",
]

CIFAR_STEM_MAX_SIZE = 64
"""Largest image side (pixels) for which ResNets get the CIFAR stem."""

ENCODER_KEYS = ("arch", "cifar_stem", "maxpool", "proj_dim", "proj_layers", "proj_hidden", "image_size", "augment",
                "method")
"""The ``cfg`` keys that define an encoder and the input it expects: the weights' shapes, the stem,
the augmentation preset whose normalisation statistics it was trained on, and the method (whether
there is a predictor). A checkpoint resumes and evaluates only with these unchanged; the one list of them."""

ENCODER_DEFAULTS = {"maxpool": -1, "method": "simmer"}
"""What a key added to :data:`ENCODER_KEYS` later means in the configs of older checkpoints."""


def _check_arch(arch: str) -> None:
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r} (see timm.list_models())")


@functools.lru_cache(maxsize=None)
def _meta_model(arch: str) -> nn.Module:
    """The architecture ``arch`` built on the meta device (no memory, no init cost)."""
    _check_arch(arch)
    with torch.device("meta"):
        return timm.create_model(arch, pretrained=False, num_classes=0)


def _is_resnet(arch: str) -> bool:
    return isinstance(_meta_model(arch), ResNet)


def use_cifar_stem(arch: str, image_size: int) -> bool:
    """Whether ``arch`` should get the CIFAR stem for images of side ``image_size``.

    True for timm ResNets (``timm.models.ResNet``: resnet18/34/50, resnet50d, resnext, ...) on
    images of :data:`CIFAR_STEM_MAX_SIZE` (64) pixels or less; False otherwise.

    Raises:
        ValueError: ``arch`` is not a timm model name.
    """
    return image_size <= CIFAR_STEM_MAX_SIZE and _is_resnet(arch)


def default_projector_layers(arch: str) -> int:
    """SimSiam's projector depth for ``arch``: 2 for basic-block ResNets (ResNet-18/34), else 3.

    Raises:
        ValueError: ``arch`` is not a timm model name.
    """
    model = _meta_model(arch)
    if isinstance(model, ResNet) and isinstance(model.layer1[0], BasicBlock):
        return 2
    return 3


def apply_cifar_stem(model: nn.Module) -> nn.Module:
    """Give a timm ResNet the CIFAR stem, in place: 3×3 stride-1 first conv, no max-pool.

    ``conv1`` becomes ``Conv2d(in, out, 3, stride=1, padding=1, bias=False)`` with the same
    channel counts (freshly initialised, as timm initialises convs), and ``maxpool`` becomes
    ``nn.Identity``, so a 32×32 input stays 32×32 through ``layer1``. For deep-stem ResNets
    (``resnet50d``, where ``conv1`` is a Sequential of three 3×3 convs) the first, stride-2
    conv of the stem is replaced by a stride-1 one. Parameter names are unchanged except that
    a single-conv stem keeps the name ``conv1.weight``, so a state_dict saved from a model with
    the stem loads into ``apply_cifar_stem(timm.create_model(name, num_classes=0))``.

    Returns:
        the same ``model``, for chaining.

    Raises:
        ValueError: ``model`` has no ``conv1``/``maxpool`` stem of that kind (not a ResNet).
    """
    conv = getattr(model, "conv1", None)
    if not hasattr(model, "maxpool") or conv is None:
        raise ValueError(
            f"the CIFAR stem needs a ResNet-style model with `conv1` and `maxpool`; "
            f"{type(model).__name__} has no such stem"
        )
    if isinstance(conv, nn.Conv2d):
        parent, name, old = model, "conv1", conv
    elif isinstance(conv, nn.Sequential) and len(conv) > 0 and isinstance(conv[0], nn.Conv2d):
        parent, name, old = conv, "0", conv[0]
    else:
        raise ValueError(
            f"the CIFAR stem needs `conv1` to be a Conv2d (or a Sequential starting with one); "
            f"got {type(conv).__name__}"
        )
    new = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    setattr(parent, name, new)
    model.maxpool = nn.Identity()
    return model


def build_backbone(arch: str, cifar_stem: bool, maxpool: bool | None = None) -> nn.Module:
    """A randomly initialised timm model returning pooled features (N, F).

    Args:
        arch: any timm model name (``resnet18``, ``resnet50``, ...).
        cifar_stem: replace the stem by the CIFAR one (:func:`apply_cifar_stem`).
        maxpool: keep (True) or remove (False) the stem's max-pool; None: removed with the CIFAR
            stem, kept otherwise. False alone is the paper's Mini-ImageNet ResNet-18 (§3.4).

    Returns:
        ``timm.create_model(arch, pretrained=False, num_classes=0)``, maybe with the CIFAR stem;
        ``.num_features`` is F.

    Raises:
        ValueError: unknown ``arch``, or ``cifar_stem`` on a model without a ResNet stem.
    """
    _check_arch(arch)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    if cifar_stem:
        apply_cifar_stem(model)
    if maxpool is not None:
        if not isinstance(getattr(model, "maxpool", None), nn.Module):
            raise ValueError(f"{arch} has no stem max-pool to {'keep' if maxpool else 'remove'}")
        model.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if maxpool else nn.Identity()
    return model


def build_projector(
    in_dim: int, hidden_dim: int | None = None, out_dim: int = 2048, num_layers: int = 2
) -> nn.Sequential:
    """SimSiam's projection MLP: (N, in_dim) -> (N, out_dim).

    ``num_layers − 1`` blocks of Linear(bias=False)–BatchNorm1d–ReLU, then
    Linear(bias=False)–BatchNorm1d(affine=False). ``hidden_dim`` defaults to ``in_dim``
    (SimSiam: F→F for ResNet-18 with 2 layers, 2048→2048 for ResNet-50 with 3).

    Raises:
        ValueError: ``num_layers < 1`` or a non-positive width.
    """
    hidden_dim = in_dim if hidden_dim is None else hidden_dim
    if num_layers < 1:
        raise ValueError(f"projector needs num_layers >= 1, got {num_layers}")
    if min(in_dim, hidden_dim, out_dim) < 1:
        raise ValueError(f"projector widths must be positive, got {in_dim=}, {hidden_dim=}, {out_dim=}")
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(width, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        width = hidden_dim
    layers += [nn.Linear(width, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=False)]
    return nn.Sequential(*layers)


def build_predictor(dim: int, hidden_dim: int | None = None) -> nn.Sequential:
    """SimSiam's prediction MLP: (N, dim) -> (N, dim).

    Linear(dim, hidden, bias=False)–BatchNorm1d–ReLU–Linear(hidden, dim); ``hidden_dim`` defaults
    to ``max(1, dim // 4)`` (SimSiam: 2048 -> 512 -> 2048).

    Raises:
        ValueError: a non-positive width.
    """
    hidden_dim = max(1, dim // 4) if hidden_dim is None else hidden_dim
    if min(dim, hidden_dim) < 1:
        raise ValueError(f"predictor widths must be positive, got {dim=}, {hidden_dim=}")
    return nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, dim))


class SimMEREncoder(nn.Module):
    """Backbone + projector (+ SimSiam's predictor). ``forward`` takes all views at once.

    Attributes:
        backbone: timm model with ``num_classes=0``: (N, 3, H, W) -> (N, F).
        projector: MLP (N, F) -> (N, D).
        predictor: MLP (N, D) -> (N, D), or None (every method but SimSiam).
        fp32_tail: under autocast, run the projector's last Linear and BatchNorm (and the
            predictor) in float32, so that z reaches the (float32) loss unrounded; the weights and
            their keys are unchanged.
        num_features: F.  out_dim: D.
    """

    def __init__(self, backbone: nn.Module, projector: nn.Module, fp32_tail: bool = True,
                 predictor: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.predictor = predictor
        self.fp32_tail = fp32_tail  # the projector's last Linear + BatchNorm in float32 under autocast
        self.num_features: int = int(getattr(backbone, "num_features"))
        last = [m for m in projector.modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d))][-1]
        self.out_dim: int = last.num_features if isinstance(last, nn.BatchNorm1d) else last.out_features

    @staticmethod
    def _flat(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        if x.ndim == 5:
            lead = tuple(x.shape[:2])
            x = x.flatten(0, 1)
        elif x.ndim == 4:
            lead = (x.shape[0],)
        else:
            raise ValueError(f"expected images (N, C, H, W) or views (K, B, C, H, W), got shape {tuple(x.shape)}")
        return x.contiguous(memory_format=torch.channels_last), lead

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features: (N, 3, H, W) -> (N, F), or (K, B, 3, H, W) -> (K, B, F)."""
        x, lead = self._flat(x)
        return self.backbone(x).reshape(*lead, -1)

    def forward(self, x: torch.Tensor, return_features: bool = False, predict: bool = False):
        """Representations z: (K, B, 3, H, W) -> (K, B, D), or (N, 3, H, W) -> (N, D).

        The K·B views go through the backbone and projector as one (K·B, 3, H, W) batch
        (view-major: ``z[k, b]`` is view k of image b, as the input). With ``predict`` (needs a
        predictor), returns ``(z, predictions)``, the predictor's outputs shaped like z; with
        ``return_features``, the pooled backbone features shaped like z ((K, B, F) or (N, F)) come
        last: ``(z, features)`` or ``(z, predictions, features)``.
        """
        if predict and self.predictor is None:
            raise ValueError("predict=True needs an encoder built with a predictor (cfg.method=simsiam)")
        x, lead = self._flat(x)
        features = self.backbone(x)
        z = self._project(features)
        outputs = [z.reshape(*lead, -1)]
        if predict:
            outputs.append(self._predict(z).reshape(*lead, -1))
        if return_features:
            outputs.append(features.reshape(*lead, -1))
        return tuple(outputs) if len(outputs) > 1 else outputs[0]

    def _predict(self, z: torch.Tensor) -> torch.Tensor:
        device = z.device.type
        if not (self.fp32_tail and torch.is_autocast_enabled(device)):
            return self.predictor(z)
        with torch.autocast(device, enabled=False):
            return self.predictor(z.float())

    def _project(self, features: torch.Tensor) -> torch.Tensor:
        device = features.device.type
        if not (self.fp32_tail and torch.is_autocast_enabled(device)):
            return self.projector(features)
        layers = list(self.projector)
        hidden = features
        for layer in layers[:-2]:
            hidden = layer(hidden)
        with torch.autocast(device, enabled=False):
            hidden = hidden.float()
            for layer in layers[-2:]:
                hidden = layer(hidden)
        return hidden


def build_encoder(
    arch: str,
    image_size: int,
    proj_dim: int = 2048,
    proj_layers: int | None = None,
    proj_hidden: int | None = None,
    cifar_stem: bool | None = None,
    maxpool: bool | None = None,
    fp32_tail: bool = True,
    predictor: bool = False,
) -> SimMEREncoder:
    """The SimMER encoder for ``arch`` on images of side ``image_size``, in channels-last.

    Args:
        arch: timm model name.
        image_size: side of the (augmented) training images; decides the stem.
        proj_dim: D, the projector's output width (2048).
        proj_layers: projector depth; None -> :func:`default_projector_layers` (2 for
            ResNet-18/34, 3 otherwise).
        proj_hidden: projector hidden width; None -> F (``backbone.num_features``).
        cifar_stem: force the stem choice; None -> :func:`use_cifar_stem`.
        maxpool: keep or remove the stem's max-pool; None -> as the stem decides.
        fp32_tail: the projector's last Linear + BatchNorm in float32 under autocast.
        predictor: add SimSiam's predictor (:func:`build_predictor`) on the projector's output.

    Raises:
        ValueError: unknown ``arch``; bad projector sizes; forced CIFAR stem on a non-ResNet.
    """
    _check_arch(arch)
    stem = use_cifar_stem(arch, image_size) if cifar_stem is None else cifar_stem
    layers = default_projector_layers(arch) if proj_layers is None else proj_layers
    backbone = build_backbone(arch, stem, maxpool)
    projector = build_projector(backbone.num_features, proj_hidden, proj_dim, layers)
    head = build_predictor(proj_dim) if predictor else None
    return SimMEREncoder(backbone, projector, fp32_tail, head).to(memory_format=torch.channels_last)


def stem_from_cfg(cfg: dict, image_size: int) -> tuple[bool, bool | None]:
    """``(cifar_stem, maxpool)`` that a config's ``cifar_stem`` and ``maxpool`` (-1 = automatic,
    also when a key predates it) choose for ``cfg['arch']`` on ``image_size``; maxpool None = as the stem decides."""
    stem, pool = cfg.get("cifar_stem", -1), cfg.get("maxpool", ENCODER_DEFAULTS["maxpool"])
    return (use_cifar_stem(cfg["arch"], image_size) if stem == -1 else bool(stem)), (None if pool == -1 else bool(pool))


def build_encoder_from_cfg(cfg: dict, image_size: int) -> SimMEREncoder:
    """:func:`build_encoder` from a config's ``cfg`` section (keys ``arch``, ``proj_dim``,
    ``proj_layers`` and ``proj_hidden`` (0 = default), ``cifar_stem`` and ``maxpool``
    (:func:`stem_from_cfg`), ``proj_fp32``, ``method`` (whether a predictor is needed: train.methods))."""
    cifar_stem, maxpool = stem_from_cfg(cfg, image_size)
    predictor = get_method(cfg.get("method", ENCODER_DEFAULTS["method"])).predictor
    return build_encoder(cfg["arch"], image_size, proj_dim=cfg["proj_dim"], proj_layers=cfg["proj_layers"] or None,
                         proj_hidden=cfg["proj_hidden"] or None, cifar_stem=cifar_stem, maxpool=maxpool,
                         fp32_tail=bool(cfg.get("proj_fp32", 1)), predictor=predictor)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module under a torch.compile / DDP wrapper."""
    while True:
        if isinstance(getattr(module, "_orig_mod", None), nn.Module):  # torch.compile
            module = module._orig_mod
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def backbone_state(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state_dict with timm's own keys (no ``_orig_mod.`` / ``module.`` prefixes).

    ``encoder`` is a :class:`SimMEREncoder` (possibly compiled or DDP-wrapped) or a backbone.
    Tensors are detached, contiguous and on CPU.
    """
    module = _unwrap(encoder)
    backbone = _unwrap(module.backbone) if isinstance(module, SimMEREncoder) else module
    return {k: v.detach().to("cpu").contiguous() for k, v in backbone.state_dict().items()}
