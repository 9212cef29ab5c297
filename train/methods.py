"""What each self-supervised method needs: its loss, the loss's options, its logged parts, a predictor.

The one place that tells the methods of ``--cfg.method`` apart (the names: ``core.choices.METHODS``).
Everything else is shared: betons, K-view augmentation, encoder (backbone + SimSiam projector),
optimiser and schedule, monitors and evaluation; the training step (train.trainer.TrainStep) is one
path for all of them::

    method = get_method(cfg["method"])
    total, parts = method.loss(z, **method.options(cfg))            # z: (K, B, D)
    total, parts = method.loss(z, predictions, **method.options(cfg))  # method.predictor: SimSiam

``parts`` holds scalar tensors named by ``method.parts``; the trainer logs ``loss`` (the total) and
then these, in this order (SimMER: ``tv``, ``entropy``, ``rank``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from core.choices import METHODS
from train.loss import barlow_twins_loss, nt_xent_loss, simmer_loss, simsiam_loss, vicreg_loss

__all__ = ["Method", "METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    """A self-supervised method in the shared pipeline."""

    name: str
    loss: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]  # z (K, B, D) [, predictions] -> (total, parts)
    parts: tuple[str, ...]  # the keys of the loss's parts, logged after the total
    options: Callable[[dict], dict]  # a config's ``cfg`` section -> the loss's keyword arguments
    predictor: bool = False  # the encoder gets SimSiam's predictor; the loss takes its outputs
    weights: tuple[str, ...] = ()  # the ``cfg`` keys of the loss's weights, named when a run goes wrong

    @property
    def log_names(self) -> tuple[str, ...]:
        """``loss`` and the parts: the names of the figures a training step returns."""
        return ("loss", *self.parts)

    def advice(self, first: str = "") -> str:
        """What to check when a run of this method diverges or collapses: ``first``, then its weights."""
        weights = " / ".join(f"cfg.{key}" for key in self.weights)
        return " or ".join(part for part in (first, f"check {weights}" if weights else "") if part)


def _simmer_options(cfg: dict) -> dict:
    return {"alpha_h": cfg["alpha_h"], "alpha_r": cfg["alpha_r"], "rank_variant": cfg["rank_variant"],
            "rank_bias": bool(cfg["rank_bias"]), "svd": cfg["svd"], "tv_reduction": cfg["tv_reduction"]}


def _vicreg_options(cfg: dict) -> dict:
    return {"sim_weight": cfg["vicreg_sim"], "var_weight": cfg["vicreg_var"], "cov_weight": cfg["vicreg_cov"]}


def _barlow_twins_options(cfg: dict) -> dict:
    return {"lambd": cfg["barlow_lambda"]}


def _simclr_options(cfg: dict) -> dict:
    return {"temperature": cfg["temperature"]}


def _no_options(cfg: dict) -> dict:
    return {}


_METHODS = {
    "simmer": Method("simmer", simmer_loss, ("tv", "entropy", "rank"), _simmer_options,
                     weights=("alpha_h", "alpha_r")),
    "vicreg": Method("vicreg", vicreg_loss, ("invariance", "variance", "covariance"), _vicreg_options,
                     weights=("vicreg_sim", "vicreg_var", "vicreg_cov")),
    "barlow_twins": Method("barlow_twins", barlow_twins_loss, ("on_diagonal", "off_diagonal"), _barlow_twins_options,
                           weights=("barlow_lambda",)),
    "simclr": Method("simclr", nt_xent_loss, ("positive", "logsumexp"), _simclr_options, weights=("temperature",)),
    "simsiam": Method("simsiam", simsiam_loss, ("z_std",), _no_options, predictor=True),
}


def get_method(name: str) -> Method:
    """The method called ``name`` (one of ``METHODS``). Raises ValueError for another name."""
    if name not in METHODS or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return _METHODS[name]
