"""Live experiment tracking: TensorBoard (on by default) and Weights & Biases, fed the values of log.jsonl.

``log.jsonl`` stays the record; a :class:`Tracker` sends the same values to the loggers that
``run.logger`` names (``tensorboard``, ``wandb``, ``none``, or several: ``tensorboard,wandb``).
Only rank 0 tracks. Scalars are keyed by the optimiser step, so a resumed run continues the same
curves: TensorBoard drops the events that a killed run wrote after its last checkpoint
(``purge_step``), and W&B resumes the run whose id the checkpoint keeps (in offline mode too;
``wandb sync`` uploads it later). A fresh start drops what a run killed before its first
checkpoint wrote, so every step appears once.

Besides the curves, TensorBoard gets the run's hyperparameters (the hparams plugin, with the final
kNN and probe accuracies as its metrics) and the resolved config as text; W&B gets both as the
run's config. Both are told what the betons held (:func:`train.trainer.describe_betons`).

TensorBoard files go to ``<run dir>/tensorboard`` (``tensorboard --logdir runs``). W&B follows its
own environment variables where a flag is left empty: ``WANDB_MODE`` (else ``online``),
``WANDB_PROJECT`` (else ``simmer``), ``WANDB_DIR`` (else the run directory: ``<run dir>/wandb``),
``WANDB_NAME`` (else the run directory's name), ``WANDB_RUN_ID`` (for a fresh run), and the ones
wandb reads by itself (``WANDB_ENTITY``, ``WANDB_API_KEY``, ``WANDB_BASE_URL``, ``WANDB_TAGS``, ...).
"""
from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import torch

from core.config import ConfigError, UserError, flatten
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


def wandb_mode(flag: str) -> str:
    """``run.wandb_mode``, else ``WANDB_MODE``, else ``online``."""
    return flag or os.environ.get("WANDB_MODE") or "online"


def check_wandb_login(flag_mode: str) -> None:
    """Raises :class:`ConfigError` (one line, no network) when W&B would run online without credentials:
    no ``WANDB_API_KEY``, no ``WANDB_IDENTITY_TOKEN_FILE``, no ``.netrc`` entry for the W&B host."""
    mode = wandb_mode(flag_mode)
    if mode not in ("online", "run") or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc")
    try:
        if netrc.netrc(path).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError(f"W&B is online (WANDB_MODE / --run.wandb_mode) but has no credentials for {host}: run "
                      "`wandb login` or set WANDB_API_KEY, or track offline (WANDB_MODE=offline or "
                      "--run.wandb_mode=offline; `wandb sync` uploads later)")


class TrackerError(UserError):
    """A logger could not start."""


class Tracker:
    """Sends scalars, images, histograms, text and hyperparameters to TensorBoard and/or W&B; does
    nothing without loggers. ``betons`` (what the data held) joins the config they are told."""

    def __init__(self, run_dir: Path, loggers: tuple[str, ...], config: dict, resume_step: int | None = None,
                 wandb_id: str | None = None, wandb_project: str = "", wandb_mode: str = "",
                 betons: dict | None = None) -> None:
        self._tensorboard = self._wandb = None
        self.wandb_id = wandb_id
        self.betons = betons
        self._config = {**config, "betons": betons} if betons else dict(config)
        if "wandb" in loggers:  # first: when it cannot start, no TensorBoard file is left behind
            self._wandb = self._start_wandb(run_dir, wandb_id, wandb_project, wandb_mode)
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            if (problem := folder_problem(run_dir / "tensorboard")) is not None:
                raise ConfigError(f"cannot write TensorBoard's files to {run_dir / 'tensorboard'} ({problem}); "
                                  "fix it, or pass --run.logger=none")
            # what a killed run logged after its checkpoint, or before its first one (a fresh start: from step 0)
            purge = 0 if resume_step is None else resume_step + 1
            try:
                self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)
            except OSError as error:
                self.close()
                raise TrackerError(f"TensorBoard cannot write to {run_dir / 'tensorboard'}: {error.strerror}") from None
            self._tensorboard.add_text("config", _as_markdown(self._config), purge)
            self._write_hparams()

    def _start_wandb(self, run_dir: Path, wandb_id: str | None, project: str, mode: str):
        import wandb

        env = os.environ
        self.wandb_id = wandb_id or env.get("WANDB_RUN_ID") or secrets.token_hex(4)  # short, unique per project
        folder = Path(env.get("WANDB_DIR") or run_dir)
        try:
            (folder / "wandb").mkdir(parents=True, exist_ok=True)
            return wandb.init(project=project or env.get("WANDB_PROJECT") or "simmer", id=self.wandb_id,
                              resume="allow", dir=str(folder), name=env.get("WANDB_NAME") or run_dir.name,
                              config=self._config, mode=wandb_mode(mode))
        except Exception as error:  # wandb raises its own errors (no network, bad key, ...): one line
            detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TrackerError(f"W&B could not start ({detail}); track offline with WANDB_MODE=offline, or use "
                               "--run.logger=tensorboard") from None

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

    def text(self, tag: str, text: str, step: int) -> None:
        """A note (e.g. a collapse warning) at ``step``: TensorBoard's text tab, a W&B string."""
        if self._tensorboard is not None:
            self._tensorboard.add_text(tag, text, step)
        if self._wandb is not None:
            self._wandb.log({tag: text}, step=step)

    def _write_hparams(self) -> None:
        """The config (and betons) as TensorBoard hyperparameters; the metrics are the final values of
        the ``epoch/`` accuracy curves, which the hparams plugin reads from this run's scalars."""
        from torch.utils.tensorboard.summary import hparams

        flat = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                for key, value in flatten(self._config).items()}
        for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
            self._tensorboard.file_writer.add_summary(summary)

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


HPARAM_METRICS = ("epoch/knn_top1", "epoch/knn_top5", "epoch/probe_test_top1", "epoch/probe_train_top1")


def _as_markdown(config: dict) -> str:
    """The config as YAML in a markdown code block (TensorBoard's text tab renders markdown)."""
    import yaml

    return "\n".join("    " + line for line in yaml.safe_dump(config, sort_keys=False).splitlines())


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
