"""Live experiment tracking: TensorBoard (on by default) and Weights & Biases, fed the values of log.jsonl.

``log.jsonl`` stays the record; a :class:`Tracker` sends the same values to the loggers that
``run.logger`` names (``tensorboard``, ``wandb``, ``none``, or several: ``tensorboard,wandb``).
Only rank 0 tracks. Scalars are keyed by the optimiser step, so a resumed run continues the same
curves: TensorBoard drops the events that a killed run wrote after its last checkpoint
(``purge_step``), and W&B resumes the run whose id the checkpoint keeps (in offline mode too;
``wandb sync`` uploads it later).

TensorBoard files go to ``<run dir>/tensorboard`` (``tensorboard --logdir runs``); W&B files to
``<run dir>/wandb``.
"""
from __future__ import annotations

import secrets
from pathlib import Path

import torch

from core.config import ConfigError
from core.io import folder_problem

LOGGERS = ("tensorboard", "wandb", "none")


def parse_loggers(text: str) -> tuple[str, ...]:
    """``"tensorboard,wandb"`` -> ``("tensorboard", "wandb")``; ``"none"`` -> ``()``. Raises ConfigError."""
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in LOGGERS]
    if unknown or not names or ("none" in names and len(names) > 1):
        raise ConfigError(f"--run.logger={text!r} is invalid: expected one or more of tensorboard, wandb "
                          "(comma-separated), or none")
    return tuple(name for name in names if name != "none")


class Tracker:
    """Sends scalars, images and histograms to TensorBoard and/or W&B; does nothing without loggers."""

    def __init__(self, run_dir: Path, loggers: tuple[str, ...], config: dict, resume_step: int | None = None,
                 wandb_id: str | None = None, wandb_project: str = "simmer", wandb_mode: str = "online") -> None:
        self._tensorboard = self._wandb = None
        self.wandb_id = wandb_id
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            if (problem := folder_problem(run_dir / "tensorboard")) is not None:
                raise ConfigError(f"cannot write TensorBoard's files to {run_dir / 'tensorboard'} ({problem}); "
                                  "fix it, or pass --run.logger=none")
            purge = None if resume_step is None else resume_step + 1  # what a killed run logged after its checkpoint
            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
        if "wandb" in loggers:
            import wandb

            self.wandb_id = wandb_id or secrets.token_hex(4)  # W&B run ids: short, unique per project
            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self._wandb = wandb.init(project=wandb_project, id=self.wandb_id, resume="allow", dir=str(run_dir),
                                     name=run_dir.name, config=config, mode=wandb_mode)

    @property
    def active(self) -> bool:
        return self._tensorboard is not None or self._wandb is not None

    def scalars(self, values: dict[str, float], step: int) -> None:
        """``{"train/loss": 0.3, ...}`` at optimiser step ``step``."""
        if self._tensorboard is not None:
            for tag, value in values.items():
                self._tensorboard.add_scalar(tag, value, step)
        if self._wandb is not None:
            self._wandb.log(dict(values), step=step)

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """``image``: (3, H, W) float in [0, 1]."""
        if self._tensorboard is not None:
            self._tensorboard.add_image(tag, image, step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Image(image.permute(1, 2, 0).numpy())}, step=step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        if self._tensorboard is not None:
            self._tensorboard.add_histogram(tag, values, step)
        if self._wandb is not None:
            import wandb

            self._wandb.log({tag: wandb.Histogram(values.numpy())}, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def views_grid(images: torch.Tensor, views: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
               count: int = 8) -> torch.Tensor:
    """A picture of ``count`` images (top row) above their K augmented views, (3, H, W) in [0, 1].

    ``images``: uint8 (B, 3, H, W); ``views``: normalised (K, B, 3, h, w); ``mean``/``std``: the
    normalisation's (1, 3, 1, 1).
    """
    from torchvision.utils import make_grid

    count = min(count, images.shape[0])
    size = views.shape[-2:]
    originals = torch.nn.functional.interpolate(images[:count].float() / 255, size=size, mode="bilinear",
                                                align_corners=False)
    shown = (views[:, :count].float() * std.float() + mean.float()).clamp(0, 1)
    rows = torch.cat([originals[None], shown]).reshape(-1, 3, *size)
    return make_grid(rows.cpu(), nrow=count, padding=1)
