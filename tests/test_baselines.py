"""Baselines in the same pipeline (``--cfg.method``): VICReg, Barlow Twins, SimCLR and SimSiam.

Each loss against a float64 reference written from its paper's formula (numpy, explicit loops),
for several K, B and D; gradients; float32 under bf16 autocast; no host sync on fake CUDA tensors;
the global batch under torch.distributed (2 gloo processes = 1 process); the config overlays; and
a short pretraining run per method on the tiny betons, with SimSiam's predictor resumed.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from baseline_workers import BASELINES, distributed_worker
from bench.step_trace import trace_device_regions
from core.choices import METHODS
from core.config import ConfigError
from data_fixtures import tiny_args
from distributed_helpers import free_port
from eval.knn import main as knn_main
from train.checkpoint import CheckpointError
from train.export import read_run
from train.loss import barlow_twins_loss, nt_xent_loss, simsiam_loss, vicreg_loss
from train.methods import get_method
from train.model import build_encoder
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "configs" / "cifar10_r18_k4.yaml"
SHAPES = ((2, 8, 5), (3, 6, 4), (4, 10, 7), (2, 5, 12))  # (K, B, D)


# ----------------------------------------------------------------------- float64 references
def _off_diagonal_sq(c: np.ndarray) -> float:
    return sum(c[i, j] ** 2 for i in range(c.shape[0]) for j in range(c.shape[1]) if i != j)


def _vicreg_pair(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    B, D = a.shape
    invariance = np.mean((a - b) ** 2)

    def variance(x):
        std = np.sqrt(np.var(x, axis=0, ddof=1) + 1e-4)
        return np.mean(np.maximum(0.0, 1.0 - std))

    def covariance(x):
        centred = x - x.mean(0)
        return _off_diagonal_sq(centred.T @ centred / (B - 1)) / D

    return invariance, variance(a) / 2 + variance(b) / 2, covariance(a) + covariance(b)


def _barlow_pair(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    B = a.shape[0]
    na = (a - a.mean(0)) / np.sqrt(a.var(0) + 1e-5)
    nb = (b - b.mean(0)) / np.sqrt(b.var(0) + 1e-5)
    c = na.T @ nb / B
    return sum((1 - c[i, i]) ** 2 for i in range(c.shape[0])), _off_diagonal_sq(c)


def _nt_xent_pair(a: np.ndarray, b: np.ndarray, temperature: float) -> tuple[float, float]:
    B = a.shape[0]
    e = np.concatenate([a, b])
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    positive, logsumexp = [], []
    for m in range(2 * B):
        p = (m + B) % (2 * B)
        positive.append(-e[m] @ e[p] / temperature)
        logsumexp.append(math.log(sum(math.exp(e[m] @ e[n] / temperature) for n in range(2 * B) if n != m)))
    return float(np.mean(positive)), float(np.mean(logsumexp))


def _pair_mean(z: np.ndarray, pair_fn) -> np.ndarray:
    return np.mean([pair_fn(z[i], z[j]) for i, j in itertools.combinations(range(len(z)), 2)], axis=0)


def _simsiam_reference(z: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    K, B, _ = z.shape
    terms = []
    for i in range(K):
        for j in range(K):
            if i != j:
                cos = [p[i, b] @ z[j, b] / (np.linalg.norm(p[i, b]) * np.linalg.norm(z[j, b])) for b in range(B)]
                terms.append(-np.mean(cos))
    unit = z / np.linalg.norm(z, axis=2, keepdims=True)
    return float(np.mean(terms)), float(np.mean(unit.std(axis=1, ddof=1)))


def _z(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 1.5 + 0.3


# ------------------------------------------------------------------ the losses against them
@pytest.mark.parametrize("shape", SHAPES)
def test_vicreg_matches_the_official_formula(shape):
    z = _z(shape)
    weights = (25.0, 25.0, 1.0), (1.0, 2.0, 0.5)
    for sim, var, cov in weights:
        total, parts = vicreg_loss(z, sim, var, cov)
        invariance, variance, covariance = _pair_mean(z.numpy(), _vicreg_pair)
        torch.testing.assert_close(parts["invariance"].item(), invariance, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(parts["variance"].item(), variance, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(parts["covariance"].item(), covariance, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(total.item(), sim * invariance + var * variance + cov * covariance,
                                   rtol=1e-10, atol=1e-12)
    # a spread-out z (std > 1 in every dimension) has no variance penalty
    assert vicreg_loss(_z(shape) * 50)[1]["variance"].item() == 0.0


@pytest.mark.parametrize("shape", SHAPES)
def test_barlow_twins_matches_the_official_formula(shape):
    z = _z(shape, seed=1)
    for lambd in (0.0051, 0.5):
        total, parts = barlow_twins_loss(z, lambd)
        on, off = _pair_mean(z.numpy(), _barlow_pair)
        torch.testing.assert_close(parts["on_diagonal"].item(), on, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(parts["off_diagonal"].item(), off, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(total.item(), on + lambd * off, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_nt_xent_matches_simclrs_formula(shape):
    z = _z(shape, seed=2)
    for temperature in (0.5, 0.1):
        total, parts = nt_xent_loss(z, temperature)
        positive, logsumexp = _pair_mean(z.numpy(), lambda a, b, t=temperature: _nt_xent_pair(a, b, t))
        torch.testing.assert_close(parts["positive"].item(), positive, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(parts["logsumexp"].item(), logsumexp, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(total.item(), positive + logsumexp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_simsiam_matches_the_negative_cosine_over_ordered_pairs(shape):
    z, p = _z(shape, seed=3), _z(shape, seed=4)
    total, parts = simsiam_loss(z, p)
    expected, z_std = _simsiam_reference(z.numpy(), p.numpy())
    torch.testing.assert_close(total.item(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(parts["z_std"].item(), z_std, rtol=1e-10, atol=1e-12)
    same = z[:1].expand(shape)  # every view alike and p = z: the loss is -1 (the minimum)
    assert simsiam_loss(same, same)[0].item() == pytest.approx(-1.0, abs=1e-12)


def test_pair_losses_do_not_depend_on_the_order_of_images_or_views():
    z = _z((3, 8, 6), seed=5)
    image_order, view_order = torch.randperm(8, generator=torch.Generator().manual_seed(0)), torch.tensor([2, 0, 1])
    for loss in (vicreg_loss, barlow_twins_loss, nt_xent_loss):
        reference = loss(z)[0]
        torch.testing.assert_close(loss(z[:, image_order])[0], reference, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(loss(z[view_order])[0], reference, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ gradients and numerics
def test_gradients_match_finite_differences_on_float64():
    z = _z((3, 5, 4), seed=6).requires_grad_()
    for loss in (vicreg_loss, barlow_twins_loss, nt_xent_loss):
        assert torch.autograd.gradcheck(lambda x, f=loss: f(x)[0], (z,), eps=1e-6, atol=1e-5)
    p = _z((3, 5, 4), seed=7).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: simsiam_loss(z.detach(), x)[0], (p,), eps=1e-6, atol=1e-5)


def test_simsiam_stops_the_gradient_at_the_target():
    z, p = _z((2, 6, 4)).requires_grad_(), _z((2, 6, 4), seed=1).requires_grad_()
    simsiam_loss(z, p)[0].backward()
    assert z.grad is None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def _loss_and_leaf(method: str, z: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """The method's loss with its default options, and the input whose gradient it gives
    (z; for SimSiam, predictions made from z, since the target z gets none)."""
    if method != "simsiam":
        return (*get_method(method).loss(z), z)
    predictions = (z.detach() * 0.9 + 0.1).requires_grad_()
    return (*simsiam_loss(z, predictions), predictions)


@pytest.mark.parametrize("method", BASELINES)
def test_float32_under_bf16_autocast_with_finite_gradients(method):
    z = torch.randn(4, 16, 32, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, parts, leaf = _loss_and_leaf(method, z)
    assert total.dtype == torch.float32 and all(part.dtype == torch.float32 for part in parts.values())
    total.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad.float()).all()
    # a collapsed z (every row alike) still gives finite values and gradients
    total, _, leaf = _loss_and_leaf(method, torch.ones(2, 8, 16, requires_grad=True))
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(leaf.grad).all()


def test_errors_name_the_expected_shape():
    for loss in (vicreg_loss, barlow_twins_loss, nt_xent_loss):
        with pytest.raises(ValueError, match=r"K >= 2.*K=1"):
            loss(torch.randn(1, 8, 4))
        with pytest.raises(ValueError, match=r"B >= 2.*B=1"):
            loss(torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match=r"predictions must have z's shape \(2, 4, 3\)"):
        simsiam_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="unknown method 'byol'; expected one of simmer, vicreg"):
        get_method("byol")
    with pytest.raises(ConfigError, match=r"--cfg.method='byol' is invalid: expected one of simmer, vicreg"):
        pretrain_main(["--cfg.method=byol", "--run.dry_run=1"])


def test_every_declared_method_has_a_loss_and_its_parts():
    for name in METHODS:
        method = get_method(name)
        assert method.name == name and method.log_names[0] == "loss" and method.predictor == (name == "simsiam")
    assert get_method("simmer").log_names == ("loss", "tv", "entropy", "rank")  # SimMER's log keys are unchanged


@pytest.mark.parametrize("flags, options", [
    (("--cfg.method=vicreg", "--cfg.vicreg_sim=20", "--cfg.vicreg_var=30", "--cfg.vicreg_cov=2"),
     {"sim_weight": 20.0, "var_weight": 30.0, "cov_weight": 2.0}),
    (("--cfg.method=barlow_twins", "--cfg.barlow_lambda=0.01"), {"lambd": 0.01}),
    (("--cfg.method=simclr", "--cfg.temperature=0.2"), {"temperature": 0.2}),
    (("--cfg.method=simsiam",), {}),
])
def test_the_methods_flags_reach_the_training_step(flags, options):
    from core.config import parse_config
    from train.trainer import build_training

    config = parse_config(["--cfg.arch=test_resnet", "--cfg.proj_dim=32", "--run.compile=0", *flags], "", ("cfg", "run"))
    step = build_training(config["cfg"], config["run"], torch.device("cpu"), 16).train_step
    assert step.loss_options == options and step.loss_names == get_method(config["cfg"]["method"]).log_names
    z = torch.randn(2, 8, 32)
    method = get_method(config["cfg"]["method"])
    arguments = (z, torch.randn(2, 8, 32)) if method.predictor else (z,)
    assert torch.equal(step.loss_fn(*arguments, **step.loss_options)[0], method.loss(*arguments, **options)[0])


def test_each_method_names_its_own_weights_when_a_run_goes_wrong():
    class Reads(dict):
        def __missing__(self, key):
            self.setdefault("read", set()).add(key)
            return 1
    for name in METHODS:
        method, cfg = get_method(name), Reads()
        method.options(cfg)
        assert set(method.weights) <= cfg.get("read", set())  # options the loss really takes
    assert get_method("simmer").advice("Lower cfg.lr") == "Lower cfg.lr or check cfg.alpha_h / cfg.alpha_r"
    assert get_method("barlow_twins").advice() == "check cfg.barlow_lambda"
    assert get_method("simsiam").advice("Lower cfg.lr") == "Lower cfg.lr"


# ------------------------------------------------------------------------ CUDA: no host sync
@pytest.mark.parametrize("method", BASELINES)
def test_the_step_of_each_method_makes_no_host_sync_on_cuda(method):
    trace = trace_device_regions("test_resnet", batch_size=32, K=2, proj_dim=64, image_size=16,
                                 extra=(f"--cfg.method={method}",))
    assert trace.syncs == []
    assert trace.launches["loss"] > 0 and trace.launches["forward"] > 0


# ----------------------------------------------------------------- distributed: global batch
@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed missing")
def test_two_gloo_processes_equal_one_process_on_the_whole_batch():
    import torch.multiprocessing as mp

    mp.spawn(distributed_worker, args=(2, free_port()), nprocs=2, join=True)


# --------------------------------------------------------------------------- model, configs
def test_the_predictor_is_simsiams_and_only_simsiam_has_one():
    encoder = build_encoder("test_resnet", 16, proj_dim=32, predictor=True)
    layers = [type(layer).__name__ for layer in encoder.predictor]
    assert layers == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (encoder.predictor[0].in_features, encoder.predictor[0].out_features, encoder.predictor[3].out_features) == (32, 8, 32)
    z, predictions, features = encoder(torch.randn(2, 4, 3, 16, 16), return_features=True, predict=True)
    assert z.shape == predictions.shape == (2, 4, 32) and features.shape[:2] == (2, 4)
    assert build_encoder("test_resnet", 16, proj_dim=32).predictor is None
    with pytest.raises(ValueError, match="needs an encoder built with a predictor"):
        build_encoder("test_resnet", 16, proj_dim=32)(torch.randn(4, 3, 16, 16), predict=True)


@pytest.mark.parametrize("method", BASELINES)
def test_each_baseline_overlay_resolves_over_the_cifar10_base(method):
    overlay = REPO / "configs" / "baselines" / f"{method}_cifar10_r18.yaml"
    with contextlib.redirect_stdout(io.StringIO()):
        config = pretrain_main(["-C", str(BASE), "-C", str(overlay), "--run.dry_run=1"])
        base = pretrain_main(["-C", str(BASE), "--run.dry_run=1"])
    assert config["cfg"]["method"] == method and config["cfg"]["K"] == 2
    assert config["run"]["dir"] == f"runs/baselines/{method}_cifar10_r18"
    # everything else is the base run's: same data, encoder, optimiser and schedule
    changed = {f"{s}.{k}" for s in ("cfg", "data", "run") for k in config[s] if config[s][k] != base[s][k]}
    assert changed == {"cfg.method", "cfg.K", "run.dir"}
    assert set(yaml.safe_load(overlay.read_text())) == {"cfg", "run"}


# ----------------------------------------------------------------------- pretraining, resume
@pytest.fixture(scope="module")
def runs(betons, tmp_path_factory) -> dict[str, Path]:
    """Two epochs of each baseline on the tiny betons (K=2, B=16, 6 steps an epoch, kNN monitor on)."""
    folder = tmp_path_factory.mktemp("baselines")
    for method in BASELINES:
        pretrain_main(tiny_args(betons, folder / method, f"--cfg.method={method}"))
    return {method: folder / method for method in BASELINES}


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", BASELINES)
def test_pretraining_logs_the_methods_parts_and_the_shared_monitors(runs, method):
    log = _log(runs[method])
    names = get_method(method).log_names
    assert [line["epoch"] for line in log] == [1, 2] and log[0]["loss"] != log[1]["loss"]
    for line in log:
        for key in (*names, "knn_top1", "probe_train_top1", "zbar_effective_rank", "zbar_std"):
            assert math.isfinite(line[key]), key
        assert not {"tv", "entropy", "rank"} & set(line)
        total = {"vicreg": 25 * line.get("invariance", 0) + 25 * line.get("variance", 0) + line.get("covariance", 0),
                 "barlow_twins": line.get("on_diagonal", 0) + 0.0051 * line.get("off_diagonal", 0),
                 "simclr": line.get("positive", 0) + line.get("logsumexp", 0)}.get(method)
        if total is not None:
            assert line["loss"] == pytest.approx(total, rel=1e-4, abs=1e-5)
        else:
            assert -1.0 <= line["loss"] <= 1.0
    checkpoint = torch.load(runs[method] / "checkpoints" / "last.pt", weights_only=False)
    assert any(key.startswith("predictor.") for key in checkpoint["model"]) == (method == "simsiam")
    assert (runs[method] / "backbone.pt").is_file()


def test_simsiam_resume_restores_the_predictor_and_evaluation_ignores_it(betons, runs, tmp_path):
    resumed = tmp_path / "resumed"
    first = pretrain_main(tiny_args(betons, resumed, "--cfg.method=simsiam", "--run.stop_after_epochs=1"))
    assert first["interrupted"]
    pretrain_main(tiny_args(betons, resumed, "--cfg.method=simsiam"))
    for straight, again in zip(_log(runs["simsiam"]), _log(resumed), strict=True):
        assert again["loss"] == pytest.approx(straight["loss"], rel=1e-6, abs=1e-7)
    weights = torch.load(runs["simsiam"] / "checkpoints" / "last.pt", weights_only=False)["model"]
    resumed_weights = torch.load(resumed / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert weights.keys() == resumed_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    # another method cannot resume it (its weights have no place for the predictor)
    with pytest.raises(CheckpointError, match="cfg.method: checkpoint 'simsiam' vs now 'simclr'"):
        pretrain_main(tiny_args(betons, resumed, "--cfg.method=simclr", "--cfg.epochs=3"))
    # evaluation and the export read the backbone alone
    results = knn_main([f"--eval.checkpoint={resumed / 'checkpoints' / 'last.pt'}", f"--data.train_beton={betons['train']}",
                        f"--data.test_beton={betons['test']}", "--eval.progress=0", "--data.num_workers=1",
                        "--eval.device=cpu", "--knn.k=10", f"--eval.out={tmp_path / 'knn.json'}"])
    assert results["top1"] == pytest.approx(_log(resumed)[-1]["knn_top1"])  # the monitor's figure (k=10 too)
    exported = read_run(resumed)
    assert set(exported.backbone.state_dict()) == {k.removeprefix("backbone.") for k in weights if k.startswith("backbone.")}

