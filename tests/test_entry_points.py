"""Every command: installed as a console script, and the one error policy — a user error is one line and exit
status 2, a bug keeps its traceback."""

import errno
import os
import subprocess
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from hidream_ft import cli
from hidream_ft.config import ConfigError
from hidream_ft.convert.__main__ import main as convert_main
from hidream_ft.data.demo import write_demo_dataset
from hidream_ft.data.pack import main as pack_main
from hidream_ft.errors import UserError
from hidream_ft.sample import main as sample_main
from hidream_ft.train import main as train_main

ROOT = Path(__file__).parents[1]
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_every_command_is_a_console_script():
    expected = {"hidream-ft-train", "hidream-ft-sample", "hidream-ft-convert", "hidream-ft-pack", "hidream-ft-submit",
                "hidream-ft-bench", "hidream-ft-demo", "hidream-ft-data-bench", "hidream-ft-plan"}
    assert expected <= set(SCRIPTS)
    installed = {script.name: script.value for script in entry_points(group="console_scripts")}
    assert {name: installed.get(name) for name in SCRIPTS} == SCRIPTS, "reinstall: pip install --no-deps -e ."


def test_every_console_script_answers_help():
    bin_dir = Path(sys.executable).parent  # the project's install line puts the scripts next to its python
    running = {}
    for name in SCRIPTS:
        script = bin_dir / name
        assert script.is_file(), f"{script} is not installed; reinstall with pip install --no-deps -e ."
        running[name] = subprocess.Popen([str(script), "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=ENV)
    for name, process in running.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.startswith("usage: "), f"{name}: {err[-2000:]}"
        if name == "hidream-ft-train":
            assert "--config" in out and "--set" in out


# The wrapper itself.

def failing(exception: BaseException):
    def main(argv):
        raise exception

    return main


def test_user_error_is_one_line_and_status_2(capsys):
    assert cli.run_main(failing(UserError("bad value\n  in two lines")), []) == 2
    assert one_error_line(capsys) == "error: bad value in two lines\n"


@pytest.mark.parametrize("error, message", [
    (OSError(errno.ENOSPC, "No space left on device"), "error: No space left on device\n"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"), "error: /runs/x: Permission denied\n"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/out"), "error: /ro/out: Read-only file system\n"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "given.toml"),
     "error: given.toml: No such file or directory\n"),
])
def test_environment_problems_name_the_path(capsys, error, message):
    assert cli.run_main(failing(error), ["--config", "given.toml"]) == 2
    assert one_error_line(capsys) == message


def test_missing_file_the_user_did_not_name_is_a_bug():
    with pytest.raises(FileNotFoundError):
        cli.run_main(failing(FileNotFoundError(errno.ENOENT, "No such file", "internal/state.json")), ["x.toml"])


def test_interrupt_is_status_130_without_output(capsys):
    assert cli.run_main(failing(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == ""


def test_bugs_propagate():
    with pytest.raises(KeyError):
        cli.run_main(failing(KeyError("deep")), [])
    assert cli.run_main(lambda argv: None, []) == 0
    assert cli.run_main(lambda argv: 3, []) == 3


# The commands.

def test_train_user_error_and_bug(tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.toml"
    config.write_text("[optim]\nlrr = 1\n")
    assert train_main(["--config", str(config)]) == 2
    assert "unknown key 'lrr'; did you mean 'lr'?" in one_error_line(capsys)

    def broken(*args, **kwargs):
        raise ValueError("a bug deep inside")

    monkeypatch.setattr("hidream_ft.config.training.build_table", broken)
    with pytest.raises(ValueError, match="a bug deep inside"):
        train_main(["--config", str(config)])


def test_a_bug_in_a_command_exits_1_with_its_traceback(tmp_path):
    """As a process: what the tests above show in-process, end to end."""
    config = tmp_path / "c.toml"
    config.write_text("")
    code = ("import sys, hidream_ft.config.training as training\n"
            "def broken(*args, **kwargs):\n    raise ValueError('a bug deep inside')\n"
            "training.build_table = broken\n"
            "from hidream_ft.train import main\n"
            f"sys.exit(main(['--config', {str(config)!r}]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ValueError: a bug deep inside" in result.stderr


def test_convert_user_error_and_bug(tmp_path, capsys, monkeypatch):
    assert convert_main(["inspect", str(tmp_path / "missing")]) == 2
    assert "missing" in one_error_line(capsys)

    def broken(path):
        raise KeyError("a bug deep inside")

    monkeypatch.setattr("hidream_ft.convert.__main__.load_source", broken)
    with pytest.raises(KeyError, match="a bug deep inside"):
        convert_main(["inspect", str(tmp_path / "missing")])


def test_sample_user_error_and_bug(tmp_path, capsys, monkeypatch):
    args = ["--model", str(tmp_path / "model"), "--prompt", "x", "--out", str(tmp_path / "x.png")]
    assert sample_main([*args, "--steps", "0"]) == 2
    assert "sampling.steps: steps must be ≥ 1" in one_error_line(capsys)

    def broken(self, where="sampling"):
        raise ValueError("a bug deep inside")

    monkeypatch.setattr("hidream_ft.config.sampling.SamplingSettings.validate", broken)
    with pytest.raises(ValueError, match="a bug deep inside"):
        sample_main(args)


def test_pack_user_errors_and_bug(tmp_path, capsys, monkeypatch):
    out = tmp_path / "shards"
    assert pack_main([str(tmp_path / "nowhere"), str(out), "--shard-size", "2"]) == 2
    assert "is not a directory" in one_error_line(capsys)
    source = write_demo_dataset(tmp_path / "data", n=2, size=(64, 64))
    assert pack_main([str(source), str(out), "--shard-size", "2"]) == 0
    capsys.readouterr()
    assert pack_main([str(source), str(out), "--shard-size", "2"]) == 2
    assert "pass --overwrite" in one_error_line(capsys)

    def broken(*args, **kwargs):
        raise KeyError("a bug deep inside")

    monkeypatch.setattr("hidream_ft.data.pack.scan_folder", broken)
    with pytest.raises(KeyError, match="a bug deep inside"):
        pack_main([str(source), str(out), "--shard-size", "2", "--overwrite"])
    with pytest.raises(ConfigError):  # the library function keeps raising; only the command prints
        from hidream_ft.data.pack import pack
        pack(tmp_path / "nowhere", out, 2)
