"""The paper's tables, run and compared: ``python bench/paper_tables.py --tables.table=4``.

    python bench/paper_tables.py --tables.dry_run=1                 # every row and its commands
    python bench/paper_tables.py --tables.table=1                   # CIFAR-10, K=10 (92.61 %)
    python bench/paper_tables.py --tables.table=4 --tables.nproc=8  # each pretraining under torchrun

Tables: 1 (CIFAR-10 ResNet-18 K=10, linear), 2 (Mini-ImageNet ResNet-50, linear), 3 (Mini-ImageNet
ResNet-18, 40-shot fine-tune), 4 (hyperparameter ablations, 12 rows) and 5 (rank-term variants,
5 rows). Each row is a config in ``configs/``; an ablation is an overlay in ``configs/ablations/``
read after its base (``-C configs/cifar10_r18_k4.yaml -C configs/ablations/<row>.yaml``). The paper's
top-1 is the ``tables.paper_top1`` of the row's own YAML. For each row, one after another:
pretraining (``train/pretrain.py -C <yaml>...``, or ``torchrun --standalone --nproc_per_node=N ...``
when ``--tables.nproc`` > 1), then the linear
evaluation (``eval/linear.py``, SimSiam's protocol) or, for Table 3, ``eval/finetune.py`` on
``data/miniimagenet_train_40shot.beton``. The results land in ``--tables.out`` (markdown: paper
against measured top-1). Resumable: a row whose results JSON exists is not run again, a
pretraining resumes from its ``checkpoints/last.pt``, and rows that share a config (Table 4's base
and K=10 rows are Table 5's base and Table 1's row) are run once.

``--tables.dry_run=1`` resolves every config (as ``--run.dry_run=1`` would), lists the commands and
missing betons, and writes the markdown with what is already measured; it needs no beton and no GPU.
Paths are relative to the repository root, where the commands run; ``python`` is this interpreter.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repository root, not this folder
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.config import ConfigError, UserError, parse_config, run_cli  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("tables",)
TABLE_NAMES = ("1", "2", "3", "4", "5")
MISSING = "—"
BASE = "configs/cifar10_r18_k4.yaml"
K10 = "configs/cifar10_r18_k10.yaml"
SHOTS_BETON = "data/miniimagenet_train_40shot.beton"
BETON_HINTS = {  # how to write a missing beton, by the start of its file name
    "cifar10_": "python data_prep/write_beton.py",
    "miniimagenet_": "python data_prep/write_beton.py --data.dataset=miniimagenet --data.root=PATH --data.shots=40",
}


@dataclass(frozen=True)
class Row:
    """One row of a paper table: a config in ``configs/`` and how its encoder is evaluated."""
    table: str  # "1" .. "5"
    setting: str  # what the row changes, as the paper's table shows it
    config: str  # YAML path relative to the repository root; holds the row's ``tables.paper_top1``
    protocol: str = "linear"  # "linear" (eval/linear.py) or "finetune" (eval/finetune.py)
    eval_args: tuple[str, ...] = ()  # extra flags of the evaluation command
    base: str | None = None  # the config that ``config`` overlays (read first), if any

    @property
    def configs(self) -> tuple[str, ...]:
        return (self.config,) if self.base is None else (self.base, self.config)

    def config_args(self, root: Path | None = None) -> list[str]:
        """``-C`` for each config, base first; paths under ``root`` when given."""
        return [arg for path in self.configs for arg in ("-C", str(root / path) if root else path)]




def _ablation(table: str, setting: str, name: str) -> Row:
    return Row(table, setting, f"configs/ablations/{name}.yaml", base=BASE)


# The paper's row order; the paper's numbers are each YAML's ``tables.paper_top1``.
ROWS = (
    Row("1", "ResNet-18, K=10, linear", K10),
    Row("2", "ResNet-50, linear", "configs/miniimagenet_r50.yaml"),
    Row("3", "ResNet-18, 40-shot fine-tune", "configs/miniimagenet_r18.yaml", "finetune",
        (f"--data.train_beton={SHOTS_BETON}",)),
    Row("4", "base: alpha_h=0.1, alpha_r=2e-4, K=4, B=512", BASE),
    _ablation("4", "alpha_h=0", "table4_alpha_h_0"),
    _ablation("4", "alpha_h=1", "table4_alpha_h_1"),
    _ablation("4", "alpha_h=10", "table4_alpha_h_10"),
    _ablation("4", "alpha_r=0", "table4_alpha_r_0"),
    _ablation("4", "alpha_r=2e-5", "table4_alpha_r_2e-5"),
    _ablation("4", "alpha_r=2e-2", "table4_alpha_r_2e-2"),
    Row("4", "K=10", K10),
    _ablation("4", "K=3", "table4_k_3"),
    _ablation("4", "B=64", "table4_b_64"),
    _ablation("4", "B=128", "table4_b_128"),
    _ablation("4", "alpha_h=0, alpha_r=0 (collapse)", "table4_alpha_h_0_alpha_r_0"),
    Row("5", "R2 nuclear, alpha_r=2e-4 (base)", BASE),
    _ablation("5", "R1 tlsm, alpha_r=2e-3", "table5_tlsm"),
    _ablation("5", "R3 nuclear/spectral, alpha_r=2e-3", "table5_nuclear_spectral"),
    _ablation("5", "R4 nuclear/Frobenius, alpha_r=2e-3", "table5_nuclear_frobenius"),
    _ablation("5", "R2 nuclear + bias column", "table5_nuclear_bias"),
)


@dataclass
class Plan:
    """A row resolved: its paper number, run directory, commands and results file."""
    row: Row
    paper_top1: float
    run_dir: str  # relative to the repository root, as the config gives it
    epochs: int  # pretraining epochs the config asks for
    results: str  # the evaluation's JSON, relative to the repository root
    commands: list[list[str]]  # pretraining, then evaluation
    inputs: list[str]  # betons the commands read
    measured_top1: float | None = None
    status: str = "not run"

    def to_dict(self) -> dict:
        return {"table": self.row.table, "setting": self.row.setting, "config": self.row.config,
                "configs": list(self.row.configs), "protocol": self.row.protocol, "paper_top1": self.paper_top1, "measured_top1": self.measured_top1,
                "difference": None if self.measured_top1 is None else self.measured_top1 - self.paper_top1,
                "status": self.status, "run_dir": self.run_dir, "results": self.results,
                "commands": [shlex.join(command) for command in self.commands]}


def select_rows(table: str) -> list[Row]:
    """The rows of table ``"1"`` .. ``"5"``, or of every table for ``"all"``."""
    choice = str(table).strip().lower()
    if choice not in (*TABLE_NAMES, "all"):
        raise ConfigError(f"--tables.table={table!r} is invalid: expected one of {', '.join(TABLE_NAMES)} or all")
    return [row for row in ROWS if choice in ("all", row.table)]


def paper_top1(config: Path) -> float:
    """The paper's top-1 (%): ``tables.paper_top1`` of ``config`` itself (an overlay does not inherit its base's)."""
    given: set[str] = set()
    value = parse_config(["-C", str(config)], "", SECTIONS, explicit=given)["tables"]["paper_top1"]
    if "tables.paper_top1" not in given or not 0 < value <= 100:
        raise ConfigError(f"{config}: needs the paper's top-1 in percent, e.g. 'tables: {{paper_top1: 92.44}}'")
    return value


def resolve(row: Row, nproc: int = 1) -> Plan:
    """Resolves ``row``'s configs as ``train/pretrain.py --run.dry_run=1`` does (in process, quietly).

    Raises :class:`ConfigError` when the config is missing or invalid, or the batch does not split
    over ``nproc`` processes.
    """
    from eval.common import EVAL_SECTIONS
    from train.pretrain import main as pretrain_main

    paper = paper_top1(REPO / row.config)
    config_args = row.config_args(REPO)
    with contextlib.redirect_stdout(io.StringIO()):
        config = pretrain_main([*config_args, "--run.dry_run=1"])
    batch = config["cfg"]["batch_size"]
    if batch % nproc or batch // nproc < 2:
        raise ConfigError(f"{row.config}: cfg.batch_size={batch} does not split into >= 2 images on each of {nproc} GPUs")
    run_dir = config["run"]["dir"]
    results = f"{run_dir}/eval_{'finetune' if row.protocol == 'finetune' else 'linear_augment'}.json"
    launcher = ["python"] if nproc == 1 else ["torchrun", "--standalone", f"--nproc_per_node={nproc}"]
    pretrain = [*launcher, "train/pretrain.py", *row.config_args()]
    eval_flags = [f"--eval.checkpoint={run_dir}/checkpoints/last.pt", *row.eval_args, f"--eval.out={results}"]
    evaluate = ["python", f"eval/{row.protocol}.py", *row.config_args(), *eval_flags]
    eval_config = parse_config([*config_args, *eval_flags], "", (*EVAL_SECTIONS, row.protocol))  # resolves too
    inputs = [config["data"]["train_beton"], config["data"]["test_beton"], eval_config["data"]["train_beton"]]
    return Plan(row, paper, run_dir, config["cfg"]["epochs"], results, [pretrain, evaluate], list(dict.fromkeys(inputs)))


def read_top1(path: Path) -> float | None:
    """Top-1 in percent from an evaluation JSON (``{"top1": 0.9244, ...}``), or None if absent or unreadable."""
    try:
        return 100.0 * float(json.loads(path.read_text())["top1"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def pretraining_complete(run_dir: Path, epochs: int) -> bool:
    """True when ``run_dir/summary.json`` reports a pretraining that finished ``epochs`` epochs.

    An interrupted run (Ctrl-C, ``--run.stop_after_epochs``) exits 0 without writing it.
    """
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        return not summary.get("interrupted") and int(summary["epochs_done"]) >= epochs
    except (OSError, ValueError, KeyError, TypeError):
        return False


def render_markdown(plans: list[Plan]) -> str:
    """The markdown table: table, row, config, paper and measured top-1, difference, status."""
    lines = ["# SimMER: the paper's tables, measured", "",
             "Top-1 (%) on the test set: linear evaluation (SimSiam's protocol), Table 3 fine-tuned on 40 labels "
             "per class. Produced by `python bench/paper_tables.py`.", "",
             "| Table | Row | Config | Paper top-1 | Measured top-1 | Difference | Status |",
             "|---|---|---|---:|---:|---:|---|"]
    for plan in plans:
        measured = MISSING if plan.measured_top1 is None else f"{plan.measured_top1:.2f}"
        difference = MISSING if plan.measured_top1 is None else f"{plan.measured_top1 - plan.paper_top1:+.2f}"
        lines.append(f"| {plan.row.table} | {plan.row.setting} | `{plan.row.config}` | {plan.paper_top1:.2f} "
                     f"| {measured} | {difference} | {plan.status} |")
    return "\n".join(lines) + "\n"


def write_text(path: Path, text: str) -> None:
    """Writes ``text`` atomically (a temporary file renamed over ``path``)."""
    from core.io import atomic_write

    atomic_write(path, lambda handle: handle.write(text), binary=False)


def _executable(command: list[str]) -> list[str]:
    """``python`` becomes this interpreter, ``torchrun`` the one beside it (or ``-m torch.distributed.run``)."""
    if command[0] == "python":
        return [sys.executable, *command[1:]]
    if command[0] == "torchrun":
        torchrun = Path(sys.executable).parent / "torchrun"
        return [str(torchrun) if torchrun.exists() else sys.executable,
                *([] if torchrun.exists() else ["-m", "torch.distributed.run"]), *command[1:]]
    return command


def run_command(command: list[str]) -> int:
    """Runs ``command`` in the repository root; on Ctrl-C lets it finish its checkpoint, then re-raises."""
    environment = {**os.environ, "NUMBA_THREADING_LAYER": os.environ.get("NUMBA_THREADING_LAYER", "omp"),
                   "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(_executable(command), cwd=REPO, env=environment)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.wait()  # the child got the same SIGINT: pretraining writes a mid-epoch checkpoint and exits
        raise


def execute(plan: Plan) -> None:
    """Pretrains (or resumes) and evaluates one row; sets ``plan.measured_top1`` and ``plan.status``."""
    pretrain, evaluate = plan.commands
    for command, stage in ((pretrain, "pretraining"), (evaluate, "evaluation")):
        print(f"[table {plan.row.table} | {plan.row.setting}] $ {shlex.join(command)}", flush=True)
        code = run_command(command)
        if code != 0:
            plan.status = f"failed: {stage} exit {code}"
            return
        if stage == "pretraining" and not pretraining_complete(REPO / plan.run_dir, plan.epochs):
            plan.status = "pretraining incomplete (re-run to resume)"
            return
    plan.measured_top1 = read_top1(REPO / plan.results)
    plan.status = "measured" if plan.measured_top1 is not None else f"failed: no top-1 in {plan.results}"


def missing_inputs(plan: Plan) -> list[str]:
    return [path for path in plan.inputs if not (REPO / path).is_file()]


def describe(plan: Plan, shared_with: str | None) -> str:
    lines = [f"Table {plan.row.table} | {plan.row.setting} | {' + '.join(plan.row.configs)} | paper {plan.paper_top1:.2f} %"
             f" | {plan.status}"]
    if shared_with:
        lines.append(f"  same run as {shared_with}")
    lines += [f"  $ {shlex.join(command)}" for command in plan.commands]
    return "\n".join(lines)


def describe_missing(paths: list[str]) -> str:
    """The missing betons, grouped by the command that writes them."""
    groups: dict[str, list[str]] = {}
    for path in paths:
        hint = next((text for prefix, text in BETON_HINTS.items() if Path(path).name.startswith(prefix)),
                    "see the README's 'Data' section")
        groups.setdefault(hint, []).append(path)
    return "\n".join(f"  {', '.join(group)}: {hint}" for hint, group in groups.items())


def run_plans(plans: list[Plan], out: Path) -> None:
    """Runs the rows not measured yet, one after another; ``out`` is rewritten after each row.

    Rows that share a config share its run: it is pretrained and evaluated once.
    """
    first_of: dict[tuple[str, ...], Plan] = {}
    try:
        for plan in plans:
            earlier = first_of.setdefault(plan.row.configs, plan)
            if earlier is not plan:
                plan.measured_top1, plan.status = earlier.measured_top1, earlier.status
            elif plan.measured_top1 is not None:
                print(f"[table {plan.row.table} | {plan.row.setting}] done: {plan.measured_top1:.2f} % ({plan.results})",
                      flush=True)
            else:
                execute(plan)
            write_text(out, render_markdown(plans))
    finally:  # also on Ctrl-C: what is measured so far
        write_text(out, render_markdown(plans))


def main(argv: list[str] | None = None) -> dict:
    """Parses ``argv``; lists (dry run) or runs the selected tables' rows; writes and returns the results."""
    given: set[str] = set()
    options = parse_config(argv, __doc__, SECTIONS, explicit=given)["tables"]
    if "tables.paper_top1" in given:
        raise ConfigError("tables.paper_top1 belongs in a row's config (configs/*.yaml), not to bench/paper_tables.py")
    rows = select_rows(options["table"])
    out = Path(options["out"])
    if not out.name or out.is_dir():
        raise ConfigError(f"--tables.out={options['out']!r} must name a markdown file")
    dry_run = bool(options["dry_run"])
    plans = [resolve(row, options["nproc"]) for row in rows]  # every config resolves before any work
    for plan in plans:
        plan.measured_top1 = read_top1(REPO / plan.results)
        plan.status = "measured" if plan.measured_top1 is not None else ("planned" if dry_run else "not run")
    missing = sorted({path for plan in plans if plan.measured_top1 is None for path in missing_inputs(plan)})

    if dry_run:
        first_of: dict[tuple[str, ...], Plan] = {}
        for plan in plans:
            earlier = first_of.setdefault(plan.row.configs, plan)
            print(describe(plan, None if earlier is plan else f"Table {earlier.row.table} ({earlier.row.setting})"))
        if missing:
            print(f"missing betons (write them before a real run):\n{describe_missing(missing)}")
        write_text(out, render_markdown(plans))
        print(f"{len(plans)} row(s), {len(first_of)} distinct run(s); every config resolves. -> {out}")
    else:
        if missing:
            raise UserError(f"missing beton(s): {', '.join(missing)}; write them first (--tables.dry_run=1 shows how)")
        run_plans(plans, out)
        print(render_markdown(plans), end="")
        print(f"-> {out}")

    failed = [plan for plan in plans if plan.measured_top1 is None]
    if failed and not dry_run:
        raise UserError(f"{len(failed)} of {len(plans)} row(s) not measured: "
                        + "; ".join(f"table {plan.row.table} {plan.row.setting} ({plan.status})" for plan in failed))
    return {"rows": [plan.to_dict() for plan in plans], "out": str(out), "dry_run": dry_run}


if __name__ == "__main__":
    sys.exit(run_cli(main))
