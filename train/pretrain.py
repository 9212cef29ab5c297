"""SimMER pretraining: ``python train/pretrain.py --cfg.K=10``.

The defaults are the paper's CIFAR-10 run (ResNet-18 with the CIFAR stem, B=512, K=4, 800 epochs,
Adam 1e-3·B/256, wd 1e-6, cosine, alpha_H=0.1, alpha_R=2e-4, nuclear) on
``data/cifar10_{train,test}.beton``. Configs in ``configs/`` (``-C configs/demo.yaml`` is a few
minutes on a CPU). Re-running the same command resumes the run in ``--run.dir``.
Multi-GPU: ``torchrun --nproc_per_node=N train/pretrain.py ...`` (``cfg.batch_size`` is global).
``--help`` lists every parameter; ``--run.dry_run=1`` prints the resolved config and exits.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from train.cluster import StopFlag  # noqa: E402  (no torch: imported in milliseconds)

if __name__ == "__main__":  # before the heavy imports, for the whole process: a signal at any moment is a clean stop
    _STOP = StopFlag().install()

import yaml  # noqa: E402

from core.config import DATA_READING, parse_config, run_cli  # noqa: E402
from train.trainer import pretrain, validate_config  # noqa: E402

SECTIONS = ("cfg", *DATA_READING, "run")  # not the conversion-only data.* flags of write_beton.py


def main(argv: list[str] | None = None, stop: StopFlag | None = None) -> dict:
    """Parses ``argv`` and pretrains; returns the final summary (or the config for a dry run).

    ``stop``: a signal flag installed earlier (the script's); else :func:`train.trainer.pretrain` installs one.
    """
    config = parse_config(argv, __doc__, SECTIONS)
    if config["run"]["dry_run"]:
        validate_config(config, check_files=False)
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return config
    return pretrain(config, stop)


if __name__ == "__main__":
    sys.exit(run_cli(functools.partial(main, stop=_STOP)))
