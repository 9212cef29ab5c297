"""core.io: atomic writes."""
from __future__ import annotations

import os
import re

import pytest

from core.io import atomic_write


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_gives_the_mode_a_plain_open_gives(tmp_path, umask):
    previous = os.umask(umask)
    try:
        atomic_write(tmp_path / "atomic.bin", lambda handle: handle.write(b"x"))
        with open(tmp_path / "plain.bin", "wb") as handle:
            handle.write(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "atomic.bin").stat().st_mode & 0o777 == (tmp_path / "plain.bin").stat().st_mode & 0o777
    assert (tmp_path / "atomic.bin").stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    path = tmp_path / "kept.json"
    path.write_text("{}")
    os.chmod(path, 0o640)
    atomic_write(path, lambda handle: handle.write("[]"), binary=False)
    assert path.read_text() == "[]" and path.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["kept.json"]  # no temporary file left


def test_a_log_line_that_is_json_but_not_a_record_is_one_error_naming_file_and_line(tmp_path):
    from core.config import UserError
    from core.io import read_jsonl

    path = tmp_path / "log.jsonl"
    for lines, number in (('{"epoch": 1}\n42\n{"epoch": 2}\n', 2), ('{"epoch": 1}\n[1, 2]\n', 2), ('"text"\n', 1)):
        path.write_text(lines)
        with pytest.raises(UserError, match=f"^{path}:{number}: a JSON (int|list|str), not a record"):
            read_jsonl(path)
    path.write_text('{"epoch": 1}\n{"epo')  # a torn last line is still only a warning
    with pytest.warns(UserWarning, match="last line is incomplete"):
        assert read_jsonl(path) == [{"epoch": 1}]


LONG = "n" * 256  # one byte over what a file or folder name may hold


@pytest.mark.parametrize("tool", ["write_beton_out_dir", "write_beton_shots_file", "knn_out", "export_out",
                                  "export_run_dir", "pretrain_run_dir"])
def test_a_name_over_255_bytes_is_one_line_before_any_work(betons, tmp_path, capsys, monkeypatch, tool):
    import eval.knn
    import train.export
    from core.config import run_cli
    from data_fixtures import tiny_args

    def no_work(*args, **kwargs):
        raise AssertionError("the work began before the name was refused")
    monkeypatch.setattr(eval.knn, "evaluate_knn", no_work)
    monkeypatch.setattr(train.export, "atomic_write", no_work)

    if tool.startswith("write_beton"):
        from data_prep.write_beton import main
        argv = ["--data.dataset=synthetic", "--data.synthetic_train=20", "--data.synthetic_test=10",
                "--data.num_workers=1", f"--data.out_dir={tmp_path / (LONG if tool.endswith('out_dir') else 'out')}"]
        if tool.endswith("shots_file"):
            (tmp_path / f"{'s' * 240}.txt").write_text("0\n1\n")  # a legal name; the beton named after it is not
            argv.append(f"--data.shots_file={tmp_path / ('s' * 240)}.txt")
    elif tool == "knn_out":
        from eval.knn import main
        argv = ["--eval.checkpoint=random", "--cfg.arch=test_resnet", "--eval.device=cpu", "--eval.progress=0",
                f"--data.train_beton={betons['train']}", f"--data.test_beton={betons['test']}",
                f"--eval.out={tmp_path / LONG}.json"]
    elif tool.startswith("export"):
        from train.export import main
        argv = [str(tmp_path / "run"), "--out", str(tmp_path / LONG)] if tool == "export_out" else [str(tmp_path / LONG)]
    else:
        from train.pretrain import main
        argv = tiny_args(betons, tmp_path / LONG / "run")
    before = sorted(tmp_path.rglob("*"))
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(r"the name '\w+\.\.\.\w+(\.json|\.beton)?' is 2[56]\d bytes long; file systems allow 255", err), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written: no beton, no folder, no temporary


def test_an_os_error_of_the_machine_is_one_line_and_a_bug_keeps_its_traceback(capsys):
    import errno

    from core.config import run_cli

    def no_permission(argv):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), b"/somewhere/events.out")

    assert run_cli(no_permission, []) == 2
    assert capsys.readouterr().err == "error: cannot write or read /somewhere/events.out: Permission denied\n"

    def a_bug(argv):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")

    assert run_cli(a_bug, []) == 1 and "Traceback" in capsys.readouterr().err
